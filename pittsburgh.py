"""Pittsburgh 30k/250k (and the synthetic set, written in the same layout): dbStruct files, images, ground truth."""
import os
from collections import namedtuple

import numpy as np
import scipy.io
import torch
import torch.utils.data as data
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from scipy.spatial import cKDTree

from commons import UserError

DB_STRUCT_FIELDS = ['whichSet', 'dbImageFns', 'utmDb', 'qImageFns', 'utmQ', 'numImages', 'numQueries',
                    'posDistThr', 'posDistSqThr', 'nonTrivPosDistSqThr']
DbStruct = namedtuple('DbStruct', ['whichSet', 'dbImage', 'utmDb', 'qImage', 'utmQ', 'numDb', 'numQ',
                                   'posDistThr', 'posDistSqThr', 'nonTrivPosDistSqThr'])
SPLIT_FILES = {'train': 'pitts30k_train', 'val': 'pitts30k_val', 'test': 'pitts30k_test',
               'train250k': 'pitts250k_train', 'val250k': 'pitts250k_val', 'test250k': 'pitts250k_test'}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def struct_path(data_path, split):
    return os.path.join(data_path, 'datasets', SPLIT_FILES[split] + '.mat')


def parse_db_struct(path):
    """Read the `dbStruct` of a Pittsburgh .mat file, checking every field it must hold."""
    if not os.path.isfile(path):
        raise UserError(f'Dataset file {path} does not exist. --dataPath must hold datasets/pitts30k_*.mat '
                        f'(and pitts250k_*.mat for the 250k splits); see the README for where to get them.')
    try:
        fields = scipy.io.loadmat(path)['dbStruct'].item()
    except Exception as error:
        raise UserError(f'Dataset file {path} is not a MATLAB file holding a struct "dbStruct" '
                        f'({type(error).__name__}: {error}).') from None
    if len(fields) != len(DB_STRUCT_FIELDS):
        raise UserError(f'dbStruct in {path} has {len(fields)} fields; expected {len(DB_STRUCT_FIELDS)}: '
                        f'{", ".join(DB_STRUCT_FIELDS)}.')
    try:
        which_set = _innermost(fields[0])
        db_images = [_innermost(f) for f in np.asarray(fields[1], dtype=object).ravel()]
        q_images = [_innermost(f) for f in np.asarray(fields[3], dtype=object).ravel()]
        utm_db = np.asarray(fields[2], dtype=np.float64).reshape(2, -1).T
        utm_q = np.asarray(fields[4], dtype=np.float64).reshape(2, -1).T
        scalars = [float(np.asarray(fields[i]).ravel()[0]) for i in range(5, 10)]
    except (IndexError, TypeError, ValueError) as error:
        raise UserError(f'dbStruct in {path} does not have the Pittsburgh layout ({error}); expected fields '
                        f'{", ".join(DB_STRUCT_FIELDS)} with 2xN UTM arrays.') from None
    if len(db_images) != len(utm_db) or len(q_images) != len(utm_q):
        raise UserError(f'dbStruct in {path}: {len(db_images)} database names for {len(utm_db)} UTM columns and '
                        f'{len(q_images)} query names for {len(utm_q)} UTM columns; the counts must match.')
    return DbStruct(which_set, db_images, utm_db, q_images, utm_q, len(db_images), len(q_images),
                    scalars[2], scalars[3], scalars[4])


def _innermost(cell):
    """The string inside MATLAB's nested cell/char arrays as scipy returns them."""
    while isinstance(cell, np.ndarray):
        cell = cell.ravel()[0]
    return str(cell)


def positives_within(db_struct, radius):
    """For each query, the sorted indices of the database images within `radius` metres."""
    tree = cKDTree(db_struct.utmDb)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in tree.query_ball_point(db_struct.utmQ, r=radius)]


def image_paths(db_struct, root):
    """Database images then queries, as the whole-set dataset orders them."""
    return ([os.path.join(root, name) for name in db_struct.dbImage]
            + [os.path.join(root, 'queries_real', name) for name in db_struct.qImage])


def check_images_exist(paths):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f'{len(missing)} of {len(paths)} images are missing, for example {missing[0]}. '
                        f'--dataPath must hold the database folders and queries_real/ named in the dbStruct.')


def load_image(path, resize=None):
    """An RGB image as a normalised [3, H, W] float tensor; a clear error for an unreadable file."""
    try:
        with Image.open(path) as image:
            image = image.convert('RGB')
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f'Image {path} cannot be read: the file is corrupt or not an image ({error}).') from None
    if resize is not None:
        image = image.resize((resize[1], resize[0]), Image.BILINEAR)
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class ImageList(data.Dataset):
    """Images by index; returns (image, index). The only work DataLoader workers do is decoding."""

    def __init__(self, paths, resize=None):
        self.paths = paths
        self.resize = resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.resize), index


class WholeDataset(ImageList):
    """All images of a split, database first then queries, with the split's ground truth."""

    def __init__(self, data_path, split, resize=None, images=True):
        """images=False: only the ground truth is needed (e.g. searching descriptors computed elsewhere)."""
        self.db_struct = parse_db_struct(struct_path(data_path, split))
        paths = image_paths(self.db_struct, data_path)
        if images:
            check_images_exist(paths)
        super().__init__(paths, resize)
        self.split = split

    def positives(self):
        return positives_within(self.db_struct, self.db_struct.posDistThr)

    def nontrivial_positives(self):
        return positives_within(self.db_struct, np.sqrt(self.db_struct.nonTrivPosDistSqThr))


def image_loader(dataset, opt, batch_size, shuffle=False, generator=None):
    return data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                           num_workers=min(opt.threads, os.cpu_count() or 1), pin_memory=opt.cuda and torch.cuda.is_available(),
                           persistent_workers=False)
