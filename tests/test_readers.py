"""Dataset readers on files other tools leave behind: hidden files and folders in the folder format (skipped, as
VPR-datasets-downloader's glob skips them), and MSLS booleans in each spelling pandas reads."""
import os

import numpy as np
import pytest

from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.search.global_features import find_images
from netvlad_toolkit.utils.commons import UserError
from test_datasets import ORIGIN, folder_name, msls, opt_for, save_image, write_csv, write_folder_split


def test_folder_format_skips_hidden_files_and_folders(tmp_path, make_opt):
    root = tmp_path / '.datasets' / 'place'  # a hidden folder above the dataset is no reason to skip it
    utm_db = ORIGIN + np.array([[0.0, 0.0], [30.0, 0.0], [60.0, 0.0]])
    write_folder_split(root, 'test', utm_db, ORIGIN[None] + [28.0, 0.0])
    database, queries = root / 'images' / 'test' / 'database', root / 'images' / 'test' / 'queries'
    expected_db = sorted(str(p) for p in database.rglob('*.jpg'))
    expected_q = sorted(str(p) for p in queries.rglob('*.jpg'))
    save_image(str(database / '.thumbnails' / folder_name(*ORIGIN, note='thumbnail')))
    save_image(str(database / 'part0' / '.cache' / 'deeper' / folder_name(*ORIGIN, note='cached')))
    (queries / ('._' + folder_name(*ORIGIN))).write_bytes(b'\x00\x05\x16\x07 AppleDouble resource fork')
    (database / ('.' + folder_name(*ORIGIN))).write_bytes(b'half-written by a downloader')
    opt = opt_for(make_opt, '--dataset=folder', '--dataPath', root, '--split=test')
    struct = load_dataset(opt, 'test').db_struct
    assert (struct.db_paths, struct.query_paths) == (expected_db, expected_q)
    assert find_images(database, '--image_dir') == sorted(os.path.relpath(p, database) for p in expected_db)


def test_msls_booleans_in_each_spelling_pandas_reads(tmp_path, make_opt):
    msls(tmp_path)
    cph = tmp_path / 'train_val' / 'cph' / 'database'
    write_csv(cph / 'raw.csv', ['', 'key', 'pano'],
              [[0, 'cph_db0', 'FALSE'], [1, 'cph_db1', 'true'], [2, 'cph_db2', 'false'], [3, 'cph_db3', 'TRUE']])
    write_csv(cph / 'subtask_index.csv', ['', 'all', 's2w'],
              [[0, 'true', 'false'], [1, 'TRUE', 'False'], [2, 'True', 'FALSE'], [3, 'false', 'false']])
    opt = opt_for(make_opt, '--dataset=msls', '--dataPath', tmp_path, '--split=msls_val')
    struct = load_dataset(opt, 'msls_val').db_struct
    db_keys = [os.path.basename(p)[:-len('.jpg')] for p in struct.db_paths]
    assert db_keys == ['cph_db0', 'cph_db2', 'sf_db0', 'sf_db1', 'sf_db3']  # cph: db1, db3 panoramas, db3 no subtask

    write_csv(cph / 'raw.csv', ['', 'key', 'pano'],
              [[0, 'cph_db0', 'False'], [1, 'cph_db1', 'False'], [2, 'cph_db2', 'yes'], [3, 'cph_db3', 'False']])
    with pytest.raises(UserError) as error:
        load_dataset(opt, 'msls_val')
    assert all(part in str(error.value) for part in (str(cph / 'raw.csv'), 'line 4', "'yes'", 'pano'))
