"""The two training recipes rule by rule (--recipe reference|authors), each rule against a computation written here
from the authors' trainWeakly.m, dbBase.m and getBestEpoch.m; a short authors-recipe run; k-means on every sample."""
import json
import math
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import torch

from netvlad_toolkit import cli
from netvlad_toolkit.datasets.datasets import GroundTruth, SplitImages, query_sample, with_positive_floor
from netvlad_toolkit.training import training


def train_opt(*flags):
    return cli.parse_options(['--mode=train', '--arch=alexnet', *flags])


def test_the_authors_recipe_sets_every_rule_and_a_given_flag_wins():
    opt = train_opt('--recipe=authors', '--nNeg=5')
    training.apply_recipe(opt)
    for flag, value in training.AUTHORS_RECIPE.items():
        assert getattr(opt, flag) == (5 if flag == 'nNeg' else value), flag
    assert opt.backPropToLayer == 'conv2'  # demo.m trains AlexNet from conv2
    vgg = cli.parse_options(['--mode=train', '--arch=vgg16', '--recipe=authors'])
    training.apply_recipe(vgg)
    assert vgg.backPropToLayer == 'conv5_1'
    reference = train_opt()
    before = dict(vars(reference))
    training.apply_recipe(reference)
    assert vars(reference) == before  # the reference recipe is the defaults: nothing changes
    assert (reference.batch_queries, reference.neg_memory, reference.val_queries) == ('violating', 'violating', 0)


# ---------------------------------------------------------------------------------------------- batches

def test_the_authors_batches_cover_every_query_in_order_and_skip_inside_a_batch():
    """trainWeakly.m: floor(numQueries / batchSize) batches of consecutive queries of a random order; a query
    without a positive or a violating negative is skipped inside its batch."""
    num_q, batch = 11, 4
    data = SimpleNamespace(whole=SimpleNamespace(db_struct=SimpleNamespace(numQ=num_q)), num_db=100,
                           nontrivial=[[1] if q % 3 else [] for q in range(num_q)], queries=None)
    opt = train_opt('--batch_queries=all', f'--batchSize={batch}')
    order = training.epoch_queries(data, opt, np.random.default_rng(5))
    assert len(order) == 8 and len(set(order)) == 8 and set(order) <= set(range(num_q))
    usable = [q for q in order if q % 3 and q % 2]  # say: odd queries with a positive have a violating negative
    triplets = [(data.num_db + q, 0, [1]) for q in usable]
    mine, batches, counts = training.rank_batches(data, order, triplets, opt, 0, 1)
    expected = [[i for i, (row, _, _) in enumerate(triplets) if list(order).index(row - data.num_db) // batch == b]
                for b in range(2)]
    assert mine == triplets and batches == expected
    assert counts == [sum(1 for q in order[b * batch:(b + 1) * batch] if q % 3) for b in range(2)]


def test_the_ports_batches_pack_the_usable_triplets():
    opt = train_opt('--batchSize=4')
    triplets = [(100 + q, 0, [1]) for q in range(10)]
    mine, batches, counts = training.rank_batches(None, np.arange(30), triplets, opt, 0, 1)
    assert mine == triplets and batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and counts == [4, 4, 2]


def test_steps_per_epoch_follow_the_batch_rule(monkeypatch):
    """An epoch's steps: ceil(usable / 4) per chunk when usable triplets are packed (violating), the batches of 4
    queries holding a usable one otherwise (port: per chunk of queries with a positive; all: over every query).
    Mining is replaced by a fixed rule: query q is usable when q % 5 != 0."""
    num_q = 40
    data = SimpleNamespace(whole=SimpleNamespace(db_struct=SimpleNamespace(numQ=num_q)), num_db=100,
                           nontrivial=[[1]] * num_q, queries=np.arange(num_q))
    steps = {}
    monkeypatch.setattr(training, 'chunk_triplets', lambda data, source, model, chunk, *rest: [
        (data.num_db + int(q), 0, [1]) for q in chunk if q % 5])
    monkeypatch.setattr(training, 'train_chunk', lambda model, source, triplets, optimizer, opt, device, bar, writer,
                        step, batches, counts: (step + sum(1 for b in batches if b), []))
    for rule in ('violating', 'port', 'all'):
        opt = train_opt(f'--batch_queries={rule}', '--cacheRefreshRate=16')
        steps[rule], _ = training.train_epoch(None, data, None, None, None, opt, None, 1, 1, (0, 1), None, 0)
    order = np.random.default_rng([opt.seed, 1]).permutation(num_q)
    chunks = [order[s:s + 16] for s in range(0, num_q, 16)]
    assert steps['violating'] == sum(math.ceil(sum(1 for q in c if q % 5) / 4) for c in chunks)
    assert steps['port'] == sum(any(q % 5 for q in c[b:b + 4]) for c in chunks for b in range(0, len(c), 4))
    assert steps['all'] == sum(any(q % 5 for q in order[b:b + 4]) for b in range(0, num_q, 4))


# ---------------------------------------------------------------------------------------------- positives

def ground_truth_with_close_images():
    """One query at the origin; database images 0.5 m, 5 m, 9 m and 30 m east of it."""
    east = np.array([0.5, 5.0, 9.0, 30.0])
    return GroundTruth(name='generated', db_paths=[f'd{i}.jpg' for i in range(4)], query_paths=['q.jpg'],
                       utmDb=np.stack([east, np.zeros(4)], axis=1), utmQ=np.zeros((1, 2)), posDistThr=25.0,
                       nonTrivPosDistSqThr=100.0)


def test_the_trivial_positive_floor_drops_images_within_a_metre():
    split = SplitImages(ground_truth_with_close_images(), 'train')
    distances = np.linalg.norm(split.db_struct.utmDb - split.db_struct.utmQ[0], axis=1)
    assert list(split.nontrivial_positives()[0]) == list(np.flatnonzero(distances <= 10))  # the port: 0.5 m is one
    floored = with_positive_floor(split, 1.0)
    assert list(floored.nontrivial_positives()[0]) == list(np.flatnonzero((distances ** 2 > 1) & (distances <= 10)))
    assert list(floored.positives()[0]) == list(split.positives()[0])  # what counts as correct stays


# ---------------------------------------------------------------------------------------------- memory

def mining_setup(rng, num_db=30, num_q=4, dim=6):
    cache = rng.normal(size=(num_db + num_q, dim)).astype(np.float32)
    cache /= np.linalg.norm(cache, axis=1, keepdims=True)
    positives = [list(rng.choice(num_db, 2, replace=False)) for _ in range(num_q - 1)] + [[]]
    potential = [set(p) for p in positives]
    return cache, positives, potential


def test_the_memory_holds_the_nearest_candidates_or_the_violating_negatives():
    rng = np.random.default_rng(3)
    num_db, num_q = 30, 4
    cache, positives, potential = mining_setup(rng, num_db, num_q)
    data = SimpleNamespace(num_db=num_db, nontrivial=positives, potential=[sorted(p) for p in potential],
                           refresh_cache=lambda *args: torch.from_numpy(cache))
    chunk = np.arange(num_q)
    for rule in ('nearest', 'violating'):
        opt = train_opt('--loss=paper', f'--neg_memory={rule}', '--nNegCache=5', '--nNeg=3', '--nNegSample=12')
        memory = np.full((num_q, training.memory_width(opt)), -1, dtype=np.int64)
        memory[3] = 7  # the query without a positive: never mined, its memory stays
        candidate_rng = np.random.default_rng(9)
        drawn = training.draw_negative_candidates(np.random.default_rng(9), num_db, data.potential, 12)
        training.chunk_triplets(data, None, None, chunk, memory, opt, None, candidate_rng, 0, 1)
        assert (memory[3] == 7).all()
        for q in range(3):
            candidates = sorted(set(drawn[q][drawn[q] >= 0]))
            sq = {n: float(((cache[num_db + q] - cache[n]) ** 2).sum()) for n in candidates}
            pos = min(float(((cache[num_db + q] - cache[p]) ** 2).sum()) for p in positives[q])
            nearest = sorted(candidates, key=sq.get)
            expected = nearest[:5] if rule == 'nearest' else [n for n in nearest if sq[n] < pos + 0.1][:3]
            assert [int(n) for n in memory[q] if n >= 0] == expected, (rule, q)


# ---------------------------------------------------------------------------------------------- refreshes

def test_the_refresh_interval_doubles_at_each_learning_rate_drop():
    """trainWeakly.m: a refresh every ceil(compFeatsFrequency / batchSize) batches, that count times lrDownFactor
    (rounded) at every drop, which comes before epochs 6, 11, ... with lrDownFreq 5."""
    opt = train_opt('--recipe=authors')
    training.apply_recipe(opt)
    batches, expected = math.ceil(1000 / 4), {}
    for epoch in range(1, 13):
        if epoch != 1 and epoch % 5 == 1:
            batches = round(batches * 2)
        expected[epoch] = batches * 4
    assert {e: training.refresh_interval(opt, e, 10 ** 6) for e in expected} == expected
    assert training.refresh_interval(train_opt(), 11, 10 ** 6) == 1000  # the port: every 1000 queries throughout
    assert training.refresh_interval(train_opt('--cacheRefreshRate=0'), 3, 77) == 77


# ---------------------------------------------------------------------------------------------- validation

def test_the_val_sample_is_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    utm_q = rng.uniform(0, 100, (50, 2))
    truth = GroundTruth(name='val', db_paths=[f'd{i}' for i in range(20)], query_paths=[f'q{i}' for i in range(50)],
                        utmDb=rng.uniform(0, 100, (20, 2)), utmQ=utm_q, posDistThr=25.0, nonTrivPosDistSqThr=100.0)
    split = SplitImages(truth, 'val')
    sample = query_sample(split, 10, seed=123)
    again, other = query_sample(split, 10, seed=123), query_sample(split, 10, seed=7)
    kept = np.sort(np.random.default_rng(123).choice(50, 10, replace=False))
    assert sample.db_struct.query_paths == [f'q{q}' for q in kept] == again.db_struct.query_paths
    assert other.db_struct.query_paths != sample.db_struct.query_paths
    assert sample.db_struct.db_paths == truth.db_paths and len(sample) == 30
    assert [list(p) for p in sample.positives()] == [list(split.positives()[q]) for q in kept]
    assert query_sample(split, 1000, seed=1) is split  # fewer queries than asked: all of them


def authors_best_epoch(curves):
    """getBestEpoch.m over epochs' Recall@1..25 curves (recallNs = 1:5, 10:5:...): filter the epochs at the max of
    R@5, then R@4 .. R@1, then R@10, R@15, ... until one is left; the first of those left."""
    recall_ns = list(range(1, 6)) + list(range(10, 26, 5))
    order = [4, 3, 2, 1, 0] + list(range(5, len(recall_ns)))
    potential = np.ones(len(curves), dtype=bool)
    table = np.array([[c[n - 1] for n in recall_ns] for c in curves])
    for row in order:
        best = table[potential, row].max()
        potential &= np.abs(table[:, row] - best) < 1e-6
        if potential.sum() <= 1:
            break
    return int(np.flatnonzero(potential)[0])


def test_the_best_epoch_breaks_ties_as_the_authors():
    rng = np.random.default_rng(1)
    for _ in range(200):
        curves = [np.sort(rng.choice([0.2, 0.4, 0.6, 0.8], 25)).tolist() for _ in range(rng.integers(1, 6))]
        best, best_curve = 0, None
        for epoch, curve in enumerate(curves):
            if training.improves(curve, best_curve):
                best, best_curve = epoch, curve
        assert best == authors_best_epoch(curves)


# ---------------------------------------------------------------------------------------------- a real run

def test_an_authors_recipe_run_records_its_recipe_and_keeps_it_on_resume(tiny_data, tmp_path, run_cli):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    common = ['--dataset=synthetic', f'--dataPath={data}', '--arch=alexnet', '--fromscratch', '--num_clusters=8',
              '--nocuda', '--threads=0', '--cacheBatchSize=8']
    assert run_cli(['--mode=cluster', *common]) == 0
    run = tmp_path / 'run'
    assert run_cli(['--mode=train', *common, '--recipe=authors', '--nEpochs=1', '--nNegSample=40',
                    '--cacheRefreshRate=16', f'--savePath={run}']) == 0
    flags = json.loads((run / 'checkpoints' / 'flags.json').read_text())
    assert flags['recipe'] == 'authors' and flags['loss'] == 'paper' and flags['batch_queries'] == 'all'
    assert flags['cacheRefreshRate'] == 16 and flags['nEpochs'] == 1  # the flags given won
    assert run_cli(['--mode=train', *common, f'--resume={run}', '--nEpochs=2']) == 0
    resumed = json.loads((run / 'checkpoints' / 'flags.json').read_text())
    assert {k: resumed[k] for k in training.AUTHORS_RECIPE if k != 'nEpochs'} == \
        {k: flags[k] for k in training.AUTHORS_RECIPE if k != 'nEpochs'}
    state = torch.load(run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=False)
    assert state['epoch'] == 2 and state['hard_negatives'].shape[1] == 10  # the authors' memory of 10
    assert len(state['best_curve']) >= 5


# ---------------------------------------------------------------------------------------------- k-means

def test_kmeans_clusters_every_sampled_descriptor(tiny_data, tmp_path, run_cli):
    """With K=2, faiss's default cap (256 points per centroid) would train on 512 of the sample: the centroids are a
    k-means fixed point over all stored descriptors only when k-means saw all of them."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    assert run_cli(['--mode=cluster', '--dataset=synthetic', f'--dataPath={data}', '--arch=alexnet',
                    '--fromscratch', '--num_clusters=2', '--nocuda', '--threads=0']) == 0
    with h5py.File(data / 'data' / 'centroids' / 'alexnet_synthetic_2_desc_cen.hdf5', 'r') as h5:
        descriptors, centroids = h5['descriptors'][:].astype(np.float64), h5['centroids'][:].astype(np.float64)
    assert len(descriptors) > 2 * 256
    assignment = ((descriptors[:, None, :] - centroids[None]) ** 2).sum(2).argmin(1)
    for k in range(2):
        mean = descriptors[assignment == k].mean(axis=0)
        assert np.linalg.norm(mean - centroids[k]) < 1e-4 * np.linalg.norm(centroids[k])
