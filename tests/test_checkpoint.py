"""Checkpoints in the reference port's layout, written here by hand, evaluated through the CLI and checked against
recalls computed independently (own AlexNet trunk, own NetVLAD, brute-force search and ground truth)."""
import io
import json
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from helpers import (
    alexnet_trunk,
    brute_force_positives,
    brute_force_recalls,
    error_paragraph,
    netvlad_reference,
    read_geometry,
    read_image,
)
from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.model.checkpoint import read_checkpoint
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.search.retrieval import extract_descriptors

ALEXNET_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
K = 64


def reference_state_dict(seed=0):
    """Random AlexNet conv1..conv5 + NetVLAD v1 weights under the reference port's key names."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for index, (out_c, in_c, size) in ALEXNET_CONVS.items():
        scale = (2 / (in_c * size * size)) ** 0.5  # He initialisation: activations neither vanish nor explode
        state[f'encoder.{index}.weight'] = torch.randn(out_c, in_c, size, size, generator=g) * scale
        state[f'encoder.{index}.bias'] = torch.randn(out_c, generator=g) * 0.01
    centroids = torch.nn.functional.normalize(torch.randn(K, 256, generator=g), dim=1)
    state['pool.conv.weight'] = (20.0 * centroids)[:, :, None, None]
    state['pool.centroids'] = centroids
    return state


def with_prefix(state, form):
    if form == 'plain':
        return OrderedDict(state)
    if form == 'module':  # nn.DataParallel around the whole model
        return OrderedDict(('module.' + k, v) for k, v in state.items())
    # the reference port with nGPU > 1: DataParallel around the encoder and the pool separately
    return OrderedDict((k.replace('encoder.', 'encoder.module.', 1).replace('pool.', 'pool.module.', 1), v)
                       for k, v in state.items())


def write_reference_checkpoint(run_dir, state_dict, numpy1_pickle=False):
    """A checkpoint dict as the reference writes it, numpy scalars included, at RUN/checkpoints/checkpoint.pth.tar."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, momentum=0.9).state_dict()
    checkpoint = {'epoch': 7, 'state_dict': state_dict,
                  'recalls': {1: np.float64(0.41), 5: np.float64(0.62), 10: np.float64(0.7), 20: np.float64(0.8)},
                  'best_score': np.float64(0.62), 'optimizer': optimizer, 'parallel': False}
    path = run_dir / 'checkpoints' / 'checkpoint.pth.tar'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    if numpy1_pickle:  # as written under numpy 1.x, which named the scalar builder numpy.core.multiarray.scalar
        rewrite_pickle(path, lambda data: data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    return path


def rewrite_pickle(path, change):
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, change(data) if item.filename.endswith('data.pkl') else data)
    path.write_bytes(buffer.getvalue())


def independent_recalls(state, data_root, split='test'):
    """Recall@{1,5,10,20} of the checkpoint's network, computed without the project's model, loader or search."""
    db_names, utm_db, q_names, utm_q = read_geometry(data_root / 'datasets' / f'pitts30k_{split}.mat')
    paths = [data_root / n for n in db_names] + [data_root / 'queries_real' / n for n in q_names]
    images = torch.stack([read_image(p) for p in paths])
    with torch.no_grad():
        features = alexnet_trunk(images, state)
        desc = netvlad_reference(features, state['pool.conv.weight'][:, :, 0, 0], None, state['pool.centroids'])
    desc = desc.numpy()
    positives = brute_force_positives(utm_db, utm_q, 25.0)
    return brute_force_recalls(desc[:len(db_names)], desc[len(db_names):], positives, [1, 5, 10, 20]), desc


def cli_argv(tiny_data, run_dir, *extra):
    argv = ['--mode=test', '--dataset=synthetic', '--dataPath', tiny_data, '--split=test', '--resume', run_dir,
            '--arch=alexnet', '--nocuda', '--threads=0', '--fromscratch', '--runsPath', run_dir.parent, *extra]
    return [str(arg) for arg in argv]


@pytest.fixture(scope='module')
def expected(tiny_data):
    return independent_recalls(reference_state_dict(), tiny_data)


@pytest.mark.parametrize('form, numpy1', [('plain', False), ('module', False), ('submodule', True)],
                         ids=['plain-keys', 'module-prefix', 'dataparallel-submodules-numpy1'])
def test_reference_checkpoint_recalls(tiny_data, tmp_path, run_cli, expected, form, numpy1):
    recalls, desc = expected
    run_dir = tmp_path / 'run'
    write_reference_checkpoint(run_dir, with_prefix(reference_state_dict(), form), numpy1)
    assert run_cli(cli_argv(tiny_data, run_dir)) == 0
    result = json.loads((run_dir / 'test_test.json').read_text())
    assert {int(n): r for n, r in result['recalls'].items()} == pytest.approx(recalls, abs=1e-9)
    assert result['descriptor_dim'] == K * 256
    assert 0 < recalls[1] < recalls[20]  # not a degenerate case where any ranking scores the same


def test_loaded_checkpoint_gives_the_reference_descriptors(tiny_data, tmp_path, make_opt, expected):
    """Descriptor by descriptor: the model built from the checkpoint, fed by the project's loader, vs the reference."""
    _, reference = expected
    run_dir = tmp_path / 'run'
    write_reference_checkpoint(run_dir, with_prefix(reference_state_dict(), 'module'))
    opt = make_opt(cli_argv(tiny_data, run_dir))
    model, checkpoint = open_run(opt)
    assert checkpoint['epoch'] == 7 and checkpoint['best_score'] == 0.62
    desc = extract_descriptors(model, load_dataset(opt, 'test'), opt, torch.device('cpu'))
    assert desc.dtype == np.float32 and desc.shape == reference.shape
    assert np.abs(desc - reference).max() < 1e-6  # unit-length rows of 16384 components


def test_reference_recalls_are_not_decided_by_near_ties(tiny_data, expected):
    """Float32 (project) and float64 (reference) rank alike unless a database image lies about as far from a query as
    its nearest positive does: check that no such near tie decides any query's recall."""
    _, desc = expected
    _, utm_db, _, utm_q = read_geometry(tiny_data / 'datasets' / 'pitts30k_test.mat')
    positives = brute_force_positives(utm_db, utm_q, 25.0)
    dist = ((desc[60:, None] - desc[None, :60]) ** 2).sum(axis=2)
    for row, correct in zip(dist, positives):
        best = min(correct, key=lambda j: row[j])
        assert np.abs(np.delete(row, best) - row[best]).min() > 1e-5


def test_read_checkpoint_plain_numbers(tmp_path):
    path = write_reference_checkpoint(tmp_path / 'run', with_prefix(reference_state_dict(), 'module'), True)
    checkpoint = read_checkpoint(str(path))
    assert type(checkpoint['best_score']) is float and checkpoint['best_score'] == 0.62
    assert checkpoint['recalls'] == {1: 0.41, 5: 0.62, 10: 0.7, 20: 0.8}
    assert set(checkpoint['state_dict']) == set(reference_state_dict())
    assert checkpoint['epoch'] == 7


@pytest.mark.parametrize('flag, value', [('arch', 'vgg16'), ('num_clusters', '32')])
def test_flag_contradicting_checkpoint(tiny_data, tmp_path, run_cli, capsys, flag, value):
    run_dir = tmp_path / 'run'
    write_reference_checkpoint(run_dir, reference_state_dict())
    argv = [a for a in cli_argv(tiny_data, run_dir) if not a.startswith(f'--{flag}=')] + [f'--{flag}={value}']
    assert run_cli(argv) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert f'--{flag}' in paragraph and 'checkpoint.pth.tar' in paragraph
    assert not (run_dir / 'test_test.json').exists()


def test_truncated_checkpoint(tiny_data, tmp_path, run_cli, capsys):
    run_dir = tmp_path / 'run'
    path = write_reference_checkpoint(run_dir, reference_state_dict())
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    assert run_cli(cli_argv(tiny_data, run_dir)) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert str(path) in paragraph and 'truncated' in paragraph
    assert not (run_dir / 'test_test.json').exists()


def test_missing_checkpoint(tiny_data, tmp_path, run_cli, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    assert run_cli(cli_argv(tiny_data, run_dir)) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert str(run_dir / 'checkpoints' / 'checkpoint.pth.tar') in paragraph
    assert list(run_dir.iterdir()) == []


def test_checkpoint_with_wrong_shapes(tiny_data, tmp_path, run_cli, capsys):
    """A state dict whose NetVLAD weights disagree with its centroids: a clear error, not a traceback."""
    state = reference_state_dict()
    state['pool.conv.weight'] = state['pool.conv.weight'][:, :128]
    run_dir = tmp_path / 'run'
    write_reference_checkpoint(run_dir, state)
    assert run_cli(cli_argv(tiny_data, run_dir)) == 2
    assert 'pool.conv.weight' in error_paragraph(capsys.readouterr().err)
