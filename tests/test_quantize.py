"""int8 quantization: int8 weights in the saved program, descriptors close to fp32, a reload in a fresh process
that gives the same descriptors without the training split, QAT that learns through the triplet loss, errors."""
import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import error_paragraph, reference_quantization
from netvlad_toolkit import cli
from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.model.checkpoint import checkpoint_path
from netvlad_toolkit.model.int8 import (
    COMPILE_ENV,
    ENCODER_NAME,
    QuantizedEmbedNet,
    converted_program,
    has_int8_dot_product,
    head_state,
    int8_weights,
    load_quantized_model,
    save_encoder,
)
from netvlad_toolkit.model.models import build_model, config_from_state_dict
from netvlad_toolkit.modes import quantize
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.training import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--latency_size', '64x80', '--split', 'test']
ALEXNET_CONV_KEYS = [f'encoder.{i}.weight' for i in (0, 3, 6, 8, 10)]


@pytest.fixture
def uncompiled(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, '0')


def options(run_dir, data, *flags):
    return cli.parse_options(['--mode=test', f'--resume={run_dir}', f'--dataPath={data}', *FAST, *flags])


def fp32_weights(run_dir):
    state = torch.load(checkpoint_path(str(run_dir)), weights_only=True)['state_dict']
    return [state[key] for key in ALEXNET_CONV_KEYS]


def program_weights(run_dir, data):
    """(int8 weight, scale) of each conv of the program --mode=test rebuilds from a run folder."""
    model, _ = open_run(options(run_dir, data))
    return int8_weights(model.encoder.program)


def sample_images(data, count=8):
    dataset = load_dataset(cli.parse_options(['--mode=test', f'--dataPath={data}']), 'test')
    return torch.stack([dataset[i][0] for i in range(count)])


# ---------------------------------------------------------------------------------------------- static

def test_static_program_stores_int8_weights_and_the_head_stays_float(static_run, float_run, clustered_data,
                                                                     uncompiled):
    folder = static_run / 'checkpoints'
    assert sorted(os.listdir(folder)) == ['checkpoint.pth.tar', 'encoder_int8.pth', 'model_best.pth.tar']
    checkpoint = torch.load(folder / 'checkpoint.pth.tar', weights_only=True)  # plain data only
    assert checkpoint['quantized'] == 'static' and 'encoder_program' not in checkpoint
    assert sorted(checkpoint['state_dict']) == ['pool.centroids', 'pool.conv.weight']
    source = torch.load(checkpoint_path(str(float_run)), weights_only=True)['state_dict']
    for key, value in checkpoint['state_dict'].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, source[key], rtol=0, atol=0)  # static quantization leaves the head

    weights = program_weights(static_run, clustered_data)
    assert len(weights) == 5
    for (int8, scale), fp32 in zip(weights, fp32_weights(float_run)):
        expected, expected_scale = reference_quantization(fp32)
        assert int8.dtype == torch.int8 and int8.shape == fp32.shape
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        assert (int8.int() - expected.int()).abs().max() <= 1  # a rounding tie may go either way
        assert (int8 == expected).float().mean() > 0.999
    stored = torch.load(folder / ENCODER_NAME, weights_only=True)['state_dict']  # tensors only
    assert [t.dtype for t in stored.values() if t.dim() == 4] == [torch.int8] * 5, 'conv weights not int8'


def test_static_report_sizes_and_recalls(static_run, float_run):
    with open(static_run / 'quantize_report.json') as f:
        report = json.load(f)
    before, after, ratio = report['before'], report['after'], report['ratio_after_over_before']
    for record in (before, after):
        assert {'file_bytes', 'latency_ms', 'recall@1', 'recall@5', 'recall@10', 'recall@20'} <= set(record)
        assert record['latency_ms'] > 0
    assert ratio['file_bytes'] <= 1 / 3.5  # int8 weights stored, not fp32
    assert after['file_bytes'] == sum(os.path.getsize(static_run / 'checkpoints' / name)
                                      for name in ('checkpoint.pth.tar', 'encoder_int8.pth'))
    assert abs(after['recall@5'] - before['recall@5']) <= 0.2
    with open(float_run.parent / 'results.jsonl') as f:
        record = json.loads(f.readlines()[-1])
    assert record['variant'] == 'int8 static' and record['arch'] == 'alexnet'


def test_static_descriptors_close_to_fp32(static_run, float_run, clustered_data, uncompiled):
    fp32_model, _ = open_run(options(float_run, clustered_data))
    int8_model, _ = open_run(options(static_run, clustered_data))
    assert isinstance(int8_model, QuantizedEmbedNet) and int8_model.output_dim == 8 * 256
    images = sample_images(clustered_data, 30)
    with torch.inference_mode():
        cosine = (fp32_model.eval()(images) * int8_model(images)).sum(dim=1)  # both L2-normalised
    assert cosine.min() >= 0.98, cosine


def saved_and_loaded(prepared, record, head_model, config, run_dir):
    """The int8 model of a prepared encoder, written as --mode=quantize writes it and loaded back from the files."""
    folder = run_dir / 'checkpoints'
    folder.mkdir(parents=True)
    save_encoder(prepared, record, folder)
    state = head_state(head_model)
    return load_quantized_model(dict(quantized=record['scheme'], state_dict=state, config=config), run_dir)


def test_whitened_model_keeps_its_float_whitening(tmp_path, uncompiled):
    """A model with PCA whitening: the encoder becomes int8, whitening and normalisation stay float."""
    torch.manual_seed(0)
    config = dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None, pca_dim=16,
                  input_norm=False)
    model = build_model(config).eval()
    images = torch.randn(6, 3, 64, 80)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(6)), batch_size=3)
    prepared, head_model, record = quantize.quantize_static(copy.deepcopy(model), loader)
    int8_model = saved_and_loaded(prepared, record, head_model, config, tmp_path)
    assert int8_model.output_dim == 16
    in_process = QuantizedEmbedNet(converted_program(prepared, images[:2]).module(), head_model.pool,
                                   head_model.whiten, compile=False)
    with torch.inference_mode():
        int8_desc, fp32_desc = int8_model(images), model(images)
        torch.testing.assert_close(int8_desc, in_process(images), rtol=0, atol=0)  # the same program
    assert int8_desc.shape == (6, 16)
    torch.testing.assert_close(int8_desc.norm(dim=1), torch.ones(6))
    assert (int8_desc * fp32_desc).sum(dim=1).min() >= 0.95


def test_compiled_program_runs_onednn_int8_convs(static_run, clustered_data):
    """The default path: Inductor lowers every conv to a oneDNN int8 conv; same numbers as the plain program."""
    from torch._dynamo.utils import counters
    counters.clear()
    model, _ = open_run(options(static_run, clustered_data))
    reference = QuantizedEmbedNet(model.encoder.program, model.pool, compile=False)
    images = sample_images(clustered_data)
    with torch.inference_mode():
        compiled, plain = model(images), reference(images)
    assert counters['inductor']['qconv_weight_prepack_matcher_count'] == 5
    # oneDNN's AVX2 int8 kernels (no VNNI) do not compute exactly the reference's integer arithmetic
    assert (compiled * plain).sum(dim=1).min() >= (0.999 if has_int8_dot_product() else 0.997)


def test_reload_in_fresh_process_without_training_split(static_run, clustered_data, tmp_path):
    """--mode=test runs the saved program as it is: no calibration images needed, no training code imported,
    and the same descriptors as in this process."""
    data = tmp_path / 'data'
    shutil.copytree(clustered_data, data)
    os.remove(data / 'datasets' / 'pitts30k_train.mat')
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {REPO!r})
        import numpy as np, torch
        torch.set_num_threads(1)  # as in this process (conftest): float reductions then add up in the same order
        from netvlad_toolkit import cli
        from netvlad_toolkit.runs.runs import open_run
        from netvlad_toolkit.datasets.datasets import load_dataset
        argv = ['--mode=test', '--resume={static_run}', '--dataPath={data}', '--runsPath={tmp_path}', *{FAST!r}]
        model = open_run(cli.parse_options(argv))[0]
        dataset = load_dataset(cli.parse_options(argv), 'test')
        with torch.inference_mode():
            descriptors = model(torch.stack([dataset[i][0] for i in range(8)]))
        np.save('{tmp_path / "descriptors.npy"}', descriptors.numpy())
        assert cli.main(argv) == 0
        assert not {{'netvlad_toolkit.modes.train', 'netvlad_toolkit.training.training', 'netvlad_toolkit.modes.prune'}} & set(sys.modules), 'training code imported'
    ''')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Recall@1:' in done.stdout and 'int8 encoder compiled' in done.stdout
    model, _ = open_run(options(static_run, clustered_data))
    with torch.inference_mode():
        descriptors = model(sample_images(clustered_data)).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / 'descriptors.npy'), descriptors)


def test_test_mode_on_a_cuda_machine_evaluates_on_the_cpu(static_run, clustered_data, monkeypatch, uncompiled,
                                                         capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    # No driver here: the DataLoader's page-locking of batches, which a real CUDA machine does, is skipped.
    monkeypatch.setattr(torch.utils.data._utils.pin_memory, 'pin_memory', lambda data, device=None: data)
    assert cli.main(['--mode=test', f'--resume={static_run}', f'--dataPath={clustered_data}',
                      f'--runsPath={static_run.parent}', *FAST[2:]]) == 0
    out = capsys.readouterr().out
    assert 'evaluating on the CPU instead of cuda' in out and 'Recall@1:' in out
    model, _ = open_run(options(static_run, clustered_data))
    assert model.cuda() is model and model.to('cuda').pool.centroids.device.type == 'cpu'


# ---------------------------------------------------------------------------------------------- QAT

def qat_program(float_run, data, out_dir):
    """QAT of float_run through quantize.quantize_qat (calibration, training.fit): the trained prepared encoder, the
    model with its head and the quantization record, without the report."""
    opt = cli.parse_options(['--mode=quantize', '--quantization_type=qat', f'--resume={float_run}',
                              f'--dataPath={data}', '--calib_images=8', '--qat_epochs=1', '--optim=ADAM',
                              '--lr=0.01', '--weightDecay=0', '--nNeg=2', '--nNegSample=20', *FAST])
    model, _ = open_run(opt)
    loader = quantize.image_loader(quantize.calibration_set(opt), opt, opt.cacheBatchSize)
    return quantize.quantize_qat(model, loader, training.training_splits(opt), opt, torch.device('cpu'), str(out_dir))


def max_weight_change(weights, fp32):
    """Largest |dequantised int8 weight - original fp32 weight|, in units of that channel's quantisation step."""
    return max(((int8.float() * scale[:, None, None, None] - w).abs() / scale[:, None, None, None]).max().item()
               for (int8, scale), w in zip(weights, fp32))


def test_qat_learns_through_the_triplet_loss(float_run, clustered_data, tmp_path, monkeypatch, uncompiled):
    """With the real triplet loss the encoder (through the fake-quantisers) and NetVLAD change; with the same loss
    multiplied by zero nothing does. A QAT that trained on anything else (output.sum()) fails the second half."""
    losses, factor = [], [1.0]

    def scaled_triplet_loss(descriptors, neg_counts, margin, loss_kind, real=training.triplet_loss):
        loss = real(descriptors, neg_counts, margin, loss_kind)
        losses.append(loss.detach())
        return loss * factor[0]

    monkeypatch.setattr(training, 'triplet_loss', scaled_triplet_loss)
    fp32 = fp32_weights(float_run)
    source_head = torch.load(checkpoint_path(str(float_run)), weights_only=True)['state_dict']
    changes = {}
    images = sample_images(clustered_data, 4)
    for factor[0] in (1.0, 0.0):
        losses.clear()
        prepared, head_model, record = qat_program(float_run, clustered_data, tmp_path / f'qat_{factor[0]}')
        assert losses and sum(losses) > 0  # the triplet loss was computed on mined triplets
        # what a later --mode=test rebuilds from the files is the program QAT made here
        loaded = saved_and_loaded(prepared, record, head_model, config_from_state_dict(source_head, 'netvlad'),
                                  tmp_path / f'qat_run_{factor[0]}')
        program = converted_program(prepared, images[:2])
        in_process = QuantizedEmbedNet(program.module(), head_model.pool, compile=False)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(images), in_process(images), rtol=0, atol=0)
        weights = int8_weights(program)
        assert len(weights) == 5 and all(int8.dtype == torch.int8 for int8, _ in weights)
        head = head_state(head_model)
        changes[factor[0]] = (max_weight_change(weights, fp32),
                              max((head[key] - source_head[key]).abs().max().item() for key in head))
    # zero gradient: int8 weights are the original ones up to rounding (half a step), the head is untouched
    assert changes[0.0][0] <= 0.5 + 1e-3 and changes[0.0][1] == 0, changes
    # the triplet loss moved encoder weights by several quantisation steps, and NetVLAD's parameters
    assert changes[1.0][0] > 2 and changes[1.0][1] > 1e-4, changes


def test_qat_cli_writes_an_int8_model_test_mode_runs(float_run, clustered_data, uncompiled, capsys):
    assert cli.main(['--mode=quantize', '--quantization_type=qat', f'--resume={float_run}', *FAST,
                      f'--dataPath={clustered_data}', f'--runsPath={float_run.parent}', '--calib_images=8',
                      '--qat_epochs=1', '--nNeg=2', '--nNegSample=20']) == 0
    qat_run = float_run.parent / 'run_quantized_qat'
    checkpoint = torch.load(qat_run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)
    assert checkpoint['quantized'] == 'qat' and checkpoint['qat_epochs'] == 1
    weights = program_weights(qat_run, clustered_data)
    assert len(weights) == 5 and all(int8.dtype == torch.int8 for int8, _ in weights)
    with open(qat_run / 'quantize_report.json') as f:
        assert json.load(f)['ratio_after_over_before']['file_bytes'] <= 1 / 3.5
    capsys.readouterr()
    assert cli.main(['--mode=test', f'--resume={qat_run}', f'--dataPath={clustered_data}',
                      f'--runsPath={float_run.parent}', *FAST]) == 0
    assert '====> Recall@1:' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- errors

def cli_error(capsys, *argv):
    """The one-paragraph error of a quantize run that must fail (exit status 2)."""
    assert cli.main(['--mode=quantize', *FAST, *argv]) == 2
    return error_paragraph(capsys.readouterr().err)


def test_no_calibration_images_is_an_error(float_run, clustered_data, capsys):
    message = cli_error(capsys, f'--resume={float_run}', f'--dataPath={clustered_data}', '--calib_images=0')
    assert '--calib_images=0' in message


def test_missing_training_split_is_an_error(float_run, clustered_data, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(clustered_data, data)
    os.remove(data / 'datasets' / 'pitts30k_train.mat')
    message = cli_error(capsys, f'--resume={float_run}', f'--dataPath={data}')
    assert 'pitts30k_train.mat' in message and 'calibrat' in message


def test_unknown_quantization_type_is_an_error(float_run, clustered_data, capsys):
    # argparse knows the choices
    assert cli.main(['--mode=quantize', f'--resume={float_run}', '--quantization_type=dynamic']) == 2
    assert "invalid choice: 'dynamic'" in error_paragraph(capsys.readouterr().err)


def test_calibrating_on_the_evaluated_split_is_an_error(float_run, clustered_data, capsys):
    message = cli_error(capsys, f'--resume={float_run}', f'--dataPath={clustered_data}', '--split=train')
    assert '--split=train' in message


def test_quantizing_a_quantized_run_is_an_error(static_run, clustered_data, capsys):
    message = cli_error(capsys, f'--resume={static_run}', f'--dataPath={clustered_data}')
    assert 'already quantized' in message


def test_missing_program_is_an_error(static_run, clustered_data, tmp_path, capsys):
    copy = tmp_path / 'copy_quantized'
    shutil.copytree(static_run, copy)
    os.remove(copy / 'checkpoints' / ENCODER_NAME)
    assert cli.main(['--mode=test', f'--resume={copy}', f'--dataPath={clustered_data}', *FAST]) == 2
    assert ENCODER_NAME in error_paragraph(capsys.readouterr().err)
