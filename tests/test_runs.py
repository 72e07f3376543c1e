"""Run folders: which layers a run trains (stored, and the reference's rule for reference checkpoints), bad input that
writes nothing in any mode, the int8 checkpoint folder replaced as one unit, log files, the paper's loss."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import error_paragraph, files_under
from netvlad_toolkit import cli
from netvlad_toolkit.model import int8
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import build_model, first_trainable_index
from netvlad_toolkit.modes import quantize
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.training import training
from netvlad_toolkit.utils import commons

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--latency_size', '64x80', '--split', 'test']
MODEL = ['--arch=alexnet', '--fromscratch', '--num_clusters=8']


def reference_run(path):
    """A run folder as the reference port writes it: a checkpoint without first_trainable, no flags.json."""
    torch.manual_seed(0)
    model = build_model(dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False))
    state = model_state(model)
    del state['first_trainable'], state['first_trainable_layer']
    save_checkpoint(dict(state, epoch=3, recalls={}, best_score=0.0), str(path), False)
    return path


def trainable(model):
    return [p.requires_grad for p in model.encoder.parameters()]


# ---------------------------------------------------------------------------------------------- frozen layers

def test_reference_checkpoint_gets_the_reference_rule(tmp_path):
    run = reference_run(tmp_path / 'run')
    model, _ = open_run(cli.parse_options(['--mode=test', f'--resume={run}']))
    assert model.frozen_layers == 10 and trainable(model) == [False] * 8 + [True] * 2  # conv5 only
    model, _ = open_run(cli.parse_options(['--mode=test', f'--resume={run}', '--fromscratch']))
    assert model.frozen_layers == 0 and all(trainable(model))


def test_stored_first_trainable_layer_wins_over_the_rule(tmp_path):
    torch.manual_seed(0)
    model = build_model(dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, first_trainable=6))
    save_checkpoint(dict(model_state(model), epoch=1, recalls={}, best_score=0.0), str(tmp_path / 'run'), False)
    reopened, checkpoint = open_run(cli.parse_options(['--mode=test', f'--resume={tmp_path / "run"}']))
    assert checkpoint['first_trainable_layer'] == 'conv3' and reopened.frozen_layers == 6
    assert trainable(reopened) == [False] * 4 + [True] * 6


def test_back_prop_to_layer_names_are_checked(make_opt):
    with pytest.raises(commons.UserError, match='--backPropToLayer=conv5_1 is not a conv layer of alexnet'):
        first_trainable_index(make_opt(['--mode=train', '--arch=alexnet', '--backPropToLayer=conv5_1']))
    assert first_trainable_index(make_opt(['--mode=train', '--arch=vgg16', '--backPropToLayer=conv4_3'])) == 21
    assert first_trainable_index(make_opt(['--mode=train', '--arch=vgg16'])) == 24  # conv5_1, the reference's rule
    assert first_trainable_index(make_opt(['--mode=train', '--arch=vgg16', '--fromscratch'])) == 0


def test_resume_refuses_another_first_trainable_layer(clustered_data, float_run, tmp_path, capsys):
    run = shutil.copytree(float_run, tmp_path / 'run')
    assert cli.main(['--mode=train', f'--resume={run}', f'--dataPath={clustered_data}', '--backPropToLayer=conv5',
                      *FAST]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'trains from conv1' in message and '--backPropToLayer=conv5' in message and '--savePath' in message


# ---------------------------------------------------------------------------------------------- bad input writes nothing

def damaged_copy(clustered_data, tmp_path, split):
    data = shutil.copytree(clustered_data, tmp_path / 'data')
    os.remove(os.path.join(data, 'datasets', f'pitts30k_{split}.mat'))
    return data


def test_train_without_val_split_writes_no_run_folder(clustered_data, tmp_path, capsys):
    data = damaged_copy(clustered_data, tmp_path, 'val')
    assert cli.main(['--mode=train', *MODEL, f'--dataPath={data}', f'--savePath={tmp_path / "run"}', *FAST]) == 2
    assert 'pitts30k_val.mat' in error_paragraph(capsys.readouterr().err)
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flags, message', [
    (['--pruning_layers=1,3'], 'this encoder has convs at 0,3,6,8,10'),
    (['--backPropToLayer=conv9'], '--backPropToLayer=conv9'),
])
def test_prune_with_bad_flags_writes_nothing(clustered_data, float_run, tmp_path, capsys, flags, message):
    run = shutil.copytree(float_run, tmp_path / 'run')
    assert cli.main(['--mode=prune', f'--resume={run}', f'--dataPath={clustered_data}', *FAST, *flags]) == 2
    assert message in error_paragraph(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ['run']


def test_prune_without_val_split_writes_nothing(clustered_data, float_run, tmp_path, capsys):
    data = damaged_copy(clustered_data, tmp_path, 'val')
    run = shutil.copytree(float_run, tmp_path / 'run')
    assert cli.main(['--mode=prune', f'--resume={run}', f'--dataPath={data}', *FAST]) == 2
    assert 'pitts30k_val.mat' in error_paragraph(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ['data', 'run']


@pytest.mark.parametrize('missing, flags', [('val', ['--quantization_type=qat']), ('train', []), ('test', [])])
def test_quantize_with_a_missing_split_writes_nothing(clustered_data, float_run, tmp_path, capsys, missing, flags):
    data = damaged_copy(clustered_data, tmp_path, missing)
    run = shutil.copytree(float_run, tmp_path / 'run')
    assert cli.main(['--mode=quantize', f'--resume={run}', f'--dataPath={data}', *FAST, *flags]) == 2
    assert f'pitts30k_{missing}.mat' in error_paragraph(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ['data', 'run']


@pytest.mark.parametrize('missing, flags, message', [
    ('train', [], 'pitts30k_train.mat'),
    ('test', [], 'pitts30k_test.mat'),
    (None, ['--pca_dim=100000'], '--pca_dim 100000'),
])
def test_pca_with_bad_input_writes_nothing(clustered_data, float_run, tmp_path, capsys, missing, flags, message):
    data = damaged_copy(clustered_data, tmp_path, missing) if missing else clustered_data
    run = shutil.copytree(float_run, tmp_path / 'run')
    assert cli.main(['--mode=pca', f'--resume={run}', f'--dataPath={data}', *FAST, *flags]) == 2
    assert message in error_paragraph(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == (['data', 'run'] if missing else ['run'])


# ---------------------------------------------------------------------------------------------- files and logs

def test_int8_checkpoints_folder_is_replaced_as_one_unit(tmp_path):
    """A killed save leaves the previous folder whole; a finished one leaves only the new folder."""
    target = tmp_path / 'checkpoints'
    target.mkdir()
    (target / 'encoder_int8.pth').write_text('old program')
    (target / 'checkpoint.pth.tar').write_text('old head')
    new = tmp_path / 'checkpoints.partial'
    new.mkdir()
    (new / 'encoder_int8.pth').write_text('new program')
    (new / 'checkpoint.pth.tar').write_text('new head')
    real_replace = os.replace

    def killed_at_second_rename(source, destination):
        if str(source) == str(new):
            raise KeyboardInterrupt('killed')
        return real_replace(source, destination)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, 'replace', killed_at_second_rename)
        with pytest.raises(KeyboardInterrupt):
            commons.replace_folder(str(new), str(target))
    assert not target.exists()
    previous = tmp_path / 'checkpoints.previous'
    assert {p: (previous / p).read_text() for p in files_under(previous)} == {
        'checkpoint.pth.tar': 'old head', 'encoder_int8.pth': 'old program'}
    commons.replace_folder(str(new), str(tmp_path / 'again'))
    assert files_under(tmp_path) == ['again/checkpoint.pth.tar', 'again/encoder_int8.pth',
                                     'checkpoints.previous/checkpoint.pth.tar', 'checkpoints.previous/encoder_int8.pth']


def test_a_second_quantize_replaces_encoder_and_head_together(float_run, clustered_data, tmp_path, monkeypatch):
    """A quantize killed after saving its encoder leaves the previous run's encoder and head, both whole."""
    monkeypatch.setenv(int8.COMPILE_ENV, '0')
    run = shutil.copytree(float_run, tmp_path / 'run')
    argv = ['--mode=quantize', f'--resume={run}', f'--dataPath={clustered_data}', f'--runsPath={tmp_path}',
            '--calib_images=8', *FAST]
    assert cli.main(argv) == 0
    folder = tmp_path / 'run_quantized_static' / 'checkpoints'
    before = {name: (folder / name).read_bytes() for name in files_under(folder)}
    real_save = quantize.save_encoder

    def killed_after_the_encoder(*args):
        real_save(*args)
        raise KeyboardInterrupt('killed')

    monkeypatch.setattr(quantize, 'save_encoder', killed_after_the_encoder)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ['--calib_images=4', '--overwrite'])
    assert {name: (folder / name).read_bytes() for name in files_under(folder)} == before


def test_log_lines_carry_timestamps_and_an_unexpected_error_is_logged(tmp_path, monkeypatch):
    commons.setup_logging(str(tmp_path))
    commons.logging.info('first line')
    error = ValueError('something unexpected')
    try:
        raise error
    except ValueError:
        commons.log_exception_to_file(error)
    commons.setup_logging()
    log = (tmp_path / 'log.txt').read_text()
    assert re.search(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d first line$', log, re.M)
    assert 'Traceback (most recent call last)' in log and 'ValueError: something unexpected' in log


def test_seed_selects_deterministic_cudnn(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', False)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', True)
    commons.make_deterministic(5)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


# ---------------------------------------------------------------------------------------------- the paper's loss

def paper_loss_by_hand(descriptors, neg_counts, margin):
    """trainWeakly.m, one query at a time: sum over negatives of max(0, |q-p|^2 + m - |q-n|^2), the batch's sum
    divided by its number of violating negatives."""
    x = descriptors.double().numpy()
    total, violating, row = 0.0, 0, 0
    for count in neg_counts:
        query, positive, negatives = x[row], x[row + 1], x[row + 2:row + 2 + count]
        d_pos = ((query - positive) ** 2).sum()
        for negative in negatives:
            hinge = d_pos + margin - ((query - negative) ** 2).sum()
            if hinge > 0:
                total += hinge
                violating += 1
        row += 2 + count
    return total / max(violating, 1)


def reference_loss_by_hand(descriptors, neg_counts, margin):
    x = descriptors.double().numpy()
    total, negatives, row = 0.0, 0, 0
    for count in neg_counts:
        for n in range(count):
            d_pos = np.linalg.norm(x[row] - x[row + 1] + 1e-6)
            d_neg = np.linalg.norm(x[row] - x[row + 2 + n] + 1e-6)
            total += max(0.0, d_pos - d_neg + np.sqrt(margin))
        negatives += count
        row += 2 + count
    return total / negatives


def test_losses_match_a_computation_by_hand():
    torch.manual_seed(0)
    neg_counts = [3, 1, 4]
    descriptors = F.normalize(torch.randn(sum(2 + n for n in neg_counts), 16), dim=1)
    for margin in (0.1, 0.5):
        paper = training.triplet_loss(descriptors, neg_counts, margin, 'paper')
        reference = training.triplet_loss(descriptors, neg_counts, margin, 'reference')
        assert paper.item() == pytest.approx(paper_loss_by_hand(descriptors, neg_counts, margin), rel=1e-5)
        assert reference.item() == pytest.approx(reference_loss_by_hand(descriptors, neg_counts, margin), rel=1e-5)
        assert paper.item() != pytest.approx(reference.item(), rel=1e-3)


def test_paper_mining_uses_squared_distances():
    """A negative at distance 1.05 from a query whose positive is at 1.0 violates margin 0.1 on squared distances
    (1.1025 < 1.1) is false, on plain distances (1.05 < 1 + sqrt(0.1)) true: the two rules differ here."""
    query = np.zeros(4)
    positive, negative = np.array([1.0, 0, 0, 0]), np.array([0, 1.05, 0, 0])
    cache = torch.tensor(np.stack([positive, negative, query]), dtype=torch.float32)
    args = (cache, torch.tensor([2]), 2, torch.tensor([[0]]), torch.tensor([[1]]), 0.1, 1)
    _, negatives, usable, _ = training.mine_triplets(*args, loss='reference')
    assert negatives.tolist() == [[1]] and usable.tolist() == [True]
    _, negatives, usable, _ = training.mine_triplets(*args, loss='paper')
    assert negatives.tolist() == [[-1]] and usable.tolist() == [False]
