"""The two training recipes (--recipe reference, --recipe authors) on the same generated data and seeds.

The data is the built-in synthetic set (`--mode=synth`: --synth_db database images and --synth_queries queries for
val and test, twice that for train, at --synth_imsize), generated once. For each seed: one `--mode=cluster
--arch=alexnet --fromscratch --seed S`, then for each recipe
`--mode=train --recipe R --nEpochs E --lrStep L` (every other flag the recipe's own: SGD at 1e-4 in both, so the
rows differ by the recipe's rules only) and `--mode=test --split test --ckpt best`. Recorded per run: the best
epoch's val Recall@1/5, test Recall@1/5, optimiser steps per epoch and seconds per epoch (training and validation).
Usage: python benchmarks/bench_recipes.py [--seeds 1 2 ...] [--epochs 3] [--lr_step 1] [--synth_db 100]
       [--synth_queries 50] [--synth_imsize 64x80] [--workdir DIR] [--results FILE] [--summarise FILE ...]
"""
import argparse
import json
import os
import re
import tempfile
import time

import numpy as np
import torch

from bench_train_protocol import ROOT, main_py, seed_data

RECALL_LINE = re.compile(r'====> Recall@(\d+): ([0-9.]+)')
RECIPES = ('reference', 'authors')


def run_recipe(data, workdir, seed, recipe, args, log):
    common = ['--arch=alexnet', '--fromscratch', '--nocuda', '--threads', '0', '--cacheBatchSize', '24',
              '--seed', str(seed), '--dataset=synthetic', '--dataPath', data]
    run = os.path.join(workdir, f'run_seed{seed}_{recipe}')
    started = time.time()
    main_py(ROOT, ['--mode=train', *common, '--recipe', recipe, '--nEpochs', str(args.epochs), '--lrStep',
                   str(args.lr_step), '--savePath', run], log)
    train_s = time.time() - started
    test = main_py(ROOT, ['--mode=test', *common, '--split', 'test', '--resume', run, '--ckpt', 'best'], log)
    latest = torch.load(os.path.join(run, 'checkpoints', 'checkpoint.pth.tar'), weights_only=False)
    best = torch.load(os.path.join(run, 'checkpoints', 'model_best.pth.tar'), weights_only=False)
    test_recalls = {int(n): float(r) for n, r in RECALL_LINE.findall(test)}
    return dict(seed=seed, recipe=recipe, val={n: best['recalls'][n] for n in (1, 5)},
                test={n: test_recalls[n] for n in (1, 5)}, best_epoch=best['epoch'],
                steps_per_epoch=latest['step'] / latest['epoch'], seconds_per_epoch=train_s / latest['epoch'])


def summarise(records):
    print('| recipe | runs | val R@1 | val R@5 | test R@1 | test R@5 | steps / epoch | s / epoch |')
    print('|---|---|---|---|---|---|---|---|')
    for recipe in RECIPES:
        rows = [r for r in records if r['recipe'] == recipe]
        if not rows:
            continue

        def cell(values, digits=3):
            return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.{digits}f}'
        print(f'| {recipe} | {len(rows)} | {cell([r["val"]["1"] for r in rows])} | '
              f'{cell([r["val"]["5"] for r in rows])} | {cell([r["test"]["1"] for r in rows])} | '
              f'{cell([r["test"]["5"] for r in rows])} | {cell([r["steps_per_epoch"] for r in rows], 1)} | '
              f'{cell([r["seconds_per_epoch"] for r in rows], 0)} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, nargs='+', default=list(range(1, 11)))
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--lr_step', type=int, default=1, help='Epochs between lr drops (both recipes).')
    parser.add_argument('--synth_db', type=int, default=100)
    parser.add_argument('--synth_queries', type=int, default=50)
    parser.add_argument('--synth_imsize', default='64x80')
    parser.add_argument('--workdir', default=None, help='Data and runs (default: a new temporary folder).')
    parser.add_argument('--results', default=None, help='Append one JSON line per run to this file.')
    parser.add_argument('--summarise', nargs='+', default=None, metavar='FILE', help='Only print the table of '
                                                                                     'stored runs.')
    args = parser.parse_args()
    if args.summarise:
        summarise([json.loads(line) for path in args.summarise for line in open(path) if line.strip()])
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix='bench_recipes_')
    root = os.path.join(workdir, 'data')
    main_py(ROOT, ['--mode=synth', '--dataPath', root, f'--synth_db={args.synth_db}',
                   f'--synth_queries={args.synth_queries}', f'--synth_imsize={args.synth_imsize}'],
            os.path.join(workdir, 'synth.log'))
    records = []
    for seed in args.seeds:
        data = seed_data(root, workdir, seed)
        log = os.path.join(workdir, f'seed{seed}.log')
        main_py(ROOT, ['--mode=cluster', '--arch=alexnet', '--fromscratch', '--nocuda', '--threads', '0',
                       '--seed', str(seed), '--dataset=synthetic', '--dataPath', data], log)
        for recipe in RECIPES:
            record = json.loads(json.dumps(run_recipe(data, workdir, seed, recipe, args, log)))
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.results:
                with open(args.results, 'a') as f:
                    f.write(json.dumps(record) + '\n')
    summarise(records)


if __name__ == '__main__':
    main()
