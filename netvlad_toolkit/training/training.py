"""Triplet training machinery shared by --mode=train, prune fine-tuning and QAT.

The descriptor cache of the training images lives in memory (float16) in the main process; a refresh computes
only the images the next chunk of queries can use. Mining is one batched similarity product per chunk: for each
query the best positive (nearest non-trivial positive) and up to nNeg violating negatives, from nNegSample random
negatives drawn without replacement plus the query's previous hard negatives, which persist across refreshes
and checkpoints. DataLoader workers only decode images. Randomness of an epoch derives from (seed, epoch), so a
resumed run repeats exactly what an uninterrupted one would have done.

Two losses (--loss): `reference`, the PyTorch port's TripletMarginLoss with margin sqrt(m) on plain L2 distances,
summed over every (query, positive, negative) of the batch and divided by the number of negatives; and `paper`,
the authors' trainWeakly.m: max(0, d(q,p)^2 + m - d(q,n)^2) on squared distances, summed and divided by the number
of violating triplets of the batch (their update divides the summed gradient by that count). Mining uses the same
rule as the loss: a negative violates when it is closer than the best positive plus the margin, in the loss's
distances.
"""
import logging
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from netvlad_toolkit.datasets.datasets import load_dataset, positives_within, query_sample, with_positive_floor
from netvlad_toolkit.datasets.images import TripletImages, collate_triplets, loading
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import trainable_layers_text
from netvlad_toolkit.search.retrieval import autocast, evaluate, extract_descriptors, log_recalls
from netvlad_toolkit.training import trunk_cache
from netvlad_toolkit.utils.commons import UserError, torchrun_process
from netvlad_toolkit.utils.options import (
    ABOVE_0,
    AT_LEAST_0,
    AT_LEAST_1,
    add_evaluating_flags,
    add_latency_flags,
    add_overwrite_flag,
    number_in,
)

LOSSES = ('reference', 'paper')
# The authors' recipe (trainWeakly.m's defaults and demo.m's settings); the reference recipe is every flag's default.
AUTHORS_RECIPE = dict(optim='SGD', lr=0.0001, momentum=0.9, weightDecay=0.001, lrStep=5, lrGamma=0.5, batchSize=4,
                      nNegSample=1000, nNeg=10, margin=0.1, loss='paper', nEpochs=30, cacheRefreshRate=1000,
                      evalEvery=1, patience=0, batch_queries='all', min_positive_dist=1.0, neg_memory='nearest',
                      nNegCache=10, refresh_doubling='on', val_queries=1000, best_epoch='authors',
                      logged_loss='queries')
AUTHORS_FIRST_TRAINED = {'alexnet': 'conv2', 'vgg16': 'conv5_1'}  # demo.m's backPropToLayer
RECIPES = {'reference': {}, 'authors': AUTHORS_RECIPE}
TIE_TOLERANCE = 1e-6  # getBestEpoch.m: recalls this close are equal


def add_compressing_flags(p):
    """The flags prune and quantize share: a run evaluated before and after, fine-tuned by triplet training, timed,
    written to a new folder."""
    add_evaluating_flags(p, trains=True, run_required=True)
    add_training_flags(p)
    add_latency_flags(p, optional=False)
    add_overwrite_flag(p)


def add_training_flags(p):
    """Flags of triplet training: --mode=train, prune fine-tuning and QAT."""
    group = p.add_argument_group('training')
    group.add_argument('--batchSize', type=AT_LEAST_1, default=4, help='Queries per batch (each with 1+1+nNeg images).')
    group.add_argument('--cacheRefreshRate', type=AT_LEAST_0, default=1000,
                       help='Recompute the training descriptor cache every this many queries (0: once per epoch).')
    group.add_argument('--trunk_cache', default='auto', choices=['auto', 'off'],
                       help='auto: when layers are frozen (ImageNet weights, the default), compute the frozen layers\' '
                            'output for every training image once per run and train and refresh the cache through the '
                            'trainable layers only; kept in RAM when it fits half the available memory, else in '
                            'RUN_FOLDER/trunk_cache_rank<r>.npy (deleted at the end; VGG16 480x640: 1.2 MB per image in '
                            'float16). off: decode and run every image each time.')
    group.add_argument('--trunk_cache_dtype', default='auto', choices=['auto', 'float32', 'float16'],
                       help='Storage of the trunk cache. auto: float32 when it fits in RAM (results equal those '
                            'without the cache), else float16 (half the size; can change close mining decisions).')
    add_optimizer_flags(group)
    group.add_argument('--margin', type=ABOVE_0, default=0.1,
                       help='Triplet margin m: sqrt(m) on plain L2 distances with --loss reference, m on squared '
                            'distances with --loss paper.')
    group.add_argument('--loss', default='reference', choices=LOSSES,
                       help='reference: the PyTorch port\'s triplet loss (margin sqrt(m) on L2 distances, summed over '
                            'the batch\'s triplets, divided by the number of negatives); paper: the authors\' '
                            'trainWeakly.m (margin m on squared L2 distances, summed over the violating negatives, '
                            'divided by their number). Mining uses the same distances and margin.')
    group.add_argument('--nNeg', type=AT_LEAST_1, default=10, help='Hard negatives per query.')
    group.add_argument('--nNegSample', type=AT_LEAST_1, default=1000, help='Random negatives to mine from per query.')
    group.add_argument('--evalEvery', type=AT_LEAST_1, default=1, help='Validate every this many epochs.')
    group.add_argument('--patience', type=AT_LEAST_0, default=10,
                       help='Stop after this many validations without a better Recall@5 (0: never).')
    recipe = p.add_argument_group('training recipe (each rule is a flag; a flag given wins over --recipe)')
    recipe.add_argument('--recipe', default='reference', choices=list(RECIPES),
                        help='reference: the PyTorch port\'s recipe (every default of this group and the one above); '
                             'authors: the NetVLAD authors\' trainWeakly.m with demo.m\'s settings: SGD at lr 1e-4, '
                             'momentum 0.9, weight decay 1e-3, lr halved every 5 epochs, 30 epochs, --loss paper, no '
                             'early stopping, and the authors\' value of every rule below; AlexNet trains from conv2, '
                             'VGG16 from conv5_1.')
    recipe.add_argument('--batch_queries', default='violating', choices=['violating', 'port', 'all'],
                        help='violating: only the queries with a violating negative, packed into full batches (this '
                             'project\'s reference recipe); port: batches of --batchSize of the queries with a '
                             'positive, a query without a violating negative dropped from its batch (the port\'s own '
                             'DataLoader and collate_fn); all: floor(queries / batchSize) batches over every training '
                             'query in shuffled order, a query without a positive or a violating negative skipped '
                             'inside its batch (authors). A batch steps when any triplet is left.')
    recipe.add_argument('--min_positive_dist', type=number_in(float, 0), default=0.0, metavar='METRES',
                        help='Training positives lie farther than this from their query, besides the dataset\'s own '
                             'rule (the port: 0, Tokyo Time Machine\'s 1 m only; authors: 1 m for every dataset, '
                             'dbBase.m).')
    recipe.add_argument('--neg_memory', default='violating', choices=['violating', 'nearest'],
                        help='What a query remembers of its mining for the next: violating, at most --nNeg violating '
                             'negatives, none when none violate (the port); nearest, its --nNegCache nearest '
                             'candidates, violating or not (authors).')
    recipe.add_argument('--nNegCache', type=AT_LEAST_1, default=10,
                        help='With --neg_memory nearest: candidates remembered per query (authors: 10).')
    recipe.add_argument('--refresh_doubling', default='off', choices=['off', 'on'],
                        help='on: the cache refresh interval is multiplied by 1/lrGamma (doubled) at every SGD '
                             'learning-rate drop (authors: compFeatsFrequency x lrDownFactor); off: --cacheRefreshRate '
                             'throughout (the port).')
    recipe.add_argument('--val_queries', type=AT_LEAST_0, default=0,
                        help='Validate on this many random val queries, drawn once from --seed (0: all of them, the '
                             'port; authors: 1000, nTestSample).')
    recipe.add_argument('--best_epoch', default='recall5', choices=['recall5', 'authors'],
                        help='The best epoch (model_best.pth.tar): recall5, the first with the highest val Recall@5 '
                             '(the port); authors, the highest Recall@5 with ties broken by Recall@4, @3, @2, @1, then '
                             '@10, @15, ... (getBestEpoch.m).')
    recipe.add_argument('--logged_loss', default='batch', choices=['batch', 'queries'],
                        help='The loss logged per step: batch, the loss that is minimised (the port); queries, the '
                             'mean over the batch\'s queries with a positive of each query\'s summed triplet loss '
                             '(authors). The gradients are the same.')


def add_optimizer_flags(group):
    """Flags of the optimiser and its schedule (make_optimizer): triplet training and distillation."""
    group.add_argument('--optim', default='SGD', choices=['SGD', 'ADAM'], help='Optimiser.')
    group.add_argument('--lr', type=ABOVE_0, default=0.0001, help='Learning rate.')
    group.add_argument('--lrStep', type=AT_LEAST_1, default=5, help='Epochs between learning-rate decays (SGD).')
    group.add_argument('--lrGamma', type=number_in(float, 0, 1, low_open=True), default=0.5,
                       help='Learning-rate decay factor (SGD).')
    group.add_argument('--weightDecay', type=number_in(float, 0), default=0.001,
                       help='Weight decay (L2). SGD: 1e-3 by default. Adam: none unless this flag is given, as the '
                            'reference port.')
    group.add_argument('--momentum', type=number_in(float, 0, 1, high_open=True), default=0.9, help='SGD momentum.')


def apply_recipe(opt, fixed=()):
    """Set every rule of --recipe that was not given on the command line (nor is in `fixed`: the stored flags of a
    resumed run, which already hold its recipe's values; nor restored from the run by runs.restore_run_flags). Adam
    gets no weight decay unless --weightDecay is given, as in the reference port."""
    settings = dict(RECIPES[opt.recipe])
    if opt.recipe == 'authors' and not opt.fromscratch:
        settings['backPropToLayer'] = AUTHORS_FIRST_TRAINED[opt.arch]
    for flag, value in settings.items():
        if hasattr(opt, flag) and flag not in opt.explicit and flag not in fixed and \
                flag not in getattr(opt, 'restored', ()):
            setattr(opt, flag, value)
    if opt.optim == 'ADAM' and 'weightDecay' not in opt.explicit:
        opt.weightDecay = 0.0  # what make_optimizer gives Adam, so that the log and flags.json say it


def recipe_text(opt):
    """The recipe's settings as this run has them."""
    shown = [flag for flag in AUTHORS_RECIPE if hasattr(opt, flag)]
    return f'recipe {opt.recipe}: ' + ', '.join(f'{flag}={getattr(opt, flag)}' for flag in shown)


# ---------------------------------------------------------------------------------------------- mining

def draw_negative_candidates(rng, num_db, positives, num_samples):
    """For each query, up to num_samples database indices outside its positives, without replacement: [Q, S]."""
    keys = rng.random((len(positives), num_db))
    for row, query_positives in enumerate(positives):
        keys[row, query_positives] = 2.0  # never drawn: above every random key
    num_samples = min(num_samples, num_db)
    candidates = np.argpartition(keys, num_samples - 1, axis=1)[:, :num_samples]
    chosen_keys = np.take_along_axis(keys, candidates, axis=1)
    return np.where(chosen_keys < 2.0, candidates, -1)


def unique_per_row(candidates):
    """Each row's duplicate entries replaced by -1 (a previous hard negative may be drawn again)."""
    candidates = np.sort(candidates, axis=1)
    repeated = np.zeros(candidates.shape, dtype=bool)
    repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    return np.where(repeated, -1, candidates)


def pad_rows(rows, fill=-1):
    """A list of 1-D integer arrays as one [len(rows), max_len] array padded with `fill`."""
    width = max(1, max(len(r) for r in rows))
    padded = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    return padded


def query_db_distances(cache, query_rows, num_db, block=4096):
    """L2 distances [Q, num_db] from the cached queries to every cached database row, in database blocks."""
    query_desc = cache[query_rows].float()
    query_sq = query_desc.pow(2).sum(1, keepdim=True)
    sq_dist = torch.empty(len(query_rows), num_db)
    for start in range(0, num_db, block):
        db_block = cache[start:min(start + block, num_db)].float()
        sq_dist[:, start:start + len(db_block)] = query_sq - 2 * query_desc @ db_block.T + db_block.pow(2).sum(1)
    return sq_dist.clamp_min_(0).sqrt_()


class Mined(NamedTuple):
    positives: torch.Tensor  # [Q] the best positive of each query
    negatives: torch.Tensor  # [Q, num_neg] its hardest violating negatives, -1 padded, hardest first
    usable: torch.Tensor     # [Q] whether it has a positive and a violating negative
    nearest: torch.Tensor    # [Q, num_nearest] its nearest candidates, violating or not, -1 padded, nearest first


def mine_triplets(cache, query_rows, num_db, nontrivial_positives, negative_candidates, margin, num_neg,
                  loss='reference', num_nearest=0):
    """Best positive and hardest violating negatives of each query, from cached descriptors.

    cache: [N, D] descriptors (database rows first); query_rows: [Q] cache rows of the queries;
    nontrivial_positives, negative_candidates: [Q, P] / [Q, C] database indices padded with -1.
    A negative violates when d(q,n) < d(q,p) + sqrt(margin) (reference loss) or d(q,n)^2 < d(q,p)^2 + margin (paper).
    """
    dist = query_db_distances(cache, query_rows, num_db)
    pos_dist = dist.gather(1, nontrivial_positives.clamp_min(0)).masked_fill(nontrivial_positives < 0, math.inf)
    best_pos_dist, best = pos_dist.min(dim=1, keepdim=True)
    positives = nontrivial_positives.gather(1, best).squeeze(1)
    neg_dist = dist.gather(1, negative_candidates.clamp_min(0)).masked_fill(negative_candidates < 0, math.inf)
    if loss == 'paper':
        violating = neg_dist.square() < best_pos_dist.square() + margin
    else:
        violating = neg_dist < best_pos_dist + margin ** 0.5
    nearest = nearest_of(negative_candidates, neg_dist, num_nearest)
    hardest_dist, order = neg_dist.masked_fill(~violating, math.inf).topk(min(num_neg, neg_dist.shape[1]), dim=1,
                                                                          largest=False)
    negatives = negative_candidates.gather(1, order).masked_fill(hardest_dist.isinf(), -1)
    has_positive = (nontrivial_positives >= 0).any(dim=1)
    return Mined(positives, negatives, violating.any(dim=1) & has_positive, nearest)


def nearest_of(candidates, dist, count):
    """The `count` nearest candidates of each row (by `dist`, inf for padding), -1 padded."""
    nearest_dist, order = dist.topk(min(count, dist.shape[1]), dim=1, largest=False)
    return candidates.gather(1, order).masked_fill(nearest_dist.isinf(), -1)


# ---------------------------------------------------------------------------------------------- data

def batch_rows(triplets, batch):
    """Whole-set rows of a batch's images as collate_triplets lays them out: each triplet's query, positive and
    negatives, triplet after triplet."""
    return [row for i in batch for row in (triplets[i][0], triplets[i][1], *triplets[i][2])]


def triplet_batches(source, triplets, batches, opt):
    """(images, negative counts) of each batch of `triplets`: on the trunk cache, its rows gathered by one index
    operation per batch; on the images, decoded by the DataLoader's workers."""
    if isinstance(source, trunk_cache.TrunkFeatures):
        return ((source.rows(batch_rows(triplets, batch)), [len(triplets[i][2]) for i in batch]) for batch in batches)
    tuples = TripletImages(source, triplets)
    return DataLoader(tuples, batch_sampler=batches, collate_fn=collate_triplets, **loading(opt, tuples))


def triplet_indices(neg_counts):
    """Rows of the anchor, positive and negative of every triplet of a batch laid out as collate_triplets does."""
    anchor, positive, negative = [], [], []
    start = 0
    for count in neg_counts:
        anchor += [start] * count
        positive += [start + 1] * count
        negative += range(start + 2, start + 2 + count)
        start += 2 + count
    return anchor, positive, negative


def triplet_terms(descriptors, neg_counts, margin, loss='reference'):
    """The loss of every triplet of a batch (--loss, see the module docstring) from its descriptors [sum(2 + n), D].

    The rows are gathered with index_select: the backward of advanced indexing with repeated rows (each query and
    positive stands in every triplet of its negatives) accumulates with atomic adds on several CPU threads, in an
    order that varies from run to run, so the same seed would not give the same training."""
    rows = [torch.tensor(r, device=descriptors.device) for r in triplet_indices(neg_counts)]
    query, pos, neg = (descriptors.index_select(0, r) for r in rows)
    if loss == 'paper':
        return F.relu((query - pos).square().sum(1) + margin - (query - neg).square().sum(1))
    return F.triplet_margin_loss(query, pos, neg, margin=margin ** 0.5, p=2, reduction='none')


def triplet_loss(descriptors, neg_counts, margin, loss='reference'):
    """The batch's loss: its triplets' summed loss divided by the number of negatives (reference) or of violating
    triplets (paper)."""
    terms = triplet_terms(descriptors, neg_counts, margin, loss)
    if loss == 'paper':
        return terms.sum() / (terms > 0).sum().clamp_min(1)
    return terms.sum() / len(terms)


# ---------------------------------------------------------------------------------------------- distributed

def init_distributed(opt):
    """Rank and world size; under torchrun, joins the process group (NCCL on GPUs, gloo on CPUs)."""
    world = torchrun_process()[1]
    if world == 1:
        return 0, 1
    use_cuda = opt.cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    if not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    return dist.get_rank(), world


def gather_rows(rows, world):
    """Concatenate, in rank order, the [n_r, D] arrays of every rank (n_r may differ by one)."""
    if world == 1:
        return rows
    size = torch.tensor([len(rows)])
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    padded = torch.zeros(int(max(sizes)), rows.shape[1], dtype=rows.dtype)
    padded[:len(rows)] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])


# ---------------------------------------------------------------------------------------------- training

def no_training_positive_text(truth, opt):
    """Why no training query has a positive: none within the radius, or only trivial ones, which the floor (the
    dataset's rule or --min_positive_dist) or the dataset's other-time rule removes."""
    radius = math.sqrt(truth.nonTrivPosDistSqThr)
    where = f'the training split {truth.name} of --dataset={opt.dataset} (--dataPath={opt.dataPath})'
    if not any(len(p) for p in positives_within(truth, radius)):
        return f'No query of {where} has a database image within {radius:.0f} m: nothing to train on.'
    floor = truth.min_train_pos_dist or 0.0
    other_time = ' or was taken at its own time (the dataset\'s rule)' if truth.train_pos_other_time else ''
    return (f'Every database image within {radius:.0f} m of a query of {where} lies within {floor:g} m of it'
            f'{other_time}: such trivial positives do not train, so nothing is left to train on. The {floor:g} m '
            f'floor is the larger of --min_positive_dist={opt.min_positive_dist:g} (--recipe authors sets 1 m) and '
            f'the dataset\'s own; lower --min_positive_dist, or train on a split whose queries have database images '
            f'farther away.')


class TrainingData:
    """The training split with what mining needs: positives, negatives pool, and the descriptor cache."""

    def __init__(self, opt):
        self.whole = with_positive_floor(load_dataset(opt, 'train'), opt.min_positive_dist)
        struct = self.whole.db_struct
        self.num_db = struct.numDb
        nontrivial = self.whole.nontrivial_positives()
        self.potential = self.whole.positives()
        self.queries = np.array([q for q, p in enumerate(nontrivial) if len(p) > 0])
        self.nontrivial = nontrivial
        if len(self.queries) == 0:
            raise UserError(no_training_positive_text(struct, opt))

    def refresh_cache(self, model, source, rows, opt, device, rank, world, cache=None):
        """Descriptors of the given whole-set rows into the float16 cache (computed sharded across ranks).

        source: the whole set's images, or their trunk output (trunk_cache) when `model` is the trainable layers."""
        shard = rows[rank::world]
        descriptors = extract_descriptors(unwrap(model), Subset(source, shard.tolist()), opt, device, 'cache')
        gathered = gather_rows(torch.from_numpy(descriptors).half(), world)
        order = np.concatenate([rows[r::world] for r in range(world)])
        if cache is None:
            cache = torch.zeros(len(self.whole), gathered.shape[1], dtype=torch.float16)
        cache[torch.from_numpy(order)] = gathered
        return cache


def unwrap(model):
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model


def chunk_triplets(data, source, model, chunk, hard_negatives, opt, device, rng, rank, world):
    """Refresh the cache for a chunk of queries and mine its triplets (rows into the whole set), updating the
    queries' memory of hard negatives (--neg_memory; a query without a positive keeps its memory)."""
    positives = pad_rows([data.nontrivial[q] for q in chunk])
    candidates = draw_negative_candidates(rng, data.num_db, [data.potential[q] for q in chunk], opt.nNegSample)
    candidates = unique_per_row(np.concatenate([candidates, hard_negatives[chunk]], axis=1))
    query_rows = data.num_db + chunk
    needed = np.unique(np.concatenate([query_rows, positives[positives >= 0], candidates[candidates >= 0]]))
    cache = data.refresh_cache(model, source, needed, opt, device, rank, world)
    nearest = opt.nNegCache if opt.neg_memory == 'nearest' else 0
    mined = mine_triplets(cache, torch.from_numpy(query_rows), data.num_db, torch.from_numpy(positives),
                          torch.from_numpy(candidates), opt.margin, opt.nNeg, opt.loss, nearest)
    remembered = (mined.nearest if nearest else mined.negatives).numpy()
    mined_queries = positives[:, 0] >= 0
    hard_negatives[chunk[mined_queries]] = -1
    hard_negatives[chunk[mined_queries], :remembered.shape[1]] = remembered[mined_queries]
    return [(int(data.num_db + q), int(p), [int(n) for n in negs if n >= 0])
            for q, p, negs, ok in zip(chunk, mined.positives, mined.negatives, mined.usable) if ok]


def memory_width(opt):
    """Hard negatives remembered per query."""
    return opt.nNegCache if opt.neg_memory == 'nearest' else opt.nNeg


def epoch_queries(data, opt, rng):
    """The training queries of an epoch, in order: the queries with a positive (--batch_queries violating, port), or
    every query cut to whole batches (all, trainWeakly.m)."""
    if opt.batch_queries != 'all':
        return rng.permutation(data.queries)
    order = rng.permutation(data.whole.db_struct.numQ)
    return order[:len(order) // opt.batchSize * opt.batchSize]


def lr_drops_before(epoch, opt):
    return (epoch - 1) // opt.lrStep if opt.optim == 'SGD' and opt.lrGamma < 1 else 0


def refresh_interval(opt, epoch, num_queries):
    """Queries between cache refreshes in `epoch`: --cacheRefreshRate (0: the whole epoch), in whole batches under
    --batch_queries all (trainWeakly.m: ceil(compFeatsFrequency / batchSize) batches), multiplied by 1/lrGamma and
    rounded at every learning-rate drop so far with --refresh_doubling on."""
    if not opt.cacheRefreshRate:
        return num_queries
    unit = opt.batchSize if opt.batch_queries == 'all' else 1
    interval = math.ceil(opt.cacheRefreshRate / unit)
    if opt.refresh_doubling == 'on':
        for _ in range(lr_drops_before(epoch, opt)):
            interval = round(interval / opt.lrGamma)
    return max(1, interval) * unit


def rank_batches(data, chunk, triplets, opt, rank, world):
    """(triplets, batches, counts) of this rank: its triplets, its batches as lists of indices into them, and each
    batch's number of queries with a positive. --batch_queries violating packs the rank's equal share of triplets
    into full batches; port and all keep the chunk's batches of --batchSize queries, each without the queries that
    found no triplet (a batch left without one is empty)."""
    if opt.batch_queries == 'violating':
        share = len(triplets) // world  # equal shares: every rank runs the same number of steps
        mine = triplets[rank * share:(rank + 1) * share]
        batches = [list(range(start, min(start + opt.batchSize, len(mine))))
                   for start in range(0, len(mine), opt.batchSize)]
        return mine, batches, [len(b) for b in batches]
    position = {int(q): i for i, q in enumerate(chunk)}
    groups = math.ceil(len(chunk) / opt.batchSize)
    batches = [[] for _ in range(groups)]
    for index, (query_row, _, _) in enumerate(triplets):
        batches[position[query_row - data.num_db] // opt.batchSize].append(index)
    with_positive = [len(data.nontrivial[q]) > 0 for q in chunk]
    counts = [sum(with_positive[g * opt.batchSize:(g + 1) * opt.batchSize]) for g in range(groups)]
    share = groups // world
    return triplets, batches[rank * share:(rank + 1) * share], counts[rank * share:(rank + 1) * share]


def make_optimizer(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == 'ADAM':  # the reference gives Adam no weight decay; --weightDecay only when given
        weight_decay = opt.weightDecay if 'weightDecay' in opt.explicit else 0.0
        optimizer = torch.optim.Adam(params, lr=opt.lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weightDecay)
    # the paper's schedule halves SGD's rate every lrStep epochs; Adam keeps its rate, as in the reference
    gamma = opt.lrGamma if opt.optim == 'SGD' else 1.0
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=opt.lrStep, gamma=gamma)
    return optimizer, scheduler


def train_chunk(model, source, triplets, optimizer, opt, device, progress, writer, step, batches=None, counts=None):
    """One pass over the mined triplets of a chunk (this rank's share of them); source as in refresh_cache.

    batches: lists of indices into `triplets`, one step each (default: consecutive --batchSize triplets); counts: each
    batch's number of queries with a positive, which --logged_loss queries divides by. Returns the step count and
    the logged loss of every batch (an empty batch logs 0 under --logged_loss queries, as trainWeakly.m)."""
    if batches is None:
        batches = [list(range(s, min(s + opt.batchSize, len(triplets)))) for s in range(0, len(triplets), opt.batchSize)]
        counts = [len(b) for b in batches]
    filled = [b for b in batches if b]
    model.train()
    losses = [0.0] * (len(batches) - len(filled) if opt.logged_loss == 'queries' else 0)
    filled_counts = [c for b, c in zip(batches, counts) if b]
    logged, first_step, started = [], step, [time.time()]
    for (images, neg_counts), count in zip(triplet_batches(source, triplets, filled, opt), filled_counts):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(opt.precision, device):
            descriptors = model(images)
        loss = triplet_loss(descriptors.float(), neg_counts, opt.margin, opt.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        logged.append((logged_loss(loss, descriptors, neg_counts, count, opt), len(images), neg_counts))
        progress.update(len(neg_counts))
        started.append(time.time())
    losses += log_steps(logged, first_step, started, progress, writer)
    return step, losses


def logged_loss(loss, descriptors, neg_counts, count, opt):
    """(the loss --logged_loss logs, as a tensor, and what its value is divided by): the minimised loss, or the sum
    over the batch of its queries' losses, divided by the batch's `count` queries. Kept as a tensor, the value is
    read once per chunk (log_steps), so that a CUDA step never waits for the host."""
    if opt.logged_loss == 'batch':
        return loss.detach(), 1
    with torch.no_grad():
        return triplet_terms(descriptors.float(), neg_counts, opt.margin, opt.loss).sum(), count


def log_steps(logged, first_step, started, progress, writer):
    """The logged losses of a chunk's steps (read from the device at once), shown on the progress bar and written
    to TensorBoard with each step's negatives and images/s (started: the time each step began, and the end)."""
    if not logged:
        return []
    values = torch.stack([value for (value, _), _, _ in logged]).tolist()
    losses = [value / divisor for value, ((_, divisor), _, _) in zip(values, logged)]
    progress.set_postfix(loss=f'{losses[-1]:.4f}')
    if writer is not None:
        for step, (loss, (_, images, neg_counts)) in enumerate(zip(losses, logged), first_step + 1):
            seconds = started[step - first_step] - started[step - first_step - 1]
            writer.add_scalar('Train/Loss', loss, step)
            writer.add_scalar('Train/nNeg', sum(neg_counts) / len(neg_counts), step)
            writer.add_scalar('Train/images_per_s', images / seconds, step)
    return losses


def train_epoch(model, data, source, optimizer, hard_negatives, opt, device, epoch, num_epochs, rank_world, writer,
                step):
    """One epoch: queries in an order drawn from (seed, epoch), the cache refreshed and mined chunk by chunk.

    `model` runs on `source`: the whole network on data.whole, or its trainable layers on the trunk cache."""
    rank, world = rank_world
    rng = np.random.default_rng([opt.seed, epoch])
    torch.manual_seed(opt.seed * 1000 + epoch)
    order = epoch_queries(data, opt, rng)
    losses = []
    chunk_size = refresh_interval(opt, epoch, len(order))
    with tqdm(total=len(order), desc=f'epoch {epoch}/{num_epochs}', unit='query', disable=rank != 0) as bar:
        for start in range(0, len(order), chunk_size):
            chunk = order[start:start + chunk_size]
            triplets = chunk_triplets(data, source, model, chunk, hard_negatives, opt, device, rng, rank, world)
            mine, batches, counts = rank_batches(data, chunk, triplets, opt, rank, world)
            step, chunk_losses = train_chunk(model, source, mine, optimizer, opt, device, bar, writer, step, batches,
                                             counts)
            losses += chunk_losses
            bar.update(len(chunk) - sum(map(len, batches)))
    return step, losses


def training_splits(opt, rank=0):
    """The train split (with what mining needs) and, on rank 0, the val split; read before anything is written."""
    data = TrainingData(opt)
    val_set = load_dataset(opt, 'val') if rank == 0 else None
    if val_set is not None and opt.val_queries:
        val_set = query_sample(val_set, opt.val_queries, opt.seed)
    return data, val_set


def fit(model, splits, opt, device, run_dir, num_epochs, state=None, save=True, on_checkpoint=None):
    """Train `model` for epochs state['epoch']+1 .. num_epochs on `splits` (see training_splits), validating every
    --evalEvery epochs and at the last one, and checkpointing into run_dir at the end of every epoch.

    Also used to fine-tune pruned (prune.py) and fake-quantised (quantize.py) models, with save=False.
    on_checkpoint() runs after each checkpoint is written. Returns the final training state (epoch, best score,
    recalls, ...).
    """
    rank, world = init_distributed(opt)
    data, val_set = splits
    logging.info('%s; %s', trainable_layers_text(model), recipe_text(opt))
    model = model.to(device).to(memory_format=torch.channels_last)
    network, source, train_opt = training_inputs(model, data, opt, device, run_dir, rank)
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(network)
    elif opt.nGPU > 1 and device.type == 'cuda' and torch.cuda.device_count() > 1:
        network = torch.nn.DataParallel(network, device_ids=list(range(opt.nGPU)))
    optimizer, scheduler = make_optimizer(network, opt)
    state = dict(state or {})
    width = memory_width(opt)
    hard_negatives = np.full((data.whole.db_struct.numQ, width), -1, dtype=np.int64)
    if 'optimizer' in state:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if 'lr' in opt.explicit:  # a learning rate given when resuming replaces the stored one
            for group in optimizer.param_groups:
                group['lr'] = group['initial_lr'] = opt.lr
        stored = state['hard_negatives'].numpy()
        hard_negatives[:, :min(width, stored.shape[1])] = stored[:, :width]
    epoch = state.get('epoch', 0)
    best_score, not_improved = state.get('best_score', 0.0), state.get('not_improved', 0)
    best_epoch, best_curve = state.get('best_epoch', 0), state.get('best_curve')
    writer = tensorboard_writer(run_dir) if rank == 0 and save else None
    step = state.get('step', 0)
    recalls = state.get('recalls', {})
    epoch_losses = list(state.get('epoch_losses', []))
    try:
        while epoch < num_epochs:
            epoch += 1
            step, losses = train_epoch(network, data, source, optimizer, hard_negatives, train_opt, device, epoch,
                                       num_epochs, (rank, world), writer, step)
            scheduler.step()
            epoch_losses.append(float(np.mean(losses)) if losses else float('nan'))
            if writer is not None:
                writer.add_scalar('Train/lr', optimizer.param_groups[0]['lr'], epoch)
            validated = epoch % opt.evalEvery == 0 or epoch == num_epochs
            is_best = False
            if validated:
                recalls, curve = validate(model, val_set, opt, device, rank, world)
                score = recalls.get(5, recalls[max(recalls)])
                is_best = improves(curve, best_curve) if opt.best_epoch == 'authors' else score > best_score
                best_score, not_improved = (score, 0) if is_best else (best_score, not_improved + opt.evalEvery)
                best_epoch, best_curve = (epoch, curve) if is_best else (best_epoch, best_curve)
                if writer is not None:
                    for n, recall in recalls.items():
                        writer.add_scalar(f'Val/Recall_{n}', recall, epoch)
                logging.info('Epoch %d: Recall@5 %.4f (best %.4f)%s', epoch, score, best_score,
                             ' *' if is_best else '')
            state = dict(epoch=epoch, recalls=recalls, best_score=best_score, best_epoch=best_epoch,
                         best_curve=best_curve, not_improved=not_improved,
                         step=step, epoch_losses=epoch_losses, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), hard_negatives=torch.from_numpy(hard_negatives),
                         parallel=world > 1)
            if save and rank == 0:  # every epoch: a killed run loses at most the epoch it was in
                save_checkpoint(dict(model_state(model), **state), run_dir, is_best)
                if on_checkpoint is not None:
                    on_checkpoint()
            if validated and opt.patience and not_improved >= opt.patience:
                logging.info('No better Recall@5 for %d epochs: stopping early.', not_improved)
                break
    finally:
        if source is not data.whole:
            source.release()
    if writer is not None:
        writer.close()
    return state


def training_inputs(model, data, opt, device, run_dir, rank):
    """What fit trains, on what, with which loader options: the whole model on the images, or (trunk cache, see
    trunk_cache.py) its trainable layers on the frozen trunk's output, computed here once for every training image."""
    if not trunk_cache.applies(model, data.whole, opt):
        return model, data.whole, opt
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    source = trunk_cache.compute(model, data.whole, opt, device, run_dir, rank, local_world)
    return trunk_cache.TrainableLayers(model), source, trunk_cache.loader_options(opt)


def validate(model, val_set, opt, device, rank, world):
    """(Recall@N, Recall@1..25 curve) on the val split, computed by rank 0 and shared with the other ranks."""
    result = [None]
    if rank == 0:
        evaluated = evaluate(model, val_set, opt, device)
        log_recalls(evaluated['recalls'])
        result[0] = evaluated['recalls'], evaluated['curve']
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def improves(curve, best_curve):
    """Whether a validation's Recall@1..25 `curve` beats the best epoch's by the authors' rule (getBestEpoch.m):
    compare Recall@5, then @4 .. @1, then @10, @15, ...; recalls within TIE_TOLERANCE are equal, and an equal epoch
    never replaces an earlier one."""
    if best_curve is None:
        return True
    for n in [n for n in [5, 4, 3, 2, 1] if n <= len(curve)] + list(range(10, len(curve) + 1, 5)):
        difference = curve[n - 1] - best_curve[n - 1]
        if abs(difference) >= TIE_TOLERANCE:
            return difference > 0
    return False


def tensorboard_writer(run_dir):
    from tensorboardX import SummaryWriter
    return SummaryWriter(log_dir=os.path.join(run_dir, 'tensorboard'))
