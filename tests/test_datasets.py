"""Dataset formats behind datasets.load_dataset: the @UTM folder layout, Tokyo 24/7 and Tokyo Time Machine dbStructs
(12 fields), Mapillary SLS; their ground truth and protocols against brute force written here, their errors, and
every mode running on the folder format."""
import csv
import os
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers import REAL_GEOMETRY, brute_force_positives, brute_force_recalls, error_paragraph, read_geometry
from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.datasets.folder_dataset import utm_from_filename
from netvlad_toolkit.modes import evaluate
from netvlad_toolkit.search import retrieval
from netvlad_toolkit.utils.commons import UserError

ORIGIN = np.array([500000.0, 4000000.0])
CLI = ['--arch=alexnet', '--fromscratch', '--nocuda', '--threads=0', '--latency_size=64x80']


def folder_name(east, north, pano_id='', note=''):
    """A VPR-datasets-downloader name: 14 @-separated fields (most left empty), written independently of the reader."""
    fields = [repr(float(east)), repr(float(north)), '17', 'T', '', '', pano_id, '', '', '', '', '', '', note]
    return '@' + '@'.join(fields) + '@.jpg'


def save_image(path, size=(80, 64), seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_folder_split(root, split, utm_db, utm_q, extensions=('.jpg',), pano_ids=None):
    """Images of one split at the given positions; returns (db paths, query paths) in the reader's sorted order."""
    for side, utm in (('database', utm_db), ('queries', utm_q)):
        for i, (east, north) in enumerate(utm):
            name = folder_name(east, north, pano_id=pano_ids[i] if pano_ids and side == 'database' else '',
                               note=f'{side}{i:03d}')
            name = name[:-len('.jpg')] + extensions[i % len(extensions)]
            subfolder = f'part{i % 2}' if side == 'database' else ''  # found recursively
            save_image(os.path.join(root, 'images', split, side, subfolder, name), seed=i)


def opt_for(make_opt, *argv):
    return make_opt(['--mode=test', *argv])


# ---------------------------------------------------------------------------------------------- folder format

def test_folder_positives_at_chosen_distances(tmp_path, make_opt, caplog):
    distances = [0, 8, 20, 40]
    utm_db = ORIGIN + np.array([[d, 0.0] for d in distances])
    utm_q = np.stack([ORIGIN, ORIGIN + [0, 1000.0]])  # the second query has no database image near it
    write_folder_split(tmp_path, 'test', utm_db, utm_q, extensions=('.jpg', '.jpeg', '.png'))
    dataset = load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path, '--split=test'), 'test')
    assert (dataset.db_struct.numDb, dataset.db_struct.numQ, len(dataset)) == (4, 2, 6)
    positions = np.array([utm_from_filename(p) for p in dataset.db_struct.db_paths])
    rank = np.argsort(np.argsort(positions[:, 0]))  # the reader sorts by path: back to the order of `distances`
    positives = [set(rank[p].tolist()) for p in dataset.positives()]
    training = [set(rank[p].tolist()) for p in dataset.nontrivial_positives()]
    assert positives == [{0, 1, 2}, set()] == brute_force_positives(utm_db, utm_q, 25)
    assert training == [{0, 1}, set()] == brute_force_positives(utm_db, utm_q, 10)
    wider = load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path,
                                 '--positive_dist_threshold=45', '--train_positives_dist_threshold=21'), 'test')
    assert [len(p) for p in wider.positives()] == [4, 0] and [len(p) for p in wider.nontrivial_positives()] == [3, 0]
    descriptors = np.eye(6, dtype=np.float32)
    with caplog.at_level('INFO'):
        result = retrieval.search_and_recall(descriptors, 4, dataset.positives(), opt_for(make_opt),
                                            dataset.db_struct)
    assert '1 of 2 queries have no database image within 25 m: they count as misses' in caplog.text
    assert result['queries_scored'] == 2 and max(result['recalls'].values()) <= 0.5


def test_folder_recall_equals_brute_force(tmp_path, make_opt):
    rng = np.random.default_rng(3)
    utm_db = ORIGIN + rng.uniform(0, 200, size=(30, 2))
    utm_q = ORIGIN + rng.uniform(0, 200, size=(12, 2))
    write_folder_split(tmp_path, 'val', utm_db, utm_q)
    opt = opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path)
    dataset = load_dataset(opt, 'val')
    db_utm, q_utm = dataset.db_struct.utmDb, dataset.db_struct.utmQ
    positives = brute_force_positives(db_utm, q_utm, 25)
    assert [set(p.tolist()) for p in dataset.positives()] == positives
    descriptors = rng.normal(size=(42, 16)).astype(np.float32)
    result = retrieval.search_and_recall(descriptors, 30, dataset.positives(), opt, dataset.db_struct)
    assert result['recalls'] == pytest.approx(brute_force_recalls(descriptors[:30], descriptors[30:], positives,
                                                                  [1, 5, 10, 20]))


def test_folder_errors(tmp_path, make_opt):
    write_folder_split(tmp_path, 'test', ORIGIN[None], ORIGIN[None])
    with pytest.raises(UserError, match='no split "train"') as error:
        load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path), 'train')
    assert 'splits are: test' in str(error.value)
    bad = tmp_path / 'images' / 'test' / 'queries' / 'holiday_photo.jpg'
    save_image(str(bad))
    with pytest.raises(UserError, match='holiday_photo.jpg'):
        load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path), 'test')
    with pytest.raises(UserError, match='"north"'):
        utm_from_filename('/x/@500000.0@north@17@T@@@@@@@@@@@.jpg')
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no images here')
    with pytest.raises(UserError, match=f'{empty} holds no image'):
        load_dataset(opt_for(make_opt, '--database_folder', empty, '--queries_folder', empty), 'test')
    with pytest.raises(UserError, match='go together'):
        load_dataset(opt_for(make_opt, '--database_folder', empty), 'test')
    with pytest.raises(UserError, match='--save_predictions=-2'):
        evaluate.test(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path, '--save_predictions=-2'))


def test_two_arbitrary_folders_in_test_mode(tmp_path, make_opt):
    utm_db = ORIGIN + np.array([[0.0, 0.0], [30.0, 0.0], [60.0, 0.0]])
    write_folder_split(tmp_path, 'x', utm_db, ORIGIN[None] + [28.0, 0.0])
    opt = opt_for(make_opt, '--database_folder', tmp_path / 'images' / 'x' / 'database',
                  '--queries_folder', tmp_path / 'images' / 'x' / 'queries')
    dataset = load_dataset(opt, opt.split)
    positions = dataset.db_struct.utmDb[dataset.positives()[0]]
    assert positions.tolist() == [[ORIGIN[0] + 30.0, ORIGIN[1]]]
    other_mode = make_opt(['--mode=cluster', '--database_folder', tmp_path, '--queries_folder', tmp_path])
    assert not hasattr(other_mode, 'database_folder')  # test mode's flags: another mode warns and reads its split


def test_folder_tokyo247_suppresses_panoramas_by_pano_id(tmp_path, make_opt):
    rng = np.random.default_rng(4)
    pano_ids = [f'pano{p}' for p in rng.integers(0, 6, size=36)]
    utm_db = ORIGIN + rng.uniform(0, 50, size=(36, 2))
    write_folder_split(tmp_path / 'tokyo247', 'test', utm_db, ORIGIN + rng.uniform(0, 50, size=(5, 2)),
                       pano_ids=pano_ids)
    opt = opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path / 'tokyo247')
    dataset = load_dataset(opt, 'test')
    struct = dataset.db_struct
    names = [p.split('@')[7] for p in struct.db_paths]  # the pano_id field, read here from the names
    assert [names[i] == names[j] for i in range(36) for j in range(36)] == \
        [struct.db_panorama[i] == struct.db_panorama[j] for i in range(36) for j in range(36)]
    assert struct.query_sizes_vary
    descriptors = rng.normal(size=(41, 8)).astype(np.float32)
    predictions = retrieval.search_and_recall(descriptors, 36, dataset.positives(), opt, struct)['predictions']
    expected = brute_force_panorama_ranking(descriptors[:36], descriptors[36:], names)
    assert [row[row >= 0].tolist() for row in predictions] == expected
    write_folder_split(tmp_path / 'other', 'test', utm_db[:3], utm_db[:1])
    assert load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path / 'other'),
                        'test').db_struct.db_panorama is None
    with pytest.raises(UserError, match='pano_id'):
        load_dataset(opt_for(make_opt, '--dataset=folder', '--dataPath', tmp_path / 'other',
                             '--panorama_suppression=on'), 'test')


def convert_to_folder_format(pittsburgh_root, target):
    """The tiny synthetic dataset (Pittsburgh layout) rewritten in the folder layout, positions in the names."""
    for split in ('train', 'val', 'test'):
        db_names, utm_db, q_names, utm_q = read_geometry(pittsburgh_root / 'datasets' / f'pitts30k_{split}.mat')
        for side, names, utm, folder in (('database', db_names, utm_db, pittsburgh_root),
                                         ('queries', q_names, utm_q, pittsburgh_root / 'queries_real')):
            os.makedirs(target / 'images' / split / side)
            for i, (name, (east, north)) in enumerate(zip(names, utm)):
                shutil.copy(folder / name, target / 'images' / split / side / folder_name(east, north, note=str(i)))


def test_every_mode_runs_on_the_folder_format(tiny_data, tmp_path, run_cli):
    """cluster -> train (1 short epoch) -> test with --save_predictions -> pca, all with --dataset folder."""
    data = tmp_path / 'folder_data'
    convert_to_folder_format(tiny_data, data)
    common = ['--dataset=folder', '--dataPath', data, '--runsPath', tmp_path, *CLI]
    assert run_cli(['--mode=cluster', *common, '--num_clusters=8']) == 0
    assert (data / 'data' / 'centroids' / 'alexnet_folder_8_desc_cen.hdf5').is_file()
    run = tmp_path / 'run'
    assert run_cli(['--mode=train', *common, '--num_clusters=8', '--nEpochs=1', '--savePath', run, '--optim=ADAM',
                    '--cacheRefreshRate=30', '--nNegSample=30']) == 0
    assert (run / 'checkpoints' / 'checkpoint.pth.tar').is_file()
    assert run_cli(['--mode=test', *common, '--split=test', '--resume', run, '--save_predictions=3']) == 0
    with open(run / 'predictions_test.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 * 3
    for row in rows:
        query_utm = np.array(utm_from_filename(row['query_image']))
        db_utm = np.array(utm_from_filename(row['database_image']))
        assert float(row['metres']) == pytest.approx(np.linalg.norm(query_utm - db_utm), abs=0.01)
        assert row['within_threshold'] == str(int(float(row['metres']) <= 25))
    first = [r for r in rows if r['query_index'] == '0']
    assert [r['rank'] for r in first] == ['1', '2', '3']
    assert float(first[0]['descriptor_distance']) <= float(first[1]['descriptor_distance'])
    with Image.open(run / 'predictions_test.png') as picture:
        assert picture.size[1] > 0
    assert run_cli(['--mode=pca', *common, '--split=test', '--resume', run, '--pca_dim=16', '--pca_images=40']) == 0


# ---------------------------------------------------------------------------------------------- Tokyo

TOKYO_FIELDS = ['whichSet', 'dbImageFns', 'utmDb', 'qImageFns', 'utmQ', 'numImages', 'numQueries', 'posDistThr',
                'posDistSqThr', 'nonTrivPosDistSqThr', 'dbTimeStamp', 'qTimeStamp']


def cell(names):
    column = np.empty((len(names), 1), dtype=object)
    column[:, 0] = names
    return column


def write_tokyo_struct(path, db_names, utm_db, q_names, utm_q, db_time, q_time, drop=()):
    """The 12-field layout of the authors' tokyo247.mat / tokyoTM_*.mat, fields in their order."""
    values = ['test', cell(db_names), np.asarray(utm_db).T, cell(q_names), np.asarray(utm_q).T,
              float(len(db_names)), float(len(q_names)), 25.0, 625.0, 100.0,
              np.asarray(db_time, dtype=np.float64)[None], np.asarray(q_time, dtype=np.float64)[None]]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {'dbStruct': {k: v for k, v in zip(TOKYO_FIELDS, values) if k not in drop}})


def tokyo247(root):
    """2 panoramas x 12 cutouts (640x480-like, here 80x64) and 3 queries of different sizes."""
    db_names = [f'{p:05d}/{p:05d}_{c * 30:03d}.jpg' for p in range(2) for c in range(12)]
    utm_db = np.repeat(ORIGIN + np.array([[0.0, 0.0], [60.0, 0.0]]), 12, axis=0)
    q_names = [f'q{i}.jpg' for i in range(3)]
    utm_q = ORIGIN + np.array([[5.0, 0.0], [55.0, 0.0], [30.0, 0.0]])
    write_tokyo_struct(root / 'datasets' / 'tokyo247.mat', db_names, utm_db, q_names, utm_q,
                       np.zeros(24), np.zeros(3))
    for i, name in enumerate(db_names):
        save_image(str(root / 'images' / name), seed=i)
    for i, (name, size) in enumerate(zip(q_names, [(80, 64), (96, 72), (64, 96)])):
        save_image(str(root / 'query' / name), size=size, seed=100 + i)
    return utm_db, utm_q


def brute_force_panorama_ranking(db_desc, query_desc, panorama):
    """For each query, its database images by distance, keeping only the first image of each panorama."""
    rankings = []
    for query in query_desc:
        seen, ranking = set(), []
        for db_index in np.argsort(((db_desc - query) ** 2).sum(axis=1), kind='stable'):
            if panorama[db_index] not in seen:
                seen.add(panorama[db_index])
                ranking.append(int(db_index))
        rankings.append(ranking)
    return rankings


def test_panorama_suppression_keeps_one_cutout_per_panorama():
    rng = np.random.default_rng(5)
    num_panoramas, num_queries = 10, 20
    panorama = np.arange(12 * num_panoramas) // 12
    db_desc = rng.normal(size=(12 * num_panoramas, 8)).astype(np.float32)
    query_desc = rng.normal(size=(num_queries, 8)).astype(np.float32)
    dist, found = retrieval.exact_search(db_desc, query_desc, 12 * 5)
    _, kept = retrieval.keep_ranked(dist, found, retrieval.first_of_each_panorama(found, panorama), 5)
    expected = brute_force_panorama_ranking(db_desc, query_desc, panorama)
    for row, ranking in zip(kept, expected):
        assert len(set(panorama[row].tolist())) == 5
        assert row.tolist() == ranking[:5]


def test_tokyo247_split_reads_12_fields_and_suppresses_panoramas(tmp_path, make_opt):
    utm_db, utm_q = tokyo247(tmp_path)
    opt = opt_for(make_opt, '--dataPath', tmp_path, '--split=tokyo247')
    dataset = load_dataset(opt, 'tokyo247')
    struct = dataset.db_struct
    assert struct.db_paths[13] == str(tmp_path / 'images' / '00001' / '00001_030.jpg')
    assert struct.query_paths[0] == str(tmp_path / 'query' / 'q0.jpg')
    assert struct.db_panorama.tolist() == [0] * 12 + [1] * 12
    assert [set(p.tolist()) for p in dataset.positives()] == brute_force_positives(utm_db, utm_q, 25)
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(27, 8)).astype(np.float32)
    result = retrieval.search_and_recall(descriptors, 24, dataset.positives(), opt, struct)
    rankings = brute_force_panorama_ranking(descriptors[:24], descriptors[24:], struct.db_panorama)
    positives = brute_force_positives(utm_db, utm_q, 25)
    for n in (1, 5):
        hits = [bool(set(r[:n]) & p) for r, p in zip(rankings, positives)]
        assert result['recalls'][n] == pytest.approx(np.mean(hits))
    assert (result['predictions'][:, 2:] == -1).all()  # only two panoramas to rank
    plain = load_dataset(opt_for(make_opt, '--dataPath', tmp_path, '--panorama_suppression=off'), 'tokyo247')
    assert plain.db_struct.db_panorama is None


def test_tokyo247_cli_extracts_queries_of_different_sizes(tmp_path, run_cli):
    tokyo247(tmp_path / 'tokyo')
    assert run_cli(['--mode=test', '--dataPath', tmp_path / 'tokyo', '--split=tokyo247', '--pooling=max',
                    '--runsPath', tmp_path, '--save_predictions=2', *CLI]) == 0
    with open(tmp_path / 'alexnet_offtheshelf' / 'predictions_tokyo247.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    for query in ('0', '1', '2'):
        panoramas = [int(r['database_index']) // 12 for r in rows if r['query_index'] == query]
        assert sorted(panoramas) == [0, 1]


def test_tokyo_time_machine_rules(tmp_path, make_opt):
    rng = np.random.default_rng(2)
    utm_db = ORIGIN + rng.uniform(0, 30, size=(40, 2))
    utm_db[:5] = ORIGIN + [3.0, 3.0]  # same place as query 0 (0 m: a trivial positive)
    utm_q = np.concatenate([[ORIGIN + [3.0, 3.0]], ORIGIN + rng.uniform(0, 30, size=(7, 2))])
    db_time = rng.choice([200907, 201005, 201104], size=40)
    q_time = rng.choice([200907, 201005, 201104], size=8)
    for split in ('train', 'val'):
        write_tokyo_struct(tmp_path / 'datasets' / f'tokyoTM_{split}.mat', [f'd{i}.jpg' for i in range(40)], utm_db,
                           [f'q{i}.jpg' for i in range(8)], utm_q, db_time, q_time)
    opt = opt_for(make_opt, '--dataset=tokyoTM', '--dataPath', tmp_path)
    val = load_dataset(opt, 'val', images=False)
    assert val.db_struct.db_paths[0] == str(tmp_path / 'images' / 'd0.jpg')
    assert val.db_struct.query_paths[0] == str(tmp_path / 'images' / 'q0.jpg')
    dist = np.linalg.norm(utm_q[:, None] - utm_db[None], axis=2)
    expected = [set(np.flatnonzero((dist[q] > 1) & (dist[q] <= 10) & (db_time != q_time[q])).tolist())
                for q in range(8)]
    assert [set(p.tolist()) for p in val.nontrivial_positives()] == expected
    assert not expected[0] & set(range(5))
    descriptors = rng.normal(size=(48, 8)).astype(np.float32)
    result = retrieval.search_and_recall(descriptors, 40, val.positives(), opt, val.db_struct)
    positives = brute_force_positives(utm_db, utm_q, 25)
    for q, row in enumerate(result['predictions']):
        ranking = [int(d) for d in np.argsort(((descriptors[:40] - descriptors[40 + q]) ** 2).sum(1), kind='stable')
                   if db_time[d] != q_time[q]]
        assert row[row >= 0].tolist() == ranking[:25]
    hits = [[bool(set(r[:n].tolist()) & p) for r, p in zip(result['predictions'], positives)] for n in (1, 5)]
    assert [result['recalls'][1], result['recalls'][5]] == pytest.approx([np.mean(h) for h in hits])
    train_set = load_dataset(opt, 'train', images=False)
    assert not train_set.db_struct.exclude_same_time and train_set.db_struct.train_pos_other_time
    write_tokyo_struct(tmp_path / 'datasets' / 'tokyoTM_val.mat', ['d.jpg'], utm_db[:1], ['q.jpg'], utm_q[:1],
                       db_time[:1], q_time[:1], drop=('qTimeStamp',))
    with pytest.raises(UserError, match='no field qTimeStamp'):
        load_dataset(opt, 'val', images=False)
    with pytest.raises(UserError, match='no split "test"'):
        load_dataset(opt, 'test', images=False)


# ---------------------------------------------------------------------------------------------- MSLS

def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_msls_side(folder, keys, utm, panoramas, subtask=None):
    """One city's database or query folder: images/<key>.jpg and the four CSVs, index column first (pandas')."""
    write_csv(folder / 'postprocessed.csv', ['', 'key', 'easting', 'northing', 'night', 'view_direction'],
              [[i, k, e, n, False, 'Forward'] for i, (k, (e, n)) in enumerate(zip(keys, utm))])
    write_csv(folder / 'raw.csv', ['', 'key', 'lon', 'lat', 'ca', 'captured_at', 'pano'],
              [[i, k, 0, 0, 0, 0, p] for i, (k, p) in enumerate(zip(keys, panoramas))])
    write_csv(folder / 'seq_info.csv', ['', 'key', 'frame_number', 'sequence_key'],
              [[i, k, i, 'seq'] for i, k in enumerate(keys)])
    if subtask is not None:
        write_csv(folder / 'subtask_index.csv', ['', 'all', 's2w'], [[i, s, False] for i, s in enumerate(subtask)])
    for i, key in enumerate(keys):
        save_image(str(folder / 'images' / f'{key}.jpg'), seed=i)


def msls(root):
    """cph and sf with the same numeric coordinates (so positives would cross cities if cities were mixed)."""
    utm_db = ORIGIN + np.array([[0.0, 0.0], [10.0, 0.0], [200.0, 0.0], [400.0, 0.0]])
    utm_q = ORIGIN + np.array([[5.0, 0.0], [205.0, 0.0], [1000.0, 0.0], [2.0, 0.0]])
    for city in ('cph', 'sf'):
        base = root / 'train_val' / city
        write_msls_side(base / 'database', [f'{city}_db{i}' for i in range(4)], utm_db, [False, False, True, False],
                        subtask=[True] * 4 if city == 'cph' else None)
        write_msls_side(base / 'query', [f'{city}_q{i}' for i in range(4)], utm_q, [False, False, False, True])


def test_msls_val_protocol(tmp_path, make_opt, caplog):
    msls(tmp_path)
    opt = opt_for(make_opt, '--dataset=msls', '--dataPath', tmp_path, '--split=msls_val')
    dataset = load_dataset(opt, 'msls_val')
    struct = dataset.db_struct
    db_keys = [os.path.basename(p)[:-4] for p in struct.db_paths]
    q_keys = [os.path.basename(p)[:-4] for p in struct.query_paths]
    assert db_keys == ['cph_db0', 'cph_db1', 'cph_db3', 'sf_db0', 'sf_db1', 'sf_db3']  # panoramas excluded
    assert q_keys == ['cph_q0', 'cph_q1', 'cph_q2', 'sf_q0', 'sf_q1', 'sf_q2']
    positives = [[db_keys[i] for i in p] for p in dataset.positives()]
    assert positives == [['cph_db0', 'cph_db1'], [], [], ['sf_db0', 'sf_db1'], [], []]  # db2 was a panorama
    descriptors = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    with caplog.at_level('INFO'):
        result = retrieval.search_and_recall(descriptors, 6, dataset.positives(), opt, struct)
    assert '4 of 6 queries have no database image within 25 m: not scored (MSLS protocol)' in caplog.text
    scored = [0, 3]
    expected = brute_force_recalls(descriptors[:6], descriptors[6:][scored],
                                   [set(dataset.positives()[q].tolist()) for q in scored], [1, 5])
    assert result['queries_scored'] == 2
    assert [result['recalls'][1], result['recalls'][5]] == pytest.approx([expected[1], expected[5]])


def test_msls_cli_writes_the_predictions_file(tmp_path, run_cli):
    msls(tmp_path / 'msls')
    assert run_cli(['--mode=test', '--dataset=msls', '--dataPath', tmp_path / 'msls', '--split=msls_val',
                    '--pooling=avg', '--runsPath', tmp_path, *CLI]) == 0
    lines = np.loadtxt(tmp_path / 'alexnet_offtheshelf' / 'msls_predictions_msls_val.csv', dtype=str, ndmin=2)
    assert lines[:, 0].tolist() == ['cph_q0', 'sf_q0']  # the scored queries, keys as mapillary_sls names them
    assert lines.shape[1] == 1 + 6
    assert set(lines[0, 1:]) == {'cph_db0', 'cph_db1', 'cph_db3', 'sf_db0', 'sf_db1', 'sf_db3'}


def test_msls_errors(tmp_path, make_opt, run_cli, capsys):
    msls(tmp_path)
    opt = opt_for(make_opt, '--dataset=msls', '--dataPath', tmp_path)
    with pytest.raises(UserError, match='no split "test"'):
        load_dataset(opt, 'test')
    path = tmp_path / 'train_val' / 'sf' / 'query' / 'postprocessed.csv'
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    write_csv(path, ['', 'key', 'east', 'northing', 'night', 'view_direction'], rows[1:])
    assert run_cli(['--mode=test', '--dataset=msls', '--dataPath', tmp_path, '--split=msls_val', '--pooling=avg',
                    '--runsPath', tmp_path / 'runs', *CLI]) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert str(path) in paragraph and 'no column easting' in paragraph
    assert not (tmp_path / 'runs').exists()
    shutil.rmtree(tmp_path / 'train_val' / 'sf')
    with pytest.raises(UserError, match='found cph'):
        load_dataset(opt, 'msls_val')


# ---------------------------------------------------------------------------------------------- real geometry

@pytest.mark.skipif(not REAL_GEOMETRY.is_file(), reason='the real pitts30k test geometry (../shared/data) is absent')
def test_real_pitts30k_geometry_through_the_interface(tmp_path, make_opt, caplog):
    """The real pitts30k test dbStruct through load_dataset (no images): sizes, and the count of queries without a
    positive that the log reports, against a brute-force count."""
    (tmp_path / 'datasets').mkdir()
    os.symlink(REAL_GEOMETRY, tmp_path / 'datasets' / 'pitts30k_test.mat')
    dataset = load_dataset(opt_for(make_opt, '--dataPath', tmp_path), 'test', images=False)
    assert (dataset.db_struct.numDb, dataset.db_struct.numQ) == (10000, 6816)
    _, utm_db, _, utm_q = read_geometry(REAL_GEOMETRY)
    nearest = np.array([np.sqrt(((utm_db - q) ** 2).sum(axis=1)).min() for q in utm_q])
    with caplog.at_level('INFO'):
        scored = retrieval.scored_queries(dataset.positives(), dataset.db_struct)
    assert len(scored) == 6816
    without = int((nearest > 25).sum())
    assert (f'{without} of 6816 queries have no database image within 25 m' in caplog.text) == (without > 0)
