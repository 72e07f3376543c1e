"""Shared fixtures: a tiny synthetic dataset in the Pittsburgh layout, and helpers that run the CLI in-process."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))
torch.set_num_threads(1)  # the machine is small and shared

from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets import synthetic  # noqa: E402

TINY_SIZE = (64, 80)  # AlexNet conv5 on 64x80 images: a 3x4 feature map, 12 local descriptors per image


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A read-only-by-convention synthetic dataset: 60 db / 30 queries for val and test, twice that for train."""
    path = tmp_path_factory.mktemp('tiny_synthetic')
    synthetic.generate(str(path), num_db=60, num_queries=30, image_size=TINY_SIZE, seed=0)
    return path


@pytest.fixture
def tiny_copy(tiny_data, tmp_path):
    """A private copy of the tiny dataset, for tests that break or add files."""
    return Path(shutil.copytree(tiny_data, tmp_path / 'data_copy'))


@pytest.fixture
def run_cli():
    """run_cli([...flags...]) runs the CLI (cli.main) in this process and returns its exit code."""
    return lambda argv: cli.main([str(arg) for arg in argv])


@pytest.fixture
def make_opt():
    """make_opt([...flags...]) is the options object the CLI builds from these flags (cli.parse_options)."""
    return lambda argv: cli.parse_options([str(arg) for arg in argv])


# Flags of the fast CPU runs of the shared fixtures below.
FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--latency_size', '64x80', '--split', 'test']


@pytest.fixture(scope='session')
def clustered_data(tiny_data, tmp_path_factory):
    """A private copy of the tiny dataset with AlexNet (--fromscratch, K=8) centroids in it."""
    path = tmp_path_factory.mktemp('clustered') / 'data'
    shutil.copytree(tiny_data, path)
    assert cli.main(['--mode=cluster', '--arch=alexnet', '--fromscratch', '--num_clusters=8',
                      f'--dataPath={path}', *FAST]) == 0
    return path


@pytest.fixture(scope='session')
def float_run(clustered_data, tmp_path_factory):
    """A run folder holding the checkpoint of a cluster-initialised (untrained) AlexNet (--fromscratch, K=8)."""
    from netvlad_toolkit.model.centroids import initialised_model
    from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
    opt = cli.parse_options(['--mode=train', '--arch=alexnet', '--fromscratch', '--num_clusters=8',
                              f'--dataPath={clustered_data}'])
    path = tmp_path_factory.mktemp('float_runs') / 'run'
    save_checkpoint(dict(model_state(initialised_model(opt)), epoch=0, recalls={}, best_score=0.0), str(path), True)
    return path


@pytest.fixture(scope='session')
def static_run(float_run, clustered_data):
    """The static int8 quantization of float_run, made through the CLI (programs run uncompiled: fast)."""
    from netvlad_toolkit.model.int8 import COMPILE_ENV
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(COMPILE_ENV, '0')
        assert cli.main(['--mode=quantize', '--quantization_type=static', f'--resume={float_run}',
                          f'--dataPath={clustered_data}', f'--runsPath={float_run.parent}', '--calib_images=16',
                          *FAST]) == 0
    return float_run.parent / 'run_quantized_static'


@pytest.fixture(scope='session')
def imagenet_stand_in(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a stand-in for torchvision's ImageNet AlexNet weights (a random state dict
    under the exact file name torchvision looks for, so it loads it without downloading). Returns (torch_home,
    the stand-in's `features` weights keyed as the encoder's: encoder.<i>.weight/bias)."""
    import torchvision
    home = tmp_path_factory.mktemp('torch_home')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.manual_seed(2016)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth')
    encoder = {key.replace('features.', 'encoder.', 1): value for key, value in state.items()
               if key.startswith('features.')}
    return home, encoder


@pytest.fixture
def imagenet_home(imagenet_stand_in, monkeypatch):
    """TORCH_HOME set to the stand-in for this test; returns the stand-in's encoder weights."""
    monkeypatch.setenv('TORCH_HOME', str(imagenet_stand_in[0]))
    return imagenet_stand_in[1]


@pytest.fixture(scope='module')
def random_float_run(tmp_path_factory):
    """(run folder, model) of a random AlexNet NetVLAD (K=8), for extraction and query."""
    from helpers import CONFIGS, save_run
    path = tmp_path_factory.mktemp('extract_runs') / 'float'
    return path, save_run(path, CONFIGS['float'])


@pytest.fixture
def places(tiny_data, tmp_path):
    """A database folder of 12 images with folder-format names (@east@north@zone@band@lat@lon@...) and 3 photos."""
    sources = sorted((tiny_data / '000').glob('*.jpg'))
    database, photos = tmp_path / 'database', tmp_path / 'photos'
    (database / 'street').mkdir(parents=True)
    photos.mkdir()
    positions = {}
    for i, source in enumerate(sources[:12]):
        east, north = 585000.5 + 7 * i, 4477000.25 + 3 * i
        name = f'street/@{east:.2f}@{north:.2f}@17@T@40.44{i:02d}@-79.99{i:02d}@pano{i}@@@@@@@@.jpg'
        shutil.copy(source, database / name)
        positions[name] = (east, north)
    for i, source in enumerate(sources[20:23]):
        shutil.copy(source, photos / f'photo{i}.jpg')
    return database, photos, positions
