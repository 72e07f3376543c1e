"""Inputs a user may hand over damaged or odd: each stops with one paragraph naming the file (exit 2), never a
traceback; derived run folders are never replaced silently; a killed synthetic generation starts clean."""
import json
import shutil

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from helpers import error_paragraph, run_killed
from netvlad_toolkit import cli
from netvlad_toolkit.datasets import synthetic
from netvlad_toolkit.modes.query import read_positions_csv
from netvlad_toolkit.search.global_features import read_descriptors

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--latency_size', '64x80', '--split', 'test']
MODEL = ['--arch=alexnet', '--fromscratch', '--num_clusters=8']


def changed_run(float_run, tmp_path, change):
    """A copy of float_run whose checkpoint dict went through change()."""
    run = shutil.copytree(float_run, tmp_path / 'run')
    path = run / 'checkpoints' / 'checkpoint.pth.tar'
    checkpoint = torch.load(path, weights_only=True)
    torch.save(change(checkpoint), path)
    return run


def nan_weight(checkpoint):
    checkpoint['state_dict']['encoder.0.weight'][0, 0, 0, 0] = float('nan')
    return checkpoint


@pytest.mark.parametrize('change, message', [
    (lambda c: dict(c, state_dict=list(c['state_dict'].values())), 'maps parameter names to tensors'),
    (lambda c: dict(c, first_trainable='conv5'), "first_trainable is 'conv5'"),
    (nan_weight, 'encoder.0.weight holds NaN'),
], ids=['state_dict a list', 'first_trainable a string', 'NaN weight'])
def test_malformed_checkpoints_are_one_paragraph(float_run, clustered_data, tmp_path, capsys, change, message):
    run = changed_run(float_run, tmp_path, change)
    assert cli.main(['--mode=test', f'--resume={run}', f'--dataPath={clustered_data}', *FAST]) == 2
    assert message in error_paragraph(capsys.readouterr().err)


def int32_weights(checkpoint):
    return dict(checkpoint, state_dict={k: v.to(torch.int32) for k, v in checkpoint['state_dict'].items()})


def narrower_centroids(checkpoint):
    checkpoint['state_dict']['pool.centroids'] = checkpoint['state_dict']['pool.centroids'][:, :100]
    return checkpoint


@pytest.mark.parametrize('change, entry, expected', [
    (int32_weights, 'encoder.0.weight', 'floating point'),
    (narrower_centroids, 'pool.centroids', 'shape [8, 256]'),
], ids=['int32 weights', 'centroids of another width'])
def test_weights_of_another_dtype_or_shape_name_the_entry(float_run, clustered_data, tmp_path, capsys, change, entry,
                                                          expected):
    run = changed_run(float_run, tmp_path, change)
    assert cli.main(['--mode=test', f'--resume={run}', f'--dataPath={clustered_data}', f'--runsPath={tmp_path}',
                      *FAST]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert f'entry {entry} ' in message and expected in message
    assert not (tmp_path / 'results.jsonl').exists()


def test_only_trivial_training_positives_name_the_floor_and_the_split(clustered_data, tmp_path, capsys):
    """--recipe authors keeps training positives farther than 1 m: queries whose only database image within 10 m is
    0.5 m away have none, and the message says so."""
    data = shutil.copytree(clustered_data, tmp_path / 'data')
    path = data / 'datasets' / 'pitts30k_train.mat'
    struct = scipy.io.loadmat(path, simplify_cells=True)['dbStruct']
    num_db, num_q = np.shape(struct['utmDb'])[1], np.shape(struct['utmQ'])[1]
    struct['utmDb'] = np.stack([np.arange(num_db) * 100.0, np.zeros(num_db)])
    struct['utmQ'] = struct['utmDb'][:, np.arange(num_q) % num_db] + np.array([[0.5], [0.0]])
    scipy.io.savemat(path, {'dbStruct': struct})
    argv = ['--mode=train', *MODEL, '--recipe=authors', f'--dataPath={data}', f'--runsPath={tmp_path}',
            f'--savePath={tmp_path / "run"}', '--nEpochs=1', *FAST[:6]]
    assert cli.main(argv) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert '--min_positive_dist=1' in message and 'trivial' in message and 'pitts30k_train.mat' in message
    assert 'within 1 m' in message and '(--dataPath=.)' not in message


def test_an_empty_checkpoint_file_is_one_paragraph(float_run, clustered_data, tmp_path, capsys):
    run = shutil.copytree(float_run, tmp_path / 'run')
    (run / 'checkpoints' / 'checkpoint.pth.tar').write_bytes(b'')
    assert cli.main(['--mode=test', f'--resume={run}', f'--dataPath={clustered_data}', *FAST]) == 2
    assert 'cannot be read' in error_paragraph(capsys.readouterr().err)


def test_nan_centroids_are_refused(clustered_data, tmp_path, capsys):
    data = shutil.copytree(clustered_data, tmp_path / 'data')
    path = next((data / 'data' / 'centroids').iterdir())
    with h5py.File(path, 'r+') as h5:
        centroids = h5['centroids'][:]
        centroids[0, 0] = np.nan
        h5['centroids'][...] = centroids
    assert cli.main(['--mode=test', *MODEL, f'--dataPath={data}', *FAST, f'--runsPath={tmp_path}']) == 2
    assert 'not all finite' in error_paragraph(capsys.readouterr().err)


@pytest.mark.parametrize('damage, message', [('nan', 'is not finite'), ('empty', 'needs at least one of each')])
def test_db_struct_with_nan_positions_or_no_database_is_refused(clustered_data, tmp_path, capsys, damage, message):
    data = shutil.copytree(clustered_data, tmp_path / 'data')
    path = data / 'datasets' / 'pitts30k_test.mat'
    struct = scipy.io.loadmat(path, simplify_cells=True)['dbStruct']
    if damage == 'nan':
        struct['utmDb'] = np.asarray(struct['utmDb'], dtype=float)
        struct['utmDb'][0, 3] = np.nan
    else:
        struct['dbImageFns'] = np.empty((0, 1), dtype=object)
        struct['utmDb'] = np.zeros((2, 0))
        struct['numImages'] = 0.0
    scipy.io.savemat(path, {'dbStruct': struct})
    assert cli.main(['--mode=test', *MODEL, f'--dataPath={data}', *FAST, f'--runsPath={tmp_path}']) == 2
    assert message in error_paragraph(capsys.readouterr().err)


def test_string_descriptors_in_a_global_feats_file_are_refused(tmp_path):
    path = tmp_path / 'feats.h5'
    with h5py.File(path, 'w') as h5:
        h5.create_dataset('a.jpg/global_descriptor', data=np.array([b'x'] * 4))
        h5.create_dataset('a.jpg/image_size', data=np.array([32, 32]))
    with pytest.raises(cli.UserError, match='not finite floating-point numbers'):
        read_descriptors(str(path), ['a.jpg'], 4, str(tmp_path / 'rows.npy'))


@pytest.mark.parametrize('content, message', [
    ('name,east,north\na.jpg,1,2,3\n'.encode(), 'more values than the header'),
    ('name,east,north\nä.jpg,1,2\n'.encode('latin-1'), 'not UTF-8'),
    (b'name,east,north\na.jpg,nan,2\n', 'finite numbers'),
], ids=['extra values', 'latin-1', 'nan'])
def test_positions_csv_errors(tmp_path, content, message):
    path = tmp_path / 'positions.csv'
    path.write_bytes(content)
    with pytest.raises(cli.UserError, match=message):
        read_positions_csv(str(path), ['a.jpg'])


def test_a_second_prune_needs_overwrite_and_replaces_the_folder_whole(float_run, clustered_data, tmp_path, capsys):
    run = shutil.copytree(float_run, tmp_path / 'run')
    argv = ['--mode=prune', f'--resume={run}', f'--dataPath={clustered_data}', f'--runsPath={tmp_path}',
            '--finetune_epochs=0', *FAST]
    assert cli.main(argv) == 0
    pruned = tmp_path / 'run_pruned_structured_20'
    report = (pruned / 'prune_report.json').read_bytes()
    assert cli.main(argv) == 2
    assert '--overwrite' in error_paragraph(capsys.readouterr().err)
    assert (pruned / 'prune_report.json').read_bytes() == report
    assert cli.main(argv + ['--pruning_amount=0.5']) == 0  # another amount: another folder
    assert (tmp_path / 'run_pruned_structured_50' / 'prune_report.json').is_file()
    assert cli.main(argv + ['--overwrite']) == 0
    assert json.loads((pruned / 'prune_report.json').read_text())['after']['recall@1'] >= 0
    assert not (tmp_path / 'run_pruned_structured_20.incomplete').exists()


def test_a_killed_synthetic_generation_starts_clean(tmp_path):
    data = tmp_path / 'synthetic'
    argv = ['--mode=synth', f'--dataPath={data}', '--synth_db=12', '--synth_queries=6', '--synth_imsize=64x80']
    assert run_killed(argv, 'netvlad_toolkit.datasets.synthetic', 'write_split', 2) == -9  # killed after the first split
    assert not synthetic.dataset_ready(str(data))
    assert cli.main(argv) == 0
    assert synthetic.dataset_ready(str(data))
    assert not (tmp_path / 'synthetic.incomplete').exists()
