"""A training run is one unit: checked before anything is written, locked while it runs, never a dead end after a
kill or a failed start, its checkpoint and model_best never disagree, and bad flags stop before anything runs."""
import json
import os
import shutil

import pytest
import torch

from helpers import error_paragraph, files_under, run_killed
from netvlad_toolkit import cli
from netvlad_toolkit.utils import commons


@pytest.fixture(scope='module')
def clustered(tmp_path_factory, tiny_data):
    path = tmp_path_factory.mktemp('run_unit') / 'data'
    shutil.copytree(tiny_data, path)
    assert cli.main(['--mode=cluster', '--dataPath', str(path), '--arch=alexnet', '--fromscratch', '--nocuda',
                      '--threads=0']) == 0
    return path


def train_argv(data, save_path, epochs=1, *extra):
    return ['--mode=train', '--dataPath', str(data), '--arch=alexnet', '--fromscratch', '--nocuda', '--threads=0',
            '--optim=ADAM', '--lr=0.0001', '--nEpochs', str(epochs), '--savePath', str(save_path),
            '--cacheRefreshRate=20', '--nNegSample=50', *extra]


def resume_argv(data, run, epochs, *extra):
    return ['--mode=train', '--resume', str(run), '--nEpochs', str(epochs), '--dataPath', str(data), '--nocuda',
            '--threads=0', *extra]


def test_a_failing_resume_leaves_the_run_as_it_was(clustered, tmp_path, capsys):
    run = tmp_path / 'run'
    assert cli.main(train_argv(clustered, run)) == 0
    flags = (run / 'checkpoints' / 'flags.json').read_bytes()
    assert cli.main(resume_argv(clustered, run, 2, '--optim', 'SGD')) == 2
    assert '--optim' in error_paragraph(capsys.readouterr().err)
    assert (run / 'checkpoints' / 'flags.json').read_bytes() == flags
    assert cli.main(resume_argv(clustered, run, 2)) == 0
    assert torch.load(run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)['epoch'] == 2
    assert json.loads((run / 'checkpoints' / 'flags.json').read_text())['optim'] == 'ADAM'


def test_a_second_train_into_a_locked_run_folder_stops(clustered, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    with commons.locked_folder(str(run)):  # another process's training holds it
        assert cli.main(train_argv(clustered, run)) == 2
        assert 'Another process is writing the run folder' in error_paragraph(capsys.readouterr().err)
    assert os.listdir(run) == []


def test_a_start_killed_in_its_first_epoch_is_started_again(clustered, tmp_path, capsys):
    run = tmp_path / 'run'
    assert run_killed(train_argv(clustered, run), 'netvlad_toolkit.training.training', 'train_chunk', 1) == -9
    assert (run / 'log.txt').exists() and not (run / 'checkpoints' / 'flags.json').exists()
    assert cli.main(resume_argv(clustered, run, 1)) == 2
    assert 'nothing to resume' in error_paragraph(capsys.readouterr().err)
    assert cli.main(train_argv(clustered, run)) == 0
    assert (run / 'checkpoints' / 'checkpoint.pth.tar').is_file()
    assert (run / 'log.txt').read_text().count('Training alexnet into') == 1  # the killed start's log was removed


def test_a_kill_between_the_two_checkpoint_files_never_leaves_best_without_model_best(clustered, tmp_path):
    run = tmp_path / 'run'
    # the first save of epoch 1 (model_best) completes, the kill comes before checkpoint.pth.tar
    assert run_killed(train_argv(clustered, run), 'netvlad_toolkit.model.checkpoint', 'atomic_torch_save', 1, after=True) == -9
    assert cli.main(train_argv(clustered, run)) == 0  # no checkpoint.pth.tar yet: a start, begun again
    assert {'checkpoint.pth.tar', 'model_best.pth.tar'} <= set(os.listdir(run / 'checkpoints'))
    assert not [name for name in files_under(run) if name.endswith('.tmp')]


def test_a_missing_model_best_of_a_best_checkpoint_is_derived(clustered, tmp_path, capsys):
    run = tmp_path / 'run'
    assert cli.main(train_argv(clustered, run)) == 0
    best = run / 'checkpoints' / 'model_best.pth.tar'
    best.unlink()  # as an older version left it after a kill between its two writes
    assert cli.main(['--mode=test', '--resume', str(run), '--ckpt', 'best', '--dataPath', str(clustered),
                      '--nocuda', '--threads=0', '--runsPath', str(tmp_path)]) == 0
    assert cli.main(resume_argv(clustered, run, 2)) == 0
    assert best.is_file()


def test_a_run_that_fails_on_its_input_writes_nothing_and_can_start_again(clustered, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(clustered, data)
    image = sorted((data / '000').iterdir())[0]
    content = image.read_bytes()
    image.write_bytes(b'not a jpeg')
    run = tmp_path / 'run'
    assert cli.main(train_argv(data, run)) == 2
    assert str(image.name) in error_paragraph(capsys.readouterr().err)
    assert not (run / 'checkpoints' / 'flags.json').exists()
    image.write_bytes(content)
    assert cli.main(train_argv(data, run)) == 0


@pytest.mark.parametrize('flag, value', [
    ('--nEpochs', '0'), ('--nNeg', '0'), ('--nNegSample', '0'), ('--cacheRefreshRate', '-5'), ('--patience', '-1'),
    ('--num_clusters', '0'), ('--num_clusters', '-3'), ('--num_clusters', '10**9'),
    ('--seed', '-1'), ('--batchSize', '0'), ('--cacheBatchSize', '0'), ('--evalEvery', '0'), ('--lrStep', '0'),
    ('--margin', '-1'), ('--threads', '-1'), ('--synth_db', '0'),
    ('--lr', 'nan'), ('--lr', 'inf'), ('--batchSize', 'four')])
def test_numeric_flags_out_of_range_stop_before_anything_runs(flag, value, tmp_path, capsys):
    run = tmp_path / 'run'
    assert cli.main(['--mode=train', '--savePath', str(run), '--dataPath', str(tmp_path / 'nowhere'),
                      flag, value]) == 2
    assert flag in error_paragraph(capsys.readouterr().err)
    assert not run.exists()


@pytest.mark.parametrize('argv', [['--mode=prune', '--resume=run', '--finetune_epochs=-1'],
                                  ['--mode=pca', '--pca_images=-5'],
                                  ['--mode=extract', '--image_dir=in', '--export_dir=out', '--resize_max=1']])
def test_out_of_range_flags_of_other_modes_stop_before_anything_runs(argv, tmp_path, capsys):
    assert cli.main(argv + ['--runsPath', str(tmp_path / 'runs')]) == 2
    assert argv[-1].split('=')[0] in error_paragraph(capsys.readouterr().err)
    assert not (tmp_path / 'runs').exists()
