"""--mode=cluster on the tiny dataset: the centroids file's layout and content, then off-the-shelf test mode."""
import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision

from helpers import alexnet_trunk, brute_force_positives, read_geometry, read_image
from netvlad_toolkit.model.centroids import initialised_model

SEED = 123  # the CLI's default --seed


def cluster_argv(data_root, runs):
    return [str(a) for a in ['--mode=cluster', '--dataset=synthetic', '--dataPath', data_root, '--arch=alexnet',
                             '--fromscratch', '--nocuda', '--threads=0', '--runsPath', runs]]


@pytest.fixture(scope='module')
def clustered(tiny_data, tmp_path_factory):
    """A copy of the tiny dataset after `--mode=cluster`; returns (data root, runs folder, centroids file)."""
    from netvlad_toolkit import cli
    root = tmp_path_factory.mktemp('cluster') / 'data'
    shutil.copytree(tiny_data, root)
    runs = root.parent / 'runs'
    assert cli.main(cluster_argv(root, runs)) == 0
    return root, runs, root / 'data' / 'centroids' / 'alexnet_synthetic_64_desc_cen.hdf5'


def seeded_alexnet_state():
    """The weights --fromscratch draws: torchvision's AlexNet initialised right after seeding with --seed."""
    torch.manual_seed(SEED)
    features = torchvision.models.alexnet().features
    return {f'encoder.{k}': v for k, v in features.state_dict().items()}


def test_centroids_file_layout(clustered):
    _, _, path = clustered
    with h5py.File(path, 'r') as h5:
        assert set(h5) == {'descriptors', 'centroids'}
        descriptors, centroids = h5['descriptors'][:], h5['centroids'][:]
    assert descriptors.dtype == np.float32 and centroids.dtype == np.float32
    assert centroids.shape == (64, 256)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)


def test_descriptors_are_local_features_of_the_train_database(clustered):
    """Every sampled descriptor is an L2-normalised conv5 location of some train database image, and the sample
    has min(100, locations) descriptors from each of min(ceil(50000 / that), numDb) images."""
    root, _, path = clustered
    with h5py.File(path, 'r') as h5:
        descriptors = h5['descriptors'][:]
    db_names = read_geometry(root / 'datasets' / 'pitts30k_train.mat')[0]
    images = torch.stack([read_image(root / name) for name in db_names])
    with torch.no_grad():
        features = alexnet_trunk(images, seeded_alexnet_state())  # [N, 256, h, w]
    locations = features.shape[2] * features.shape[3]
    per_image = min(100, locations)
    assert len(descriptors) == per_image * min(int(np.ceil(50000 / per_image)), len(db_names))
    local = torch.nn.functional.normalize(features.flatten(2), dim=1).transpose(1, 2).reshape(-1, 256).numpy()
    sq_dist = (descriptors ** 2).sum(1)[:, None] - 2 * descriptors @ local.T.astype(np.float32) + (local ** 2).sum(1)
    nearest = sq_dist.argmin(axis=1)
    assert sq_dist.min(axis=1).max() < 1e-4
    assert len(set(nearest.tolist())) == len(descriptors)  # drawn without replacement
    counts = np.bincount(nearest // locations, minlength=len(db_names))
    assert np.all(counts == per_image)


def kmeans_cost(descriptors, centroids):
    sq_dist = (descriptors ** 2).sum(1)[:, None] - 2 * descriptors @ centroids.T + (centroids ** 2).sum(1)
    return sq_dist.min(axis=1).sum()


def test_centroids_are_kmeans_centroids(clustered):
    _, _, path = clustered
    with h5py.File(path, 'r') as h5:
        descriptors, centroids = h5['descriptors'][:].astype(np.float64), h5['centroids'][:].astype(np.float64)
    rng = np.random.default_rng(0)
    random_pick = min(kmeans_cost(descriptors, descriptors[rng.choice(len(descriptors), 64, replace=False)])
                      for _ in range(5))
    assert kmeans_cost(descriptors, centroids) < 0.8 * random_pick
    # a k-means fixed point: each centroid is (close to) the mean of the descriptors nearest to it
    sq_dist = (descriptors ** 2).sum(1)[:, None] - 2 * descriptors @ centroids.T + (centroids ** 2).sum(1)
    assignment = sq_dist.argmin(axis=1)
    moved = [np.linalg.norm(descriptors[assignment == k].mean(axis=0) - centroids[k])
             for k in range(64) if np.any(assignment == k)]
    assert max(moved) < 1e-3


def test_offtheshelf_model_is_initialised_from_the_file(clustered, make_opt):
    root, runs, path = clustered
    opt = make_opt(['--mode=test', '--dataset=synthetic', '--dataPath', root, '--arch=alexnet', '--fromscratch',
                    '--nocuda', '--runsPath', runs])
    model = initialised_model(opt)
    with h5py.File(path, 'r') as h5:
        centroids = h5['centroids'][:]
    np.testing.assert_array_equal(model.pool.centroids.detach().numpy(), centroids)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    weight = model.pool.conv.weight[:, :, 0, 0].detach().numpy()
    alpha = weight / unit  # v1: alpha times the unit centroids, one alpha for all
    assert np.all(alpha > 0) and np.ptp(alpha) / alpha.mean() < 1e-4


def test_offtheshelf_test_mode(clustered, run_cli, capsys):
    root, runs, _ = clustered
    argv = [str(a) for a in ['--mode=test', '--dataset=synthetic', '--dataPath', root, '--split=test',
                             '--arch=alexnet', '--fromscratch', '--nocuda', '--threads=0', '--runsPath', runs]]
    assert run_cli(argv) == 0
    stdout = capsys.readouterr().out
    printed = {int(n): float(r) for n, r in re.findall(r'^====> Recall@(\d+): (\d\.\d{4})$', stdout, re.M)}
    assert sorted(printed) == [1, 5, 10, 20]
    result = json.loads((runs / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    stored = {int(n): r for n, r in result['recalls'].items()}
    assert printed == {n: round(r, 4) for n, r in stored.items()}
    assert stored[1] <= stored[5] <= stored[10] <= stored[20]
    assert result['descriptor_dim'] == 64 * 256 and result['split'] == 'test'
    # even a random trunk with clustered NetVLAD does far better than a random guess
    _, utm_db, _, utm_q = read_geometry(root / 'datasets' / 'pitts30k_test.mat')
    chance = np.mean([len(p) for p in brute_force_positives(utm_db, utm_q, 25.0)]) / len(utm_db)
    assert stored[1] > 2 * chance
