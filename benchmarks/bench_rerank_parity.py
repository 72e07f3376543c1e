"""Patch-NetVLAD re-ranking side by side with QVPR/Patch-NetVLAD's own code, on the same whitened run and images.

    git --git-dir=MIRROR archive HEAD patchnetvlad/__init__.py patchnetvlad/models patchnetvlad/tools \\
        patchnetvlad/configs | tar -x -C /tmp/patchnetvlad          # the original's package, never committed
    python benchmarks/bench_rerank_parity.py --patchnetvlad_repo /tmp/patchnetvlad --workdir /tmp/bench_rerank

The run is bench_rerank.py's (built in --workdir, or reused from there): the synthetic test split, AlexNet whitened
by --mode=pca, the global search's first 100 candidates of each query (at most the database). For each of the
original's three configs (configs/<name>.ini, num_pcs cut to the run's whitening):

- patch descriptors: the toolkit's (patch_netvlad.patch_features) beside the original's PatchNetVLAD pooling and
  WPCA layer (models_generic.get_model, with the run's centroids, soft-assignment and whitening loaded) on the
  same feature map, each in float32 as it runs, and both in float64 (patch_netvlad.patch_descriptors on a float64
  copy of the layer); --assignment_scale 0.01 repeats it with every cluster well assigned everywhere;
- matching and scores: the original's local_matcher (reading its .npy files, as it does) and PatchMatcher beside
  the toolkit's rerank, both on the original's descriptors (so that only the matching differs): mutual matches,
  per-size scores, fused scores, re-ranked orders. RANSAC is random: cv2 is seeded (cv2.setRNGSeed), and the
  same 4-point hypotheses are also scored by both (cv2.getPerspectiveTransform and cv2.perspectiveTransform
  against the toolkit's four_point_homographies and within);
- time per query of the matching (one thread, process time): the original's PatchMatcher loop, the toolkit's
  batched matcher, and the toolkit's former per-candidate matcher (per_candidate_scores below, kept here only),
  with Recall@N and the inlier counts of the former and the batched one;
- RANSAC, the batched matcher against the same seeded search run one candidate and one hypothesis at a time
  (loop_scores, written here): inlier counts per (candidate, size), orders and Recall@N.

Shims, all here: faiss and sklearn.neighbors (imported at the top of the original's modules, used only to
initialise clusters) are stand-in modules; the original computes patch centres for VGG16's 16-pixel stride from
feature_match imageresizeH/W, which is set to 16 x the feature map (AlexNet's map of this run); its box filter is made in torch's default dtype,
set to float64 for its float64 run; descriptors are
handed to the matcher in memory (the same .npy layout feature_extract.py writes: [num_pcs, patches]).
"""
import argparse
import configparser
import copy
import datetime
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rerank import SIZES, cpu_name, recalls, whitened_run  # noqa: E402
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.datasets import load_dataset  # noqa: E402
from netvlad_toolkit.runs.runs import load_model, place_model  # noqa: E402
from netvlad_toolkit.search import patch_netvlad as pn  # noqa: E402
from netvlad_toolkit.search.retrieval import exact_search  # noqa: E402

TIE = 1e-9  # fused scores closer than this are a tie (their order is the sort's)
SAME_HYPOTHESES = 50  # 4-point samples per (query, candidate, size) scored by both cv2 and the toolkit


def import_original(repo):
    """The original's modules (patchnetvlad.*) from the folder `repo`, with stand-ins for faiss and sklearn."""
    for name in ('faiss', 'sklearn', 'sklearn.neighbors'):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules['sklearn.neighbors'].NearestNeighbors = None
    sys.path.insert(0, os.path.abspath(repo))
    import cv2
    from patchnetvlad.models import local_matcher, models_generic
    from patchnetvlad.tools import patch_matcher
    return types.SimpleNamespace(cv2=cv2, local_matcher=local_matcher, models_generic=models_generic,
                                 patch_matcher=patch_matcher)


def original_config(repo, name, num_pcs, grid):
    config = configparser.ConfigParser()
    config.read(os.path.join(repo, 'patchnetvlad', 'configs', f'{name}.ini'))
    config['global_params']['num_pcs'] = str(num_pcs)
    for section in ('feature_extract', 'feature_match'):
        config[section]['imageresizeH'], config[section]['imageresizeW'] = str(16 * grid[0]), str(16 * grid[1])
    return config


def toolkit_config(config, name, top):
    params = config['global_params']
    return pn.configured(name, top, tuple(int(s) for s in params['patch_sizes'].split(',')),
                         tuple(int(s) for s in params['strides'].split(',')),
                         tuple(float(w) for w in config['feature_match']['patchWeights2Use'].split(',')),
                         int(params['num_pcs']), config['feature_match']['matcher'])


def original_model(original, model, config, dtype):
    """The original's PatchNetVLAD pooling and WPCA layer holding the run's clusters and whitening."""
    params = config['global_params']
    params['num_clusters'], params['vladv2'] = str(model.pool.num_clusters), str(model.pool.conv.bias is not None)
    net = original.models_generic.get_model(torch.nn.Identity(), model.pool.dim, params, append_pca_layer=True)
    num_pcs = int(params['num_pcs'])
    state = {'pool.centroids': model.pool.centroids, 'pool.conv.weight': model.pool.conv.weight,
             'WPCA.0.weight': model.whiten.weight[:num_pcs, :, None, None], 'WPCA.0.bias': model.whiten.bias[:num_pcs]}
    if model.pool.conv.bias is not None:
        state['pool.conv.bias'] = model.pool.conv.bias
    net.load_state_dict(state)
    return net.to(dtype).eval()


@torch.no_grad()
def original_descriptors(original, net, features):
    """Per image, per patch size, [num_pcs, patches] as feature_extract.py saves them (in the features' dtype:
    the original makes its box filter in the default dtype, set to theirs for the call)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(features.dtype)
    try:
        vlad_local, _ = net.pool(features)
    finally:
        torch.set_default_dtype(default)
    per_size = []
    for local in vlad_local:
        pca = original.models_generic.get_pca_encoding(net, local.permute(2, 0, 1).reshape(-1, local.size(1)))
        per_size.append(pca.reshape(local.size(2), local.size(0), -1).permute(1, 2, 0))
    return [[size[image].float().numpy() for size in per_size] for image in range(len(features))]


def extract(model, dataset, needed, original, nets, config, batch=8):
    """(toolkit PatchFeatures, toolkit float64 descriptors, original float32 descriptors, original float64
    descriptors), each a dict by image index, of the images `needed`."""
    toolkit, toolkit64, original32, original64 = [], [], [], []
    pool64 = copy.deepcopy(model.pool).double()
    weight, bias = (p.detach().double() for p in pn.patch_projection(model, config.pca_dim))
    for first in range(0, len(needed), batch):
        images = torch.stack([dataset[i][0] for i in needed[first:first + batch]])
        toolkit += pn.patch_features(model, images, config)[1]
        with torch.no_grad():
            features = model.features(images).float()
            exact = pn.patch_descriptors(features.double(), pool64, weight, bias, config.patch_sizes, config.strides)
        toolkit64 += [[size[image].numpy() for size in exact] for image in range(len(images))]
        original32 += original_descriptors(original, nets[0], features)
        original64 += original_descriptors(original, nets[1], features.double())
    return tuple(dict(zip(needed, values)) for values in (toolkit, toolkit64, original32, original64))


def descriptor_differences(toolkit, toolkit64, original32, original64):
    """Largest absolute differences: float32 (the toolkit's against the original's, each as it runs), float64
    (both computed in float64) and float32_to_64 (the toolkit's float32 against the original in float64)."""
    largest = {'float32': 0.0, 'float64': 0.0, 'float32_to_64': 0.0}
    for index, ours in toolkit.items():
        for mine, exact, a, b in zip(ours.descriptors, toolkit64[index], original32[index], original64[index]):
            largest['float32'] = max(largest['float32'], float(np.abs(mine - a.T).max(initial=0)))
            largest['float64'] = max(largest['float64'], float(np.abs(exact - b.T).max(initial=0)))
            largest['float32_to_64'] = max(largest['float32_to_64'], float(np.abs(mine - b.T).max(initial=0)))
    return largest


def as_features(descriptors, like):
    """PatchFeatures holding the original's descriptors [num_pcs, patches] per size, the toolkit's keypoints."""
    return pn.PatchFeatures([d.T.copy() for d in descriptors], like.keypoints, like.grid)


def original_scores(original, matcher, query, candidates, device):
    """The original's per-size scores [C, sizes] (negative, as PatchMatcher gives them) of one query, with its
    matching time (process time): its tensors as local_matcher loads them."""
    qfeat = [torch.transpose(torch.tensor(d, device=device), 0, 1) for d in query]
    dbfeats = [[torch.tensor(d, device=device) for d in candidate] for candidate in candidates]
    started = time.process_time()
    scores = np.array([matcher.match(qfeat, dbfeat)[0] for dbfeat in dbfeats])
    return scores, time.process_time() - started


def original_matches(original, query, candidate):
    """The original's mutual matches of one size as (query row, candidate row) pairs (compare_two_*'s code)."""
    forward, backward = original.patch_matcher.torch_nn(torch.tensor(query.T), torch.tensor(candidate))
    forward, backward = forward.numpy(), backward.numpy()
    mutual = np.atleast_1d(np.argwhere(backward[forward] == np.arange(len(forward))).squeeze())
    return set(zip(forward[mutual].tolist(), mutual.tolist()))


def same_hypotheses(original, source, target, threshold, rng):
    """Inlier counts of the same random 4-point hypotheses: cv2's (getPerspectiveTransform, perspectiveTransform,
    squared error <= threshold^2) and the toolkit's (four_point_homographies, within). (hypotheses, differing)."""
    cv2 = original.cv2
    samples = np.array([rng.choice(len(source), 4, replace=False) for _ in range(SAME_HYPOTHESES)])
    homographies = pn.four_point_homographies(torch.from_numpy(source[samples]), torch.from_numpy(target[samples]))
    usable = pn.same_orientation(homographies, torch.from_numpy(source[samples])).numpy()
    samples, homographies = samples[usable], homographies[usable]
    if not len(samples):
        return 0, 0, 0
    ours = pn.within(homographies, torch.from_numpy(source), torch.from_numpy(target), threshold).sum(dim=1).numpy()
    exact = pn.within(homographies, torch.from_numpy(source), torch.from_numpy(target), threshold, torch.float64)
    theirs = []
    for sample in samples:
        h = cv2.getPerspectiveTransform(source[sample].astype(np.float32), target[sample].astype(np.float32))
        projected = cv2.perspectiveTransform(source[None].astype(np.float64), h)[0]
        theirs.append(int((((projected - target) ** 2).sum(axis=1) <= threshold ** 2).sum()))
    return len(samples), int(np.sum(ours != np.array(theirs))), int(np.sum(exact.sum(dim=1).numpy() != theirs))


def per_candidate_scores(query, candidates, config):
    """The toolkit's former matcher, kept here for the side-by-side: per candidate and size, mutual matches by
    one product, and RANSAC by RANSAC_HYPOTHESES samples, a least-squares refit kept if no worse. [C, sizes]."""
    scores = np.zeros((len(candidates), len(config.patch_sizes)))
    for c, candidate in enumerate(candidates):
        for index, stride in enumerate(config.strides):
            similarity = torch.from_numpy(query.descriptors[index]) @ torch.from_numpy(candidate.descriptors[index]).T
            forward, backward = similarity.argmax(dim=1), similarity.argmax(dim=0)
            mutual = torch.nonzero(backward[forward] == torch.arange(len(forward))).flatten()
            source = candidate.keypoints[index][forward[mutual].numpy()]
            target = query.keypoints[index][mutual.numpy()]
            if len(mutual) < (4 if config.matcher == 'ransac' else 1):
                continue
            if config.matcher == 'ransac':
                score = former_ransac(source, target, pn.RANSAC_THRESHOLD * stride).sum()
            else:
                points = query.keypoints[index]
                shifts = source.astype(np.float64) - target
                score = ((points.max(axis=0) - points.min(axis=0) - np.abs(shifts - shifts.mean(axis=0))) ** 2).sum()
            scores[c, index] = score / len(query.descriptors[index])
    return scores


def former_ransac(source, target, threshold):
    """The former matcher's RANSAC of one candidate, with its own homography and inlier test (former_*)."""
    source, target = torch.from_numpy(source).double(), torch.from_numpy(target).double()
    samples = pn.ransac_samples(len(source))
    inliers = former_within(former_homographies(source[samples], target[samples]), source, target, threshold)
    best = inliers[inliers.sum(dim=1).argmax()]
    x, y, u, v = source[best, 0], source[best, 1], target[best, 0], target[best, 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    system = torch.cat([torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=1),
                        torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=1)])
    refit = torch.linalg.lstsq(system, torch.cat([u, v])[:, None]).solution[:, 0]
    refit_inliers = former_within(torch.cat([refit, refit.new_ones(1)]).reshape(1, 3, 3), source, target,
                                  threshold)[0]
    return (refit_inliers if refit_inliers.sum() >= best.sum() else best).numpy()


def former_adjugate(m):
    a, b, c = m.unbind(dim=-2)
    return torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=-1)


def former_from_basis(points):
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1).transpose(1, 2)  # [h, 3, 4]
    first_three = homogeneous[:, :, :3]
    return first_three * (former_adjugate(first_three) @ homogeneous[:, :, 3:]).transpose(1, 2)


def former_homographies(source, target):
    return former_from_basis(target) @ former_adjugate(former_from_basis(source))


def former_within(homographies, source, target, threshold):
    unit = homographies / torch.linalg.matrix_norm(homographies)[:, None, None]
    points = torch.cat([source, torch.ones_like(source[:, :1])], dim=1).float()  # [n, 3]
    x, y, w = (unit.float().reshape(-1, 3) @ points.T).reshape(len(homographies), 3, -1).unbind(dim=1)
    u, v = target.float().T
    dx, dy = torch.addcmul(x, u, w, value=-1), torch.addcmul(y, v, w, value=-1)
    return torch.addcmul(dx.square_(), dy, dy) <= w.mul_(threshold).square_()


def loop_scores(query, candidates, config):
    """The batched matcher's scores [C, sizes] computed one candidate and one hypothesis at a time (RANSAC: the
    same seeded samples in turn, OpenCV's orientation check from the triangles' signs, each homography from the
    null vector of the 8x9 linear system of its 4 points, the inlier test in float64, OpenCV's adaptive stop),
    written here independently of patch_netvlad's batched code; the mutual matches are mutual_matches' (checked against the
    original's above)."""
    scores = np.zeros((len(candidates), len(config.patch_sizes)))
    for index, stride in enumerate(config.strides):
        nearest, mutual = pn.mutual_matches(query.descriptors[index], [c.descriptors[index] for c in candidates])
        for c, candidate in enumerate(candidates):
            rows = mutual[c].nonzero()[:, 0].numpy()
            if len(rows) >= 4:
                source = candidate.keypoints[index][nearest[c, rows].numpy()].astype(np.float64)
                target = query.keypoints[index][rows].astype(np.float64)
                scores[c, index] = loop_ransac(source, target, pn.RANSAC_THRESHOLD * stride)
    return scores / [len(d) for d in query.descriptors]


def triangle_signs(points):
    signs = []
    for i, j, k in ((0, 1, 2), (1, 2, 3), (0, 2, 3), (0, 1, 3)):
        (ax, ay), (bx, by) = points[j] - points[i], points[k] - points[i]
        signs.append(np.sign(ax * by - ay * bx))
    return np.array(signs)


def loop_ransac(source, target, threshold):
    best, tried, needed = 0, 0, pn.RANSAC_HYPOTHESES
    for sample in pn.ransac_samples(len(source)).tolist():
        product = triangle_signs(source[sample]) * triangle_signs(target[sample])
        if not (np.all(product > 0) or np.all(product < 0)):
            continue
        system = []
        for (x, y), (u, v) in zip(source[sample], target[sample]):
            system += [[x, y, 1, 0, 0, 0, -u * x, -u * y, -u], [0, 0, 0, x, y, 1, -v * x, -v * y, -v]]
        h = np.linalg.svd(np.array(system))[2][-1].reshape(3, 3)  # the null vector (h_33 may be 0)
        projected = np.c_[source, np.ones(len(source))] @ h.T
        with np.errstate(divide='ignore', invalid='ignore'):  # points mapped to infinity: no inliers
            count = int((np.linalg.norm(projected[:, :2] / projected[:, 2:] - target, axis=1) <= threshold).sum())
        tried += 1
        if count > best:
            best, ratio = count, count / len(source)
            needed = 0 if ratio == 1 else min(pn.RANSAC_HYPOTHESES, round(np.log(1 - pn.RANSAC_CONFIDENCE) /
                                                                          np.log(1 - ratio ** 4)))
        if tried >= needed:
            break
    return best


def batched_scores(query, candidates, config):
    return np.stack([pn.size_scores(query, candidates, index, config)[0]
                     for index in range(len(config.patch_sizes))], axis=1)


def timed(function, *args):
    started = time.process_time()
    result = function(*args)
    return result, time.process_time() - started


def order_of(fused, candidates):
    return candidates[np.argsort(-fused, kind='stable')]


def compare_config(name, args, original, model, dataset, predictions, out_dir):
    num_db = dataset.db_struct.numDb
    with torch.no_grad():
        grid = tuple(model.features(dataset[0][0][None]).shape[2:])
    config_ini = original_config(args.patchnetvlad_repo, name, min(pn.RERANK_CONFIGS[name].pca_dim,
                                                                   model.whiten.out_features), grid)
    config = toolkit_config(config_ini, name, predictions.shape[1])
    nets = [original_model(original, model, config_ini, dtype) for dtype in (torch.float32, torch.float64)]
    needed = sorted(set(predictions.ravel().tolist()) | set(range(num_db, num_db + len(predictions))))
    toolkit, toolkit64, original32, original64 = extract(model, dataset, needed, original, nets, config)
    largest = descriptor_differences(toolkit, toolkit64, original32, original64)
    patch_sizes = list(config.patch_sizes)
    keypoints, indices = zip(*[original.local_matcher.calc_keypoint_centers_from_patches(
        config_ini['feature_match'], size, size, stride, stride) for size, stride in zip(patch_sizes, config.strides)])
    matcher = original.patch_matcher.PatchMatcher(config_ini['feature_match']['matcher'], patch_sizes,
                                                  list(config.strides), list(keypoints), list(indices))
    theirs = {i: as_features(original32[i], toolkit[i]) for i in needed}
    stats = dict(queries=len(predictions), score_diff=0.0, fused_diff=0.0, same_order=0, same_order_former=0,
                 match_sets_differ=0, pairs=0, hypotheses=0, hypotheses_differ=0, hypotheses_differ64=0, same_up_to_ties=0, time_original=[], time_batched=[],
                 time_former=[], counts_differ_former=0, counts_differ_loop=0,
                 same_order_loop=0)
    orders = {'original': [], 'batched': [], 'former': [], 'loop': []}
    rng = np.random.default_rng(0)
    original.cv2.setRNGSeed(0)
    for q, candidates in enumerate(predictions):
        query = theirs[num_db + q]
        their_scores, spent = original_scores(original, matcher, original32[num_db + q],
                                              [original32[c] for c in candidates], 'cpu')
        stats['time_original'].append(spent)
        ours, spent = timed(batched_scores, query, [theirs[c] for c in candidates], config)
        stats['time_batched'].append(spent)
        former, spent = timed(per_candidate_scores, query, [theirs[c] for c in candidates], config)
        stats['time_former'].append(spent)
        stats['counts_differ_former'] += int(np.sum(np.abs(former - ours) * [len(d) for d in query.descriptors]
                                                    > 0.5))
        if config.matcher == 'ransac':
            loop = loop_scores(query, [theirs[c] for c in candidates], config)
            stats['counts_differ_loop'] += int(np.sum(np.abs(loop - ours) * [len(d) for d in query.descriptors]
                                                      > 0.5))
            orders['loop'].append(order_of(pn.fuse_scores(loop, config.patch_weights), candidates))
        stats['score_diff'] = max(stats['score_diff'], float(np.abs(ours + their_scores).max()))
        their_fused = -original.local_matcher.normalise_func(their_scores, len(patch_sizes),
                                                             np.array(config.patch_weights))
        our_fused = pn.fuse_scores(ours, config.patch_weights)
        stats['fused_diff'] = max(stats['fused_diff'], float(np.nan_to_num(np.abs(our_fused - their_fused)).max()))
        orders['original'].append(candidates[np.argsort(-their_fused)])
        orders['batched'].append(order_of(our_fused, candidates))
        orders['former'].append(order_of(pn.fuse_scores(former, config.patch_weights), candidates))
        stats['same_order'] += bool(np.array_equal(orders['original'][-1], orders['batched'][-1]))
        their_positions = np.argsort(-their_fused)  # the original's order: is it also a descending order of ours?
        stats['same_up_to_ties'] += bool(np.all(np.diff(our_fused[their_positions]) <= TIE))
        stats['same_order_former'] += bool(np.array_equal(orders['former'][-1], orders['batched'][-1]))
        stats['same_order_loop'] += bool(config.matcher == 'ransac' and np.array_equal(orders['loop'][-1],
                                                                                     orders['batched'][-1]))
        for c in candidates[:args.match_checks]:
            for index, stride in enumerate(config.strides):
                nearest, mutual = pn.mutual_matches(query.descriptors[index], [theirs[c].descriptors[index]])
                pairs = set(zip(mutual[0].nonzero()[:, 0].tolist(), nearest[0][mutual[0]].tolist()))
                stats['pairs'] += 1
                stats['match_sets_differ'] += pairs != original_matches(original, query.descriptors[index].T,
                                                                        original32[c][index])
                if config.matcher == 'ransac' and len(pairs) >= 4:
                    rows = sorted(pairs)
                    source = theirs[c].keypoints[index][[j for _, j in rows]].astype(np.float64)
                    target = query.keypoints[index][[i for i, _ in rows]].astype(np.float64)
                    tried, differ, differ64 = same_hypotheses(original, source, target, pn.RANSAC_THRESHOLD * stride,
                                                              rng)
                    stats['hypotheses'] += tried
                    stats['hypotheses_differ'] += differ
                    stats['hypotheses_differ64'] += differ64
    stats['local_matcher_agrees'] = run_local_matcher(original, config_ini, original32, predictions, num_db,
                                                      orders['original'], out_dir, config.matcher)
    positives = dataset.positives()
    stats['recalls'] = {key: recalls(np.array(value), positives) for key, value in orders.items() if value}
    stats['recalls']['global'] = recalls(predictions, positives)
    return dict(config=config, descriptors=largest, **stats)


def run_local_matcher(original, config, descriptors, predictions, num_db, orders, out_dir, matcher):
    """The original's local_matcher on its .npy files: whether its re-ranked orders are those computed above from
    PatchMatcher's scores (for RANSAC, with cv2 seeded alike: a check of the shims, not of the toolkit)."""
    prefix = os.path.join(out_dir, 'patchfeats')
    names = [f'image{i:05d}.jpg' for i in range(num_db + len(predictions))]
    sizes = [int(s) for s in config['global_params']['patch_sizes'].split(',')]
    for index, per_size in descriptors.items():
        name = names[index]
        for size, d in zip(sizes, per_size):
            np.save(f'{prefix}_psize{size}_{os.path.splitext(name)[0]}.npy', d)
    eval_set = types.SimpleNamespace(images=names, numDb=num_db)
    original.cv2.setRNGSeed(0)
    reordered = original.local_matcher.local_matcher(predictions, eval_set, prefix, prefix, config, 'cpu')
    same = sum(np.array_equal(a, b) for a, b in zip(reordered, orders))
    return f'{same}/{len(orders)}' + (' (RANSAC: the random draws follow another call order)' if
                                      matcher == 'ransac' and same < len(orders) else '')


def report(rows, args, before_s):
    print(f'\n{datetime.date.today()}, {cpu_name()}, 1 torch thread, torch {torch.__version__}, '
          f'OpenCV {rows[0]["cv2"]}; total {time.time() - before_s:.0f} s')
    print('| config (scorer) | PCA dim | queries x candidates | largest descriptor difference: both float32 / both '
          'float64 / toolkit float32 to original float64 | mutual-match sets differing | same hypotheses, inlier '
          'counts differing (float32 test / float64 test) | '
          'largest per-size score difference | largest fused score difference | re-ranked order identical | '
          'identical up to ties |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for row in rows:
        config = row['config']
        hyp = (f'{row["hypotheses_differ"]} / {row["hypotheses_differ64"]} of {row["hypotheses"]}'
               if config.matcher == 'ransac' else 'n/a')
        print(f'| {config.name} ({config.matcher}) | {config.pca_dim} | {row["queries"]} x {config.num_candidates} | '
              f'{row["descriptors"]["float32"]:.2e} / {row["descriptors"]["float64"]:.2e} / '
              f'{row["descriptors"]["float32_to_64"]:.2e} | '
              f'{row["match_sets_differ"]} of {row["pairs"]} | {hyp} | {row["score_diff"]:.2e} | '
              f'{row["fused_diff"]:.2e} | {row["same_order"]}/{row["queries"]} | '
              f'{row["same_up_to_ties"]}/{row["queries"]} |')
    print('\ntime per query of the matching and scoring (ms, process time, 1 thread), the same descriptors')
    print('| config (scorer) | original (PatchMatcher, OpenCV) | toolkit, former per-candidate | toolkit, batched | '
          'former / batched | orders former = batched | inlier counts or scores differing, former vs batched | '
          ' R@1/5/10 original | former | batched | global |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for row in rows:
        config = row['config']
        ms = {key: 1000 * np.mean(row[f'time_{key}']) for key in ('original', 'former', 'batched')}
        r = {key: '/'.join(f'{values[n]:.3f}' for n in (1, 5, 10) if n in values)
             for key, values in row['recalls'].items()}
        print(f'| {config.name} ({config.matcher}) | {ms["original"]:.1f} | {ms["former"]:.1f} | {ms["batched"]:.1f} '
              f'| {ms["former"] / ms["batched"]:.1f}x | {row["same_order_former"]}/{row["queries"]} | '
              f'{row["counts_differ_former"]} of {row["queries"] * config.num_candidates * len(config.patch_sizes)} '
              f'| {r["original"]} | {r["former"]} | {r["batched"]} | {r["global"]} |')
    print('\nRANSAC, the batched matcher against the same seeded search one candidate and one hypothesis at a time '
          '(loop_scores, float64)')
    print('| config | (candidate, size) inlier counts differing | re-ranked orders identical | R@1/5/10 loop | batched |')
    print('|---|---|---|---|---|')
    for row in rows:
        if 'loop' in row['recalls']:
            r = {key: '/'.join(f'{values[n]:.3f}' for n in (1, 5, 10) if n in values)
                 for key, values in row['recalls'].items()}
            pairs = row['queries'] * row['config'].num_candidates * len(row['config'].patch_sizes)
            print(f'| {row["config"].name} | {row["counts_differ_loop"]} of {pairs} | '
                  f'{row["same_order_loop"]}/{row["queries"]} | {r["loop"]} | {r["batched"]} |')
    for row in rows:
        print(f'{row["config"].name}: the original\'s local_matcher gives the orders of its PatchMatcher scores for '
              f'{row["local_matcher_agrees"]} queries')


def main_bench():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--patchnetvlad_repo', default=os.environ.get('PATCHNETVLAD_REPO'), required=
                        'PATCHNETVLAD_REPO' not in os.environ,
                        help='A checkout of QVPR/Patch-NetVLAD (its patchnetvlad/ package and configs/); default: '
                             '$PATCHNETVLAD_REPO.')
    parser.add_argument('--workdir', default=None, help='bench_rerank.py\'s work folder (the run is built there if '
                                                        'absent; default: a new temporary folder).')
    parser.add_argument('--tiny', action='store_true', help='bench_rerank.py\'s tiny dataset and model.')
    parser.add_argument('--configs', default='performance,speed,storage')
    parser.add_argument('--queries', type=int, default=None, help='Only the first N queries (default: all).')
    parser.add_argument('--candidates', type=int, default=100, help='Candidates re-ranked per query.')
    parser.add_argument('--assignment_scale', type=float, default=1.0,
                        help='Multiply the run\'s soft-assignment weights (alpha) by this before both sides (e.g. '
                             '0.01: every cluster well assigned everywhere, where the integral image cancels nothing).')
    parser.add_argument('--match_checks', type=int, default=10,
                        help='Candidates per query whose mutual matches and same hypotheses are compared one by one.')
    args = parser.parse_args()
    original = import_original(args.patchnetvlad_repo)
    size = SIZES['tiny' if args.tiny else 'full']
    work_dir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='bench_rerank_'))
    started = time.time()
    run, common = whitened_run(work_dir, size, size['imsize'])
    torch.set_num_threads(1)
    opt = cli.parse_options(['--mode=test', f'--resume={run}', '--split=test', *common])
    model, _, _ = load_model(opt)
    model = place_model(model.eval(), torch.device('cpu'))[0]
    with torch.no_grad():
        model.pool.conv.weight.mul_(args.assignment_scale)
    dataset = load_dataset(opt, 'test')
    num_db = dataset.db_struct.numDb
    with torch.no_grad():
        whole = torch.cat([model(torch.stack([dataset[i][0] for i in range(first, min(first + 8, len(dataset)))]))
                           for first in range(0, len(dataset), 8)]).numpy()
    predictions = exact_search(whole[:num_db], whole[num_db:], min(args.candidates, num_db))[1][:args.queries]
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for name in args.configs.split(','):
            rows.append(dict(compare_config(name, args, original, model, dataset, predictions, out_dir),
                             cv2=original.cv2.__version__))
    report(rows, args, started)


if __name__ == '__main__':
    main_bench()
