"""Training with and without the frozen-trunk cache in Pittsburgh 30k's proportions, scaled down.

Pitts30k's training split has 10,000 database images and 7,416 queries; the reference recipe refreshes the
descriptor cache every 1,000 queries and mines each query's negatives from 1,000 random database images, and every
query steps 12 images (query, positive, 10 negatives). Here every count that sets the share of refreshes, mining and
steps in an epoch is scaled by the same factor 520 / 10,000: 520 database images and 386 queries (the generated set
with --db 260 --queries 193: the train split has twice as many), a refresh every 52 queries (--cacheRefreshRate),
52 random negatives per query (--nNegSample); per query as on Pittsburgh: nNeg 10, batches of 4 queries. A refresh
then describes about the whole database plus its queries (as on Pittsburgh, where 1,000 x 1,000 draws cover the
10,000 images) and an epoch has about 7.4 refreshes. AlexNet with a seeded stand-in for the ImageNet weights
(bench_train.save_stand_in), trained from conv5, NetVLAD K=64, images 240x320, the reference recipe otherwise.

Each arm (--trunk_cache auto / off) runs in its own subprocess from the same cluster-initialised model, on one
torch thread, decoding in the main process (--threads 0), and is timed in process CPU time: the trunk pass (once per
run), one epoch split into refresh (describing the needed images), mining (candidates, distances, triplets) and
steps, then validation (Recall@N on the val split, 260 database images and 193 queries). A whole run is the trunk
pass plus --epochs times (epoch + validation): the epochs of a run differ only in their random draws. The cached
arm also times one training step's parts alone (conv5 forward/backward, NetVLAD forward/backward, loss, optimizer)
on a batch of the cache, against its mean step in the epoch.
Usage: python benchmarks/bench_train_pitts.py [--workdir DIR] [--arms cached,uncached] [--epochs 30]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from bench_train import parsed_arm_args, prepare_workdir, run_arms  # noqa: E402
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.datasets import load_dataset  # noqa: E402
from netvlad_toolkit.model.centroids import centroids_path, initialised_model  # noqa: E402
from netvlad_toolkit.runs.runs import place_model  # noqa: E402
from netvlad_toolkit.search.retrieval import evaluate  # noqa: E402
from netvlad_toolkit.training import training  # noqa: E402

ARMS = {'cached': 'auto', 'uncached': 'off'}
SHAPE = dict(db=260, queries=193, refresh=52, negative_sample=52)  # see the docstring: Pitts30k x 520 / 10,000
PARTS = ['conv5 forward', 'NetVLAD forward', 'loss forward+backward', 'NetVLAD backward', 'conv5 backward',
         'optimizer step']


def flags(workdir):
    return ['--dataset=synthetic', '--dataPath', os.path.join(workdir, 'data'), '--arch=alexnet', '--threads=0',
            '--nocuda']


class CpuClock:
    """Process CPU seconds spent inside the wrapped functions, by name."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, name, function):
        def timed(*args, **kwargs):
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - started
        return timed


def timed_epoch(network, data, source, train_opt, device):
    """CPU seconds of one epoch, split into refresh, mining and steps, and its number of steps."""
    clock = CpuClock()
    refresh, chunk_triplets, train_chunk = (training.TrainingData.refresh_cache, training.chunk_triplets,
                                            training.train_chunk)
    training.TrainingData.refresh_cache = clock.wrap('refresh', refresh)
    training.chunk_triplets = clock.wrap('refresh+mining', chunk_triplets)
    training.train_chunk = clock.wrap('steps', train_chunk)
    optimizer, _ = training.make_optimizer(network, train_opt)
    hard_negatives = np.full((data.whole.db_struct.numQ, train_opt.nNeg), -1)
    started = time.process_time()
    steps, _ = training.train_epoch(network, data, source, optimizer, hard_negatives, train_opt, device, 1, 1, (0, 1),
                                    None, 0)
    epoch_s = time.process_time() - started
    training.TrainingData.refresh_cache, training.chunk_triplets, training.train_chunk = (refresh, chunk_triplets,
                                                                                          train_chunk)
    s = clock.seconds
    return dict(epoch_s=epoch_s, refresh_s=s['refresh'], mining_s=s['refresh+mining'] - s['refresh'],
                steps_s=s['steps'], steps=steps, other_s=epoch_s - s['refresh+mining'] - s['steps'])


def cpu_seconds(function, repeats=5):
    """Median process CPU seconds of function() (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return float(np.median(times))


def step_parts(network, source, opt):
    """CPU seconds of each part of one training step run alone, on a batch of 4 queries x 12 cached rows."""
    model = network.model
    conv5, pool = model.encoder[model.frozen_layers:], model.pool
    counts = [opt.nNeg] * opt.batchSize
    rows = source.features[:sum(2 + c for c in counts)].float().contiguous(memory_format=torch.channels_last)
    optimizer, _ = training.make_optimizer(network, opt)
    features = conv5(rows)
    features_in = features.detach().requires_grad_()
    descriptors = pool(features_in)
    descriptors_in = descriptors.detach().requires_grad_()

    def loss_step():
        descriptors_in.grad = None
        training.triplet_loss(descriptors_in, counts, opt.margin, opt.loss).backward()

    loss_step()
    parts = {'conv5 forward': lambda: conv5(rows), 'NetVLAD forward': lambda: pool(features_in),
             'loss forward+backward': loss_step,
             'NetVLAD backward': lambda: descriptors.backward(descriptors_in.grad, retain_graph=True),
             'conv5 backward': lambda: features.backward(features_in.grad, retain_graph=True),
             'optimizer step': optimizer.step}
    with torch.enable_grad():
        return {name: cpu_seconds(part) for name, part in parts.items()}


def run_arm(arm, args):
    torch.set_num_threads(1)
    opt = cli.parse_options(['--mode=train', *flags(args.workdir), f'--cacheRefreshRate={SHAPE["refresh"]}',
                             f'--nNegSample={SHAPE["negative_sample"]}', f'--trunk_cache={ARMS[arm]}'])
    opt.savePath = os.path.join(args.workdir, f'run_{arm}')
    os.makedirs(opt.savePath, exist_ok=True)
    model, device = place_model(initialised_model(opt), torch.device('cpu'))
    model = model.to(memory_format=torch.channels_last)
    data = training.TrainingData(opt)
    started = time.process_time()
    network, source, train_opt = training.training_inputs(model, data, opt, device, opt.savePath, 0)
    result = dict(arm=arm, trunk_s=time.process_time() - started, **timed_epoch(network, data, source, train_opt,
                                                                               device))
    started = time.process_time()
    result['recalls'] = evaluate(model, load_dataset(opt, 'val'), opt, device)['recalls']
    result['validation_s'] = time.process_time() - started
    if arm == 'cached':  # after validation: timing the optimizer's step moves the weights
        result['parts'] = step_parts(network, source, train_opt)
        source.release()
    print(json.dumps(result))


def report(results, epochs):
    print(f'Pittsburgh-shaped training, AlexNet conv5 + NetVLAD K=64, 520 db / 386 queries, process CPU s, 1 thread; '
          f'whole run = trunk pass + {epochs} x (epoch + validation)')
    print('| arm | trunk pass | refresh | mining | steps (count) | epoch | validation | whole run | R@1 | R@5 | R@10 |')
    for arm, r in results.items():
        whole = r['trunk_s'] + epochs * (r['epoch_s'] + r['validation_s'])
        recalls = r['recalls']
        print(f'| {arm} | {r["trunk_s"]:.1f} | {r["refresh_s"]:.1f} | {r["mining_s"]:.1f} | '
              f'{r["steps_s"]:.1f} ({r["steps"]}) | {r["epoch_s"]:.1f} | {r["validation_s"]:.1f} | {whole:.0f} | '
              f'{recalls["1"]:.3f} | {recalls["5"]:.3f} | {recalls["10"]:.3f} |')
        r['whole_s'] = whole
    if set(results) == set(ARMS):
        cached, uncached = results['cached'], results['uncached']
        print(f'cache vs none: {uncached["epoch_s"] / cached["epoch_s"]:.2f}x per epoch, '
              f'{uncached["whole_s"] / cached["whole_s"]:.2f}x per whole run; recall equal: '
              f'{cached["recalls"] == uncached["recalls"]}')
    if 'cached' in results:
        parts = results['cached']['parts']
        step_s = results['cached']['steps_s'] / results['cached']['steps']
        print('cached step parts alone (ms): ' + ', '.join(f'{n} {1000 * parts[n]:.1f}' for n in PARTS))
        print(f'sum of parts {1000 * sum(parts.values()):.1f} ms; mean step in the epoch {1000 * step_s:.1f} ms '
              f'({step_s / sum(parts.values()):.2f}x the sum)')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--epochs', type=int, default=30, help='Epochs of the whole run (the reference nEpochs).')
    args = parsed_arm_args(parser, 'bench_train_pitts_')
    if args.arm:
        return run_arm(args.arm, args)
    prepare_workdir(args.workdir, 'alexnet', SHAPE['db'], SHAPE['queries'])
    if not os.path.isfile(centroids_path(cli.parse_options(['--mode=cluster', *flags(args.workdir)]))):
        cli.main(['--mode=cluster', *flags(args.workdir)])
    report(run_arms(__file__, ['--workdir', args.workdir], args.arms.split(',')), args.epochs)


if __name__ == '__main__':
    main()
