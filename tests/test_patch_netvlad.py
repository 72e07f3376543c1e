"""Patch-NetVLAD re-ranking: patch descriptors against the NetVLAD layer applied to each crop of the feature map,
mutual nearest neighbours against brute force, the RANSAC and rapid spatial scores against computations written
here on generated keypoints, the re-ranked order against the scores, the store read back row by row, and the
whole chain through a PCA-whitened run folder."""
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FAST
from netvlad_toolkit import cli
from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.model.models import EmbedNet, build_model
from netvlad_toolkit.runs import figures
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.search import patch_netvlad as pn
from netvlad_toolkit.search import retrieval
from netvlad_toolkit.search.global_features import PhotoList, describe_images, extraction_settings
from netvlad_toolkit.search.patch_features import PatchStore, StoreWriter, store_path
from netvlad_toolkit.utils.commons import UserError

WHITENED = dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None, pca_dim=32)


def small_config(**changes):
    return dataclasses.replace(pn.RERANK_CONFIGS['performance'], **changes)


@torch.no_grad()
def crop_descriptors(features, pool, weight, bias, size, stride):
    """Per patch, row-major: the NetVLAD layer applied to the size x size crop of the feature map, whitened with
    (weight, bias) and L2-normalised; and the crop's centre (x, y). Returns ([n, dim], [n, 2])."""
    height, width = features.shape[1:]
    descriptors, centres = [], []
    for top in range(0, height - size + 1, stride):
        for left in range(0, width - size + 1, stride):
            vlad = pool(features[None, :, top:top + size, left:left + size])
            descriptors.append(F.normalize(vlad @ weight.T + bias, dim=1)[0])
            centres.append([left + (size - 1) / 2, top + (size - 1) / 2])
    if not descriptors:
        return np.empty((0, len(weight)), np.float32), np.empty((0, 2), np.float32)
    return torch.stack(descriptors).numpy(), np.array(centres, np.float32)


@pytest.mark.parametrize('vladv2, sharpness', [(False, 1.0), (True, 1.0), (False, 300.0)])
def test_patch_descriptors_are_netvlad_of_each_crop(vladv2, sharpness):
    """Several sizes and strides at once (one larger than the map: no patches), the whitening cut to 20 of its 32
    rows; with a sharp soft-assignment (sharpness 300), as after training, most clusters are nearly absent from
    most patches, and their rows must still be those of the crop."""
    torch.manual_seed(1)
    model = build_model(dict(WHITENED, vladv2=vladv2)).eval()
    with torch.no_grad():
        model.pool.conv.weight.mul_(sharpness)
    config = small_config(patch_sizes=(2, 3, 5, 12), strides=(1, 2, 1, 1), patch_weights=(1, 1, 1, 1), pca_dim=20)
    images = torch.randn(2, 3, 150, 190)
    global_desc, patches = pn.patch_features(model, images, config)
    with torch.no_grad():
        features = model.features(images)
        np.testing.assert_allclose(global_desc, model(images).numpy(), atol=1e-6)
        weight, bias = model.whiten.weight[:20], model.whiten.bias[:20]
        for image in range(2):
            assert patches[image].grid == tuple(features.shape[2:])
            for index, (size, stride) in enumerate(zip(config.patch_sizes, config.strides)):
                expected, centres = crop_descriptors(features[image], model.pool, weight, bias, size, stride)
                assert patches[image].descriptors[index].shape == expected.shape
                np.testing.assert_allclose(patches[image].descriptors[index], expected, atol=2e-5)
                np.testing.assert_array_equal(patches[image].keypoints[index], centres)
    assert len(patches[0].descriptors[3]) == 0 and features.shape[2] < 12


def test_bf16_autocast_runs_the_encoder_in_bf16_and_the_patches_in_float32():
    torch.manual_seed(2)
    model = build_model(WHITENED).eval()
    config = small_config(patch_sizes=(2,), strides=(1,), patch_weights=(1,), pca_dim=8)
    images = torch.randn(1, 3, 96, 128)
    _, patches = pn.patch_features(model, images, config, precision='bf16')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        features = model.features(images)
    expected, _ = crop_descriptors(features[0].float(), model.pool, model.whiten.weight[:8], model.whiten.bias[:8],
                                   2, 1)
    assert patches[0].descriptors[0].dtype == np.float32
    np.testing.assert_allclose(patches[0].descriptors[0], expected, atol=2e-5)


def test_a_run_without_whitening_or_with_too_few_dimensions_is_refused():
    model = build_model(dict(WHITENED, pca_dim=None))
    with pytest.raises(UserError, match=r'PCA-whitened run.*--mode=pca --pca_dim 512'):
        pn.patch_features(model, torch.randn(1, 3, 64, 80), pn.RERANK_CONFIGS['speed'])
    with pytest.raises(UserError, match=r'whitened to 32 dimensions'):
        pn.patch_features(build_model(WHITENED), torch.randn(1, 3, 64, 80), pn.RERANK_CONFIGS['speed'])


def test_the_configs_are_the_reference_inis():
    performance, speed, storage = (pn.RERANK_CONFIGS[name] for name in ('performance', 'speed', 'storage'))
    assert (performance.patch_sizes, performance.strides, performance.patch_weights, performance.pca_dim,
            performance.matcher) == ((2, 5, 8), (1, 1, 1), (0.45, 0.15, 0.4), 4096, 'ransac')
    assert (speed.patch_sizes, speed.strides, speed.patch_weights, speed.pca_dim, speed.matcher) == \
        ((5,), (1,), (1.0,), 512, 'spatial')
    assert (storage.patch_sizes, storage.strides, storage.pca_dim, storage.matcher) == ((5,), (1,), 128, 'spatial')
    with pytest.raises(UserError, match='one stride and one weight per patch size'):
        small_config(strides=(1, 1))


def unit_rows(rng, n, dim):
    rows = rng.normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def brute_force_mutual(query_desc, db_desc):
    """Pairs (i, j): j is i's nearest database row and i is j's nearest query row, by L2 distance in float64."""
    distances = np.array([[np.linalg.norm(q.astype(np.float64) - d) for d in db_desc] for q in query_desc])
    pairs = set()
    for i in range(len(query_desc)):
        j = int(np.argmin(distances[i]))
        if int(np.argmin(distances[:, j])) == i:
            pairs.add((i, j))
    return pairs


def test_mutual_matches_are_the_brute_force_mutual_nearest_neighbours():
    rng = np.random.default_rng(3)
    query_desc = unit_rows(rng, 40, 16)
    db_desc = np.concatenate([query_desc[:15] + 0.3 * unit_rows(rng, 15, 16), unit_rows(rng, 25, 16)])
    db_desc = (db_desc / np.linalg.norm(db_desc, axis=1, keepdims=True)).astype(np.float32)
    db_desc = db_desc[rng.permutation(len(db_desc))]
    various = [db_desc, db_desc[:0], db_desc[7:30], unit_rows(rng, 60, 16), db_desc[::-1]]
    same_size = [db_desc, db_desc[::-1], unit_rows(rng, 40, 16).astype(np.float16)]  # stacked without padding
    for candidates in (various, same_size):
        nearest, mutual = pn.mutual_matches(query_desc, candidates)
        for c, candidate in enumerate(candidates):
            expected = brute_force_mutual(query_desc, candidate.astype(np.float32)) if len(candidate) else set()
            assert set(zip(mutual[c].nonzero()[:, 0].tolist(), nearest[c][mutual[c]].tolist())) == expected
    assert len(brute_force_mutual(query_desc, db_desc)) >= 15
    assert not pn.mutual_matches(query_desc, various)[1][1].any()


def apply_homography(h, points):
    projected = np.c_[points, np.ones(len(points))] @ h.T
    return projected[:, :2] / projected[:, 2:]


def test_ransac_keeps_the_points_of_the_homography_and_rejects_the_others():
    """Patch centres of a 9x12 grid; 70 of them mapped by a known perspective homography (with noise well inside
    the threshold), 30 moved elsewhere (at least 4 thresholds away from where the homography puts them)."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:9, 0:12]
    source = np.c_[x.ravel(), y.ravel()].astype(np.float32) + 2.0
    h = np.array([[1.05, 0.08, 1.5], [-0.04, 0.97, -0.8], [0.004, -0.003, 1.0]])
    target = apply_homography(h, source) + rng.uniform(-0.3, 0.3, size=source.shape)
    outliers = rng.choice(len(source), 30, replace=False)
    threshold = pn.RANSAC_THRESHOLD
    for index in outliers:
        while np.linalg.norm(target[index] - apply_homography(h, source[index:index + 1])[0]) < 4 * threshold:
            target[index] = rng.uniform(-2, 16, size=2)
    planted = np.ones(len(source), dtype=bool)
    planted[outliers] = False
    points = torch.from_numpy(np.stack([source, target.astype(np.float32)])).double()[:, None]
    inliers = pn.ransac_inliers(*points, torch.tensor([len(source)]), threshold)
    np.testing.assert_array_equal(inliers[0].numpy(), planted)
    assert not pn.ransac_inliers(*points, torch.tensor([3]), threshold).any()


def triangle_signs(points):
    return np.array([np.sign((points[j] - points[i]) @ [[0, -1], [1, 0]] @ (points[k] - points[i]))
                     for i, j, k in ((0, 1, 2), (1, 2, 3), (0, 2, 3), (0, 1, 3))])


def ransac_one_by_one(source, target, samples, threshold):
    """One candidate's RANSAC as OpenCV's loop runs it, written here in float64: the samples in turn, those whose
    four triangles do not all keep (or all flip) their orientation skipped; each homography from the 8x8 linear
    system of its 4 points; the best inlier count kept; stop once log(0.005) / log(1 - (best / n)^4) (rounded, at
    most 2000) samples were tried. Returns the best inlier mask."""
    best, tried, needed = np.zeros(len(source), dtype=bool), 0, 2000
    for sample in samples.tolist():
        product = triangle_signs(source[sample]) * triangle_signs(target[sample])
        if not (np.all(product > 0) or np.all(product < 0)):
            continue
        system, values = [], []
        for (x, y), (u, v) in zip(source[sample], target[sample]):
            system += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
            values += [u, v]
        inliers = np.linalg.norm(apply_homography(np.append(np.linalg.solve(system, values), 1).reshape(3, 3),
                                                  source) - target, axis=1) <= threshold
        tried += 1
        if inliers.sum() > best.sum():
            best, ratio = inliers, inliers.sum() / len(source)
            needed = 0 if ratio == 1 else min(2000, round(np.log(0.005) / np.log(1 - ratio ** 4)))
        if tried >= needed:
            break
    return best


@pytest.mark.parametrize('points, first_round', [(2048, 32), (100, 3)])
def test_batched_ransac_is_each_candidates_ransac_one_by_one(monkeypatch, points, first_round):
    """Candidates with 0 to 120 matches, of which a share (all, most, a fifth, none) follows a planted homography
    (with noise up to 0.2 or 0.8 of the threshold: with the larger, hypotheses through different inliers find
    different counts, and where the search stops matters), the others anywhere in the grid; rows past each
    candidate's matches are noise that must not count. The batched masks are those of the loop written here,
    candidate by candidate, whether the candidates are tried in one block or in several, in large or small
    rounds."""
    monkeypatch.setattr(pn, 'RANSAC_POINTS', points)
    monkeypatch.setattr(pn, 'RANSAC_ROUND', first_round)
    rng = np.random.default_rng(11)
    counts, shares = [0, 3, 4, 5, 9, 40, 120, 120, 60, 80], [1, 1, 1, 0.8, 0.7, 1, 0.6, 0.2, 0, 0.9]
    threshold = pn.RANSAC_THRESHOLD
    source = rng.uniform(0, 30, size=(len(counts), max(counts), 2))
    target = rng.uniform(0, 30, size=source.shape)
    for c, (count, share) in enumerate(zip(counts, shares)):
        h = np.array([[1, 0.05 * rng.normal(), rng.uniform(-4, 4)], [0.05 * rng.normal(), 1, rng.uniform(-4, 4)],
                      [0.002 * rng.normal(), 0.002 * rng.normal(), 1]])
        planted = rng.random(count) < share
        noise = (0.2 if c % 2 else 0.8) * threshold / np.sqrt(2)
        target[c, :count][planted] = apply_homography(h, source[c, :count][planted]) + rng.uniform(
            -noise, noise, size=(planted.sum(), 2))
    masks = pn.ransac_inliers(torch.from_numpy(source), torch.from_numpy(target), torch.tensor(counts), threshold)
    for c, count in enumerate(counts):
        expected = np.zeros(max(counts), dtype=bool)
        if count >= 4:
            expected[:count] = ransac_one_by_one(source[c, :count], target[c, :count], pn.ransac_samples(count).numpy(),
                                                 threshold)
        np.testing.assert_array_equal(masks[c].numpy(), expected, err_msg=f'candidate {c}')
    assert masks[6].sum() >= 0.4 * 120 and masks[3].sum() == 4


def spatial_score_by_the_paper(query_points, db_points, x_max, y_max):
    dx = [d[0] - q[0] for q, d in zip(query_points, db_points)]
    dy = [d[1] - q[1] for q, d in zip(query_points, db_points)]
    mean_x, mean_y = sum(dx) / len(dx), sum(dy) / len(dy)
    return sum((x_max - abs(a - mean_x)) ** 2 + (y_max - abs(b - mean_y)) ** 2 for a, b in zip(dx, dy))


def shifted_candidate(query, shift, rng, noise=0.05):
    """PatchFeatures of an image whose patches are the query's moved by `shift` patches to the right (those that
    leave the grid replaced by random ones), each descriptor slightly changed."""
    rows, columns = pn.patch_grid(*query.grid, 5, 1)
    grid = query.descriptors[0].reshape(rows, columns, -1)
    moved = np.roll(grid, shift, axis=1)
    moved[:, :shift] = unit_rows(rng, rows * shift, grid.shape[2]).reshape(rows, shift, -1)
    moved = moved.reshape(rows * columns, -1) + noise * rng.normal(size=(rows * columns, grid.shape[2]))
    moved = (moved / np.linalg.norm(moved, axis=1, keepdims=True)).astype(np.float32)
    return pn.PatchFeatures([moved], query.keypoints, query.grid)


def random_features(rng, grid, config):
    descriptors = [unit_rows(rng, int(np.prod(pn.patch_grid(*grid, s, t))), config.pca_dim)
                   for s, t in zip(config.patch_sizes, config.strides)]
    return pn.PatchFeatures(descriptors, [pn.patch_keypoints(*grid, s, t) for s, t in zip(config.patch_sizes,
                                                                                          config.strides)], grid)


def test_rapid_spatial_score_is_the_papers_formula():
    rng = np.random.default_rng(5)
    config = small_config(patch_sizes=(5,), strides=(1,), patch_weights=(1,), pca_dim=24, matcher='spatial')
    query = random_features(rng, (12, 15), config)  # 8 x 11 patches
    candidate = shifted_candidate(query, 3, rng)
    pairs = sorted(brute_force_mutual(query.descriptors[0], candidate.descriptors[0]))
    q_points = query.keypoints[0][[i for i, _ in pairs]]
    d_points = candidate.keypoints[0][[j for _, j in pairs]]
    expected = spatial_score_by_the_paper(q_points.tolist(), d_points.tolist(), 10.0, 7.0) / 88
    scores = pn.size_scores(query, [candidate, random_features(rng, (12, 15), config)], 0, config)[0]
    assert scores[0] == pytest.approx(expected, rel=1e-9)
    drawn = pn.matched_points(query, candidate, config)[0]
    np.testing.assert_array_equal(drawn[0], q_points)
    np.testing.assert_array_equal(drawn[1], d_points)
    shifts = d_points - q_points
    assert np.sum((shifts[:, 0] == 3) & (shifts[:, 1] == 0)) == 8 * 8  # every planted pair matched
    assert scores[0] > scores[1]


def test_ransac_score_counts_the_inliers_per_query_patch():
    rng = np.random.default_rng(6)
    config = small_config(patch_sizes=(5,), strides=(1,), patch_weights=(1,), pca_dim=24, matcher='ransac')
    query = random_features(rng, (12, 15), config)
    candidate = shifted_candidate(query, 2, rng)
    pairs = sorted(brute_force_mutual(query.descriptors[0], candidate.descriptors[0]))
    errors = np.linalg.norm(candidate.keypoints[0][[j for _, j in pairs]] + [-2, 0]
                            - query.keypoints[0][[i for i, _ in pairs]], axis=1)
    consistent = np.sum(errors <= pn.RANSAC_THRESHOLD)  # with the planted translation
    assert consistent == 8 * 9  # every patch that stayed in the grid
    assert pn.size_scores(query, [candidate], 0, config)[0][0] == pytest.approx(consistent / 88)


def test_rerank_orders_candidates_by_the_fused_score(tmp_path):
    """Candidates shifted by 1..4 patches, or random, stored and re-ranked: the order is the stable descending
    order of scores computed here (per size: the paper's spatial score of the brute-force mutual matches,
    z-normalised over the candidates, weighted), padding stays last."""
    rng = np.random.default_rng(7)
    config = small_config(name='test', patch_sizes=(5, 5), strides=(1, 1), patch_weights=(0.7, 0.3), pca_dim=24,
                          matcher='spatial')
    query = random_features(rng, (12, 15), config)
    query.descriptors[1] = query.descriptors[0]
    database = []
    for shift in (4, 0, 2, 0, 1, 3):
        candidate = shifted_candidate(query, shift, rng) if shift else random_features(rng, (12, 15), config)
        database.append(pn.PatchFeatures([candidate.descriptors[0]] * 2, query.keypoints, query.grid))
    database.append(database[2])  # a tie with candidate 2
    writer = StoreWriter(store_path(tmp_path, 'test'), [f'db{i}' for i in range(len(database))], config.patch_sizes,
                         config.strides, config.pca_dim, 'model', dtype='float32')
    writer.append(database)
    writer.finish()
    candidates = np.array([0, 1, 2, 3, 4, 5, 6, -1])
    with pn.open_store(tmp_path, config) as store:
        ranked, scores, timing = pn.rerank(query, candidates, store, config)
        assert pn.rerank(query, np.array([-1, -1]), store, config)[0].tolist() == [-1, -1]
    raw = np.zeros((7, 2))
    for c, candidate in enumerate(database):
        for size in range(2):
            pairs = sorted(brute_force_mutual(query.descriptors[size], candidate.descriptors[size]))
            q_points = [query.keypoints[size][i].tolist() for i, _ in pairs]
            d_points = [candidate.keypoints[size][j].tolist() for _, j in pairs]
            raw[c, size] = spatial_score_by_the_paper(q_points, d_points, 10.0, 7.0) / 88 if pairs else 0.0
    fused = ((raw - raw.mean(axis=0)) / raw.std(axis=0)) @ np.array([0.7, 0.3])
    expected = sorted(range(7), key=lambda c: -fused[c])  # Python's sort is stable
    assert ranked.tolist() == expected + [-1]
    np.testing.assert_allclose(scores[:7], fused[expected], rtol=1e-6)
    assert scores[-1] == -np.inf
    assert expected.index(2) + 1 == expected.index(6)  # the tie keeps the global order
    assert set(timing) == {'extraction_s', 'reading_s', 'matching_s'}


def test_store_is_written_in_chunks_continued_and_read_back_by_rows(tmp_path):
    rng = np.random.default_rng(8)
    config = small_config(name='chunks', patch_sizes=(2, 5), strides=(1, 1), patch_weights=(1, 1), pca_dim=12)
    grids = [(6, 8), (4, 4), (9, 7), (6, 8), (3, 5)]  # 4x4: no patch of size 5; 3x5: none of 5
    features = [random_features(rng, grid, config) for grid in grids]
    names = [f'img{i}.jpg' for i in range(5)]
    path = store_path(tmp_path, 'chunks')
    settings = (config.patch_sizes, config.strides, config.pca_dim, 'model-a')
    writer = StoreWriter(path, names[:4], *settings)
    writer.append(features[:2])  # then killed: a .partial is left, no store
    assert not (tmp_path / 'patch-feats-netvlad-chunks.h5').exists()
    writer = StoreWriter(path, names[:4], *settings)
    assert writer.done == 2
    writer.append(features[2:4])
    writer.finish()
    writer = StoreWriter(path, names, *settings)  # one more database image: extended
    assert writer.done == 4
    writer.append(features[4:])
    writer.finish()
    with h5py.File(path, 'r') as f:
        counts = [sum(len(d) for d in image.descriptors) for image in features]
        np.testing.assert_array_equal(f['offsets'][()], np.cumsum([0] + counts))
        np.testing.assert_array_equal(f['grid'][()], grids)
        assert f['descriptors'].dtype == np.float16 and f['descriptors'].chunks is not None
        assert [n.decode() for n in f['names'][()]] == names
    with pn.open_store(tmp_path, config) as store:
        for index in (3, 0, 4, 1):
            read = pn.store_features(store, [index], config)[0]
            assert read.grid == grids[index]
            for size in range(2):
                np.testing.assert_array_equal(read.descriptors[size],
                                              features[index].descriptors[size].astype(np.float16).astype(np.float32))
                np.testing.assert_array_equal(read.keypoints[size], features[index].keypoints[size])
        with pytest.raises(UserError, match='holds 5 images'):
            store.rows(5)
    with pytest.raises(UserError, match='another model'):
        StoreWriter(path, names, *settings[:3], 'model-b')
    with pytest.raises(UserError, match=r'holds patch sizes \[2, 5\]'):
        pn.open_store(tmp_path, dataclasses.replace(config, patch_sizes=(2, 4)))


def test_storage_per_image_counts_every_patch():
    assert pn.feature_map_size('vgg16', 480, 640) == (30, 40)
    assert pn.feature_map_size('alexnet', 480, 640) == (29, 39)
    speed = pn.RERANK_CONFIGS['speed']
    assert pn.storage_per_image(speed, 'vgg16') == 26 * 36 * 512 * 2 + PatchStore.INDEX_BYTES
    performance = pn.RERANK_CONFIGS['performance']
    assert pn.storage_per_image(performance, 'alexnet', dtype='float32') == \
        (28 * 38 + 25 * 35 + 22 * 32) * 4096 * 4 + PatchStore.INDEX_BYTES


@pytest.fixture(scope='module')
def whitened_run(float_run, clustered_data, tmp_path_factory):
    """A copy of the session's float run, PCA-whitened to 16 dimensions by --mode=pca."""
    run = tmp_path_factory.mktemp('patch_runs') / 'run'
    shutil.copytree(float_run, run)
    assert cli.main(['--mode=pca', f'--resume={run}', f'--dataPath={clustered_data}', '--pca_dim=16',
                      *FAST]) == 0
    return f'{run}_pca16'


@pytest.mark.parametrize('name', ['performance', 'speed'])
def test_rerank_through_a_whitened_run_folder(whitened_run, float_run, clustered_data, tmp_path, name):
    """The test split at 128x160 (a 7x9 AlexNet feature map: no patch of size 8): the database's store, then each
    query's top 10 of the global search re-ranked; the store holds what extraction gives, and each re-ranked
    list is its candidates ordered by the scores computed again from freshly extracted features."""
    opt = cli.parse_options(['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}',
                              '--resize=128x160', *FAST])
    model, _ = open_run(opt)
    dataset = load_dataset(opt, 'test')
    num_db = dataset.db_struct.numDb
    config = dataclasses.replace(pn.RERANK_CONFIGS[name], pca_dim=16, num_candidates=10)
    device = torch.device('cpu')
    database = torch.utils.data.Subset(dataset, range(num_db))
    queries = torch.utils.data.Subset(dataset, range(num_db, len(dataset)))
    pn.build_store(model, database, dataset.db_struct.db_paths, tmp_path, config, device, batch_size=16,
                   run=whitened_run, dtype='float32')
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    global_desc, direct = pn.patch_features(model, images, config)
    db_desc, query_desc = global_desc[:num_db], global_desc[num_db:]
    predictions = np.argsort(-(query_desc @ db_desc.T), axis=1, kind='stable')[:, :10]
    with pn.open_store(tmp_path, config) as store:
        assert store.names == dataset.db_struct.db_paths
        for index in (0, 17, num_db - 1):
            stored = pn.store_features(store, [index], config)[0]
            for size in range(3 if name == 'performance' else 1):
                np.testing.assert_allclose(stored.descriptors[size], direct[index].descriptors[size], atol=1e-5)
        reranked, scores, timing = pn.rerank_queries(model, queries, predictions, store, config, device,
                                                     batch_size=16)
    if name == 'performance':
        assert len(direct[0].descriptors[2]) == 0
    for q in range(len(predictions)):
        raw = np.array([[pn.size_scores(direct[num_db + q], [direct[c]], size, config)[0][0]
                         for size in range(len(config.patch_sizes))] for c in predictions[q]])
        std = raw.std(axis=0)
        fused = np.where(std > 0, (raw - raw.mean(axis=0)) / np.where(std > 0, std, 1), 0) @ config.patch_weights
        order = sorted(range(10), key=lambda c: -fused[c])
        assert reranked[q].tolist() == predictions[q][order].tolist()
        np.testing.assert_allclose(scores[q], fused[order], atol=1e-6)
    assert timing['matching_s'].shape == (len(predictions),) and np.all(timing['extraction_s'] > 0)
    float_opt = cli.parse_options(['--mode=test', f'--resume={float_run}', f'--dataPath={clustered_data}', *FAST])
    with pytest.raises(UserError, match='--mode=pca'):
        pn.build_store(open_run(float_opt)[0], database, dataset.db_struct.db_paths, tmp_path / 'raw', config,
                       device)


def test_reorder_first_moves_each_distance_with_its_id():
    rng = np.random.default_rng(0)
    predictions = np.stack([rng.permutation(20)[:8] for _ in range(5)])
    predictions[4, 6:] = -1
    dist = np.sort(rng.random(predictions.shape), axis=1)
    dist[4, 6:] = np.inf
    reordered = np.stack([np.concatenate([rng.permutation(row[:5][row[:5] >= 0])]) for row in predictions])
    new_dist, new_predictions = retrieval.reorder_first(dist, predictions, reordered)
    for q in range(len(predictions)):
        by_id = dict(zip(predictions[q].tolist(), dist[q].tolist()))
        assert new_predictions[q, :5].tolist() == reordered[q].tolist()
        assert new_predictions[q, 5:].tolist() == predictions[q, 5:].tolist()
        assert new_dist[q].tolist() == [by_id[i] for i in new_predictions[q].tolist()]


def test_rerank_flags_override_the_config_and_name_its_store(make_opt):
    opt = make_opt(['--mode=test', '--rerank', 'patch', '--rerank_config', 'performance', '--patch_sizes', '3,6',
                    '--strides', '1,2', '--patchWeights2Use', '0.5,0.5', '--num_pcs', '16', '--matcher',
                    'spatialApproximator', '--rerank_top', '7'])
    config = pn.flags_config(opt)
    assert (config.patch_sizes, config.strides, config.patch_weights, config.pca_dim, config.matcher,
            config.num_candidates) == ((3, 6), (1, 2), (0.5, 0.5), 16, 'spatial', 7)
    assert config.name == 'performance_p3-6_s1-2_d16'
    assert pn.flags_config(make_opt(['--mode=test', '--rerank', 'patch'])) == pn.RERANK_CONFIGS['performance']
    assert pn.flags_config(make_opt(['--mode=test'])) is None
    with pytest.raises(UserError, match='--patch_sizes, --strides, --patchWeights2Use'):
        pn.flags_config(make_opt(['--mode=test', '--rerank', 'patch', '--patch_sizes', '3']))
    with pytest.raises(UserError, match='--patch_sizes.*comma-separated'):
        make_opt(['--mode=test', '--patch_sizes', '3;5'])


def test_test_mode_reranks_the_global_candidates_and_scores_the_new_order(whitened_run, clustered_data, run_cli,
                                                                           tmp_path, encoded_images):
    """--rerank patch in test mode against the global ranking of the same run and the library's re-ranking of it:
    each image goes through the encoder once; the top 10 of each query are the global top 10 in the order
    rerank_queries gives (from queries extracted afresh), and Recall@N is that of the new order, counted here."""
    flags = ['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}', '--resize=128x160', *FAST,
             '--runsPath', tmp_path]
    rerank = ['--rerank', 'patch', '--rerank_config', 'speed', '--num_pcs', '16', '--rerank_top', '10']
    opt = cli.parse_options(flags)
    plain = cli.run(opt)
    encoded_images.clear()
    reranked = cli.run(cli.parse_options(flags + rerank))
    dataset = load_dataset(opt, 'test')
    assert sorted(encoded_images) == sorted([tuple(dataset[0][0].shape[1:])] * len(dataset))
    num_db = dataset.db_struct.numDb
    config = dataclasses.replace(pn.RERANK_CONFIGS['speed'], name='speed_p5_s1_d16', pca_dim=16, num_candidates=10)
    model, _ = open_run(opt)
    store_dir = f'{whitened_run}/patch_features/test'
    with pn.open_store(store_dir, config) as store:
        expected = pn.rerank_queries(model, torch.utils.data.Subset(dataset, range(num_db, len(dataset))),
                                     plain['predictions'][:, :10], store, config, torch.device('cpu'))[0]
    assert reranked['predictions'][:, :10].tolist() == expected.tolist()
    assert reranked['predictions'][:, :10].tolist() != plain['predictions'][:, :10].tolist()
    positives = dataset.positives()
    for n, recall in reranked['recalls'].items():
        hits = [np.isin(reranked['predictions'][q, :n], positives[q]).any() for q in range(len(positives))]
        assert recall == pytest.approx(np.mean(hits))
    record = [json.loads(line) for line in open(tmp_path / 'results.jsonl')][-1]
    assert record['variant'].endswith('+ patch re-ranking (speed_p5_s1_d16)')
    assert record['rerank']['candidates'] == 10 and record['rerank']['ms_per_query'] > 0
    assert record['rerank']['global_recalls'] == {str(n): r for n, r in plain['recalls'].items()}


@pytest.fixture
def encoded_images(monkeypatch):
    """Counts the images that go through any model's encoder (EmbedNet.features), by image size."""
    counted = []
    features = EmbedNet.features

    def counting(self, images):
        counted.extend([tuple(images.shape[2:])] * len(images))
        return features(self, images)
    monkeypatch.setattr(EmbedNet, 'features', counting)
    return counted


def test_joint_pass_gives_the_plain_global_descriptors_and_both_stores(whitened_run, clustered_data, tmp_path,
                                                                       encoded_images):
    """extract_jointly on a database whose store holds its first 30 images already (a store being extended): every
    image through the encoder once; the global descriptors those of the model applied to each image here; the
    database store's new rows and the query store's rows the patch features of each image computed here."""
    opt = cli.parse_options(['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}',
                              '--resize=128x160', *FAST])
    model, _ = open_run(opt)
    dataset = load_dataset(opt, 'test')
    struct, num_db = dataset.db_struct, dataset.db_struct.numDb
    config = dataclasses.replace(pn.RERANK_CONFIGS['speed'], pca_dim=16, num_candidates=10)
    device = torch.device('cpu')
    database = torch.utils.data.Subset(dataset, range(num_db))
    queries = torch.utils.data.Subset(dataset, range(num_db, len(dataset)))
    pn.build_store(model, torch.utils.data.Subset(database, range(30)), struct.db_paths[:30], tmp_path / 'db', config,
                   device, batch_size=16)
    encoded_images.clear()
    descriptors = np.full((len(dataset), model.output_dim), np.nan, dtype=np.float32)
    query_store, extraction_s = pn.extract_jointly(model, database, struct.db_paths, queries, struct.query_paths,
                                                   tmp_path / 'db', tmp_path / 'queries', config, device, descriptors,
                                                   batch_size=16)
    assert len(encoded_images) == len(dataset) and extraction_s > 0
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        expected = torch.cat([model(images[first:first + 16]) for first in range(0, len(images), 16)]).numpy()
    np.testing.assert_allclose(descriptors, expected, atol=1e-5)
    direct = pn.patch_features(model, images, config)[1]
    with pn.open_store(tmp_path / 'db', config) as db_store, \
            PatchStore(query_store, config.patch_sizes, config.strides, config.pca_dim) as stored:
        assert stored.names == list(struct.query_paths) and db_store.names == list(struct.db_paths)
        for index in (30, num_db - 1):
            np.testing.assert_allclose(pn.store_features(db_store, [index], config)[0].descriptors[0],
                                       direct[index].descriptors[0], atol=1e-3)  # float16 rows
        for q in (0, len(queries) - 1):
            np.testing.assert_allclose(pn.store_features(stored, [q], config)[0].descriptors[0],
                                       direct[num_db + q].descriptors[0], atol=1e-6)


def test_query_mode_lists_the_reranked_order(whitened_run, places, tmp_path, run_cli, encoded_images):
    """--mode=query --rerank patch with every database image a candidate: the answers are the database in the
    order of the library's re-ranking of the global search (of photos extracted afresh here), read from the store
    beside the cached database. Every image goes through the encoder once: each database image (its cached global
    descriptor and its patches from one pass) and each photo; asked again, each photo once, the cached database
    not at all."""
    database, photos, _ = places
    out = tmp_path / 'answers'
    common = ['--mode=query', f'--resume={whitened_run}', '--query', photos, '--database', database, '--nocuda',
              '--threads', '0', '--num_matched', '12']
    rerank = ['--rerank', 'patch', '--rerank_config', 'speed', '--num_pcs', '16', '--patch_sizes', '2',
              '--rerank_top', '12']
    assert run_cli(common + rerank + ['--export_dir', tmp_path / 'first']) == 0
    assert len(encoded_images) == len(list(database.rglob('*.jpg'))) + len(list(photos.glob('*.jpg')))
    encoded_images.clear()
    assert run_cli(common + rerank + ['--export_dir', out]) == 0
    assert len(encoded_images) == len(list(photos.glob('*.jpg')))
    opt = cli.parse_options(common)
    model, _ = open_run(opt)
    names = sorted(p.relative_to(database).as_posix() for p in database.rglob('*.jpg'))
    photo_paths = sorted(photos.glob('*.jpg'))
    settings = extraction_settings('cpu', threads=0)
    query_desc = describe_images(model, [str(p) for p in photo_paths], settings, torch.device('cpu'))[1]
    db_desc = describe_images(model, [str(database / n) for n in names], settings, torch.device('cpu'))[1]
    candidates = np.argsort(-(query_desc @ db_desc.T), axis=1, kind='stable')
    config = pn.configured('speed', 12, patch_sizes=(2,), num_pcs=16)
    store_dir = next(Path(whitened_run, 'query_database').glob('database_*'))
    with pn.open_store(store_dir, config) as store:
        expected = pn.rerank_queries(model, PhotoList([str(p) for p in photo_paths]), candidates, store, config,
                                     torch.device('cpu'))[0]
    for photo, order in zip(photo_paths, expected):
        with open(out / f'{photo.stem}.csv') as f:
            listed = [row['database_image'] for row in csv.DictReader(f)]
        assert listed == [names[i] for i in order]
        with Image.open(out / 'patch_matches' / f'{photo.stem}.png') as drawn:  # the first 3 candidates, a row each
            assert drawn.height == 3 * (figures.MATCH_HEIGHT + 18)


def test_a_patch_larger_than_the_feature_map_stops_and_records_nothing(whitened_run, clustered_data, places,
                                                                      tmp_path, run_cli, capsys):
    """At 64x80 AlexNet's feature map is 3x4 cells: the speed config's 5x5 patch fits nowhere, so re-ranking would
    change nothing. Test and query mode stop with one paragraph naming the flags that fix it, and write no result."""
    before = sorted(Path(whitened_run).rglob('*'))
    runs = tmp_path / 'runs'
    assert run_cli(['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}', *FAST, '--rerank',
                    'patch', '--rerank_config', 'speed', '--num_pcs', '16', '--runsPath', runs]) == 2
    paragraph = capsys.readouterr().err
    assert '5x5 patch' in paragraph and '3x4-cell feature map' in paragraph
    assert '--patch_sizes 3' in paragraph and '--resize' in paragraph
    assert not runs.exists() and sorted(Path(whitened_run).rglob('*')) == before
    database, photos, _ = places
    assert run_cli(['--mode=query', f'--resume={whitened_run}', '--query', photos, '--database', database, '--nocuda',
                    '--threads', '0', '--num_matched', '3', '--rerank', 'patch', '--rerank_config', 'speed',
                    '--num_pcs', '16', '--export_dir', tmp_path / 'answers']) == 2
    assert '--patch_sizes 3' in capsys.readouterr().err and not (tmp_path / 'answers').exists()


def test_sizes_that_fit_nowhere_are_named_when_others_fit(whitened_run, clustered_data, tmp_path, run_cli, capsys):
    """The performance config (2, 5, 8) at 64x80 (3x4 cells): only size 2 fits; it re-ranks, and says that 5 and 8
    add nothing."""
    assert run_cli(['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}', *FAST, '--rerank',
                    'patch', '--num_pcs', '16', '--rerank_top', '3', '--runsPath', tmp_path,
                    '--output_features_dir', tmp_path / 'store']) == 0
    out = capsys.readouterr().out
    assert 'patch sizes 5,8 place no patch in the 3x4-cell feature map' in out and 'Re-ranked the top 3' in out


def test_query_mode_says_that_it_reranked(whitened_run, places, tmp_path, run_cli, capsys):
    database, photos, _ = places
    assert run_cli(['--mode=query', f'--resume={whitened_run}', '--query', photos, '--database', database, '--nocuda',
                    '--threads', '0', '--num_matched', '3', '--rerank', 'patch', '--rerank_config', 'speed',
                    '--num_pcs', '16', '--patch_sizes', '2', '--rerank_top', '5', '--export_dir', tmp_path]) == 0
    assert 'Re-ranked the top 5 candidates of each query with Patch-NetVLAD (speed_p2_s1_d16, spatial)' in \
        capsys.readouterr().out


def test_query_mode_reranks_a_database_with_an_image_that_cannot_be_decoded(whitened_run, places, tmp_path, run_cli,
                                                                              capsys):
    """A database image whose header reads but whose pixels do not (cut in half): the joint pass stops naming it;
    with --skip_unreadable the database is described without it and re-ranked all the same."""
    database, photos, _ = places
    broken = sorted(database.rglob('*.jpg'))[5]
    broken.write_bytes(broken.read_bytes()[:len(broken.read_bytes()) // 2])
    command = ['--mode=query', f'--resume={whitened_run}', '--query', photos, '--database', database, '--nocuda',
               '--threads', '0', '--num_matched', '11', '--rerank', 'patch', '--rerank_config', 'speed',
               '--num_pcs', '16', '--patch_sizes', '2', '--rerank_top', '11', '--export_dir', tmp_path / 'out']
    assert run_cli(command) == 2
    assert broken.name in capsys.readouterr().err
    assert run_cli(command + ['--skip_unreadable']) == 0
    with open(tmp_path / 'out' / f'{sorted(photos.glob("*.jpg"))[0].stem}.csv') as f:
        listed = [row['database_image'] for row in csv.DictReader(f)]
    assert len(listed) == 11 and broken.relative_to(database).as_posix() not in listed


def test_rerank_errors_name_what_to_give(whitened_run, float_run, places, clustered_data, tmp_path, run_cli, capsys):
    database, photos, _ = places
    assert run_cli(['--mode=test', f'--resume={float_run}', f'--dataPath={clustered_data}', *FAST, '--rerank',
                    'patch']) == 2
    assert '--mode=pca' in capsys.readouterr().err
    assert not (Path(float_run) / 'patch_features').exists()
    assert run_cli(['--mode=test', f'--resume={whitened_run}', f'--dataPath={clustered_data}', *FAST, '--rerank',
                    'patch', '--rerank_config', 'speed']) == 2
    assert '--num_pcs 16' in capsys.readouterr().err
    h5 = tmp_path / 'db.h5'
    with h5py.File(h5, 'w') as f:
        f.create_dataset('a.jpg/global_descriptor', data=np.zeros(16, np.float32))
    assert run_cli(['--mode=query', f'--resume={whitened_run}', '--query', photos, '--database', h5, '--nocuda',
                    '--rerank', 'patch']) == 2
    assert 'give --image_dir' in capsys.readouterr().err


def test_rerank_on_the_default_imagenet_path(imagenet_home, tiny_copy, run_cli, tmp_path):
    """The default path end to end: the ImageNet-initialised AlexNet (the stand-in weights), clustered, whitened by
    --mode=pca, then test mode re-ranks each query's top 10: the re-ranked lists are the global lists re-ordered,
    and the global recall the record keeps is that of the same run without re-ranking."""
    common = ['--arch=alexnet', '--num_clusters=8', f'--dataPath={tiny_copy}', '--runsPath', tmp_path, *FAST]
    assert run_cli(['--mode=cluster', *common]) == 0
    assert run_cli(['--mode=pca', '--pca_dim=16', *common]) == 0
    run = tmp_path / 'alexnet_offtheshelf_pca16'
    test = ['--mode=test', f'--resume={run}', '--resize=128x160', *common]
    plain = cli.run(cli.parse_options([str(a) for a in test]))
    reranked = cli.run(cli.parse_options([str(a) for a in test] + ['--rerank', 'patch', '--rerank_config',
                                                                     'speed', '--num_pcs', '16', '--rerank_top',
                                                                     '10']))
    assert [sorted(row) for row in reranked['predictions'][:, :10].tolist()] == \
        [sorted(row) for row in plain['predictions'][:, :10].tolist()]
    assert reranked['rerank']['global_recalls'] == plain['recalls']
    assert (run / 'patch_features' / 'test' / 'patch-feats-netvlad-speed_p5_s1_d16.h5').is_file()
