"""The Python API and the torch.hub entry: a run folder loads as a model that gives the descriptors --mode=extract
writes."""
import h5py
import numpy as np
import torch

from conftest import REPO
from netvlad_toolkit import cli
from netvlad_toolkit.api import describe, load_run

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8']


def extracted(float_run, images, tmp_path):
    out = tmp_path / 'feats'
    assert cli.main(['--mode=extract', f'--resume={float_run}', f'--image_dir={images}', f'--export_dir={out}',
                      *FAST]) == 0
    with h5py.File(out / 'global-feats-netvlad.h5', 'r') as f:
        return {name: f[name]['global_descriptor'][()] for name in f}


def test_torch_hub_load_gives_the_descriptors_extract_writes(float_run, tiny_data, tmp_path):
    images = tiny_data / '000'
    names = sorted(p.name for p in images.iterdir())[:6]
    expected = extracted(float_run, images, tmp_path)
    model = torch.hub.load(str(REPO), 'netvlad', source='local', run=str(float_run))
    got = describe(model, [str(images / name) for name in names])
    np.testing.assert_allclose(got, np.stack([expected[name] for name in names]), rtol=0, atol=1e-5)
    batch = torch.stack([model.preprocess(str(images / name)) for name in names])
    np.testing.assert_allclose(describe(model, batch), got, rtol=0, atol=1e-5)


def test_load_run_returns_the_model_on_the_device_with_its_preprocessing(float_run, tiny_data):
    model, preprocess = load_run(str(float_run))
    image = preprocess(str(sorted((tiny_data / '000').iterdir())[0]))
    assert image.shape[0] == 3 and not model.training
    assert next(model.parameters()).device.type == 'cpu'
