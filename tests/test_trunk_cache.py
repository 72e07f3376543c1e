"""The frozen-trunk cache (trunk_cache.py, --trunk_cache): the same triplets and losses as without it, the trunk's
output equal to torchvision's own layers on the decoded image, RAM or disk storage, when it is off,
and torchrun."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import Subset

from helpers import free_port
from netvlad_toolkit.datasets import gpu_decode
from netvlad_toolkit.datasets.images import load_image
from netvlad_toolkit.model.models import build_model, model_config
from netvlad_toolkit.training import training, trunk_cache

REPO = Path(__file__).resolve().parents[1]
CONV5 = 10
CHUNK_TRIPLETS = training.chunk_triplets


def train_options(make_opt, data, *flags):
    return make_opt(['--mode=train', '--arch=alexnet', '--num_clusters=8', f'--dataPath={data}', '--nocuda',
                     '--threads=0', '--cacheBatchSize=8', '--batchSize=2', '--cacheRefreshRate=15',
                     '--nNegSample=40', *flags])


def one_epoch(model, opt, run_dir, monkeypatch):
    """Triplets mined and per-batch losses of one epoch of fit's machinery, and the trained model."""
    mined = []

    def recording(*args):
        mined.append(CHUNK_TRIPLETS(*args))
        return mined[-1]

    monkeypatch.setattr(training, 'chunk_triplets', recording)
    torch.manual_seed(0)
    data = training.TrainingData(opt)
    device = torch.device('cpu')
    network, source, train_opt = training.training_inputs(model, data, opt, device, str(run_dir), 0)
    optimizer, _ = training.make_optimizer(network, opt)
    hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1)
    _, losses = training.train_epoch(network, data, source, optimizer, hard_negatives, train_opt, device, 1, 1,
                                     (0, 1), None, 0)
    return mined, losses, source


@pytest.fixture
def stand_in_model(imagenet_home, make_opt, tiny_data):
    torch.manual_seed(1)
    return build_model(model_config(train_options(make_opt, tiny_data)), pretrained=True)


def cached_and_plain_epochs(model, make_opt, data, run_dir, monkeypatch, dtype):
    assert model.frozen_layers == CONV5
    cached = one_epoch(copy.deepcopy(model), train_options(make_opt, data, '--trunk_cache_dtype', dtype), run_dir,
                       monkeypatch)
    plain = one_epoch(copy.deepcopy(model), train_options(make_opt, data, '--trunk_cache=off'), run_dir, monkeypatch)
    assert isinstance(cached[2], trunk_cache.TrunkFeatures) and not isinstance(plain[2], trunk_cache.TrunkFeatures)
    assert len(plain[0]) >= 4 and sum(map(len, plain[0])) > 0  # several refreshes, triplets mined
    assert len(cached[1]) == len(plain[1]) > 0
    np.testing.assert_allclose(cached[1], plain[1], atol=1e-3)  # every batch's loss
    return cached[0], plain[0]


def test_the_same_triplets_and_losses_with_and_without_the_trunk_cache(stand_in_model, make_opt, tiny_data,
                                                                       tmp_path, monkeypatch):
    cached, plain = cached_and_plain_epochs(stand_in_model, make_opt, tiny_data, tmp_path, monkeypatch, 'auto')
    assert cached == plain  # float32 in RAM: the very same triplets, negatives in the same order


def test_a_float16_cache_mines_the_same_negatives_up_to_the_order_of_near_ties(stand_in_model, make_opt, tiny_data,
                                                                                tmp_path, monkeypatch):
    cached, plain = cached_and_plain_epochs(stand_in_model, make_opt, tiny_data, tmp_path, monkeypatch, 'float16')
    assert [[(q, p, sorted(n)) for q, p, n in chunk] for chunk in cached] == \
        [[(q, p, sorted(n)) for q, p, n in chunk] for chunk in plain]


def independent_trunk(stand_in, image):
    """conv1..conv4 (with their ReLUs and pools) of torchvision's AlexNet holding the stand-in weights."""
    features = torchvision.models.alexnet().features
    features.load_state_dict({key.replace('encoder.', '', 1): value for key, value in stand_in.items()})
    with torch.no_grad():
        return features[:CONV5](image[None])[0]


def test_the_cached_trunk_is_torchvisions_conv1_to_conv4_on_each_image(stand_in_model, imagenet_home, make_opt,
                                                                        tiny_data, tmp_path):
    opt = train_options(make_opt, tiny_data)
    whole = training.TrainingData(opt).whole
    cache = trunk_cache.compute(stand_in_model, whole, opt, torch.device('cpu'), str(tmp_path))
    assert cache.path is None and cache.features.dtype == torch.float32  # tiny: float32 in RAM
    assert len(cache) == len(whole)
    for index in (0, len(whole) - 1):  # a database image and a query
        features, returned_index = cache[index]
        torch.testing.assert_close(features, independent_trunk(imagenet_home, load_image(whole.paths[index])),
                                   rtol=1e-4, atol=1e-4)
        assert returned_index == index


def test_a_cache_over_the_memory_budget_goes_to_a_float16_file_deleted_at_the_end(stand_in_model, imagenet_home,
                                                                                   make_opt, tiny_data, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(trunk_cache, 'RAM_FRACTION', 0.0)
    opt = train_options(make_opt, tiny_data)
    whole = training.TrainingData(opt).whole
    cache = trunk_cache.compute(stand_in_model, whole, opt, torch.device('cpu'), str(tmp_path))
    assert cache.path == str(tmp_path / 'trunk_cache_rank0.npy')
    stored = np.load(cache.path, mmap_mode='r')
    assert stored.dtype == np.float16 and stored.shape[0] == len(whole)
    expected = independent_trunk(imagenet_home, load_image(whole.paths[3]))
    torch.testing.assert_close(cache[3][0], expected, rtol=2e-3, atol=2e-3)
    cache.release()
    assert not (tmp_path / 'trunk_cache_rank0.npy').exists()


def test_a_float32_file_when_asked(stand_in_model, imagenet_home, make_opt, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trunk_cache, 'RAM_FRACTION', 0.0)
    opt = train_options(make_opt, tiny_data, '--trunk_cache_dtype=float32')
    cache = trunk_cache.compute(stand_in_model, training.TrainingData(opt).whole, opt, torch.device('cpu'),
                                str(tmp_path))
    assert np.load(cache.path, mmap_mode='r').dtype == np.float32
    cache.release()


def test_off_without_frozen_layers_with_the_flag_and_for_an_encoder_program(stand_in_model, make_opt, tiny_data,
                                                                           caplog):
    opt = train_options(make_opt, tiny_data)
    whole = training.TrainingData(opt).whole
    assert trunk_cache.applies(stand_in_model, whole, opt)
    assert not trunk_cache.applies(stand_in_model, whole, train_options(make_opt, tiny_data, '--trunk_cache=off'))
    assert not trunk_cache.applies(copy.deepcopy(stand_in_model).set_first_trainable(0), whole, opt)
    program = copy.deepcopy(stand_in_model)
    program.encoder = torch.fx.symbolic_trace(program.encoder)  # one graph, as QAT's exported encoder
    with caplog.at_level('INFO'):
        assert not trunk_cache.applies(program, whole, opt)
    assert 'Trunk cache off: the encoder is one exported program' in caplog.text
    whole.sizes_vary_from = len(whole) - 1  # as Tokyo 24/7 queries without --resize
    with caplog.at_level('INFO'):
        assert not trunk_cache.applies(stand_in_model, whole, opt)
    assert 'Trunk cache off: the training images differ in size' in caplog.text


def test_training_removes_its_trunk_cache_file(imagenet_home, run_cli, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trunk_cache, 'RAM_FRACTION', 0.0)
    run = tmp_path / 'run'
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    flags = ['--arch=alexnet', '--num_clusters=8', f'--dataPath={data}', '--nocuda', '--threads=0',
             '--cacheBatchSize=8']
    assert run_cli(['--mode=cluster', *flags]) == 0
    assert run_cli(['--mode=train', *flags, '--nEpochs=1', '--nNegSample=20', '--savePath', run]) == 0
    log = (run / 'log.txt').read_text()
    assert 'Trunk cache: output of the 10 frozen encoder layers' in log and 'on disk' in log
    assert not list(run.glob('trunk_cache*'))


def test_torchrun_two_processes_train_with_the_trunk_cache(imagenet_home, run_cli, tiny_data, tmp_path):
    data, run = tmp_path / 'data', tmp_path / 'ddp'
    shutil.copytree(tiny_data, data)
    flags = ['--arch=alexnet', '--num_clusters=8', f'--dataPath={data}', '--nocuda', '--threads=0',
             '--cacheBatchSize=8']
    assert run_cli(['--mode=cluster', *flags]) == 0
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               f'--master_port={free_port()}',
               str(REPO / 'main.py'), '--mode=train', *flags, '--nEpochs=1', '--nNegSample=20', '--savePath', str(run)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert 'Trunk cache: output of the 10 frozen encoder layers' in (run / 'log.txt').read_text()
    checkpoint = torch.load(run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)
    assert checkpoint['parallel'] is True and checkpoint['epoch'] == 1 and checkpoint['recalls']


@pytest.mark.parametrize('storage', ['ram float32', 'ram float16', 'file float16'])
def test_a_batch_gathers_exactly_the_rows_of_its_triplets_images(storage, tmp_path):
    """The step's batch of cached rows (one index operation) and the refresh's (a DataLoader fetching a batch) equal
    the rows read one image at a time, in the order collate_triplets lays a batch out."""
    stored = np.random.default_rng(0).standard_normal((30, 4, 3, 5)).astype(np.float16 if 'float16' in storage
                                                                             else np.float32)
    if storage.startswith('file'):
        np.save(tmp_path / 'cache.npy', stored)
        source = trunk_cache.TrunkFeatures(np.load(tmp_path / 'cache.npy', mmap_mode='r'))
    else:
        source = trunk_cache.TrunkFeatures(torch.from_numpy(stored.copy()))
    triplets = [(20, 3, [7, 1, 9]), (25, 3, [2]), (21, 0, [7, 8, 4, 5]), (29, 11, [6, 7])]
    batches = [[0, 1], [2], [3, 0]]
    one_at_a_time = {row: torch.from_numpy(stored[row].astype(np.float32)) for row in range(len(stored))}
    gathered = list(training.triplet_batches(source, triplets, batches, None))
    assert len(gathered) == len(batches)
    for (images, neg_counts), batch in zip(gathered, batches):
        rows = [row for i in batch for row in (triplets[i][0], triplets[i][1], *triplets[i][2])]
        assert images.dtype == torch.float32 and torch.equal(images, torch.stack([one_at_a_time[r] for r in rows]))
        assert neg_counts == [len(triplets[i][2]) for i in batch]
        per_item = training.collate_triplets([training.TripletImages(source, triplets)[i] for i in batch])
        assert torch.equal(per_item[0], images) and per_item[1] == neg_counts
    refresh_rows = [28, 3, 3, 17, 0, 12]
    loader, on_device = gpu_decode.image_batches(Subset(Subset(source, list(range(30))[::-1]), [29 - r for r in
                                                                                               refresh_rows]),
                                                 None, 4, torch.device('cpu'))
    refreshed = [on_device(batch) for batch in loader]
    assert [len(images) for images, _ in refreshed] == [4, 2]
    assert torch.equal(torch.cat([images for images, _ in refreshed]),
                       torch.stack([one_at_a_time[r] for r in refresh_rows]))
    assert torch.cat([rows for _, rows in refreshed]).tolist() == refresh_rows
