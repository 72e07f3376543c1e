"""dbStruct parsing (a file written here in the reference layout, and the real pitts30k test geometry), positives
against brute force, and the user errors for broken data, directly and through the CLI."""
import os

import numpy as np
import pytest
import scipy.io

from helpers import REAL_GEOMETRY, brute_force_positives, error_paragraph, files_under, read_geometry
from netvlad_toolkit.datasets import images
from netvlad_toolkit.datasets.datasets import load_dataset, positives_within
from netvlad_toolkit.datasets.images import load_image
from netvlad_toolkit.datasets.pittsburgh import parse_db_struct
from netvlad_toolkit.utils.commons import UserError

FIELDS = ['whichSet', 'dbImageFns', 'utmDb', 'qImageFns', 'utmQ', 'numImages', 'numQueries', 'posDistThr',
          'posDistSqThr', 'nonTrivPosDistSqThr']


def cell(names):
    column = np.empty((len(names), 1), dtype=object)
    column[:, 0] = names
    return column


def write_db_struct(path, db_names, utm_db, q_names, utm_q, which='test', drop=None):
    """A .mat holding one struct `dbStruct` with the ten fields of the reference, in their order."""
    values = [which, cell(db_names), np.asarray(utm_db, dtype=np.float64).T, cell(q_names),
              np.asarray(utm_q, dtype=np.float64).T, float(len(db_names)), float(len(q_names)), 25.0, 625.0, 100.0]
    struct = {name: value for name, value in zip(FIELDS, values) if name != drop}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {'dbStruct': struct})


def small_geometry(seed=0, num_db=40, num_q=15):
    rng = np.random.default_rng(seed)
    utm_db = 585000 + rng.uniform(0, 150, size=(num_db, 2))
    utm_q = 585000 + rng.uniform(0, 150, size=(num_q, 2))
    db_names = [f'{i // 1000:03d}/{i:06d}_pitch{i % 2 + 1}_yaw{i % 12 + 1}.jpg' for i in range(num_db)]
    q_names = [f'000/{i:06d}_pitch1_yaw1.jpg' for i in range(num_q)]
    return db_names, utm_db, q_names, utm_q


def test_parse_written_struct(tmp_path):
    db_names, utm_db, q_names, utm_q = small_geometry()
    path = tmp_path / 'datasets' / 'pitts30k_val.mat'
    write_db_struct(path, db_names, utm_db, q_names, utm_q, which='val')
    s = parse_db_struct(str(path))
    assert s.whichSet == 'val'
    assert s.dbImage == db_names and s.qImage == q_names
    assert (s.numDb, s.numQ) == (40, 15)
    np.testing.assert_array_equal(s.utmDb, utm_db)  # [N, 2]: easting, northing per image
    np.testing.assert_array_equal(s.utmQ, utm_q)
    assert (s.posDistThr, s.posDistSqThr, s.nonTrivPosDistSqThr) == (25.0, 625.0, 100.0)


@pytest.mark.parametrize('radius', [25.0, 10.0])
def test_positives_match_brute_force(tmp_path, radius):
    db_names, utm_db, q_names, utm_q = small_geometry(seed=1)
    path = tmp_path / 'd.mat'
    write_db_struct(path, db_names, utm_db, q_names, utm_q)
    positives = positives_within(parse_db_struct(str(path)), radius)
    expected = brute_force_positives(utm_db, utm_q, radius)
    assert [set(p.tolist()) for p in positives] == expected
    assert all(np.all(np.diff(p) > 0) for p in positives)  # sorted, unique
    assert sum(map(len, expected)) > 0 and any(len(p) == 0 for p in expected)  # a meaningful mix


@pytest.mark.skipif(not REAL_GEOMETRY.is_file(), reason='real pitts30k test geometry not available')
def test_real_pitts30k_test_geometry():
    s = parse_db_struct(str(REAL_GEOMETRY))
    assert (s.numDb, s.numQ) == (10000, 6816)
    assert len(s.dbImage) == 10000 and len(s.qImage) == 6816
    assert s.dbImage[0].endswith('.jpg') and '/' in s.dbImage[0]
    assert s.posDistThr == 25.0
    positives = positives_within(s, s.posDistThr)
    assert all(len(p) > 0 for p in positives)  # every query has a database image within 25 m
    raw = scipy.io.loadmat(str(REAL_GEOMETRY))['dbStruct'][0, 0]
    utm_db, utm_q = raw[2].T, raw[4].T
    np.testing.assert_array_equal(s.utmDb, utm_db)
    for start in range(0, len(utm_q), 1000):  # brute force, a block of queries at a time
        dist = np.sqrt(((utm_q[start:start + 1000, None, :] - utm_db[None]) ** 2).sum(axis=2))
        found = np.zeros(dist.shape, dtype=bool)
        for row, p in enumerate(positives[start:start + 1000]):
            found[row, p] = True
        assert not np.any((dist < 25 - 1e-6) & ~found)  # all within 25 m (a rounding margin at the border)
        assert not np.any((dist > 25 + 1e-6) & found)  # and nothing farther
    assert np.mean([len(p) for p in positives]) == pytest.approx(142.1, abs=0.05)  # the geometry's README


def test_missing_mat(tmp_path):
    path = tmp_path / 'datasets' / 'pitts30k_test.mat'
    with pytest.raises(UserError, match='pitts30k_test.mat'):
        parse_db_struct(str(path))


def test_mat_without_db_struct(tmp_path):
    path = tmp_path / 'other.mat'
    scipy.io.savemat(path, {'something': np.zeros(3)})
    with pytest.raises(UserError, match='other.mat') as error:
        parse_db_struct(str(path))
    assert 'dbStruct' in str(error.value)


def test_mat_that_is_not_matlab(tmp_path):
    path = tmp_path / 'garbage.mat'
    path.write_bytes(b'not a MATLAB file at all' * 10)
    with pytest.raises(UserError, match='garbage.mat'):
        parse_db_struct(str(path))


def test_missing_field_is_named(tmp_path):
    db_names, utm_db, q_names, utm_q = small_geometry()
    path = tmp_path / 'nine.mat'
    write_db_struct(path, db_names, utm_db, q_names, utm_q, drop='nonTrivPosDistSqThr')
    with pytest.raises(UserError, match='nine.mat') as error:
        parse_db_struct(str(path))
    assert 'no field nonTrivPosDistSqThr' in str(error.value)


def test_missing_and_corrupt_images(tiny_copy, make_opt):
    db_struct = parse_db_struct(str(tiny_copy / 'datasets' / 'pitts30k_test.mat'))
    image = tiny_copy / db_struct.dbImage[3]
    assert load_image(str(image)).shape == (3, 64, 80)
    image.write_bytes(image.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(UserError, match=db_struct.dbImage[3]):
        load_image(str(image))
    image.write_bytes(b'\x00' * 100)  # not an image at all
    with pytest.raises(UserError, match=db_struct.dbImage[3]):
        load_image(str(image))
    missing = tiny_copy / 'queries_real' / db_struct.qImage[5]
    missing.unlink()
    with pytest.raises(UserError, match=db_struct.qImage[5]):
        load_dataset(make_opt(['--mode=test', '--dataPath', tiny_copy]), 'test')


def test_whole_dataset_order_and_ground_truth(tiny_data, make_opt):
    dataset = load_dataset(make_opt(['--mode=test', '--dataPath', tiny_data]), 'test')
    _, utm_db, q_names, utm_q = read_geometry(tiny_data / 'datasets' / 'pitts30k_test.mat')
    assert len(dataset) == 60 + 30
    assert dataset.paths[60] == os.path.join(str(tiny_data), 'queries_real', q_names[0])  # db first, then queries
    assert [set(p.tolist()) for p in dataset.positives()] == brute_force_positives(utm_db, utm_q, 25)
    assert [set(p.tolist()) for p in dataset.nontrivial_positives()] == brute_force_positives(utm_db, utm_q, 10)


# Through the CLI: exit code 2, one paragraph naming the file, no traceback, nothing written.

def assert_cli_error(run_cli, capsys, argv, names, data_root, runs):
    before = files_under(data_root)
    assert run_cli(argv) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert names in paragraph, paragraph
    assert files_under(data_root) == before
    assert not runs.exists() or files_under(runs) == []


def test_cli_missing_mat(tiny_copy, tmp_path, run_cli, capsys):
    (tiny_copy / 'datasets' / 'pitts30k_test.mat').unlink()
    runs = tmp_path / 'runs'
    assert_cli_error(run_cli, capsys, ['--mode=test', '--dataPath', tiny_copy, '--split=test', '--arch=alexnet',
                                       '--fromscratch', '--pooling=max', '--nocuda', '--threads=0', '--runsPath', runs],
                     'pitts30k_test.mat', tiny_copy, runs)


def test_cli_missing_image(tiny_copy, tmp_path, run_cli, capsys):
    db_struct = parse_db_struct(str(tiny_copy / 'datasets' / 'pitts30k_train.mat'))
    (tiny_copy / db_struct.dbImage[17]).unlink()
    runs = tmp_path / 'runs'
    assert_cli_error(run_cli, capsys, ['--mode=cluster', '--dataPath', tiny_copy, '--arch=alexnet', '--fromscratch',
                                       '--nocuda', '--threads=0', '--runsPath', runs],
                     db_struct.dbImage[17], tiny_copy, runs)
    assert not (tiny_copy / 'data').exists()  # no centroids file


@pytest.mark.parametrize('threads', [0, 1], ids=['in-process', 'loader-worker'])
def test_cli_corrupt_image_in_cluster(tiny_copy, tmp_path, run_cli, capsys, threads, monkeypatch):
    # A worker even for the tiny set's images, whose loading would not repay one's start.
    monkeypatch.setattr(images, 'WORKER_START_SECONDS', dict.fromkeys(images.WORKER_START_SECONDS, 0))
    db_struct = parse_db_struct(str(tiny_copy / 'datasets' / 'pitts30k_train.mat'))
    image = tiny_copy / db_struct.dbImage[50]
    image.write_bytes(image.read_bytes()[:300])
    runs = tmp_path / 'runs'
    assert_cli_error(run_cli, capsys, ['--mode=cluster', '--dataPath', tiny_copy, '--arch=alexnet', '--fromscratch',
                                       '--nocuda', f'--threads={threads}', '--runsPath', runs],
                     db_struct.dbImage[50], tiny_copy, runs)
    assert not (tiny_copy / 'data').exists()  # no centroids file


def test_cli_corrupt_query_in_test(tiny_copy, tmp_path, run_cli, capsys):
    db_struct = parse_db_struct(str(tiny_copy / 'datasets' / 'pitts30k_test.mat'))
    image = tiny_copy / 'queries_real' / db_struct.qImage[-1]
    image.write_bytes(b'GIF89a' + b'\x01' * 50)
    runs = tmp_path / 'runs'
    assert_cli_error(run_cli, capsys, ['--mode=test', '--dataPath', tiny_copy, '--split=test', '--arch=alexnet',
                                       '--fromscratch', '--pooling=avg', '--nocuda', '--threads=0', '--runsPath', runs],
                     db_struct.qImage[-1], tiny_copy, runs)
