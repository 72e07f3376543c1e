"""Exact search and recall against brute force on the full distance matrix."""
import numpy as np
import pytest

from netvlad_toolkit.search.retrieval import exact_search, recall_curve


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def descriptors():
    rng = np.random.default_rng(0)
    return unit_rows(rng, 300, 32), unit_rows(rng, 70, 32)


def brute_force(db, queries, k):
    dist = ((queries.astype(np.float64)[:, None, :] - db.astype(np.float64)[None]) ** 2).sum(axis=2)
    order = np.argsort(dist, axis=1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def test_exact_search_matches_brute_force(descriptors):
    db, queries = descriptors
    dist, index = exact_search(db, queries, 25)
    expected_dist, expected_index = brute_force(db, queries, 25)
    assert index.shape == (70, 25) and dist.shape == (70, 25)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(dist, expected_dist, atol=1e-5)  # squared L2 distances


@pytest.mark.parametrize('db_chunk', [7, 25, 64, 299])
def test_chunked_search_equals_one_shot(descriptors, db_chunk):
    """Chunks smaller than k, equal to k, and a last chunk of one row must all merge to the one-shot result."""
    db, queries = descriptors
    one_dist, one_index = exact_search(db, queries, 25)
    dist, index = exact_search(db, queries, 25, db_chunk=db_chunk)
    np.testing.assert_array_equal(index, one_index)
    np.testing.assert_allclose(dist, one_dist, atol=1e-6)


def test_k_larger_than_database(descriptors):
    db, queries = descriptors
    dist, index = exact_search(db[:10], queries, 25, db_chunk=4)
    expected_dist, expected_index = brute_force(db[:10], queries, 10)
    assert index.shape == (70, 10)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(dist, expected_dist, atol=1e-5)


def brute_force_curve(predictions, positives, max_n):
    curve = []
    for n in range(1, max_n + 1):
        found = [len(set(predictions[q, :n].tolist()) & set(np.asarray(positives[q]).tolist())) > 0
                 for q in range(len(predictions))]
        curve.append(np.mean(found))
    return np.array(curve)


def test_recall_curve_matches_brute_force():
    rng = np.random.default_rng(1)
    num_db, num_q = 200, 60
    predictions = np.stack([rng.permutation(num_db)[:25] for _ in range(num_q)])
    positives = [np.sort(rng.choice(num_db, rng.integers(0, 15), replace=False)) for _ in range(num_q)]
    curve = recall_curve(predictions, positives)
    np.testing.assert_allclose(curve, brute_force_curve(predictions, positives, 25))
    assert curve[0] < curve[-1]  # the random case really exercises ranks beyond the first


def test_recall_curve_end_to_end_on_geometry():
    """Descriptors that encode position: recall from exact_search + recall_curve equals brute force."""
    rng = np.random.default_rng(2)
    utm_db = rng.uniform(0, 400, size=(250, 2))
    utm_q = rng.uniform(0, 400, size=(80, 2))
    noise = lambda n: rng.normal(0, 30, size=(n, 2))  # noisy positions as 2-D "descriptors"
    db_desc = np.hstack([utm_db + noise(250), np.zeros((250, 6))]).astype(np.float32)
    q_desc = np.hstack([utm_q + noise(80), np.zeros((80, 6))]).astype(np.float32)
    dist = np.sqrt(((utm_q[:, None] - utm_db[None]) ** 2).sum(axis=2))
    positives = [np.flatnonzero(row <= 25) for row in dist]
    _, predictions = exact_search(db_desc, q_desc, 20, db_chunk=64)
    curve = recall_curve(predictions, positives)
    _, expected_predictions = brute_force(db_desc, q_desc, 20)
    np.testing.assert_allclose(curve, brute_force_curve(expected_predictions, positives, 20))
    assert 0 < curve[0] < curve[-1] <= 1
