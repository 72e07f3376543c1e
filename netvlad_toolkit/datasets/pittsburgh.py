"""dbStruct datasets (the NetVLAD authors' .mat files): Pittsburgh 30k/250k, Tokyo 24/7 and Tokyo Time Machine.

Fields are read by name, so both the 10-field Pittsburgh layout and the 12-field Tokyo layout (with dbTimeStamp,
qTimeStamp) load. The protocols follow the authors' dataset classes (dbPitts.m, dbTokyo247.m,
dbTokyoTimeMachine.m): Tokyo 24/7 ranks panoramas (12 consecutive database cutouts each), Tokyo Time Machine
takes training positives from another time, more than 1 m away, and removes database images of the query's time
from its ranking on val.
"""
import os
from collections import namedtuple

import numpy as np
import scipy.io

from netvlad_toolkit.utils.commons import UserError

REQUIRED_FIELDS = ['dbImageFns', 'utmDb', 'qImageFns', 'utmQ', 'posDistThr', 'nonTrivPosDistSqThr']
DbStruct = namedtuple('DbStruct', ['whichSet', 'dbImage', 'utmDb', 'qImage', 'utmQ', 'numDb', 'numQ',
                                   'posDistThr', 'posDistSqThr', 'nonTrivPosDistSqThr', 'dbTimeStamp', 'qTimeStamp'])
PITTSBURGH_FILES = {'train': 'pitts30k_train', 'val': 'pitts30k_val', 'test': 'pitts30k_test',
                    'train250k': 'pitts250k_train', 'val250k': 'pitts250k_val', 'test250k': 'pitts250k_test',
                    'tokyo247': 'tokyo247', 'tokyoTM_train': 'tokyoTM_train', 'tokyoTM_val': 'tokyoTM_val'}
TOKYO_TM_FILES = {'train': 'tokyoTM_train', 'val': 'tokyoTM_val', 'tokyoTM_train': 'tokyoTM_train',
                  'tokyoTM_val': 'tokyoTM_val', 'tokyo247': 'tokyo247'}
CUTOUTS_PER_PANORAMA = 12  # Tokyo 24/7 database: 12 consecutive cutouts of one panorama
TOKYO_TM_MIN_POSITIVE_DIST = 1.0  # metres (dbTokyoTimeMachine.m: dSq > 1)


def split_file(dataset, split):
    """The dbStruct file name (without .mat) of a split; a UserError for a split the dataset does not have."""
    files = TOKYO_TM_FILES if dataset == 'tokyoTM' else PITTSBURGH_FILES
    if split not in files:
        raise UserError(f'--dataset {dataset} has no split "{split}"; its splits are: {", ".join(files)}.')
    return files[split]


def struct_path(data_path, name):
    return os.path.join(data_path, 'datasets', name + '.mat')


def parse_db_struct(path):
    """Read the `dbStruct` of a .mat file by field name, checking every field the NetVLAD authors' dbBase needs."""
    if not os.path.isfile(path):
        raise UserError(f'Dataset file {path} does not exist. For the dbStruct datasets (--dataset pittsburgh, '
                        f'tokyoTM) --dataPath must hold datasets/<split>.mat (pitts30k_*.mat, pitts250k_*.mat, '
                        f'tokyo247.mat, tokyoTM_*.mat); see docs/datasets.md for where to get them. Another dataset '
                        f'is read with --dataset (synthetic, folder, msls).')
    try:
        struct = scipy.io.loadmat(path)['dbStruct']
        names = struct.dtype.names or ()
    except Exception as error:
        raise UserError(f'Dataset file {path} is not a MATLAB file holding a struct "dbStruct" '
                        f'({type(error).__name__}: {error}).') from None
    missing = [name for name in REQUIRED_FIELDS if name not in names]
    if missing:
        raise UserError(f'dbStruct in {path} has no field {", ".join(missing)}; it has {", ".join(names)}. A dbStruct '
                        f'needs {", ".join(REQUIRED_FIELDS)} (Tokyo files also dbTimeStamp, qTimeStamp).')
    field = lambda name: struct[name].ravel()[0]
    try:
        db_images = [_innermost(f) for f in np.asarray(field('dbImageFns'), dtype=object).ravel()]
        q_images = [_innermost(f) for f in np.asarray(field('qImageFns'), dtype=object).ravel()]
        utm_db = np.asarray(field('utmDb'), dtype=np.float64).reshape(2, -1).T
        utm_q = np.asarray(field('utmQ'), dtype=np.float64).reshape(2, -1).T
        pos_dist, non_trivial = (float(np.asarray(field(name)).ravel()[0])
                                 for name in ('posDistThr', 'nonTrivPosDistSqThr'))
        times = [np.asarray(field(name), dtype=np.float64).ravel() if name in names else None
                 for name in ('dbTimeStamp', 'qTimeStamp')]
    except (IndexError, TypeError, ValueError) as error:
        raise UserError(f'dbStruct in {path} does not have the NetVLAD layout ({error}); expected fields '
                        f'{", ".join(REQUIRED_FIELDS)} with 2xN UTM arrays.') from None
    if len(db_images) != len(utm_db) or len(q_images) != len(utm_q):
        raise UserError(f'dbStruct in {path}: {len(db_images)} database names for {len(utm_db)} UTM columns and '
                        f'{len(q_images)} query names for {len(utm_q)} UTM columns; the counts must match.')
    for name, values, count in (('dbTimeStamp', times[0], len(db_images)), ('qTimeStamp', times[1], len(q_images))):
        if values is not None and len(values) != count:
            raise UserError(f'dbStruct in {path}: {name} has {len(values)} entries for {count} images.')
    which_set = _innermost(field('whichSet')) if 'whichSet' in names else ''
    return DbStruct(which_set, db_images, utm_db, q_images, utm_q, len(db_images), len(q_images),
                    pos_dist, pos_dist ** 2, non_trivial, *times)


def _innermost(cell):
    """The string inside MATLAB's nested cell/char arrays as scipy returns them."""
    while isinstance(cell, np.ndarray):
        cell = cell.ravel()[0]
    return str(cell)


def image_folders(name, root):
    """(database folder, query folder) of a dbStruct's relative names, as the authors' dataset classes set them."""
    if name == 'tokyo247':
        return os.path.join(root, 'images'), os.path.join(root, 'query')
    if name.startswith('tokyoTM'):
        return os.path.join(root, 'images'), os.path.join(root, 'images')
    return root, os.path.join(root, 'queries_real')


def read_split(opt, split):
    """The GroundTruth fields (see datasets.GroundTruth) of a dbStruct split."""
    name = split_file(opt.dataset, split)
    path = struct_path(opt.dataPath, name)
    struct = parse_db_struct(path)
    root = getattr(opt, 'imagesPath', None) or opt.dataPath
    db_folder, query_folder = image_folders(name, root)
    fields = dict(name=os.path.basename(path), db_paths=[os.path.join(db_folder, f) for f in struct.dbImage],
                  query_paths=[os.path.join(query_folder, f) for f in struct.qImage], utmDb=struct.utmDb,
                  utmQ=struct.utmQ, posDistThr=struct.posDistThr, nonTrivPosDistSqThr=struct.nonTrivPosDistSqThr,
                  images_hint=f'The images named in {path} must be under {db_folder} (database) and {query_folder} '
                              f'(queries); give --imagesPath if they are not under --dataPath.')
    suppression = getattr(opt, 'panorama_suppression', 'auto')
    if suppression == 'on' and name != 'tokyo247':
        raise UserError(f'--panorama_suppression on: {path} has no panoramas (only Tokyo 24/7, --split tokyo247, '
                        f'groups its database into panoramas of {CUTOUTS_PER_PANORAMA} cutouts).')
    if name == 'tokyo247':
        fields.update(query_sizes_vary=True)
        if suppression != 'off':
            fields.update(db_panorama=np.arange(struct.numDb) // CUTOUTS_PER_PANORAMA)
    if name.startswith('tokyoTM'):
        _check_time_stamps(struct, path)
        fields.update(db_time=struct.dbTimeStamp, q_time=struct.qTimeStamp, train_pos_other_time=True,
                      min_train_pos_dist=TOKYO_TM_MIN_POSITIVE_DIST, exclude_same_time=name == 'tokyoTM_val')
    return fields


def _check_time_stamps(struct, path):
    missing = [name for name in ('dbTimeStamp', 'qTimeStamp') if getattr(struct, name) is None]
    if missing:
        raise UserError(f'dbStruct in {path} has no field {", ".join(missing)}: Tokyo Time Machine needs the capture '
                        f'time of every image (the 12-field layout).')
