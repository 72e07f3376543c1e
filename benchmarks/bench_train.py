"""Training: one epoch with the frozen-trunk cache, without it, and with reference-style mining, in the paper's
setting (ImageNet weights, training from conv5 / conv5_1; a seeded random stand-in for the ImageNet files, as the
tests use, since this machine cannot download them) on a generated dataset at 240x320.

Arms (each in its own subprocess, the same initial model, cluster-initialised NetVLAD):
  trunk_cache     this project's training, --trunk_cache auto: the frozen layers' output of every training image is
                  computed once per run (timed apart, `trunk_s`), then the epoch runs the trainable layers only;
  no_trunk_cache  the same with --trunk_cache off: every refresh and step decodes images and runs the whole encoder;
  reference       what the reference port does each epoch: queries in a fixed order; at every cache refresh the
                  descriptors of the WHOLE training set are recomputed and written to an HDF5 file; every query reads
                  its positives and nNegSample negatives (drawn with replacement) back and fits sklearn
                  NearestNeighbors on them; the training step is training.train_chunk's.
Each arm ends with val Recall@N, to compare at equal recall. --refresh_every sets cacheRefreshRate; with the
default 32 training queries and 8 queries per refresh there are 4 refreshes, each needing ~95% of the database
(1000 negatives drawn per query), as a Pittsburgh refresh (1000 queries x 1000 negatives over 10,000 images) does.
Usage: python benchmarks/bench_train.py --arch alexnet [--workdir DIR] [--db 1000] [--queries 16]
       [--device cuda --threads 12]
       (the train split gets twice --db / --queries; needs scikit-learn: benchmarks/requirements.txt)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
import torchvision
from tqdm import tqdm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets import synthetic  # noqa: E402
from netvlad_toolkit.datasets.datasets import load_dataset  # noqa: E402
from netvlad_toolkit.model.centroids import initialised_model  # noqa: E402
from netvlad_toolkit.runs.runs import place_model  # noqa: E402
from netvlad_toolkit.search.retrieval import evaluate, extract_descriptors  # noqa: E402
from netvlad_toolkit.training import training  # noqa: E402

ARMS = ['trunk_cache', 'no_trunk_cache', 'reference']
STAND_IN_FILES = {'alexnet': 'alexnet-owt-7be5be79.pth', 'vgg16': 'vgg16-397923af.pth'}


def flags(args):
    return ['--dataset=synthetic', '--dataPath', os.path.join(args.workdir, 'data'), f'--arch={args.arch}',
            f'--threads={args.threads}', '--num_clusters=16', *(['--nocuda'] if args.device == 'cpu' else [])]


def options(args, arm):
    return cli.parse_options(['--mode=train', *flags(args),
                              f'--cacheRefreshRate={args.refresh_every}',
                              f'--trunk_cache={"off" if arm == "no_trunk_cache" else "auto"}'])


def save_stand_in(torch_home, arch):
    """A seeded random torchvision state dict under the file name torchvision loads the ImageNet weights from."""
    path = os.path.join(torch_home, 'hub', 'checkpoints', STAND_IN_FILES[arch])
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.manual_seed(2016)
        torch.save(getattr(torchvision.models, arch)().state_dict(), path)


def reference_epoch(model, opt, data, device):
    """One epoch the reference way (mining and cache only; the step is training.train_chunk's)."""
    from sklearn.neighbors import NearestNeighbors
    optimizer, _ = training.make_optimizer(model, opt)
    cache_path = os.path.join(opt.savePath, 'train_feat_cache.hdf5')
    os.makedirs(opt.savePath, exist_ok=True)
    rng = np.random.default_rng(opt.seed)
    negatives = [np.setdiff1d(np.arange(data.num_db), p) for p in data.potential]
    for start in range(0, len(data.queries), opt.cacheRefreshRate):
        chunk = data.queries[start:start + opt.cacheRefreshRate]  # never shuffled
        with h5py.File(cache_path, 'w') as h5:  # the whole training set, every refresh
            h5.create_dataset('features', data=extract_descriptors(model, data.whole, opt, device, 'h5 cache'))
        triplets = []
        with h5py.File(cache_path, 'r') as h5:
            features = h5['features']
            for q in chunk:
                query = features[data.num_db + q][None]
                positives = np.sort(data.nontrivial[q])
                knn = NearestNeighbors(n_neighbors=1).fit(features[positives])
                d_pos, best = knn.kneighbors(query, 1)
                sample = np.unique(rng.choice(negatives[q], opt.nNegSample))  # with replacement, as the reference
                knn = NearestNeighbors(n_neighbors=1).fit(features[sample])
                d_neg, found = knn.kneighbors(query, min(opt.nNeg * 10, len(sample)))
                violating = d_neg[0] < d_pos[0, 0] + opt.margin ** 0.5
                if violating.any():
                    triplets.append((int(data.num_db + q), int(positives[best[0, 0]]),
                                     [int(n) for n in sample[found[0][violating][:opt.nNeg]]]))
        with tqdm(total=len(chunk), desc='reference epoch') as bar:
            training.train_chunk(model, data.whole, triplets, optimizer, opt, device, bar, None, 0)


def run_arm(arm, args):
    opt = options(args, arm)
    opt.savePath = os.path.join(args.workdir, f'{args.arch}_{arm}')
    os.makedirs(opt.savePath, exist_ok=True)
    model, device = place_model(initialised_model(opt), torch.device(args.device))
    data = training.TrainingData(opt)
    started = time.time()
    if arm == 'reference':
        trunk_s = 0.0
        reference_epoch(model, opt, data, device)
    else:
        network, source, train_opt = training.training_inputs(model, data, opt, device, opt.savePath, 0)
        trunk_s = time.time() - started
        optimizer, _ = training.make_optimizer(network, opt)
        hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1)
        training.train_epoch(network, data, source, optimizer, hard_negatives, train_opt, device, 1, 1, (0, 1),
                             None, 0)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    epoch_s = time.time() - started - trunk_s
    recalls = evaluate(model, load_dataset(opt, 'val'), opt, device)['recalls']
    print(json.dumps(dict(arm=arm, trunk_s=trunk_s, epoch_s=epoch_s, recalls=recalls,
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def parsed_arm_args(parser, prefix):
    """The benchmark's arguments with the hidden --arm (one arm, run in its own process) and --workdir (default: a
    new temporary folder named `prefix`...), whose torch_home becomes $TORCH_HOME."""
    parser.add_argument('--arm', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    os.environ['TORCH_HOME'] = os.path.join(args.workdir, 'torch_home')
    return args


def prepare_workdir(workdir, arch, db, queries):
    """The stand-in ImageNet weights of `arch` in $TORCH_HOME and the generated dataset (db / queries of val and
    test, twice that in train, 240x320) in workdir/data, made once."""
    save_stand_in(os.environ['TORCH_HOME'], arch)
    data = os.path.join(workdir, 'data')
    if not synthetic.dataset_ready(data):
        synthetic.generate(data, db, queries, (240, 320), seed=123)


def run_arms(script, argv, arms):
    """{arm: its result} of each arm run as `script argv --arm ARM` in a process of its own (its last stdout line,
    JSON; stderr shows its progress)."""
    results = {}
    for arm in arms:
        out = subprocess.run([sys.executable, script, *argv, '--arm', arm], stdout=subprocess.PIPE, text=True,
                             check=True).stdout
        results[arm] = json.loads(out.strip().splitlines()[-1])
        print(results[arm], flush=True)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--arch', default='alexnet', choices=sorted(STAND_IN_FILES))
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--db', type=int, default=1000, help='Database images of val/test (train: twice).')
    parser.add_argument('--queries', type=int, default=16, help='Queries of val/test (train: twice).')
    parser.add_argument('--refresh_every', type=int, default=8, help='--cacheRefreshRate of every arm.')
    parser.add_argument('--arms', default=','.join(ARMS))
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='Where every arm trains.')
    parser.add_argument('--threads', type=int, default=2, help='--threads (DataLoader workers) of every arm.')
    args = parsed_arm_args(parser, 'bench_train_')
    if args.arm:
        return run_arm(args.arm, args)
    prepare_workdir(args.workdir, args.arch, args.db, args.queries)
    cli.main(['--mode=cluster', *flags(args)])
    results = run_arms(__file__, [*sys.argv[1:], '--workdir', args.workdir], args.arms.split(','))
    for arm, r in results.items():
        print(f'{args.arch} {arm:15s} trunk pass {r["trunk_s"]:6.1f} s  epoch {r["epoch_s"]:7.1f} s  '
              f'val R@1 {r["recalls"]["1"]:.3f}  R@5 {r["recalls"]["5"]:.3f}  peak RSS {r["peak_rss_mib"]:.0f} MiB')
    if 'trunk_cache' in results:
        cached = results['trunk_cache']
        for arm in set(results) - {'trunk_cache'}:
            other = results[arm]['epoch_s']
            print(f'trunk cache vs {arm}: {other / cached["epoch_s"]:.2f}x faster per epoch, '
                  f'{other / (cached["epoch_s"] + cached["trunk_s"]):.2f}x counting the once-per-run trunk pass')


if __name__ == '__main__':
    main()
