"""The folder layout of VPR-datasets-downloader, read by deep-visual-geo-localization-benchmark and
VPR-methods-evaluation: `<dataset>/images/{train,val,test}/{database,queries}/`, positions in the file names.

A name is `@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude@pano_id@tile_num@heading@pitch@roll
@height@timestamp@note@.jpg`; fields may be empty, only east and north are needed. Images are found recursively
(.jpg, .jpeg, .png), hidden files and folders (names starting with '.', such as .thumbnails/ or macOS's ._ files)
left out as the downloader's glob leaves them. `--database_folder D --queries_folder Q` (test mode) read two
arbitrary folders instead.
"""
import os

import numpy as np

from netvlad_toolkit.utils.commons import UserError

FIELDS = ['utm_east', 'utm_north', 'utm_zone_number', 'utm_zone_letter', 'latitude', 'longitude', 'pano_id',
          'tile_num', 'heading', 'pitch', 'roll', 'height', 'timestamp', 'note']
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
NAME_FORMAT = ('@UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height'
               '@timestamp@note@.jpg')


def filename_fields(path):
    """The @-separated fields of an image name, by name (FIELDS; those the name lacks are absent)."""
    parts = os.path.basename(path).split('@')
    if len(parts) < 4 or parts[0] != '':
        raise UserError(f'Image name {path} is not of the form {NAME_FORMAT} (VPR-datasets-downloader); at least '
                        f'UTM east and north are needed.')
    return dict(zip(FIELDS, parts[1:-1]))


def utm_from_filename(path):
    """(UTM east, UTM north) in metres from an image name of the folder format."""
    fields = filename_fields(path)
    try:
        return float(fields['utm_east']), float(fields['utm_north'])
    except ValueError:
        raise UserError(f'Image name {path} does not start with two numbers @UTM_east@UTM_north@ (found '
                        f'"{fields["utm_east"]}" and "{fields["utm_north"]}"); expected {NAME_FORMAT}.') from None


def images_in(folder, flag):
    """Sorted paths of the images under `folder` (recursively, hidden files and folders left out); `flag` names
    where the folder came from."""
    if not os.path.isdir(folder):
        raise UserError(f'{flag}: folder {folder} does not exist.')
    paths = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith('.')]  # os.walk descends into what is kept
        paths += [os.path.join(parent, name) for name in names
                  if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)]
    paths.sort()
    if not paths:
        raise UserError(f'{flag}: folder {folder} holds no image ({", ".join(IMAGE_EXTENSIONS)}).')
    return paths


def two_folders(opt):
    """Whether --database_folder/--queries_folder replace the split (test mode only, both given)."""
    given = [getattr(opt, flag, None) for flag in ('database_folder', 'queries_folder')]
    if not any(given):
        return False
    if not all(given):
        raise UserError('--database_folder and --queries_folder go together: give both.')
    return True


def evaluation_name(opt):
    """What an evaluation is called in logs, file names and the results table: the split, or, for two folders,
    <database folder>+<queries folder> (their own names, not the --split default)."""
    if not two_folders(opt):
        return opt.split
    return '+'.join(os.path.basename(os.path.normpath(folder)) for folder in (opt.database_folder, opt.queries_folder))


def split_folders(opt, split):
    """(database folder, queries folder, where they came from) of a split."""
    if two_folders(opt):
        return opt.database_folder, opt.queries_folder, '--database_folder/--queries_folder'
    images = os.path.join(opt.dataPath, 'images')
    folder = os.path.join(images, split)
    if not os.path.isdir(folder):
        present = sorted(os.listdir(images)) if os.path.isdir(images) else []
        raise UserError(f'--dataset folder: {opt.dataPath} has no split "{split}" ({folder} does not exist). '
                        + (f'Its splits are: {", ".join(present)}.' if present else
                           '--dataPath must hold images/{train,val,test}/{database,queries}/.'))
    return os.path.join(folder, 'database'), os.path.join(folder, 'queries'), f'--dataPath {opt.dataPath}'


def is_tokyo247(*folders):
    return any('tokyo247' in os.path.normpath(os.path.abspath(f)).lower().split(os.sep) for f in folders)


def panorama_ids(paths):
    """Integer panorama ids from the names' pano_id field (names without one are an error)."""
    ids = [filename_fields(p).get('pano_id', '') for p in paths]
    unnamed = [p for p, i in zip(paths, ids) if not i]
    if unnamed:
        raise UserError(f'Panorama suppression needs the pano_id field of every database name; {len(unnamed)} names '
                        f'have none, for example {unnamed[0]}. Give --panorama_suppression off to rank images.')
    return np.unique(ids, return_inverse=True)[1]


def read_split(opt, split):
    """The GroundTruth fields (see datasets.GroundTruth) of a split of the folder format."""
    db_folder, query_folder, source = split_folders(opt, split)
    db_paths, query_paths = images_in(db_folder, source), images_in(query_folder, source)
    fields = dict(name=f'{db_folder} + {query_folder}', db_paths=db_paths, query_paths=query_paths,
                  utmDb=np.array([utm_from_filename(p) for p in db_paths], dtype=np.float64),
                  utmQ=np.array([utm_from_filename(p) for p in query_paths], dtype=np.float64),
                  posDistThr=float(opt.positive_dist_threshold),
                  nonTrivPosDistSqThr=float(opt.train_positives_dist_threshold) ** 2)
    tokyo = is_tokyo247(db_folder, query_folder)
    suppression = getattr(opt, 'panorama_suppression', 'auto')
    if suppression == 'on' or (suppression == 'auto' and tokyo):
        fields.update(db_panorama=panorama_ids(db_paths))
    if tokyo:
        fields.update(query_sizes_vary=True)
    return fields
