"""--mode=query: answers against brute force on descriptors computed here, positions from folder-format names and
from a CSV, the database cache, and the errors."""
import csv
import shutil

import h5py
import numpy as np
from PIL import Image

from helpers import error_paragraph
from test_extract import counting_extraction, reference_descriptor

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '4']


def query_cli(run_cli, run_dir, database, photos, out, *flags):
    return run_cli(['--mode=query', f'--resume={run_dir}', '--query', photos, f'--database={database}',
                    f'--export_dir={out}', *FAST, *flags])


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def brute_force_top(model, database, names, photo, n):
    """(names, similarities) of the n database images most similar to the photo, from the full similarity row."""
    db = np.stack([reference_descriptor(model, database / name) for name in names]).astype(np.float64)
    sim = db @ reference_descriptor(model, photo).astype(np.float64)
    order = np.argsort(-sim)[:n]
    return [names[i] for i in order], sim[order]


def test_query_against_a_folder_equals_brute_force(random_float_run, places, tmp_path, run_cli, monkeypatch):
    run_dir, model = random_float_run
    database, photos, positions = places
    assert query_cli(run_cli, run_dir, database, photos, tmp_path / 'out', '--num_matched=4') == 0
    names = sorted(positions)
    summary = {row['query']: row for row in read_csv(tmp_path / 'out' / 'queries.csv')}
    for i in range(3):
        expected_names, expected_sim = brute_force_top(model, database, names, photos / f'photo{i}.jpg', 4)
        rows = read_csv(tmp_path / 'out' / f'photo{i}.csv')
        assert [row['database_image'] for row in rows] == expected_names
        assert [int(row['rank']) for row in rows] == [1, 2, 3, 4]
        np.testing.assert_allclose([float(row['similarity']) for row in rows], expected_sim, atol=1e-5)
        for row in rows:
            assert (float(row['east']), float(row['north'])) == positions[row['database_image']]
        top1 = summary[f'photo{i}.jpg']
        assert top1['best_match'] == expected_names[0]
        assert (float(top1['estimated_east']), float(top1['estimated_north'])) == positions[expected_names[0]]
        with Image.open(tmp_path / 'out' / f'photo{i}.png') as picture:
            assert picture.size == (5 * 168, 146)  # the query and 4 retrievals in a row, 168x146 tiles

    # The folder was extracted once into the run folder; a new image alone is extracted next time.
    batches = counting_extraction(monkeypatch)
    shutil.copy(photos / 'photo0.jpg', database / 'street' / 'new.jpg')
    assert query_cli(run_cli, run_dir, database, photos / 'photo0.jpg', tmp_path / 'out2') == 0
    assert sum(batches) == 1 + 1  # the new database image, then the photo
    assert 'street/new.jpg' == read_csv(tmp_path / 'out2' / 'photo0.csv')[0]['database_image']


def test_query_an_extracted_file_with_positions_csv(random_float_run, places, tmp_path, run_cli):
    run_dir, model = random_float_run
    database, photos, positions = places
    assert run_cli(['--mode=extract', f'--resume={run_dir}', f'--image_dir={database}',
                    f'--export_dir={tmp_path / "feats"}', *FAST]) == 0
    names = sorted(positions)
    with open(tmp_path / 'positions.csv', 'w') as f:
        f.write('name,lat,lon\n' + ''.join(f'{name},{40 + i / 100},{-80 + i / 100}\n' for i, name in
                                           enumerate(names[:-1])))  # the last image has no position
    assert query_cli(run_cli, run_dir, tmp_path / 'feats' / 'global-feats-netvlad.h5', photos / 'photo1.jpg',
                     tmp_path / 'out', '--num_matched=12', f'--positions={tmp_path / "positions.csv"}',
                     f'--image_dir={database}') == 0
    rows = read_csv(tmp_path / 'out' / 'photo1.csv')
    expected_names, _ = brute_force_top(model, database, names, photos / 'photo1.jpg', 12)
    assert [row['database_image'] for row in rows] == expected_names
    for row in rows:
        index = names.index(row['database_image'])
        expected = ('', '') if index == 11 else (str(40 + index / 100), str(-80 + index / 100))
        assert (row['lat'], row['lon']) == expected
    best_placed = next(row for row in rows if row['lat'])
    summary = read_csv(tmp_path / 'out' / 'queries.csv')[0]
    assert (summary['estimated_lat'], summary['estimated_lon']) == (best_placed['lat'], best_placed['lon'])


def test_query_errors(random_float_run, places, tmp_path, run_cli, capsys):
    run_dir, _ = random_float_run
    database, photos, _ = places
    assert query_cli(run_cli, run_dir, database, photos, tmp_path / 'out', '--num_matched=13') == 2
    assert '--num_matched 13 is larger than the database' in error_paragraph(capsys.readouterr().err)

    other = tmp_path / 'other.h5'
    with h5py.File(other, 'w') as f:
        f.create_group('x.jpg').create_dataset('global_descriptor', data=np.ones(7, np.float32) / 7 ** 0.5)
    assert query_cli(run_cli, run_dir, other, photos, tmp_path / 'out', '--num_matched=1') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(other) in message and '7-D' in message and '2048-D' in message

    (tmp_path / 'empty').mkdir()
    assert query_cli(run_cli, run_dir, database, tmp_path / 'empty', tmp_path / 'out') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'holds no image' in message and '--query' in message
    assert not (tmp_path / 'out').exists()

    (photos / 'broken.jpg').write_bytes(b'\xff\xd8 not really')
    assert query_cli(run_cli, run_dir, database, photos, tmp_path / 'out') == 2
    assert 'broken.jpg' in error_paragraph(capsys.readouterr().err)
    assert query_cli(run_cli, run_dir, database, photos, tmp_path / 'out', '--skip_unreadable') == 0
    assert 'broken.jpg' in capsys.readouterr().out
    assert sorted(row['query'] for row in read_csv(tmp_path / 'out' / 'queries.csv')) == \
        ['photo0.jpg', 'photo1.jpg', 'photo2.jpg']

    (tmp_path / 'bad.csv').write_text('file,x,y\na,1,2\n')
    assert query_cli(run_cli, run_dir, database, photos, tmp_path / 'out', f'--positions={tmp_path / "bad.csv"}') == 2
    assert 'name,east,north' in error_paragraph(capsys.readouterr().err)
