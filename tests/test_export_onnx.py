"""--mode=export --format onnx: onnxruntime (CPU) against PyTorch on float, pruned, whitened and imported runs, at
two batch sizes and two image sizes; the metadata; a graph whose size does not grow with K; int8 runs refused."""
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from helpers import error_paragraph, files_under, matlab_network, write_matlab_network
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import build_model
from netvlad_toolkit.runs.runs import open_run

SIZES = [(1, 64, 80), (3, 96, 112)]


def save_run(run, config, seed=0):
    torch.manual_seed(seed)
    model = build_model(dict(dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False,
                                  encoder_channels=None, pca_dim=None), **config))
    save_checkpoint(dict(model_state(model), epoch=0, recalls={}, best_score=0.0, parallel=False), str(run), False)
    return run


def float_run(tmp_path):
    return save_run(tmp_path / 'float', {})


def pruned_run(tmp_path):
    return save_run(tmp_path / 'pruned', dict(encoder_channels=[48, 144, 288, 192, 192], vladv2=True))


def whitened_run(tmp_path):
    return save_run(tmp_path / 'whitened', dict(pca_dim=32))


def imported_run(tmp_path):
    from netvlad_toolkit import cli
    net = matlab_network(np.random.default_rng(0), [8] * 7 + [16] * 6, clusters=4, out_dim=8,
                         average_image=np.array([123.7, 116.8, 103.9]))
    write_matlab_network(tmp_path / 'net.mat', net)
    assert cli.main(['--mode=import', '--matlab', str(tmp_path / 'net.mat'), '--savePath', str(tmp_path / 'imp')]) == 0
    return tmp_path / 'imp'


def export_run(run_cli, run, path):
    assert run_cli(['--mode=export', '--format', 'onnx', '--resume', run, '--export_path', path]) == 0
    return onnx.load(str(path))


@pytest.mark.parametrize('make_run', [float_run, pruned_run, whitened_run, imported_run])
def test_onnxruntime_equals_pytorch(make_run, tmp_path, run_cli, make_opt):
    run = make_run(tmp_path)
    graph = export_run(run_cli, run, tmp_path / 'out' / 'model.onnx')
    model = open_run(make_opt(['--mode=test', '--resume', run]))[0].eval()
    session = onnxruntime.InferenceSession(str(tmp_path / 'out' / 'model.onnx'), providers=['CPUExecutionProvider'])
    for batch, height, width in SIZES:
        images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        (got,) = session.run(None, {'image': images.numpy()})
        with torch.no_grad():
            expected = model(images).numpy()
        assert got.shape == (batch, model.output_dim)
        assert np.abs(got - expected).max() <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    dims = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and dims[1] == ''


def test_metadata(tmp_path, run_cli):
    graph = export_run(run_cli, whitened_run(tmp_path), tmp_path / 'model.onnx')
    props = {p.key: p.value for p in graph.metadata_props}
    assert (props['arch'], props['num_clusters'], props['dim'], props['whitening']) == ('alexnet', '8', '256', '32')
    assert props['descriptor_dim'] == '32'
    assert json.loads(props['mean']) == [0.485, 0.456, 0.406] and json.loads(props['std']) == [0.229, 0.224, 0.225]


def test_graph_does_not_grow_with_the_number_of_clusters(tmp_path, run_cli):
    counts = []
    for clusters in (4, 32):
        run = save_run(tmp_path / f'k{clusters}', dict(num_clusters=clusters))
        counts.append(len(export_run(run_cli, run, tmp_path / f'k{clusters}.onnx').graph.node))
    assert counts[0] == counts[1] <= 100  # a per-cluster loop would add nodes per cluster


def test_int8_run_is_refused(tmp_path, run_cli, capsys):
    run = tmp_path / 'int8'
    save_checkpoint(dict(quantized='static', state_dict={}, source_run='float_run'), str(run), False)
    assert run_cli(['--mode=export', '--resume', run, '--export_path', tmp_path / 'm.onnx']) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'int8' in message and 'float_run' in message
    assert files_under(tmp_path) == ['int8/checkpoints/checkpoint.pth.tar']


def test_onnxruntime_int8_is_evaluated_beside_the_float_model(tiny_data, tmp_path, run_cli):
    run = float_run(tmp_path)
    path = tmp_path / 'model.onnx'
    assert run_cli(['--mode=export', '--resume', run, '--export_path', path, '--onnx_int8', '--calib_images=8',
                    f'--dataPath={tiny_data}', f'--runsPath={tmp_path}', '--split=val', '--latency_size=64x80',
                    '--threads=0', '--cacheBatchSize=8']) == 0
    graph = onnx.load(str(tmp_path / 'model_int8.onnx'))
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 5  # the five AlexNet convs
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)).numpy()
    outputs = [onnxruntime.InferenceSession(str(p), providers=['CPUExecutionProvider']).run(None, {'image': images})[0]
               for p in (path, tmp_path / 'model_int8.onnx')]
    assert (outputs[0] * outputs[1]).sum(axis=1).min() > 0.9  # same descriptor up to int8 rounding
    record = json.loads((tmp_path / 'results.jsonl').read_text().splitlines()[-1])
    assert record['variant'] == 'onnxruntime int8 static' and record['split'] == 'val'
    assert set(record['recalls']) == {'1', '5', '10', '20'} and record['latency_ms'] > 0
    assert abs(record['file_mb'] - (tmp_path / 'model_int8.onnx').stat().st_size / 2 ** 20) < 1e-9


def test_int8_is_not_evaluated_on_its_calibration_split(tiny_data, tmp_path, run_cli, capsys):
    run = float_run(tmp_path)
    assert run_cli(['--mode=export', '--resume', run, '--export_path', tmp_path / 'm.onnx', '--onnx_int8',
                    f'--dataPath={tiny_data}', '--split=train']) == 2
    assert '--split=train' in error_paragraph(capsys.readouterr().err)
    assert files_under(tmp_path) == ['float/checkpoints/checkpoint.pth.tar']
