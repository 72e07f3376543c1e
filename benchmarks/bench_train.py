"""Training: one epoch of this project's training against the reference port's style, on the same synthetic data.

Reference style = what the reference port does each epoch: queries in a fixed order; at every cache refresh the
descriptors of the WHOLE training set are recomputed and written to an HDF5 file; every query then reads its
positives and 1000 negatives (drawn with replacement) back from that file and fits sklearn NearestNeighbors on
them. The training step itself (images, loss, optimizer) is the same code for both, so the ratio isolates the
mining and caching; the 'full reference' arm also uses the reference's per-cluster NetVLAD loop and fp32, against
this project's training in bf16 autocast.
Each arm runs in its own subprocess (peak RSS is its own) and ends with a val Recall@N, to compare at equal recall.
Usage: python benchmarks/bench_train.py [--workdir DIR] [--epochs 1]   (needs scikit-learn: benchmarks/requirements.txt)
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
from tqdm import tqdm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import main as cli  # noqa: E402
import training  # noqa: E402
from centroids import initialised_model  # noqa: E402
from datasets import load_dataset  # noqa: E402
from retrieval import evaluate, extract_descriptors  # noqa: E402

ARMS = ['ours_fp32', 'reference_mining_fp32', 'ours_bf16', 'reference_full_fp32']


def options(workdir, precision='fp32'):
    return cli.parse_options(['--mode=train', '--dataset=synthetic', '--dataPath', os.path.join(workdir, 'data'),
                              '--arch=alexnet', '--fromscratch', '--nocuda', '--threads=2', '--optim=ADAM',
                              '--lr=0.00001', '--precision', precision])


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
            training.train_chunk(model, data, triplets, optimizer, opt, device, bar, None, 0)


def run_arm(arm, workdir):
    opt = options(workdir, 'bf16' if arm == 'ours_bf16' else 'fp32')
    opt.savePath = os.path.join(workdir, arm)
    device = torch.device('cpu')
    model = initialised_model(opt)
    if arm == 'reference_full_fp32':
        from bench_netvlad import loop_netvlad
        layer = model.pool
        layer.forward = lambda x: loop_netvlad(layer, x)
    started = time.time()
    if arm.startswith('ours'):
        data = training.TrainingData(opt)
        optimizer, _ = training.make_optimizer(model, opt)
        hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1)
        training.train_epoch(model, data, optimizer, hard_negatives, opt, device, 1, 1, (0, 1), None, 0)
    else:
        reference_epoch(model, opt, training.TrainingData(opt), device)
    epoch_s = time.time() - started
    recalls = evaluate(model, load_dataset(opt, 'val'), opt, device)['recalls']
    print(json.dumps(dict(arm=arm, epoch_s=epoch_s, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 1024, recalls=recalls)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--arm', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix='bench_train_')
    if args.arm:
        return run_arm(args.arm, workdir)
    for mode in ('synth', 'cluster'):
        cli.main([f'--mode={mode}', '--dataset=synthetic', '--dataPath', os.path.join(workdir, 'data'),
                  '--arch=alexnet', '--fromscratch', '--nocuda'])
    results = {}
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, '--workdir', workdir, '--arm', arm], capture_output=True,
                             text=True, check=True).stdout
        results[arm] = json.loads(out.strip().splitlines()[-1])
        print(results[arm], flush=True)
    ours, ref = results['ours_fp32'], results['reference_mining_fp32']
    print(f'\nmining+cache only (fp32, same layer): {ref["epoch_s"] / ours["epoch_s"]:.2f}x faster per epoch, '
          f'peak RSS {ours["peak_rss_mib"]:.0f} vs {ref["peak_rss_mib"]:.0f} MiB')
    full_ref, fast = results['reference_full_fp32'], results['ours_bf16']
    print(f'this training (bf16) vs full reference style (loop NetVLAD, HDF5, sklearn, fp32): '
          f'{full_ref["epoch_s"] / fast["epoch_s"]:.2f}x faster per epoch, peak RSS {fast["peak_rss_mib"]:.0f} vs '
          f'{full_ref["peak_rss_mib"]:.0f} MiB')
    for arm, r in results.items():
        print(f'{arm:24s} epoch {r["epoch_s"]:7.1f} s  val R@1 {r["recalls"]["1"]:.3f}  R@5 {r["recalls"]["5"]:.3f}')


if __name__ == '__main__':
    main()
