"""--mode=extract (hloc's global-feats HDF5) and --mode=pairs (hloc's pairs_from_retrieval), checked by reopening the
files with plain h5py and against descriptors and top-k lists computed here."""
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CONFIGS, error_paragraph, read_image, save_run
from netvlad_toolkit.search import global_features, retrieval

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '4']
@pytest.fixture
def image_dir(tiny_data, tmp_path):
    """Images in nested folders, suffixes in several cases, two image sizes, and a file that is no image."""
    root = tmp_path / 'images'
    sources = sorted((tiny_data / '000').glob('*.jpg'))[:7]
    names = ['a.jpg', 'b.JPG', 'sub/c.png', 'sub/deeper/d.jpeg', 'sub/deeper/e.Jpeg', 'f-g.jpg', 'sub/h.PNG']
    for index, (source, name) in enumerate(zip(sources, names)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source).convert('RGB')
        if index % 3 == 2:
            image = image.resize((96, 72))  # another size: extracted in its own batch
        image.save(root / name, format='PNG' if name.lower().endswith('png') else 'JPEG', quality=95)
    (root / 'notes.txt').write_text('not an image')
    return root


def hloc_names(path):
    """Names as hloc's list_h5_names lists them: the parent group of every dataset."""
    names = []
    with h5py.File(path, 'r') as f:
        f.visititems(lambda _, obj: names.append(obj.parent.name.strip('/')) if isinstance(obj, h5py.Dataset) else None)
    return sorted(set(names))


def read_h5(path):
    with h5py.File(path, 'r') as f:
        return {name: (f[name]['global_descriptor'][()], f[name]['image_size'][()]) for name in hloc_names(path)}


def reference_descriptor(model, path, size=None):
    """The model's descriptor of one image, loaded and normalised by the test's own reader."""
    if size is not None:
        resized = path.parent / f'resized_{path.stem}.png'
        Image.open(path).convert('RGB').resize(size, Image.BILINEAR).save(resized)
        path = resized
    with torch.inference_mode():
        return model(read_image(path).float()[None])[0].numpy()


class Killed(Exception):
    """Stands for the process being killed between two writes."""


def counting_extraction(monkeypatch, kill_after=None):
    """Record the images of each extracted batch (a list, returned); after kill_after batches, raise as a kill."""
    batches = []
    real_extract = retrieval.extract_descriptors

    def counted(model, dataset, *args, **kwargs):
        if len(batches) == kill_after:
            raise Killed
        batches.append(len(dataset))
        return real_extract(model, dataset, *args, **kwargs)

    monkeypatch.setattr(global_features, 'extract_descriptors', counted)
    return batches


def extract_cli(run_cli, run_dir, image_dir, export_dir, *flags):
    return run_cli(['--mode=extract', f'--resume={run_dir}', f'--image_dir={image_dir}', f'--export_dir={export_dir}',
                    *FAST, *flags])


# ---------------------------------------------------------------------------------------------- extract

@pytest.mark.parametrize('variant', sorted(CONFIGS))
def test_extract_writes_hloc_layout(variant, image_dir, tmp_path, run_cli):
    run_dir = tmp_path / variant
    model = save_run(run_dir, CONFIGS[variant])
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'out') == 0
    path = tmp_path / 'out' / 'global-feats-netvlad.h5'
    expected = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob('*')
                      if p.is_file() and p.suffix != '.txt')
    assert hloc_names(path) == expected
    with h5py.File(path, 'r') as f:
        assert set(f['sub']['deeper'].keys()) == {'d.jpeg', 'e.Jpeg'}  # a '/' nests groups
        for name in expected:
            descriptor, size = f[name]['global_descriptor'], f[name]['image_size']
            assert descriptor.dtype == np.float32 and descriptor.shape == (model.output_dim,)
            assert size.dtype == np.int64 and size.shape == (2,)
            assert list(size[()]) == list(Image.open(image_dir / name).size)  # [width, height]
            np.testing.assert_allclose(np.linalg.norm(descriptor[()]), 1.0, atol=1e-5)
            np.testing.assert_allclose(descriptor[()], reference_descriptor(model, image_dir / name), atol=1e-5)


def test_as_half_and_resize_max(random_float_run, image_dir, tmp_path, run_cli):
    run_dir, model = random_float_run
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'out', '--as_half', '--resize_max=60') == 0
    written = read_h5(tmp_path / 'out' / 'global-feats-netvlad.h5')
    for name, (descriptor, size) in written.items():
        width, height = Image.open(image_dir / name).size
        assert descriptor.dtype == np.float16 and list(size) == [width, height]
        scale = 60 / max(width, height)
        expected = reference_descriptor(model, image_dir / name, (round(width * scale), round(height * scale)))
        np.testing.assert_allclose(descriptor.astype(np.float32), expected, atol=2e-3)


def test_killed_extraction_resumes_to_the_straight_result(random_float_run, image_dir, tmp_path, run_cli, monkeypatch):
    run_dir, _ = random_float_run
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'straight') == 0
    monkeypatch.setattr(global_features, 'CHUNK_BATCHES', 1)
    killed = counting_extraction(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        extract_cli(run_cli, run_dir, image_dir, tmp_path / 'resumed', '--cacheBatchSize=2')
    out = tmp_path / 'resumed'
    assert not (out / 'global-feats-netvlad.h5').exists()  # only the .partial: nothing looks finished
    assert len(hloc_names(out / 'global-feats-netvlad.h5.partial')) == sum(killed) == 4

    resumed_batches = counting_extraction(monkeypatch)
    assert extract_cli(run_cli, run_dir, image_dir, out, '--cacheBatchSize=2') == 0
    assert sum(resumed_batches) == 7 - 4  # the finished images were skipped
    assert not (out / 'global-feats-netvlad.h5.partial').exists()
    straight = read_h5(tmp_path / 'straight' / 'global-feats-netvlad.h5')
    resumed = read_h5(out / 'global-feats-netvlad.h5')
    assert sorted(straight) == sorted(resumed)
    for name in straight:
        np.testing.assert_allclose(resumed[name][0], straight[name][0], atol=1e-6)
        np.testing.assert_array_equal(resumed[name][1], straight[name][1])


def test_existing_groups_are_replaced_and_others_kept(random_float_run, image_dir, tmp_path, run_cli):
    run_dir, model = random_float_run
    path = tmp_path / 'out' / 'global-feats-netvlad.h5'
    path.parent.mkdir()
    stale = np.zeros(model.output_dim, np.float32)
    stale[0] = 1
    with h5py.File(path, 'w') as f:
        for name in ('a.jpg', 'elsewhere/x.jpg'):
            f.create_group(name).create_dataset('global_descriptor', data=stale)
            f[name].create_dataset('image_size', data=np.array([1, 1], np.int64))
    assert extract_cli(run_cli, run_dir, image_dir, path.parent) == 0
    written = read_h5(path)
    assert 'elsewhere/x.jpg' in written and len(written) == 8
    np.testing.assert_allclose(written['a.jpg'][0], reference_descriptor(model, image_dir / 'a.jpg'), atol=1e-5)


def test_extract_errors(random_float_run, image_dir, tmp_path, run_cli, capsys):
    run_dir, _ = random_float_run
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    assert extract_cli(run_cli, run_dir, tmp_path / 'empty', tmp_path / 'out1') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'holds no image' in message and str(tmp_path / 'empty') in message
    assert not (tmp_path / 'out1').exists()

    (image_dir / 'sub' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'out2') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'broken.jpg' in message and '--skip_unreadable' in message

    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'out3', '--skip_unreadable') == 0
    out = capsys.readouterr().out
    assert 'broken.jpg' in out and 'Wrote the descriptors of 7 images' in out and '(1 unreadable left out)' in out
    assert len(hloc_names(tmp_path / 'out3' / 'global-feats-netvlad.h5')) == 7


def test_truncated_image_is_skipped_from_its_batch(random_float_run, image_dir, tmp_path, run_cli, capsys):
    """A file whose header reads but whose pixels do not: found while decoding a batch, not before."""
    run_dir, model = random_float_run
    data = (image_dir / 'a.jpg').read_bytes()
    (image_dir / 'a_truncated.jpg').write_bytes(data[:len(data) // 3])
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'stopped') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'a_truncated.jpg' in message and '--skip_unreadable' in message
    assert not (tmp_path / 'stopped' / 'global-feats-netvlad.h5').exists()
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path / 'out', '--skip_unreadable') == 0
    out = capsys.readouterr().out
    assert 'a_truncated.jpg' in out and 'Wrote the descriptors of 7 images' in out  # the one skipped while decoding
    written = read_h5(tmp_path / 'out' / 'global-feats-netvlad.h5')
    assert 'a_truncated.jpg' not in written and len(written) == 7
    np.testing.assert_allclose(written['b.JPG'][0], reference_descriptor(model, image_dir / 'b.JPG'), atol=1e-5)


def test_file_of_another_dimension_is_refused(random_float_run, image_dir, tmp_path, run_cli, capsys):
    run_dir, _ = random_float_run
    path = tmp_path / 'out' / 'global-feats-netvlad.h5'
    path.parent.mkdir()
    with h5py.File(path, 'w') as f:
        f.create_group('old.jpg').create_dataset('global_descriptor', data=np.ones(7, np.float32))
        f['old.jpg'].create_dataset('image_size', data=np.array([1, 1], np.int64))
    before = path.read_bytes()
    assert extract_cli(run_cli, run_dir, image_dir, path.parent) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(path) in message and '(7,)' in message
    assert path.read_bytes() == before and not path.with_suffix('.h5.partial').exists()


# ---------------------------------------------------------------------------------------------- pairs

def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_features(path, names, descriptors):
    """A global-feats file written with plain h5py, as hloc writes it."""
    with h5py.File(path, 'w') as f:
        for name, descriptor in zip(names, descriptors):
            group = f.create_group(name)
            group.create_dataset('global_descriptor', data=descriptor)
            group.create_dataset('image_size', data=np.array([640, 480], np.int64))


def brute_force_pairs(query_names, query_desc, db_names, db_desc, k):
    """hloc's rule on the full similarity matrix: no pair of equal names, none of negative similarity, top k."""
    lines = []
    sim = query_desc.astype(np.float64) @ db_desc.astype(np.float64).T
    for q, name in enumerate(query_names):
        candidates = [(-sim[q, d], d) for d in range(len(db_names)) if db_names[d] != name and sim[q, d] >= 0]
        lines += [f'{name} {db_names[d]}' for _, d in sorted(candidates)[:k]]
    return lines


def pairs_cli(run_cli, *flags):
    return run_cli(['--mode=pairs', *flags])


@pytest.fixture
def small_chunks(monkeypatch):
    """Search chunks of 5 rows (8-D float32), so that every side is split and merged."""
    monkeypatch.setattr(retrieval, 'SEARCH_CHUNK_BYTES', 5 * 8 * 4)


def test_pairs_of_one_file_equal_brute_force(tmp_path, run_cli, small_chunks):
    rng = np.random.default_rng(0)
    names = [f'seq{i % 3}/img{i:03d}.jpg' for i in range(37)]
    desc = unit_rows(rng, 37, 8)  # 8-D: many negative similarities
    write_features(tmp_path / 'feats.h5', names, desc)
    assert pairs_cli(run_cli, '--descriptors', tmp_path / 'feats.h5', '--num_matched', 20,
                     '--output', tmp_path / 'pairs.txt') == 0
    lines = (tmp_path / 'pairs.txt').read_text().split('\n')
    order = np.argsort(names)
    expected = brute_force_pairs([names[i] for i in order], desc[order], names, desc, 20)
    assert lines == expected
    assert any(len([l for l in lines if l.startswith(n + ' ')]) < 20 for n in names)  # negatives were dropped


def test_pairs_with_prefixes_lists_and_two_files(tmp_path, run_cli, small_chunks):
    rng = np.random.default_rng(1)
    db_names = [f'db/{i:03d}.jpg' for i in range(23)] + [f'other/{i}.jpg' for i in range(4)]
    query_names = [f'q/{i:03d}.jpg' for i in range(9)] + ['db/005.jpg']  # a query that is also a database image
    db_desc, query_desc = unit_rows(rng, 27, 8), unit_rows(rng, 10, 8)
    query_desc[-1] = db_desc[5]
    write_features(tmp_path / 'db.h5', db_names, db_desc)
    write_features(tmp_path / 'q.h5', query_names, query_desc)
    (tmp_path / 'queries.txt').write_text('# my queries\nq/003.jpg 640 480\n\ndb/005.jpg\nq/001.jpg\n')
    assert pairs_cli(run_cli, '--descriptors', tmp_path / 'q.h5', '--db_descriptors', tmp_path / 'db.h5',
                     '--query_list', tmp_path / 'queries.txt', '--db_prefix', 'db/', 'nothing/',
                     '--num_matched', 4, '--output', tmp_path / 'pairs.txt') == 0
    chosen = [3, 9, 1]
    expected = brute_force_pairs([query_names[i] for i in chosen], query_desc[chosen], db_names[:23], db_desc[:23], 4)
    assert (tmp_path / 'pairs.txt').read_text().split('\n') == expected
    assert not any(line == 'db/005.jpg db/005.jpg' for line in expected)


def test_top_k_by_dot_equals_brute_force(small_chunks):
    rng = np.random.default_rng(2)
    db, queries = unit_rows(rng, 41, 8), unit_rows(rng, 13, 8)
    scores, found = retrieval.top_k_by_dot(queries, db, 7)
    sim = queries.astype(np.float64) @ db.astype(np.float64).T
    expected = np.argsort(-sim, axis=1)[:, :7]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, expected, axis=1), atol=1e-6)


def test_pairs_errors(tmp_path, run_cli, capsys):
    rng = np.random.default_rng(3)
    write_features(tmp_path / 'a.h5', [f'{i}.jpg' for i in range(5)], unit_rows(rng, 5, 8))
    write_features(tmp_path / 'b.h5', [f'{i}.jpg' for i in range(5)], unit_rows(rng, 5, 16))
    base = ['--descriptors', tmp_path / 'a.h5', '--output', tmp_path / 'pairs.txt']
    assert pairs_cli(run_cli, *base, '--num_matched', 6) == 2
    assert '--num_matched 6 is larger than the database' in error_paragraph(capsys.readouterr().err)
    assert pairs_cli(run_cli, *base, '--num_matched', 2, '--db_descriptors', tmp_path / 'b.h5') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert '8-D' in message and '16-D' in message
    assert pairs_cli(run_cli, *base, '--num_matched', 2, '--query_prefix', 'x/') == 2
    assert 'x/' in error_paragraph(capsys.readouterr().err)
    assert not (tmp_path / 'pairs.txt').exists()


def test_extracted_file_feeds_pairs(random_float_run, image_dir, tmp_path, run_cli):
    """extract then pairs, end to end: every image's best match is found among the others."""
    run_dir, _ = random_float_run
    assert extract_cli(run_cli, run_dir, image_dir, tmp_path) == 0
    feats = tmp_path / 'global-feats-netvlad.h5'
    assert pairs_cli(run_cli, '--descriptors', feats, '--num_matched', 2, '--output', tmp_path / 'p.txt') == 0
    written = read_h5(feats)
    names = sorted(written)
    desc = np.stack([written[n][0] for n in names])
    assert (tmp_path / 'p.txt').read_text().split('\n') == brute_force_pairs(names, desc, names, desc, 2)
