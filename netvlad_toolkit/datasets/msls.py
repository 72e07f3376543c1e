"""Mapillary Street-Level Sequences (MSLS), image to image, with the dataset's own validation protocol.

Layout (as published): `<dataPath>/train_val/<city>/{database,query}/` with `images/<key>.jpg`, `postprocessed.csv`
(frame index, easting, northing, ...), `raw.csv` (pano, ...), `seq_info.csv` (key, sequence_key, frame_number) and,
in the validation cities, `subtask_index.csv`. The protocol follows mapillary_sls (datasets/msls.py, evaluate.py):
validation cities cph and sf, panoramas excluded from database and queries, positives within 25 m, and only the
queries that have a positive are scored. `write_predictions` writes the file its evaluate.py reads.
"""
import csv
import os

import numpy as np

from netvlad_toolkit.utils.commons import UserError, atomic_write_text

VAL_CITIES = ['cph', 'sf']
TRAIN_CITIES = ['trondheim', 'london', 'boston', 'melbourne', 'amsterdam', 'helsinki', 'tokyo', 'toronto', 'saopaulo',
                'moscow', 'zurich', 'paris', 'bangkok', 'budapest', 'austin', 'berlin', 'ottawa', 'phoenix', 'goa',
                'amman', 'nairobi', 'manila']
SPLIT_CITIES = {'msls_val': VAL_CITIES, 'val': VAL_CITIES, 'train': TRAIN_CITIES}
CITY_SPACING_M = 1e8  # cities are shifted this far apart in northing: UTM zones repeat, positives never cross cities
# The booleans pandas.read_csv reads by default (its true_values/false_values), as mapillary_sls reads these files.
TRUE_VALUES = ('True', 'TRUE', 'true')
FALSE_VALUES = ('False', 'FALSE', 'false')


def read_table(path, columns):
    """The rows of a CSV file as dicts, checking that it has `columns`; the first (index) column is '' if unnamed."""
    if not os.path.isfile(path):
        raise UserError(f'MSLS file {path} does not exist; --dataPath must be the MSLS root holding '
                        f'train_val/<city>/{{database,query}}/.')
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f'MSLS file {path} has no column {", ".join(missing)}; its columns are '
                            f'{", ".join(reader.fieldnames or [])}.')
        return list(reader)


def read_flags(path, column):
    """The booleans of one column of a CSV file, one per row."""
    flags = []
    for line, row in enumerate(read_table(path, [column]), 2):
        value = row[column]
        if value not in TRUE_VALUES + FALSE_VALUES:
            found = repr(value) if value else 'nothing'
            raise UserError(f'MSLS file {path}, line {line}: column {column} holds {found}; expected a boolean as '
                            f'pandas reads it: {", ".join(TRUE_VALUES + FALSE_VALUES)}.')
        flags.append(value in TRUE_VALUES)
    return flags


def frames(folder):
    """(image paths, [N, 2] easting/northing) of one city's database or query folder, panoramas excluded."""
    located = read_table(os.path.join(folder, 'postprocessed.csv'), ['easting', 'northing'])
    panoramas = read_flags(os.path.join(folder, 'raw.csv'), 'pano')
    keys = [row['key'] for row in read_table(os.path.join(folder, 'seq_info.csv'), ['key'])]
    subtask_path = os.path.join(folder, 'subtask_index.csv')
    in_subtask = read_flags(subtask_path, 'all') if os.path.isfile(subtask_path) else [True] * len(keys)
    paths, utm = [], []
    for row in located:
        frame = int(next(iter(row.values())))  # the index column: the frame's row in raw.csv and seq_info.csv
        if frame >= min(len(panoramas), len(keys), len(in_subtask)):
            raise UserError(f'MSLS folder {folder}: postprocessed.csv names frame {frame}, which raw.csv, '
                            f'seq_info.csv or subtask_index.csv does not have.')
        if not panoramas[frame] and in_subtask[frame]:
            paths.append(os.path.join(folder, 'images', keys[frame] + '.jpg'))
            utm.append((float(row['easting']), float(row['northing'])))
    return paths, np.array(utm, dtype=np.float64).reshape(-1, 2)


def read_split(opt, split):
    """The GroundTruth fields (see datasets.GroundTruth) of an MSLS split (msls_val or val: cph and sf; train)."""
    if getattr(opt, 'panorama_suppression', 'auto') == 'on':
        raise UserError('--panorama_suppression on: MSLS ranks single images; its panoramas are left out altogether '
                        '(raw.csv pano), as its own evaluation does.')
    if split not in SPLIT_CITIES:
        raise UserError(f'--dataset msls has no split "{split}"; its splits are: {", ".join(SPLIT_CITIES)}.')
    root = os.path.join(opt.dataPath, 'train_val')
    cities = [c for c in SPLIT_CITIES[split] if os.path.isdir(os.path.join(root, c))]
    if split != 'train' and cities != VAL_CITIES or not cities:
        raise UserError(f'--dataset msls --split {split} needs the cities {", ".join(SPLIT_CITIES[split])} under '
                        f'{root}; found {", ".join(cities) or "none"}.')
    db_paths, query_paths, utm_db, utm_q = [], [], [], []
    for number, city in enumerate(cities):
        shift = np.array([0.0, number * CITY_SPACING_M])
        for side, paths, utm in (('database', db_paths, utm_db), ('query', query_paths, utm_q)):
            city_paths, city_utm = frames(os.path.join(root, city, side))
            paths += city_paths
            utm.append(city_utm + shift)
    return dict(name=f'MSLS {split} ({", ".join(cities)})', db_paths=db_paths, query_paths=query_paths,
                utmDb=np.concatenate(utm_db), utmQ=np.concatenate(utm_q),
                posDistThr=float(opt.positive_dist_threshold),
                nonTrivPosDistSqThr=float(opt.train_positives_dist_threshold) ** 2,
                only_queries_with_positives=True,
                images_hint=f'MSLS images are under {root}/<city>/{{database,query}}/images/<key>.jpg.')


def image_key(path):
    return os.path.splitext(os.path.basename(path))[0]


def write_predictions(path, query_paths, db_paths, predictions):
    """The predictions file mapillary_sls's evaluate.py reads: per line a query key, then its ranked database keys."""
    lines = [' '.join([image_key(query_path)] + [image_key(db_paths[i]) for i in ranked if i >= 0]) + '\n'
             for query_path, ranked in zip(query_paths, predictions)]
    atomic_write_text(''.join(lines), path)
