"""Training: mining against brute force, a short real run, exact resume, loss on a fixed batch, torchrun (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import free_port
from netvlad_toolkit.model.checkpoint import read_checkpoint
from netvlad_toolkit.training import training

REPO = Path(__file__).resolve().parents[1]


def brute_force_mining(cache, query_row, num_db, positives, candidates, margin, num_neg):
    """The paper's rule, one query at a time, with numpy."""
    cache = cache.astype(np.float64)
    dist = lambda i: np.linalg.norm(cache[query_row] - cache[i])  # noqa: E731
    best = min(positives, key=dist)
    threshold = dist(best) + np.sqrt(margin)
    violating = sorted((dist(n), n) for n in set(candidates) if dist(n) < threshold)
    return best, [n for _, n in violating[:num_neg]]


def test_mining_picks_the_hardest_violating_negatives():
    rng = np.random.default_rng(0)
    num_db, num_queries, dim = 40, 6, 8
    cache = rng.normal(size=(num_db + num_queries, dim)).astype(np.float32)
    cache /= np.linalg.norm(cache, axis=1, keepdims=True)
    positives = [rng.choice(num_db, size=rng.integers(1, 4), replace=False) for _ in range(num_queries)]
    candidates = [rng.choice(num_db, size=15, replace=False) for _ in range(num_queries)]
    query_rows = num_db + np.arange(num_queries)
    best, negatives, usable, _ = training.mine_triplets(
        torch.from_numpy(cache), torch.from_numpy(query_rows), num_db, torch.from_numpy(training.pad_rows(positives)),
        torch.from_numpy(training.pad_rows(candidates)), margin=0.1, num_neg=4)
    for q in range(num_queries):
        expected_best, expected_negs = brute_force_mining(cache, query_rows[q], num_db, positives[q], candidates[q],
                                                          0.1, 4)
        assert int(best[q]) == expected_best
        assert [int(n) for n in negatives[q] if n >= 0] == expected_negs
        assert bool(usable[q]) == bool(expected_negs)


def test_negative_candidates_exclude_positives_and_never_repeat():
    rng = np.random.default_rng(1)
    positives = [np.arange(0, 30), np.array([5, 6]), np.array([], dtype=np.int64)]
    candidates = training.draw_negative_candidates(rng, 100, positives, 50)
    for row, query_positives in zip(candidates, positives):
        drawn = row[row >= 0]
        assert len(drawn) == len(set(drawn.tolist()))
        assert not set(drawn.tolist()) & set(query_positives.tolist())
        assert len(drawn) == min(50, 100 - len(query_positives))
    deduplicated = training.unique_per_row(np.array([[3, 7, 3, -1, 7, 9]]))
    assert sorted(deduplicated[deduplicated >= 0].tolist()) == [3, 7, 9]


@pytest.fixture(scope='module')
def clustered(tiny_data, tmp_path_factory):
    """A private copy of the tiny dataset with its centroids (the session's tiny_data stays as generated)."""
    import shutil

    from netvlad_toolkit import cli
    path = tmp_path_factory.mktemp('train_clustered') / 'data'
    shutil.copytree(tiny_data, path)
    assert cli.main(['--mode=cluster', '--dataset=synthetic', '--dataPath', str(path), '--arch=alexnet',
                      '--fromscratch', '--nocuda', '--threads=0']) == 0
    return path


def train_argv(data, save_path, epochs, *extra):
    return ['--mode=train', '--dataset=synthetic', '--dataPath', data, '--arch=alexnet', '--fromscratch',
            '--nocuda', '--threads=0', '--optim=ADAM', '--lr=0.0001', '--nEpochs', epochs, '--savePath', save_path,
            '--cacheRefreshRate=20', '--nNegSample=50', '--latency_size=64x80', *extra]


def test_short_training_writes_checkpoints_flags_and_logs(clustered, run_cli, tmp_path):
    run = tmp_path / 'run'
    assert run_cli(train_argv(clustered, run, 2)) == 0
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar', 'flags.json'):
        assert (run / 'checkpoints' / name).is_file()
    checkpoint = torch.load(run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)
    assert checkpoint['epoch'] == 2
    assert set(checkpoint['recalls']) == {1, 5, 10, 20}
    assert isinstance(checkpoint['best_score'], float)
    assert all(k.startswith(('encoder.', 'pool.')) for k in checkpoint['state_dict'])
    assert json.loads((run / 'checkpoints' / 'flags.json').read_text())['nEpochs'] == 2
    assert (run / 'log.txt').read_text().count('====> Recall@1:') == 2
    assert any(name.startswith('events') for name in os.listdir(run / 'tensorboard'))
    assert run_cli(['--mode=test', '--dataset=synthetic', '--dataPath', clustered, '--split=test', '--resume', run,
                    '--nocuda', '--threads=0', '--latency_size=64x80', '--runsPath', tmp_path]) == 0


def test_loss_falls_on_a_fixed_batch(clustered, make_opt):
    from netvlad_toolkit.model.centroids import initialised_model
    opt = make_opt(train_argv(clustered, 'unused', 1))
    model = initialised_model(opt)
    data = training.TrainingData(opt)
    hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1)
    triplets = training.chunk_triplets(data, data.whole, model, data.queries[:4], hard_negatives, opt,
                                       torch.device('cpu'), np.random.default_rng(0), 0, 1)
    assert triplets, 'no violating negatives on an untrained model'
    images, counts = training.collate_triplets([training.TripletImages(data.whole, triplets)[i]
                                             for i in range(len(triplets))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(8):
        loss = training.triplet_loss(model.train()(images), counts, opt.margin)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resumed_run_ends_with_the_same_weights(clustered, run_cli, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    assert run_cli(train_argv(clustered, straight, 2)) == 0
    assert run_cli(train_argv(clustered, resumed, 1)) == 0
    first_half = read_checkpoint(str(resumed / 'checkpoints' / 'checkpoint.pth.tar'))
    assert first_half['epoch'] == 1
    assert run_cli(['--mode=train', '--resume', resumed, '--nEpochs=2', '--dataPath', clustered, '--nocuda',
                    '--threads=0']) == 0
    a = read_checkpoint(str(straight / 'checkpoints' / 'checkpoint.pth.tar'))
    b = read_checkpoint(str(resumed / 'checkpoints' / 'checkpoint.pth.tar'))
    assert b['epoch'] == 2
    assert a['best_score'] == b['best_score'] and a['recalls'] == b['recalls']
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(a['hard_negatives'], b['hard_negatives'])


def test_command_line_flags_win_over_stored_flags(clustered, run_cli, tmp_path, caplog):
    run = tmp_path / 'run'
    assert run_cli(train_argv(clustered, run, 1)) == 0
    assert run_cli(['--mode=train', '--resume', run, '--nEpochs=2', '--dataPath', clustered, '--nocuda',
                    '--threads=0', '--lr=0.00005']) == 0
    stored = json.loads((run / 'checkpoints' / 'flags.json').read_text())
    assert stored['lr'] == 0.00005 and stored['optim'] == 'ADAM' and stored['nNegSample'] == 50
    assert '--lr: the command line value 5e-05 replaces the stored 0.0001' in (run / 'log.txt').read_text()


def test_missing_cluster_file_names_the_command(tiny_copy, run_cli, capsys, tmp_path):
    for centroids in tiny_copy.glob('data/centroids/*.hdf5'):
        centroids.unlink()
    assert run_cli(train_argv(tiny_copy, tmp_path / 'run', 1)) == 2
    error = capsys.readouterr().err
    assert 'desc_cen.hdf5' in error and '--mode=cluster' in error
    assert not (tmp_path / 'run').exists()


def test_torchrun_two_processes_on_gloo(clustered, tmp_path):
    run = tmp_path / 'ddp'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               f'--master_port={free_port()}',
               str(REPO / 'main.py'), *map(str, train_argv(clustered, run, 1))]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert completed.returncode == 0, completed.stderr[-3000:]
    checkpoint = torch.load(run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)
    assert checkpoint['parallel'] is True and checkpoint['epoch'] == 1
    assert not any(k.startswith('module.') for k in checkpoint['state_dict'])
    test = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=test', '--dataset=synthetic',
                           '--dataPath', str(clustered), '--split=test', '--resume', str(run), '--nocuda',
                           '--threads=0', '--latency_size=64x80', '--runsPath', str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    assert '====> Recall@1:' in test.stdout
