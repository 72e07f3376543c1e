"""Large-scale evaluation: chunked search against one-shot search, descriptor files (streamed, validated, sharded
and merged), PCA whitening (the maths, the stored layer, the recall it keeps) and the approximate indexes."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import error_paragraph
from netvlad_toolkit import cli as main
from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.model.centroids import initialised_model
from netvlad_toolkit.modes.pca import fit_whitening
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.search import retrieval
from netvlad_toolkit.search.descriptors import DescriptorFile, load_descriptor_file, open_parts, part_name, part_rows
from netvlad_toolkit.search.retrieval import approximate_search, exact_search, recall_curve
from netvlad_toolkit.utils.commons import UserError

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '16', '--latency_size', '64x80', '--split', 'test']
MODEL = ['--arch=alexnet', '--fromscratch', '--num_clusters=8']


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class RowReads:
    """An array that records the largest number of rows any single read asked for."""

    def __init__(self, array):
        self.array, self.largest = array, 0

    @property
    def shape(self):
        return self.array.shape

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        rows = self.array[key]
        self.largest = max(self.largest, len(rows))
        return rows


@pytest.fixture(scope='module')
def random_set():
    rng = np.random.default_rng(0)
    db, queries = unit_rows(rng, 500, 64), unit_rows(rng, 120, 64)
    positives = [np.sort(rng.choice(500, rng.integers(0, 20), replace=False)) for _ in range(120)]
    return db, queries, positives


# ---------------------------------------------------------------------------------------------- chunked search

@pytest.mark.parametrize('db_chunk, query_chunk', [(1, 1), (7, 120), (500, 13), (25, 25), (64, 1), (499, 119)])
def test_chunked_search_equals_one_shot(random_set, db_chunk, query_chunk):
    """Any split of database and queries into chunks gives the same top-25, distances and recalls."""
    db, queries, positives = random_set
    one_dist, one_index = exact_search(db, queries, 25, db_chunk=len(db), query_chunk=len(queries))
    dist, index = exact_search(db, queries, 25, db_chunk=db_chunk, query_chunk=query_chunk)
    np.testing.assert_array_equal(index, one_index)
    np.testing.assert_allclose(dist, one_dist, atol=1e-5)
    np.testing.assert_array_equal(recall_curve(index, positives), recall_curve(one_index, positives))


def test_search_reads_one_chunk_at_a_time(random_set, monkeypatch):
    """No read of the database or the queries is larger than a chunk, with the default chunk size as well."""
    db, queries, _ = random_set
    db_reads, query_reads = RowReads(db), RowReads(queries)
    exact_search(db_reads, query_reads, 25, db_chunk=40, query_chunk=16)
    assert (db_reads.largest, query_reads.largest) == (40, 16)
    monkeypatch.setattr(retrieval, 'SEARCH_CHUNK_BYTES', 4 * 64 * 30)  # 30 rows of 64-D float32
    db_reads, query_reads = RowReads(db), RowReads(queries)
    _, index = exact_search(db_reads, query_reads, 25)
    assert (db_reads.largest, query_reads.largest) == (30, 30)
    np.testing.assert_array_equal(index, exact_search(db, queries, 25, db_chunk=500, query_chunk=120)[1])


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_search_of_descriptor_files_equals_in_memory(random_set, tmp_path, dtype):
    db, queries, _ = random_set
    whole = DescriptorFile.create(str(tmp_path / 'whole.npy'), 620, 64, dtype)
    whole[0:500], whole[500:620] = db, queries
    stored = np.load(tmp_path / 'whole.npy')  # a plain .npy file
    assert stored.dtype == np.dtype(dtype) and stored.shape == (620, 64)
    _, from_file = exact_search(whole.view(0, 500), whole.view(500, 620), 25, db_chunk=33, query_chunk=17)
    _, in_memory = exact_search(stored[:500], stored[500:], 25, db_chunk=500, query_chunk=120)
    np.testing.assert_array_equal(from_file, in_memory)


def cli(data, runs, *flags):
    return main.main([*MODEL, f'--dataPath={data}', f'--runsPath={runs}', *FAST, *map(str, flags)])


def test_evaluate_streams_to_a_file_and_removes_it(clustered_data, tmp_path, monkeypatch):
    """evaluate() through small chunks of a descriptor file gives the one-shot in-memory predictions, and leaves
    nothing in --cachePath."""
    opt = main.parse_options(['--mode=test', *MODEL, f'--dataPath={clustered_data}', *FAST,
                              f'--cachePath={tmp_path / "cache"}'])
    model = initialised_model(opt).eval()
    dataset = load_dataset(opt, 'test')
    descriptors = retrieval.extract_descriptors(model, dataset, opt, torch.device('cpu'))
    _, expected = exact_search(descriptors[:60], descriptors[60:], 25, db_chunk=60, query_chunk=30)
    monkeypatch.setattr(retrieval, 'SEARCH_CHUNK_BYTES', 4 * 2048 * 7)  # 7 rows of 2048-D per chunk
    result = retrieval.evaluate(model, dataset, opt, torch.device('cpu'))
    np.testing.assert_array_equal(result['predictions'], expected)
    assert result['descriptor_dim'] == 2048 and set(result['recalls']) == {1, 5, 10, 20}
    assert list((tmp_path / 'cache').iterdir()) == []


# ---------------------------------------------------------------------------------------------- descriptor files

@pytest.fixture
def descriptor_file(tmp_path):
    path = tmp_path / 'test_64d_part000of001.npy'
    np.save(path, unit_rows(np.random.default_rng(3), 50, 64))
    return path


def test_load_descriptor_file_accepts_a_good_file(descriptor_file):
    descriptors = load_descriptor_file(str(descriptor_file), 50, 64)
    np.testing.assert_array_equal(descriptors[10:20], np.load(descriptor_file)[10:20])


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), 'is truncated'),
    (lambda p: p.write_bytes(p.read_bytes() + b'\0' * 256), 'is too long'),
    (lambda p: p.write_bytes(b'garbage' + p.read_bytes()[7:]), 'is not a .npy array file'),
    (lambda p: p.write_bytes(b''), 'is not a .npy array file'),
    (lambda p: np.save(p, np.zeros((50, 64), dtype=np.int32)), 'expected a 2-D row-major float16 or float32'),
    (lambda p: np.save(p, unit_rows(np.random.default_rng(0), 50, 32)), '32-D descriptors, but the model gives 64-D'),
    (lambda p: np.save(p, unit_rows(np.random.default_rng(0), 49, 64)), 'holds 49 descriptors; expected 50'),
    (lambda p: p.unlink(), 'does not exist'),
])
def test_damaged_descriptor_file_is_a_clear_error(descriptor_file, damage, message):
    damage(descriptor_file)
    with pytest.raises(UserError, match=message) as error:
        load_descriptor_file(str(descriptor_file), 50, 64)
    assert str(descriptor_file) in str(error.value)


@pytest.mark.parametrize('bad_value', [np.nan, 0.0, 3.0])
def test_corrupt_rows_are_a_clear_error(descriptor_file, bad_value):
    """A header and size that look right over rows that are not the network's unit vectors (garbage, a region
    never written)."""
    rows = np.load(descriptor_file)
    rows[37] = bad_value
    np.save(descriptor_file, rows)
    with pytest.raises(UserError, match=r'is corrupt: row 37 '):
        load_descriptor_file(str(descriptor_file), 50, 64)


# ---------------------------------------------------------------------------------------------- sharding

def test_sharded_extraction_merges_to_the_one_process_result(clustered_data, tmp_path, monkeypatch, capsys):
    """Three 'torchrun' processes each write a part; --descriptors merges them to the one-process recalls."""
    runs, parts = tmp_path / 'runs', tmp_path / 'parts'
    assert cli(clustered_data, runs, '--mode=test') == 0
    expected = json.loads((runs / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    monkeypatch.setenv('WORLD_SIZE', '3')
    for rank in range(3):
        monkeypatch.setenv('RANK', str(rank))
        assert cli(clustered_data, runs, '--mode=test', f'--cachePath={parts}') == 0
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.delenv('RANK')
    names = sorted(p.name for p in parts.iterdir())
    assert names == [f'test_2048d_part{r:03d}of003.npy' for r in range(3)]
    assert [len(np.load(parts / name)) for name in names] == [30, 30, 30]
    assert cli(clustered_data, runs, '--mode=test', '--descriptors', *sorted(parts.iterdir())) == 0
    merged = json.loads((runs / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    assert merged['recalls'] == expected['recalls'] and merged['curve'] == expected['curve']

    capsys.readouterr()
    assert cli(clustered_data, runs, '--mode=test', '--descriptors', parts / names[0], parts / names[2]) == 2
    assert 'Descriptor parts 1 of 3 are missing' in error_paragraph(capsys.readouterr().err)
    (parts / names[1]).write_bytes((parts / names[1]).read_bytes()[:-100])
    assert cli(clustered_data, runs, '--mode=test', '--descriptors', *sorted(parts.iterdir())) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert str(parts / names[1]) in paragraph and 'is truncated' in paragraph


def test_torchrun_without_cache_path_is_a_clear_error(clustered_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    assert cli(clustered_data, tmp_path / 'runs', '--mode=test') == 2
    assert 'give --cachePath' in error_paragraph(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- whitening

@pytest.mark.parametrize('n, dim_in, dim_out', [(400, 48, 20), (40, 300, 39), (60, 300, 12)])
def test_whitening_is_pca_and_whitens_its_sample(n, dim_in, dim_out):
    """Against numpy's eigendecomposition of the full covariance: rows of W are the top principal directions
    scaled by 1/sqrt(eigenvalue), and W x + b has zero mean and identity covariance on the sample; both the
    covariance (D <= n) and the Gram (D > n) routes."""
    rng = np.random.default_rng(n + dim_in)
    sample = (rng.normal(size=(n, dim_in)) * np.geomspace(3, 0.05, dim_in) + rng.normal(size=dim_in)).astype(np.float32)
    weight, bias, eigenvalues = (t.double().numpy() for t in fit_whitening(sample, dim_out, eps=0.0))
    reference_values, reference_vectors = np.linalg.eigh(np.cov(sample.astype(np.float64).T))
    reference_values, reference_vectors = reference_values[::-1][:dim_out], reference_vectors[:, ::-1][:, :dim_out]
    np.testing.assert_allclose(eigenvalues, reference_values, rtol=1e-6)
    cosines = np.abs(np.sum(weight / np.linalg.norm(weight, axis=1, keepdims=True) * reference_vectors.T, axis=1))
    np.testing.assert_allclose(cosines, 1, atol=1e-4)
    whitened = sample.astype(np.float64) @ weight.T + bias
    np.testing.assert_allclose(whitened.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(whitened.T), np.eye(dim_out), atol=1e-3)


@pytest.fixture(scope='module')
def whitened_run(clustered_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp('pca_runs')
    assert cli(clustered_data, runs, '--mode=pca', '--pca_dim=64') == 0
    return runs, runs / 'alexnet_offtheshelf_pca64'


def test_whitening_is_stored_and_reloaded(whitened_run, clustered_data):
    """The new run folder holds the layer; loading it gives pooling -> whitening -> L2 normalisation."""
    _, run = whitened_run
    opt = main.parse_options(['--mode=test', f'--resume={run}', f'--dataPath={clustered_data}', *FAST])
    model, checkpoint = open_run(opt)
    model.eval()
    assert model.output_dim == 64 and model.whiten.weight.shape == (64, 2048)
    assert checkpoint['pca']['dim'] == 64 and checkpoint['pca']['images'] == 120
    assert checkpoint['variant'] == 'off-the-shelf (k-means init) + PCA-whitening 64'
    test_set = load_dataset(main.parse_options(['--mode=test', f'--dataPath={clustered_data}']), 'test')
    images = torch.stack([test_set[i][0] for i in range(4)])
    with torch.no_grad():
        raw = model.pool(model.encoder(images))
        expected = F.normalize(raw @ checkpoint['state_dict']['whiten.weight'].T
                               + checkpoint['state_dict']['whiten.bias'], dim=1)
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_whitening_keeps_recall(whitened_run, clustered_data):
    """On the tiny test split (30 queries), the 64-D whitened descriptor of the untrained network does as well
    as its 2048-D raw one: mean Recall@{1,5,10,20} no lower, no single Recall@N more than 2 queries lower; test
    mode of the new folder reproduces what pca mode reported."""
    runs, run = whitened_run
    report = json.loads((run / 'pca_test.json').read_text())
    raw, whitened = report['raw']['recalls'], report['whitened']['recalls']
    assert report['raw']['descriptor_dim'] == 2048 and report['whitened']['descriptor_dim'] == 64
    assert np.mean(list(whitened.values())) >= np.mean(list(raw.values()))
    assert all(whitened[n] >= raw[n] - 2 / 30 - 1e-9 for n in raw)
    assert cli(clustered_data, runs, '--mode=test', f'--resume={run}') == 0
    tested = json.loads((run / 'test_test.json').read_text())
    assert tested['descriptor_dim'] == 64
    np.testing.assert_allclose(list(tested['recalls'].values()), list(whitened.values()))
    variants = [json.loads(line)['variant'] for line in (runs / 'results.jsonl').read_text().splitlines()]
    assert variants[:2] == ['off-the-shelf (k-means init)', 'off-the-shelf (k-means init) + PCA-whitening 64']


def test_default_pca_dim_is_capped_and_an_explicit_one_is_an_error(clustered_data, tmp_path, capsys):
    runs = tmp_path / 'runs'
    assert cli(clustered_data, runs, '--mode=pca', '--pca_dim=200') == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert '--pca_dim 200 is more than 120 training images span at most 119 dimensions' in paragraph
    assert cli(clustered_data, runs, '--mode=pca', '--pca_images=40') == 0  # default 4096 -> 39
    assert 'whitening to 39 dimensions' in capsys.readouterr().out
    assert (runs / 'alexnet_offtheshelf_pca39' / 'checkpoints' / 'checkpoint.pth.tar').is_file()


# ---------------------------------------------------------------------------------------------- approximate

@pytest.mark.parametrize('kind, least_top1', [('hnsw', 0.95), ('ivfpq', 0.5)])
def test_approximate_search_finds_most_exact_neighbours(kind, least_top1):
    rng = np.random.default_rng(5)
    centres = unit_rows(rng, 100, 32)
    db = centres[rng.integers(0, 100, 3000)] + 0.1 * unit_rows(rng, 3000, 32)
    queries = centres[rng.integers(0, 100, 200)] + 0.1 * unit_rows(rng, 200, 32)
    _, exact = exact_search(db, queries, 10)
    approximate = approximate_search(kind, db, queries, 10)
    assert approximate.shape == (200, 10)
    assert np.mean(approximate[:, 0] == exact[:, 0]) >= least_top1


def test_approximate_index_reports_recall_beside_exact(clustered_data, tmp_path, capsys):
    runs = tmp_path / 'runs'
    assert cli(clustered_data, runs, '--mode=test') == 0
    exact = json.loads((runs / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    assert cli(clustered_data, runs, '--mode=test', '--index=ivfpq', '--compare_exact') == 0
    result = json.loads((runs / 'alexnet_offtheshelf' / 'test_test_ivfpq.json').read_text())  # beside the exact one
    assert result['index'] == 'ivfpq' and result['exact']['recalls'] == exact['recalls']
    assert 'Recall@N        exact      ivfpq     change' in capsys.readouterr().out


def test_faiss_gpu_is_used_when_present_and_allowed(random_set, monkeypatch):
    """With faiss-gpu and a GPU (stood in for here), both searches move their indexes to it, unless --nocuda."""
    import faiss
    db, queries, positives = random_set
    moved = []
    monkeypatch.setattr(faiss, 'StandardGpuResources', lambda: 'gpu resources', raising=False)
    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 1)
    monkeypatch.setattr(faiss, 'index_cpu_to_gpu', raising=False,
                        value=lambda res, device, index: moved.append(type(faiss.downcast_index(index))) or index)
    whole = np.concatenate([db, queries])
    expected = retrieval.search_and_recall(whole, 500, positives, main.parse_options(['--mode=test', '--nocuda']))
    assert moved == []
    for flags, index_type in ((['--index=flat'], faiss.IndexFlatL2), (['--index=ivfpq'], faiss.IndexIVFPQ)):
        result = retrieval.search_and_recall(whole, 500, positives, main.parse_options(['--mode=test', *flags]))
        assert moved.pop() == index_type
        if flags == ['--index=flat']:
            np.testing.assert_array_equal(result['predictions'], expected['predictions'])


def test_parts_are_searched_in_place_as_one_array(tmp_path):
    """Slices and views of DescriptorParts equal those of the rows concatenated in memory, across part borders."""
    rng = np.random.default_rng(0)
    whole = unit_rows(rng, 10, 8).astype(np.float32)
    for rank in range(3):
        start, stop = part_rows(10, rank, 3)
        np.save(tmp_path / part_name('test', 8, rank, 3), whole[start:stop])
    parts = open_parts(sorted(map(str, tmp_path.iterdir())), 'test', 10, 8)
    assert parts.shape == (10, 8) and not any(p.suffix != '.npy' for p in tmp_path.iterdir())
    np.testing.assert_array_equal(parts[2:9], whole[2:9])
    np.testing.assert_array_equal(parts.view(1, 8)[2:6], whole[3:7])
    _, found = exact_search(parts, parts.view(7, 10), 3, db_chunk=4, query_chunk=2)
    np.testing.assert_array_equal(found[:, 0], [7, 8, 9])


def test_parts_of_another_split_or_mixed_dtypes_are_clear_errors(tmp_path):
    rng = np.random.default_rng(1)
    for rank, dtype in enumerate([np.float32, np.float16]):
        np.save(tmp_path / part_name('val', 8, rank, 2), unit_rows(rng, 5, 8).astype(dtype))
    paths = sorted(map(str, tmp_path.iterdir()))
    with pytest.raises(UserError, match=r'holds descriptors of split val .* but --split=test'):
        open_parts(paths, 'test', 10, 8)
    with pytest.raises(UserError, match=r'mix dtypes \(float16, float32\)'):
        open_parts(paths, 'val', 10, 8)
