"""The training mechanism, pinned: from fixed weights and fixed mined batches, the project's training steps give the
loss and the parameters that an independent float64 computation gives (the reference port's loss, torch's SGD and
Adam update rules written out), for SGD and Adam, with and without weight decay."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tqdm import tqdm

from helpers import alexnet_trunk, netvlad_reference, read_image
from netvlad_toolkit.model.centroids import new_model
from netvlad_toolkit.training import training

BETAS, ADAM_EPS, MOMENTUM = (0.9, 0.999), 1e-8, 0.9
PAIRWISE_EPS = 1e-6  # torch's pairwise distance adds it to the difference: ||a - b + eps||
NEG_COUNTS = ([3, 1, 4, 2], [2, 3, 1, 4])  # two batches of 4 queries with different numbers of negatives
# Adam trains conv5 and NetVLAD only, as a run from ImageNet weights: Adam divides each gradient by its own size, so
# the earlier layers' gradients of the order of its eps (1e-8), whose float32 rounding is relatively large, would
# decide the comparison with the float64 computation rather than the mechanism.
TRAIN_FROM_CONV5 = ['--backPropToLayer', 'conv5']


def fixed_triplets(whole):
    """Two batches of (query row, positive row, negative rows) from the split's ground truth, drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    num_db = whole.db_struct.numDb
    nontrivial, potential = whole.nontrivial_positives(), whole.positives()
    queries = [q for q in range(whole.db_struct.numQ) if len(nontrivial[q])][:8]
    counts = [c for batch in NEG_COUNTS for c in batch]
    triplets = []
    for q, count in zip(queries, counts):
        negatives = rng.permutation(np.setdiff1d(np.arange(num_db), potential[q]))[:count]
        triplets.append((num_db + q, int(nontrivial[q][0]), [int(n) for n in negatives]))
    return triplets


def reference_loss(descriptors, neg_counts, margin):
    """The port's TripletMarginLoss(margin=sqrt(margin), p=2), triplet by triplet, summed, over the negatives."""
    total, row = 0.0, 0
    for count in neg_counts:
        query, positive = descriptors[row], descriptors[row + 1]
        for n in range(count):
            negative = descriptors[row + 2 + n]
            d_pos = (query - positive + PAIRWISE_EPS).norm()
            d_neg = (query - negative + PAIRWISE_EPS).norm()
            total = total + torch.clamp(d_pos - d_neg + math.sqrt(margin), min=0)
        row += 2 + count
    return total / sum(neg_counts)


def reference_forward(images, params):
    features = alexnet_trunk(images, params)
    weight = params['pool.conv.weight'][:, :, 0, 0]
    return netvlad_reference(features, weight, None, params['pool.centroids'])


def reference_steps(params, trainable, batches, optim, lr, weight_decay, margin):
    """torch's update rules written out (SGD with momentum; Adam with L2 weight decay added to the gradient), for
    the parameters named in `trainable`."""
    params = {k: v.detach().double().clone().requires_grad_(k in trainable) for k, v in params.items()}
    state = {k: dict(buf=None, m=torch.zeros_like(v), v=torch.zeros_like(v)) for k, v in params.items()}
    losses = []
    for step, (images, neg_counts) in enumerate(batches, 1):
        loss = reference_loss(reference_forward(images, params), neg_counts, margin)
        grads = torch.autograd.grad(loss, [params[k] for k in trainable])
        losses.append(loss.item())
        with torch.no_grad():
            for name, grad in zip(trainable, grads):
                p = params[name]
                g = grad + weight_decay * p
                s = state[name]
                if optim == 'SGD':
                    s['buf'] = g.clone() if s['buf'] is None else MOMENTUM * s['buf'] + g
                    p -= lr * s['buf']
                else:
                    s['m'] = BETAS[0] * s['m'] + (1 - BETAS[0]) * g
                    s['v'] = BETAS[1] * s['v'] + (1 - BETAS[1]) * g * g
                    m_hat = s['m'] / (1 - BETAS[0] ** step)
                    v_hat = s['v'] / (1 - BETAS[1] ** step)
                    p -= lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
    return losses, {k: v.detach() for k, v in params.items()}


def fixed_model(opt, whole):
    """The seeded --fromscratch network; NetVLAD centroids are means of three of its local features each, with a
    soft assignment (weight 5 times the unit centroids) in which no cluster's weight underflows float32."""
    model = new_model(opt)
    images = torch.stack([whole[i][0] for i in range(16)])
    with torch.no_grad():
        local = torch.nn.functional.normalize(model.encoder(images).flatten(2), dim=1)
        local = local.transpose(1, 2).reshape(-1, local.shape[1])
        groups = torch.from_numpy(np.random.default_rng(1).choice(len(local), (opt.num_clusters, 3), replace=False))
        centroids = local[groups].mean(dim=1)
        model.pool.centroids.copy_(centroids)
        model.pool.conv.weight.copy_(5.0 * torch.nn.functional.normalize(centroids, dim=1)[:, :, None, None])
    return model


@pytest.mark.parametrize('optim, lr, flags, weight_decay, wrong_decay, steps', [
    ('SGD', 0.01, [], 1e-3, 0.0, 2),                      # SGD keeps the default weight decay
    ('SGD', 0.01, ['--weightDecay=0'], 0.0, 1e-3, 2),     # two steps: the momentum acts in the second
    ('ADAM', 0.00001, TRAIN_FROM_CONV5, 0.0, 1e-3, 1),   # Adam: none unless given, as the reference
    ('ADAM', 0.00001, TRAIN_FROM_CONV5 + ['--weightDecay=0.001'], 1e-3, 0.0, 1),
], ids=['sgd-default-decay', 'sgd-no-decay', 'adam-default-no-decay', 'adam-explicit-decay'])
def test_training_steps_match_independent_computation(tiny_data, make_opt, optim, lr, flags, weight_decay,
                                                       wrong_decay, steps):
    opt = make_opt(['--mode=train', '--dataset=synthetic', '--dataPath', tiny_data, '--arch=alexnet', '--fromscratch',
                    '--nocuda', '--threads=0', '--optim', optim, '--lr', lr, *flags])
    data = training.TrainingData(opt)
    model = fixed_model(opt, data.whole)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    triplets = fixed_triplets(data.whole)[:4 * steps]

    optimizer, _ = training.make_optimizer(model, opt)
    with tqdm(disable=True) as progress:
        _, losses = training.train_chunk(model, data.whole, triplets, optimizer, opt, torch.device('cpu'), progress,
                                         None, 0)

    paths = data.whole.paths
    batches = []
    for first in range(0, len(triplets), 4):
        batch = triplets[first:first + 4]
        rows = [r for q, p, negs in batch for r in (q, p, *negs)]
        batches.append((torch.stack([read_image(paths[r]) for r in rows]), [len(t[2]) for t in batch]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected_losses, expected = reference_steps(start, trainable, batches, optim, lr, weight_decay, opt.margin)
    wrong = reference_steps(start, trainable, batches, optim, lr, wrong_decay, opt.margin)[1]

    assert len(losses) == steps and expected_losses[0] > 0.01
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5)
    trained = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(trained[name].double(), value, rtol=0, atol=1e-5, msg=lambda m: f'{name}: {m}')
        assert (trained[name].double() - value).norm() <= update_tolerance(start[name], value), name
    # the weight decay is visible in these steps: the wrong decay would have failed the update check above
    assert any((wrong[k] - value).norm() > 3 * update_tolerance(start[k], value) for k, value in expected.items())


def update_tolerance(start, expected):
    """1e-3 of the update's norm, plus the float32 rounding of the parameters (before and after)."""
    return 1e-3 * (expected - start.double()).norm() + 2 * 2 ** -23 * (start.double().norm() + expected.norm())


def port_mining(descriptors, num_db, queries, nontrivial, candidates, margin, num_neg):
    """The port's QueryDatasetFromStruct.__getitem__, for each query in order, on float64 descriptors [N, D]: the
    positive nearest in descriptor space among the non-trivial ones; the nNeg*10 nearest of the candidate negatives;
    of those, the violating ones (d(q,n) < d(q,p) + sqrt(margin)), at most nNeg, nearest first; a query without a
    violating negative is skipped."""
    triplets = []
    for q, query_candidates in zip(queries, candidates):
        query = descriptors[num_db + q]
        positives = np.asarray(nontrivial[q])
        d_pos = np.linalg.norm(descriptors[positives] - query, axis=1)
        sample = np.unique(query_candidates[query_candidates >= 0])
        d_neg = np.linalg.norm(descriptors[sample] - query, axis=1)
        nearest = np.argsort(d_neg, kind='stable')[:num_neg * 10]
        violating = nearest[d_neg[nearest] < d_pos.min() + math.sqrt(margin)][:num_neg]
        if len(violating):
            triplets.append((num_db + int(q), int(positives[d_pos.argmin()]), [int(n) for n in sample[violating]]))
    return triplets


def test_the_users_train_command_mines_batches_and_steps_as_the_port(tiny_data, make_opt, monkeypatch):
    """The user's command (Adam, lr 1e-4, reference loss, batch 4, nNeg 10): from one cache refresh, the mined
    triplets, their batches, the losses and the parameters after the first steps equal the port's procedure written
    out in float64 here (mining per query, batches of 4 in query order, TripletMarginLoss over the negatives, Adam)."""
    opt = make_opt(['--mode=train', '--dataset=synthetic', '--dataPath', tiny_data, '--arch=alexnet', '--fromscratch',
                    '--nocuda', '--threads=0', '--optim', 'ADAM', '--lr', '0.0001', '--nNegSample', '40',
                    *TRAIN_FROM_CONV5])
    data = training.TrainingData(opt)
    model = fixed_model(opt, data.whole)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    chunk = data.queries[:12]
    rng = np.random.default_rng(5)
    drawn = training.draw_negative_candidates(np.random.default_rng(5), data.num_db,
                                              [data.potential[q] for q in chunk], opt.nNegSample)
    hard_negatives = np.full((data.whole.db_struct.numQ, opt.nNeg), -1)
    triplets = training.chunk_triplets(data, data.whole, model, chunk, hard_negatives, opt, torch.device('cpu'), rng,
                                       0, 1)

    paths = data.whole.paths
    with torch.no_grad():
        reference = reference_forward(torch.stack([read_image(p) for p in paths]), start).numpy()
    expected = port_mining(reference, data.num_db, chunk, data.nontrivial, drawn, opt.margin, opt.nNeg)
    assert len(expected) >= 8 and triplets == expected

    steps = 2
    optimizer, _ = training.make_optimizer(model, opt)
    with tqdm(disable=True) as progress:
        _, losses = training.train_chunk(model, data.whole, triplets[:4 * steps], optimizer, opt,
                                         torch.device('cpu'), progress, None, 0)
    batches = []
    for first in range(0, 4 * steps, 4):
        batch = expected[first:first + 4]
        rows = [r for q, p, negs in batch for r in (q, p, *negs)]
        batches.append((torch.stack([read_image(paths[r]) for r in rows]), [len(t[2]) for t in batch]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected_losses, expected_params = reference_steps(start, trainable, batches, 'ADAM', 1e-4, 0.0, opt.margin)
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5)
    trained = model.state_dict()
    for name, value in expected_params.items():
        assert (trained[name].double() - value).norm() <= update_tolerance(start[name], value), name


@pytest.mark.parametrize('loss', training.LOSSES)
def test_the_loss_gradient_is_the_same_in_every_run_on_several_threads(loss):
    """A batch's loss gradient is bitwise the same every time on two CPU threads: nothing in it accumulates in an
    order that varies (the backward of advanced indexing with repeated rows did, and a seed did not fix a run)."""
    counts = [10, 9, 7, 7]
    descriptors = F.normalize(torch.randn(sum(counts) + 8, 16384, generator=torch.Generator().manual_seed(0)), dim=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = []
        for _ in range(100):
            rows = descriptors.clone().requires_grad_()
            training.triplet_loss(rows, counts, 0.1, loss).backward()
            gradients.append(rows.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])
