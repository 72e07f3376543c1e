"""The path a real user walks, with ImageNet weights (a stand-in for them, see conftest.imagenet_stand_in) and without
--fromscratch: cluster -> train, killed in its second epoch -> resume -> test -> prune (structured, unstructured) ->
quantize (static, QAT) -> pca. After every stage that trains, the layers before conv5 are bit-identical to the
stand-in file and the trainable ones changed."""
import json
import os
import re
import shutil

import pytest
import torch

from helpers import error_paragraph, files_under, reference_quantization
from netvlad_toolkit import cli as main
from netvlad_toolkit.model import int8
from netvlad_toolkit.model.checkpoint import checkpoint_path, read_checkpoint
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.training import training

FROZEN_CONVS = [0, 3, 6, 8]  # AlexNet conv1..conv4: frozen with ImageNet weights (the reference's rule)
CONV5 = 10
COMMON = ['--arch=alexnet', '--num_clusters=8', '--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8',
          '--latency_size', '64x80']
TRAIN = ['--optim=ADAM', '--lr=0.001', '--cacheRefreshRate=0', '--nNegSample=50', '--nEpochs=2', '--evalEvery=2']
TIMESTAMP = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ')


def cli(data, *flags):
    return main.main([*COMMON, f'--dataPath={data}', *map(str, flags)])


def encoder_state(run_dir):
    return read_checkpoint(checkpoint_path(str(run_dir)))['state_dict']


def assert_frozen_as_stand_in(state, stand_in):
    for index in FROZEN_CONVS:
        for kind in ('weight', 'bias'):
            key = f'encoder.{index}.{kind}'
            assert torch.equal(state[key], stand_in[key]), f'{key} changed: it should be frozen'


@pytest.fixture(scope='module')
def walk(tiny_data, imagenet_stand_in, tmp_path_factory):
    """Cluster and train with the ImageNet stand-in: one run straight to epoch 2, one killed in epoch 2 (after the
    epoch-1 checkpoint, which is no validation epoch with --evalEvery=2) and resumed."""
    root = tmp_path_factory.mktemp('default_path')
    data = root / 'data'
    shutil.copytree(tiny_data, data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TORCH_HOME', str(imagenet_stand_in[0]))
        assert cli(data, '--mode=cluster') == 0
        assert cli(data, '--mode=train', *TRAIN, '--savePath', root / 'straight') == 0
        real_epoch = training.train_epoch

        def killed_in_epoch_2(model, data_, source, optimizer, hard_negatives, opt, device, epoch, *rest):
            if epoch == 2:
                raise RuntimeError('injected kill in epoch 2')
            return real_epoch(model, data_, source, optimizer, hard_negatives, opt, device, epoch, *rest)

        patch.setattr(training, 'train_epoch', killed_in_epoch_2)
        with pytest.raises(RuntimeError, match='injected kill'):
            cli(data, '--mode=train', *TRAIN, '--savePath', root / 'run')
        patch.setattr(training, 'train_epoch', real_epoch)
        killed = read_checkpoint(checkpoint_path(str(root / 'run')))
        log_after_kill = (root / 'run' / 'log.txt').read_text()
        assert cli(data, '--mode=train', '--resume', root / 'run') == 0
    return dict(root=root, data=data, run=root / 'run', straight=root / 'straight', killed=killed,
                log_after_kill=log_after_kill)


def test_cluster_and_train_freeze_the_layers_before_conv5(walk, imagenet_stand_in):
    stand_in = imagenet_stand_in[1]
    checkpoint = read_checkpoint(checkpoint_path(str(walk['run'])))
    assert checkpoint['epoch'] == 2
    assert checkpoint['first_trainable'] == CONV5 and checkpoint['first_trainable_layer'] == 'conv5'
    assert_frozen_as_stand_in(checkpoint['state_dict'], stand_in)
    assert not torch.equal(checkpoint['state_dict']['encoder.10.weight'], stand_in['encoder.10.weight'])
    flags = json.loads((walk['run'] / 'checkpoints' / 'flags.json').read_text())
    assert flags['backPropToLayer'] == 'conv5' and flags['first_trainable'] == CONV5 and not flags['fromscratch']
    log = (walk['run'] / 'log.txt').read_text()
    assert 'First trainable layer: conv5 (encoder index 10)' in log


def test_a_killed_run_keeps_its_last_epoch_and_resumes_exactly(walk):
    assert walk['killed']['epoch'] == 1 and walk['killed']['recalls'] == {}  # written without a validation
    log = walk['log_after_kill']
    assert 'Traceback' in log and 'RuntimeError: injected kill in epoch 2' in log  # the crash is in log.txt
    recall_lines = [line for line in (walk['run'] / 'log.txt').read_text().splitlines() if 'Recall@1:' in line]
    assert recall_lines and all(TIMESTAMP.match(line) for line in recall_lines)
    straight, resumed = (read_checkpoint(checkpoint_path(str(walk[k]))) for k in ('straight', 'run'))
    assert straight['recalls'] == resumed['recalls'] and straight['best_score'] == resumed['best_score']
    for key, value in straight['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(straight['hard_negatives'], resumed['hard_negatives'])


def test_a_new_training_never_writes_into_an_existing_run(walk, imagenet_home, capsys):
    before = {name: (walk['run'] / name).read_bytes() for name in files_under(walk['run'])}
    assert cli(walk['data'], '--mode=train', *TRAIN, '--savePath', walk['run']) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(walk['run']) in message and '--resume' in message and '--savePath' in message
    assert {name: (walk['run'] / name).read_bytes() for name in files_under(walk['run'])} == before


def test_test_mode_runs_the_trained_model(walk, capsys):
    assert cli(walk['data'], '--mode=test', '--split=test', '--resume', walk['run'], '--runsPath', walk['root']) == 0
    assert '====> Recall@1:' in capsys.readouterr().out


def test_structured_pruning_fine_tunes_from_conv5_only(walk, imagenet_stand_in):
    assert cli(walk['data'], '--mode=prune', '--split=test', '--resume', walk['run'], '--runsPath', walk['root'],
               '--pruning_type=structured', '--pruning_amount=0.2', '--pruning_layers=10', '--finetune_epochs=1',
               '--pruning_criterion=l2',  # the channels this test predicts; the default ranks by activation
               '--optim=ADAM', '--lr=0.01', '--cacheRefreshRate=0', '--nNegSample=50') == 0
    pruned_dir = f'{walk["run"]}_pruned_structured_20'
    checkpoint = read_checkpoint(checkpoint_path(pruned_dir))
    assert checkpoint['first_trainable'] == CONV5
    state, source = checkpoint['state_dict'], encoder_state(walk['run'])
    assert_frozen_as_stand_in(state, imagenet_stand_in[1])
    source_conv5 = source['encoder.10.weight']
    kept = source_conv5.flatten(1).norm(dim=1).argsort(descending=True)[:208].sort().values  # highest L2 norms
    assert state['encoder.10.weight'].shape == source_conv5[kept].shape
    assert not torch.equal(state['encoder.10.weight'], source_conv5[kept])  # fine-tuned
    assert 'First trainable layer: conv5' in (walk['root'] / 'run_pruned_structured_20' / 'log.txt').read_text()


def test_unstructured_pruning_keeps_the_frozen_weights_it_does_not_zero(walk, imagenet_stand_in):
    assert cli(walk['data'], '--mode=prune', '--split=test', '--resume', walk['run'], '--runsPath', walk['root'],
               '--pruning_type=unstructured', '--pruning_amount=0.2', '--finetune_epochs=1', '--optim=ADAM',
               '--lr=0.01', '--cacheRefreshRate=0', '--nNegSample=50') == 0
    state = encoder_state(f'{walk["run"]}_pruned_unstructured_20')
    stand_in, source = imagenet_stand_in[1], encoder_state(walk['run'])
    for index in FROZEN_CONVS:
        weight, original = state[f'encoder.{index}.weight'], stand_in[f'encoder.{index}.weight']
        kept = weight != 0
        assert torch.equal(weight[kept], original[kept]) and kept.float().mean() < 0.95
        assert torch.equal(state[f'encoder.{index}.bias'], stand_in[f'encoder.{index}.bias'])
    conv5, kept = state['encoder.10.weight'], state['encoder.10.weight'] != 0
    assert not torch.equal(conv5[kept], source['encoder.10.weight'][kept])


def test_static_and_qat_quantization_keep_the_frozen_layers(walk, imagenet_stand_in, monkeypatch):
    monkeypatch.setenv(int8.COMPILE_ENV, '0')
    stand_in, source = imagenet_stand_in[1], encoder_state(walk['run'])
    for kind in ('static', 'qat'):
        assert cli(walk['data'], '--mode=quantize', '--split=test', '--resume', walk['run'], '--runsPath',
                   walk['root'], f'--quantization_type={kind}', '--calib_images=16', '--optim=ADAM', '--lr=0.01',
                   '--cacheRefreshRate=0', '--nNegSample=50') == 0
        folder = walk['root'] / f'run_quantized_{kind}' / 'checkpoints'
        model, _ = open_run(main.parse_options(['--mode=test', f'--resume={folder.parent}', *COMMON]))
        weights = int8.int8_weights(model.encoder.program)
        for index, (int8_weight, _) in zip(FROZEN_CONVS, weights):
            expected, _ = reference_quantization(stand_in[f'encoder.{index}.weight'])
            assert (int8_weight.int() - expected.int()).abs().max() <= 1
            assert (int8_weight == expected).float().mean() > 0.999
        conv5_moved = not torch.equal(weights[-1][0], reference_quantization(source['encoder.10.weight'])[0])
        head = torch.load(folder / 'checkpoint.pth.tar', weights_only=True)
        head_moved = not torch.equal(head['state_dict']['pool.conv.weight'], source['pool.conv.weight'])
        assert head['first_trainable'] == CONV5
        assert (conv5_moved and head_moved) == (kind == 'qat')  # only QAT trains: conv5 and the head


def test_pca_keeps_the_runs_frozen_layers(walk):
    assert cli(walk['data'], '--mode=pca', '--split=test', '--resume', walk['run'], '--runsPath', walk['root'],
               '--pca_dim=16') == 0
    whitened_dir = f'{walk["run"]}_pca16'
    checkpoint = read_checkpoint(checkpoint_path(whitened_dir))
    assert checkpoint['first_trainable'] == CONV5 and checkpoint['first_trainable_layer'] == 'conv5'
    model, _ = open_run(main.parse_options(['--mode=test', f'--resume={whitened_dir}', *COMMON]))
    assert [p.requires_grad for p in model.encoder.parameters()] == [False] * 8 + [True] * 2
    assert os.path.isfile(os.path.join(whitened_dir, 'log.txt'))
