"""Pruning: channel surgery against masking the original, reloading in test mode, packed sparse files, errors."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import alexnet_trunk, error_paragraph
from netvlad_toolkit import cli
from netvlad_toolkit.model.checkpoint import checkpoint_path, model_state, read_checkpoint, save_checkpoint
from netvlad_toolkit.model.models import build_model, conv_indices
from netvlad_toolkit.modes import prune
from netvlad_toolkit.runs.runs import open_run

ALEXNET_CONVS = [0, 3, 6, 8, 10]
# 80% of 64, 192, 384, 256, 256 channels, to the nearest multiple of 8
WIDTHS_AT_20 = [48, 152, 304, 208, 208]
FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '16', '--latency_size', '64x80', '--split', 'test']


def tiny_alexnet(seed=0):
    torch.manual_seed(seed)
    config = dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None)
    return build_model(config).eval()


@pytest.fixture
def run_dir(float_run, tmp_path):
    """A run folder holding the checkpoint of a cluster-initialised (untrained) AlexNet."""
    return Path(shutil.copytree(float_run, tmp_path / 'run'))


def prune_cli(run_dir, data, *flags):
    return cli.main(['--mode=prune', f'--resume={run_dir}', f'--dataPath={data}', *FAST, *flags])


def masked_copy(model, widths):
    """The unpruned model with all but its `widths` highest-L2 filters zeroed (and the matching centroid columns)."""
    masked = tiny_alexnet()
    masked.load_state_dict(model.state_dict())
    encoder, kept_inputs = masked.encoder, torch.arange(3)
    kept = {}
    with torch.no_grad():
        for index, width in zip(ALEXNET_CONVS, widths):
            weight = encoder[index].weight[:, kept_inputs]
            norms = weight.pow(2).sum(dim=(1, 2, 3)).sqrt()
            num_removed = len(norms) - width
            removed = norms.argsort()[:num_removed]
            encoder[index].weight[removed] = 0
            encoder[index].bias[removed] = 0
            kept_inputs = kept[index] = norms.argsort()[num_removed:].sort().values
        masked.pool.centroids[:, removed] = 0
    return masked, kept


def test_structured_pruning_equals_masking_the_removed_channels():
    """Removing channels must compute exactly what the original computes with those channels zeroed."""
    model = tiny_alexnet()
    masked, kept = masked_copy(model, WIDTHS_AT_20)
    prune.prune_structured(model, 0.2, ALEXNET_CONVS)
    images = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        expected = masked.encoder(images)[:, kept[10]]
        torch.testing.assert_close(model.encoder(images), expected, rtol=1e-4, atol=1e-5)
        vlad = masked(images).reshape(3, 8, 256)[:, :, kept[10]].reshape(3, -1)
        torch.testing.assert_close(model(images), vlad, rtol=1e-4, atol=1e-5)


def test_structured_pruning_shrinks_every_shape_consistently():
    model = prune.prune_structured(tiny_alexnet(), 0.2, ALEXNET_CONVS)
    assert [model.encoder[i].out_channels for i in ALEXNET_CONVS] == WIDTHS_AT_20
    assert [model.encoder[i].in_channels for i in ALEXNET_CONVS] == [3, 48, 152, 304, 208]
    assert model.pool.conv.weight.shape == (8, 208, 1, 1) and model.pool.centroids.shape == (8, 208)
    assert model.pool.dim == 208 and model.output_dim == 8 * 208
    assert model(torch.randn(2, 3, 64, 80)).shape == (2, 8 * 208)


def test_activation_importance_is_the_mean_squared_activation():
    """Against the trunk computed with plain conv2d: conv1 after its ReLU, conv5 (no ReLU after it) as it is."""
    model = tiny_alexnet()
    images = torch.randn(5, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    importance = prune.activation_importance(model.encoder, images)
    state = {k: v.double() for k, v in model.state_dict().items()}
    conv1 = torch.relu(torch.nn.functional.conv2d(images.double(), state['encoder.0.weight'],
                                                  state['encoder.0.bias'], stride=4, padding=2))
    torch.testing.assert_close(importance[0].double(), conv1.pow(2).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-7)
    conv5 = alexnet_trunk(images, model.state_dict())
    torch.testing.assert_close(importance[10].double(), conv5.pow(2).mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-7)
    assert sorted(importance) == ALEXNET_CONVS


def test_structured_pruning_keeps_the_most_important_channels():
    model = tiny_alexnet()
    original = {index: model.encoder[index].weight.detach().clone() for index in ALEXNET_CONVS}
    # conv1: the odd channels matter most; the other convs: the last channels
    importance = {index: torch.arange(len(weight), dtype=torch.float32) for index, weight in original.items()}
    importance[0] = (torch.arange(64) % 2).float() * 100 + torch.arange(64)
    prune.prune_structured(model, 0.5, ALEXNET_CONVS, importance)
    kept_conv1 = torch.arange(1, 64, 2)
    torch.testing.assert_close(model.encoder[0].weight, original[0][kept_conv1], rtol=0, atol=0)
    torch.testing.assert_close(model.encoder[3].weight, original[3][96:, kept_conv1], rtol=0, atol=0)
    torch.testing.assert_close(model.encoder[10].weight, original[10][128:, 128:], rtol=0, atol=0)


def test_pruning_only_inner_layers_keeps_the_descriptor_size():
    model = prune.prune_structured(tiny_alexnet(), 0.5, [3, 6])
    assert [model.encoder[i].out_channels for i in ALEXNET_CONVS] == [64, 96, 192, 256, 256]
    assert model.encoder[8].in_channels == 192 and model.output_dim == 8 * 256
    assert model(torch.randn(1, 3, 64, 80)).shape == (1, 8 * 256)


def test_structured_prune_mode_reloads_in_test_mode(run_dir, clustered_data, capsys):
    assert prune_cli(run_dir, clustered_data, '--pruning_type=structured', '--pruning_amount=0.2',
                     '--finetune_epochs=0') == 0
    out_dir = f'{run_dir}_pruned_structured_20'
    with open(os.path.join(out_dir, 'prune_report.json')) as f:
        report = json.load(f)
    after = report['after']
    assert after['descriptor_dim'] == 8 * 208 and report['before']['descriptor_dim'] == 8 * 256
    assert after['encoder_channels'] == WIDTHS_AT_20
    assert report['ratio_after_over_before']['macs'] < 0.7
    assert after['file_bytes'] < report['before']['file_bytes']
    assert os.listdir(os.path.join(out_dir, 'checkpoints')) == ['checkpoint.pth.tar']

    capsys.readouterr()
    assert cli.main(['--mode=test', f'--resume={out_dir}', f'--dataPath={clustered_data}', *FAST]) == 0
    assert f'====> Recall@1: {after["recall@1"]:.4f}' in capsys.readouterr().out
    with open(os.path.join(out_dir, 'test_test.json')) as f:
        assert json.load(f)['recalls'] == {str(n): after[f'recall@{n}'] for n in (1, 5, 10, 20)}


def test_reloaded_pruned_checkpoint_gives_the_same_descriptors(tmp_path):
    model = prune.prune_structured(tiny_alexnet(), 0.3, ALEXNET_CONVS)
    save_checkpoint(dict(model_state(model), epoch=0, recalls={}, best_score=0.0), str(tmp_path), False)
    opt = cli.parse_options(['--mode=test', f'--resume={tmp_path}'])
    reloaded, _ = open_run(opt)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize('scope', ['global', 'layer'])
def test_unstructured_pruning_reaches_the_sparsity_and_shrinks_the_file(run_dir, clustered_data, scope):
    assert prune_cli(run_dir, clustered_data, '--pruning_type=unstructured', '--pruning_amount=0.6',
                     f'--pruning_scope={scope}', '--finetune_epochs=0') == 0
    out_dir = f'{run_dir}_pruned_unstructured_60'
    with open(os.path.join(out_dir, 'prune_report.json')) as f:
        after = json.load(f)['after']
    assert after['sparsity_total'] == pytest.approx(0.6, abs=1e-6)
    assert set(after['sparsity']) == {f'encoder.{i}.weight' for i in ALEXNET_CONVS}
    if scope == 'layer':
        assert all(share == pytest.approx(0.6, abs=1e-3) for share in after['sparsity'].values())
    original = os.path.getsize(checkpoint_path(str(run_dir)))
    pruned = os.path.getsize(checkpoint_path(out_dir))
    assert pruned < 0.6 * original  # 40% of the values + a 1-bit mask per weight

    state = read_checkpoint(checkpoint_path(out_dir))['state_dict']
    weights = [state[f'encoder.{i}.weight'] for i in ALEXNET_CONVS]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.6, abs=1e-6)
    opt = cli.parse_options(['--mode=test', f'--resume={out_dir}'])
    reloaded, _ = open_run(opt)  # packed weights come back dense, in the original order
    assert [reloaded.encoder[i].out_channels for i in ALEXNET_CONVS] == [64, 192, 384, 256, 256]


def test_unstructured_fine_tuning_keeps_the_sparsity(run_dir, clustered_data):
    assert prune_cli(run_dir, clustered_data, '--pruning_type=unstructured', '--pruning_amount=0.5',
                     '--pruning_scope=layer', '--pruning_layers=8,10', '--finetune_epochs=1',
                     '--cacheRefreshRate=0', '--nNegSample=50') == 0
    state = read_checkpoint(checkpoint_path(f'{run_dir}_pruned_unstructured_50'))
    original = read_checkpoint(checkpoint_path(str(run_dir)))['state_dict']
    assert state['epoch'] == 1
    for index in (8, 10):
        weight = state['state_dict'][f'encoder.{index}.weight']
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert not torch.equal(state['state_dict']['encoder.0.weight'], original['encoder.0.weight'])  # it trained
    assert float((state['state_dict']['encoder.0.weight'] == 0).float().mean()) < 0.01


@pytest.mark.parametrize('amount', ['0', '-0.1', '1', '1.5'])
def test_bad_amount_is_a_clear_error(run_dir, clustered_data, capsys, amount):
    assert prune_cli(run_dir, clustered_data, f'--pruning_amount={amount}') == 2
    err = capsys.readouterr().err
    assert err.startswith('Error: --pruning_amount=') and 'outside (0, 1)' in err


def test_unknown_pruning_type_is_a_clear_error(run_dir, clustered_data, capsys):
    assert prune_cli(run_dir, clustered_data, '--pruning_type=channel') == 2
    assert "--pruning_type: invalid choice: 'channel'" in error_paragraph(capsys.readouterr().err)


def test_bad_layers_are_a_clear_error(run_dir, clustered_data, capsys):
    assert prune_cli(run_dir, clustered_data, '--pruning_layers=1,3') == 2
    assert 'this encoder has convs at 0,3,6,8,10' in capsys.readouterr().err


def test_whitened_model_refuses_to_shrink_its_descriptor():
    torch.manual_seed(0)
    config = dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None,
                  pca_dim=16)
    model = build_model(config)
    with pytest.raises(prune.UserError, match='PCA-whitening'):
        prune.prune_structured(model, 0.2, conv_indices(model.encoder))
