"""Training parity: this project's training against a re-implementation of the reference port's, over many seeds.

The re-implementation is written here from the port's description (its training defaults and known faults), not
from the project's code:
- NetVLAD with the reference's loop over clusters (bench_netvlad.loop_netvlad);
- each cache refresh recomputes the descriptors of the whole training set (a stale cache until the next refresh);
  the queries are split into --cacheRefreshRate subsets in a fixed order, shuffled within a subset;
- mining is lazy, per query, when its batch is drawn: best positive among the non-trivial positives, --nNegSample
  negatives drawn WITH replacement (then made unique), the nNeg*10 nearest of them, of which up to nNeg that violate
  the margin; a query without a violating negative is dropped from its batch. The reference writes its hard-negative
  memory inside DataLoader workers, where it is lost, so here there is none;
- the reference's loss: TripletMarginLoss(margin=sqrt(--margin), p=2) summed over every (query, positive, negative)
  and divided by the number of negatives; Adam without weight decay (or SGD with momentum, weight decay and StepLR).
Both arms start from the same network for a seed: AlexNet from random weights drawn with that seed and NetVLAD
initialised from centroids clustered with that seed (`--mode=cluster --seed S`). Each arm then trains
--epochs epochs and is evaluated on the val split. Printed: per seed, then mean and standard error over seeds of
val Recall@1/5 for both arms, their paired difference, and the time per epoch.
Usage: python benchmarks/bench_parity.py [--seeds 10] [--first_seed 1] [--epochs 5] [--synth_db 100]
       [--synth_queries 100] [--imsize 64x80] [--workdir DIR] [--threads 1] [--results FILE]
       python benchmarks/bench_parity.py --summarise FILE [FILE ...]
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_netvlad import loop_netvlad  # noqa: E402

import main as cli  # noqa: E402
import training  # noqa: E402
from centroids import initialised_model  # noqa: E402
from datasets import load_dataset  # noqa: E402
from retrieval import evaluate, extract_descriptors  # noqa: E402

TRAIN_FLAGS = ['--optim', 'ADAM', '--lr', '0.0001']  # the user's train command, from the port's README


def options(data_path, seed, extra=()):
    return cli.parse_options(['--mode=train', '--dataset=synthetic', '--dataPath', data_path, '--arch=alexnet',
                              '--fromscratch', '--nocuda', '--threads=0', '--cacheBatchSize=32', '--seed', str(seed),
                              *TRAIN_FLAGS, *extra])


# ---------------------------------------------------------------------------------------------- the reference's way

def reference_optimizer(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == 'ADAM':
        return torch.optim.Adam(params, lr=opt.lr), None
    sgd = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weightDecay)
    return sgd, torch.optim.lr_scheduler.StepLR(sgd, step_size=opt.lrStep, gamma=opt.lrGamma)


def mine_query(cache, query, data, opt, rng):
    """The reference dataset's __getitem__: (query row, positive row, negative rows) or None."""
    query_desc = cache[data.num_db + query]
    positives = np.asarray(data.nontrivial[query])
    pos_dist = np.linalg.norm(cache[positives] - query_desc, axis=1)
    best = positives[pos_dist.argmin()]
    pool = np.setdiff1d(np.arange(data.num_db), data.potential[query])
    sample = np.unique(rng.choice(pool, opt.nNegSample))  # with replacement
    neg_dist = np.linalg.norm(cache[sample] - query_desc, axis=1)
    nearest = np.argsort(neg_dist, kind='stable')[:opt.nNeg * 10]
    violating = neg_dist[nearest] < pos_dist.min() + math.sqrt(opt.margin)
    if not violating.any():
        return None
    return data.num_db + query, best, sample[nearest[violating][:opt.nNeg]]


def reference_loss(descriptors, num_queries, neg_counts, margin):
    """Rows are [queries, positives, negatives]; the port's criterion per triplet, summed, over the negatives."""
    queries, positives = descriptors[:num_queries], descriptors[num_queries:2 * num_queries]
    negatives = descriptors[2 * num_queries:]
    loss = descriptors.new_zeros(())
    neg_row = 0
    for i, count in enumerate(neg_counts):
        for _ in range(count):
            loss = loss + F.triplet_margin_loss(queries[i:i + 1], positives[i:i + 1], negatives[neg_row:neg_row + 1],
                                                margin=math.sqrt(margin), p=2, reduction='sum')
            neg_row += 1
    return loss / neg_row


def reference_epoch(model, data, optimizer, opt, device, rng):
    num_subsets = math.ceil(len(data.queries) / opt.cacheRefreshRate)
    for subset in np.array_split(data.queries, num_subsets):  # fixed order of subsets
        cache = extract_descriptors(model, data.whole, opt, device, 'reference cache')
        model.train()
        order = rng.permutation(subset)
        for start in range(0, len(order), opt.batchSize):
            triplets = [t for t in (mine_query(cache, q, data, opt, rng) for q in order[start:start + opt.batchSize])
                        if t is not None]
            if not triplets:
                continue
            rows = [t[0] for t in triplets] + [t[1] for t in triplets] + [n for t in triplets for n in t[2]]
            images = torch.stack([data.whole[int(r)][0] for r in rows]).to(device)
            loss = reference_loss(model(images), len(triplets), [len(t[2]) for t in triplets], opt.margin)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


# ---------------------------------------------------------------------------------------------- the arms

def train_project(model, opt, device, epochs):
    data = training.TrainingData(opt)
    optimizer, scheduler = training.make_optimizer(model, opt)
    hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1, dtype=np.int64)
    times, step = [], 0
    for epoch in range(1, epochs + 1):
        started = time.time()
        step, _ = training.train_epoch(model, data, data.whole, optimizer, hard_negatives, opt, device, epoch, epochs,
                                       (0, 1), None, step)
        scheduler.step()
        times.append(time.time() - started)
    return times


def train_reference(model, opt, device, epochs):
    layer = model.pool
    layer.forward = lambda x: loop_netvlad(layer, x)
    data = training.TrainingData(opt)  # the split's positives and negatives only
    optimizer, scheduler = reference_optimizer(model, opt)
    rng = np.random.default_rng(opt.seed)
    torch.manual_seed(opt.seed)
    times = []
    for _ in range(epochs):
        started = time.time()
        reference_epoch(model, data, optimizer, opt, device, rng)
        if scheduler is not None:
            scheduler.step()
        times.append(time.time() - started)
    return times


def run_seed(data_path, seed, epochs, extra):
    assert cli.main(['--mode=cluster', '--dataset=synthetic', '--dataPath', data_path, '--arch=alexnet',
                     '--fromscratch', '--nocuda', '--threads=0', '--seed', str(seed)]) == 0
    opt = options(data_path, seed, extra)
    device = torch.device('cpu')
    start_state = initialised_model(opt).state_dict()
    val_set = load_dataset(opt, 'val')
    result = dict(seed=seed)
    for arm, trainer in (('project', train_project), ('reference', train_reference)):
        model = initialised_model(opt)
        model.load_state_dict(start_state)
        if arm == 'project':
            initial = evaluate(model, val_set, opt, device)['recalls']
            result['initial'] = dict(recall1=initial[1], recall5=initial[5])
        times = trainer(model, opt, device, epochs)
        recalls = evaluate(model, val_set, opt, device)['recalls']
        result[arm] = dict(recall1=recalls[1], recall5=recalls[5], epoch_s=float(np.mean(times)))
    return result


def mean_sem(values):
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float('nan')


def summarise(results):
    lines = ['before training (both arms): ' + '   '.join(
        f'{key} {mean:.4f} ± {sem:.4f}' for key in ('recall1', 'recall5')
        for mean, sem in [mean_sem([r['initial'][key] for r in results])])]
    for key in ('recall1', 'recall5', 'epoch_s'):
        cells = []
        for arm in ('project', 'reference'):
            mean, sem = mean_sem([r[arm][key] for r in results])
            cells.append(f'{arm} {mean:.4f} ± {sem:.4f}')
        diff, diff_sem = mean_sem([r['project'][key] - r['reference'][key] for r in results])
        lines.append(f'{key:8s} ' + '   '.join(cells) + f'   paired difference {diff:+.4f} ± {diff_sem:.4f}')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=10)
    parser.add_argument('--first_seed', type=int, default=1)
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--synth_db', type=int, default=100)
    parser.add_argument('--synth_queries', type=int, default=100)
    parser.add_argument('--imsize', default='64x80')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: the machine is shared)')
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--results', default=None, help='JSON lines, one per seed (appended as they finish)')
    parser.add_argument('--extra', nargs='*', default=[], help='more training flags for both arms')
    parser.add_argument('--summarise', nargs='+', default=None, metavar='RESULTS',
                        help='only print the summary of stored --results files (e.g. of runs split over processes)')
    args = parser.parse_args()
    if args.summarise:
        results = [json.loads(line) for path in args.summarise for line in open(path) if line.strip()]
        print(f'{len(results)} seeds: {sorted(r["seed"] for r in results)}')
        print(summarise(results))
        return
    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix='bench_parity_')
    data_path = os.path.join(workdir, 'data')
    cli.main(['--mode=synth', '--dataset=synthetic', '--dataPath', data_path, f'--synth_db={args.synth_db}',
              f'--synth_queries={args.synth_queries}', f'--synth_imsize={args.imsize}'])
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    results = []
    for seed in seeds:
        result = run_seed(data_path, seed, args.epochs, args.extra)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, 'a') as f:
                f.write(json.dumps(result) + '\n')
    print(f'\n{len(results)} seeds, {args.epochs} epochs, {args.synth_db * 2} train db / {args.synth_queries * 2} '
          f'train queries, val {args.synth_db} db / {args.synth_queries} queries, {args.imsize}, flags '
          f'{" ".join(TRAIN_FLAGS + args.extra)}')
    print(summarise(results))


if __name__ == '__main__':
    main()
