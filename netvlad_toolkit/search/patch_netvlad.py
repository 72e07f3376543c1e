"""Patch-NetVLAD re-ranking (Hausler et al., CVPR 2021): the candidates of a global NetVLAD search re-ordered by
how well the query's image patches match theirs, and how consistently those matches lie in space.

- Patch descriptors: NetVLAD of each square patch of the conv feature map, for several patch sizes at once. The
  soft-assignment-weighted residuals a_k(x_i) (x_i - c_k) are formed once per feature map; each patch size then
  takes the sum over all its patches in one pass (a box sum, `avg_pool2d` with no divisor). Each patch's residual
  sums are intra-normalised and L2-normalised as the NetVLAD layer does, then projected with the run's PCA
  whitening cut to the config's dimension, and L2-normalised again. The reference code takes the sums from an
  integral image instead; its differences of large running sums cancel for clusters that are weakly assigned in
  a patch, and intra-normalisation turns what is left into unit-norm noise rows.
- Matching: mutual nearest neighbours between the query's and each candidate's patches of one size, all
  candidates of a query at once (one matrix product per block of candidates, both argmaxes of it).
- Scoring: the inliers of a RANSAC homography between the matched patch centres ('ransac', the performance
  config), or rapid spatial scoring ('spatial', the speed and storage configs), both over all candidates at once;
  each size's scores are z-normalised over the query's candidates and summed with the config's weights. RANSAC
  follows cv2.findHomography's (the reference's scorer): seeded 4-point samples that keep their orientation, tried
  in turn until OpenCV's adaptive count for confidence 0.995 (at most 2000), the best one's inliers counted; the
  candidates' hypotheses are tried in rounds, one batched computation each (the homographies of all samples,
  the inliers of only those that keep their orientation). Keypoints are the patch centres in
  feature-map cells, so one threshold (RANSAC_THRESHOLD strides) serves VGG16 and AlexNet alike; the reference's
  are pixels for VGG16's stride of 16, a similarity of these, with the threshold scaled alike.

A run without PCA whitening is refused (a UserError naming --mode=pca): its raw patch descriptors are K*D-D
(32768 for VGG16), tens to hundreds of MB per image (storage_per_image), terabytes for a Pitts30k database.
The database's patch features are computed once into a store file (patch_features.py). A re-ranked search takes
each image through the encoder once (extract_jointly): the global descriptors and the patch stores of the
database and of the queries from the same pass.
"""
import dataclasses
import functools
import logging
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from netvlad_toolkit.datasets.gpu_decode import image_batches
from netvlad_toolkit.model.models import build_encoder
from netvlad_toolkit.model.netvlad import EPS, NetVLAD
from netvlad_toolkit.search.global_features import extraction_settings
from netvlad_toolkit.search.patch_features import PatchStore, StoreWriter, model_fingerprint, store_path
from netvlad_toolkit.search.retrieval import autocast, extract_descriptors, rows_of
from netvlad_toolkit.utils.commons import UserError

MATCHERS = ('ransac', 'spatial')
RANSAC_THRESHOLD = 1.5       # reprojection error allowed, in patch strides (the reference: 16 px x stride x 1.5)
RANSAC_HYPOTHESES = 2000     # 4-point samples per homography (cv2.findHomography's default maximum)
RANSAC_SEED = 0
RANSAC_CONFIDENCE = 0.995    # probability that the hypotheses tried include one of inliers only (cv2's default)
RANSAC_ROUND = 32            # hypotheses of each candidate tried at once in the first round (then 4 times as many)
RANSAC_POINTS = 2048         # matches of all candidates whose hypotheses are tried together
MATCH_BYTES = 2 ** 20        # float32 bytes of the similarities of one block of candidates
BLOCK_BYTES = 16 * 2 ** 20   # float32 bytes of the weighted residuals of one block of clusters
WRITE_BYTES = 256 * 2 ** 20  # float32 bytes of patch features kept before a write to the store (what a kill loses)


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """The settings of one of the reference code's configs (configs/<name>.ini)."""
    name: str
    patch_sizes: tuple    # sides of the square patches, in feature-map cells (global_params patch_sizes)
    strides: tuple        # steps between patches of each size, in cells (global_params strides)
    patch_weights: tuple  # fusion weight of each size's scores (feature_match patchWeights2Use)
    pca_dim: int          # dimension of the whitened patch descriptors (global_params num_pcs)
    matcher: str          # 'ransac' (RANSAC) or 'spatial' (spatialApproximator)
    num_candidates: int = 100  # candidates re-ranked per query (the largest of feature_match n_values_all)

    def __post_init__(self):
        sizes, strides, weights = len(self.patch_sizes), len(self.strides), len(self.patch_weights)
        if not sizes or sizes != strides or sizes != weights:
            raise UserError(f'Patch-NetVLAD config {self.name}: {sizes} patch sizes, {strides} strides and {weights} '
                            f'patch weights; give one stride and one weight per patch size (--patch_sizes, '
                            f'--strides, --patchWeights2Use).')
        if min(self.patch_sizes) < 1 or min(self.strides) < 1:
            raise UserError(f'Patch-NetVLAD config {self.name}: patch sizes {self.patch_sizes} and strides '
                            f'{self.strides} must be at least 1 (feature-map cells).')
        if self.matcher not in MATCHERS:
            raise UserError(f'Patch-NetVLAD config {self.name}: matcher {self.matcher!r}; use one of '
                            f'{", ".join(MATCHERS)}.')
        if self.pca_dim < 1 or self.num_candidates < 1:
            raise UserError(f'Patch-NetVLAD config {self.name}: the PCA dimension ({self.pca_dim}) and the number '
                            f'of candidates ({self.num_candidates}) must be at least 1.')


RERANK_CONFIGS = {
    'performance': RerankConfig('performance', (2, 5, 8), (1, 1, 1), (0.45, 0.15, 0.4), 4096, 'ransac'),
    'speed': RerankConfig('speed', (5,), (1,), (1.0,), 512, 'spatial'),
    'storage': RerankConfig('storage', (5,), (1,), (1.0,), 128, 'spatial'),
}


MATCHER_FLAGS = {'RANSAC': 'ransac', 'spatialApproximator': 'spatial'}  # the reference configs' matcher values


def configured(name, top=100, patch_sizes=None, strides=None, patch_weights=None, num_pcs=None, matcher=None):
    """RERANK_CONFIGS[name] re-ranking `top` candidates, with the settings given in place of the config's (None:
    the config's; matcher under the reference's names, RANSAC or spatialApproximator). A config whose stored
    settings (sizes, strides, dimension) differ from the named one's gets its own name, and so its own store."""
    base = RERANK_CONFIGS[name]
    config = RerankConfig(name, patch_sizes or base.patch_sizes, strides or base.strides,
                          patch_weights or base.patch_weights, num_pcs or base.pca_dim,
                          MATCHER_FLAGS[matcher] if matcher else base.matcher, top)
    stored = (config.patch_sizes, config.strides, config.pca_dim)
    if stored != (base.patch_sizes, base.strides, base.pca_dim):
        joined = ['-'.join(map(str, values)) for values in stored[:2]]
        config = dataclasses.replace(config, name=f'{name}_p{joined[0]}_s{joined[1]}_d{config.pca_dim}')
    return config


def flags_config(opt):
    """The config that --rerank patch, --rerank_config, --rerank_top and the settings' flags ask for; None without
    --rerank patch."""
    if opt.rerank == 'none':
        return None
    return configured(opt.rerank_config, opt.rerank_top, opt.patch_sizes, opt.strides, opt.patchWeights2Use,
                      opt.num_pcs, opt.matcher)


@dataclasses.dataclass
class PatchFeatures:
    """One image's Patch-NetVLAD features: per patch size (the config's order), descriptors [n, dim] (float32 unit
    rows) and keypoints [n, 2] (patch centres (x, y) in feature-map cells), rows in the same order; grid: the
    feature map's (height, width); extraction_s: this image's share of its batch's extraction time (process CPU
    time, as every time of the re-ranking)."""
    descriptors: list
    keypoints: list
    grid: tuple
    extraction_s: float = 0.0


# ---------------------------------------------------------------------------------------------- patches

def patch_grid(height, width, size, stride):
    """(rows, columns) of the size x size patches, `stride` apart, that fit in a height x width feature map."""
    return max(0, (height - size) // stride + 1), max(0, (width - size) // stride + 1)


def patch_keypoints(height, width, size, stride):
    """Patch centres [n, 2] (x, y) in feature-map cells, row-major (the order of the patch descriptors)."""
    rows, columns = patch_grid(height, width, size, stride)
    y, x = torch.meshgrid(torch.arange(rows) * stride, torch.arange(columns) * stride, indexing='ij')
    return (torch.stack([x, y], dim=-1).reshape(-1, 2) + (size - 1) / 2).float().numpy()


def check_patches_fit(grid, image_size, config):
    """A patch size larger than the feature map places no patch: its score is the same for every candidate (it
    adds nothing). When no size fits, re-ranking would change nothing: one paragraph naming the flags instead."""
    too_large = [size for size in config.patch_sizes if size > min(grid)]
    if len(too_large) == len(config.patch_sizes):
        example = f'--patch_sizes {min(grid)}' + (' --strides 1 --patchWeights2Use 1' if len(config.patch_sizes) > 1
                                                  else '')
        raise UserError(f'Patch-NetVLAD re-ranking ({config.name}) cannot place a {too_large[0]}x{too_large[0]} patch '
                        f'in the {grid[0]}x{grid[1]}-cell feature map of a {image_size[0]}x{image_size[1]}-pixel '
                        f'image: patch sizes must be at most {min(grid)} cells here. Give smaller --patch_sizes (e.g. '
                        f'{example}), or larger images (--resize; --resize_max in query '
                        f'mode). Nothing was recorded.')


def check_first_image(model, dataset, config):
    """check_patches_fit on the first image of `dataset` (of (image, index)), before any store is built; a warning
    naming the sizes that do not fit it, when others do."""
    image = dataset[0][0]
    grid = model.feature_grid(*image.shape[1:])
    check_patches_fit(grid, image.shape[1:], config)
    too_large = [size for size in config.patch_sizes if size > min(grid)]
    if too_large:
        logging.warning('Patch-NetVLAD (%s): patch size%s %s place%s no patch in the %dx%d-cell feature map of a '
                        '%dx%d-pixel image, and add%s nothing to its scores (smaller --patch_sizes or larger images '
                        'change that).', config.name, 's' if len(too_large) > 1 else '',
                        ','.join(map(str, too_large)), '' if len(too_large) > 1 else 's', *grid, *image.shape[1:],
                        '' if len(too_large) > 1 else 's')


def patch_projection(model, dim):
    """(weight [dim, K*D], bias [dim]) of the run's PCA whitening cut to its `dim` leading components: its rows are
    the principal directions by decreasing variance (pca.py's and the NetVLAD authors' whitening alike), so the
    first `dim` rows are the whitening to `dim` dimensions."""
    if not isinstance(model.pool, NetVLAD):
        raise UserError(f'Patch-NetVLAD needs a NetVLAD run; this one pools with {model.pool.mode} pooling.')
    if not hasattr(model, 'whiten'):
        raise UserError(f'Patch-NetVLAD needs a PCA-whitened run: this run has no whitening, and its raw patch '
                        f'descriptors ({model.pool.output_dim}-D) would take tens to hundreds of MB per database '
                        f'image. Whiten it first (python main.py --mode=pca --pca_dim {dim} --resume=RUN) and '
                        f're-rank with the run folder that writes (RUN_pca{dim}).')
    if dim > model.whiten.out_features:
        raise UserError(f'The Patch-NetVLAD config asks for {dim}-D patch descriptors, but the run is whitened to '
                        f'{model.whiten.out_features} dimensions. Give --num_pcs {model.whiten.out_features} (or fewer), or '
                        f'whiten the run to {dim} (--mode=pca --pca_dim {dim}).')
    return model.whiten.weight[:dim], model.whiten.bias[:dim]


def clusters_per_block(batch, dim, locations, clusters):
    return int(np.clip(BLOCK_BYTES // (4 * batch * dim * locations), 1, clusters))


def patch_descriptors(features, pool, weight, bias, sizes, strides):
    """Whitened Patch-NetVLAD descriptors of a float32 feature map [B, D, H, W]: per patch size, [B, n, dim].

    The NetVLAD of one patch is V(k) = sum over the patch's locations i of a_k(x_i) (x_i - c_k), each row
    intra-normalised, the whole L2-normalised; the soft-assignment a_k(x_i) of a location does not depend on the
    patch. By blocks of clusters (memory: BLOCK_BYTES of residuals): the weighted residuals of the block, each
    size's box sums, their intra-normalised rows projected by the block's columns of the whitening and their
    squared norms summed (the L2 norm before the projection, which is linear, divides the sum at the end).
    Residuals are laid out channels-last, where pooling over a small map of many channels is fastest."""
    batch, dim, height, width = features.shape
    clusters = pool.num_clusters
    x = features.flatten(2)  # [B, D, HW]
    if pool.normalize_input:
        x = F.normalize(x, p=2, dim=1)
    logits = torch.einsum('kd,bdn->bnk', pool.conv.weight.reshape(clusters, dim), x)
    if pool.conv.bias is not None:
        logits = logits + pool.conv.bias
    soft_assign = F.softmax(logits, dim=2)  # [B, HW, K]
    x = x.transpose(1, 2)  # [B, HW, D]
    grids = [patch_grid(height, width, size, stride) for size, stride in zip(sizes, strides)]
    projected = [x.new_zeros(batch, rows * columns, len(weight)) for rows, columns in grids]
    squared_norms = [x.new_zeros(batch, rows * columns, 1) for rows, columns in grids]
    step = clusters_per_block(batch, dim, height * width, clusters)
    for first in range(0, clusters, step):
        block = slice(first, min(first + step, clusters))
        count = block.stop - block.start
        residuals = (x[:, :, None] - pool.centroids[block]).mul_(soft_assign[:, :, block, None])  # [B, HW, k, D]
        residuals = residuals.reshape(batch, height, width, count * dim).permute(0, 3, 1, 2)  # channels-last
        for index, (size, stride) in enumerate(zip(sizes, strides)):
            if not projected[index].shape[1]:
                continue
            sums = F.avg_pool2d(residuals, size, stride, divisor_override=1)  # [B, k*D, rows, columns]
            rows = sums.permute(0, 2, 3, 1).reshape(batch, -1, count, dim)  # [B, n, k, D]
            norms = torch.linalg.vector_norm(rows, dim=3, keepdim=True)
            intra = rows / norms.clamp_min(EPS)
            squared_norms[index] += (norms / norms.clamp_min(EPS)).pow(2).sum(dim=2)  # [B, n, 1]
            projected[index] += intra.reshape(batch, -1, count * dim) @ weight[:, block.start * dim:block.stop * dim].T
    return [F.normalize(total / norms.sqrt().clamp_min(EPS) + bias, p=2, dim=2)
            for total, norms in zip(projected, squared_norms)]


def patch_features(model, images, config, precision='fp32'):
    """The global descriptors [B, output_dim] (float32, as model(images)) and the PatchFeatures of each image of a
    batch [B, 3, H, W] on the model's device, from one pass of the encoder (under `precision` autocast:
    fp32, bf16, fp16; the aggregation stays float32, as in EmbedNet)."""
    weight, bias = patch_projection(model, config.pca_dim)
    started = time.process_time()
    model.eval()
    with torch.inference_mode():
        with autocast(precision, images.device):
            features = model.features(images)
        with torch.autocast(images.device.type, enabled=False):
            features = features.float()
            global_desc = model.describe(features).cpu().numpy()
            patches = [p.cpu().numpy() for p in patch_descriptors(features, model.pool, weight, bias,
                                                                  config.patch_sizes, config.strides)]
    height, width = features.shape[2:]
    check_patches_fit((height, width), images.shape[2:], config)
    keypoints = [patch_keypoints(height, width, size, stride) for size, stride in zip(config.patch_sizes,
                                                                                     config.strides)]
    share = (time.process_time() - started) / len(images)
    return global_desc, [PatchFeatures([p[b] for p in patches], keypoints, (height, width), share)
                         for b in range(len(images))]


def loader(dataset, batch_size, threads, device):
    """The project's batches of an image dataset (decoding in `threads` workers; on the card on CUDA): (loader,
    on_device), as gpu_decode.image_batches."""
    return image_batches(dataset, types.SimpleNamespace(threads=threads, cuda=device.type == 'cuda'), batch_size,
                         device)


# ---------------------------------------------------------------------------------------------- the store

def build_store(model, database, names, folder, config, device, precision='fp32', batch_size=8, threads=0,
                run='', dtype='float16', descriptors=None):
    """The patch features of every image of `database` (a dataset of (image, index), in the order of `names`)
    in the store file of `config` in `folder` (store_path), written in chunks as they are computed: a killed build
    continues where it stopped, and a store of the same model, settings and first images is extended, not
    rewritten. `run` names the model in the store's errors. descriptors: rows [len(names), output_dim] (an array
    or a DescriptorFile) that receive each image's global descriptor, from the same encoder pass as its patches
    (those of the images already in the store from a pass of the global network alone: each image goes through
    the encoder once). Returns the store's path."""
    patch_projection(model, config.pca_dim)  # a run that cannot give patch descriptors stops before any file
    path = store_path(folder, config.name)
    writer = StoreWriter(path, names, config.patch_sizes, config.strides, config.pca_dim,
                         model_fingerprint(model), run, dtype)
    if descriptors is not None and writer.done:
        settings = extraction_settings(device, batch_size, precision, threads)
        descriptors[:writer.done] = extract_descriptors(model, torch.utils.data.Subset(database, range(writer.done)),
                                                        settings, device, 'descriptors (patches stored)')
    if writer.done < len(names):
        todo = torch.utils.data.Subset(database, range(writer.done, len(names)))
        pending, pending_bytes, row = [], 0, writer.done
        batches, on_device = loader(todo, batch_size, threads, device)
        for batch in tqdm(batches, desc=f'patch features ({config.name})', unit='batch'):
            images = on_device(batch)[0].contiguous(memory_format=torch.channels_last)
            global_desc, batch = patch_features(model, images, config, precision)
            if descriptors is not None:
                descriptors[row:row + len(batch)] = global_desc
            row += len(batch)
            pending += batch
            pending_bytes += sum(d.nbytes for image in batch for d in image.descriptors)
            if pending_bytes >= WRITE_BYTES:
                writer.append(pending)
                pending, pending_bytes = [], 0
        writer.append(pending)
    return writer.finish()


def open_store(folder, config):
    """The store of `config` in `folder`, checked against the config's settings."""
    return PatchStore(store_path(folder, config.name), config.patch_sizes, config.strides, config.pca_dim)


def store_features(store, ids, config):
    """PatchFeatures of the database images `ids`, read from the store (only their rows)."""
    features = []
    for index in ids:
        rows, grid = store.rows(index)
        ends = np.cumsum([0] + [int(np.prod(patch_grid(*grid, s, t))) for s, t in zip(config.patch_sizes,
                                                                                       config.strides)])
        features.append(PatchFeatures([rows[a:b] for a, b in zip(ends[:-1], ends[1:])],
                                      [patch_keypoints(*grid, s, t) for s, t in zip(config.patch_sizes,
                                                                                    config.strides)], grid))
    return features


# ---------------------------------------------------------------------------------------------- matching

def padded(arrays, dim):
    """Row arrays [m_c, dim] stacked into float32 [C, m, dim], zero rows after each one's own, and which rows are
    real [C, m] (None where all have m rows: one copy, no padding)."""
    counts = [len(rows) for rows in arrays]
    if len(set(counts)) == 1:
        return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False)).reshape(len(arrays), -1, dim), None
    stacked = torch.zeros(len(arrays), max(counts), dim)
    for index, rows in enumerate(arrays):
        stacked[index, :len(rows)] = torch.as_tensor(np.ascontiguousarray(rows, dtype=np.float32))
    return stacked, torch.arange(max(counts)) < torch.tensor(counts)[:, None]


def mutual_matches(query_desc, candidate_descs):
    """The mutual nearest neighbours between a query's unit descriptors [n, dim] and each candidate's [m_c, dim]
    (nearest in L2 = largest dot product): (nearest [C, n]: each query row's nearest row of the candidate, mutual
    [C, n] bool: whether that row's nearest query row is this one). By blocks of candidates of MATCH_BYTES of
    similarities (small enough to stay in cache for both reductions): one matrix product each, laid out
    [n, candidates x rows] (the query on the left: the faster GEMM shape here), and NumPy's argmax both ways (the
    first index on ties; faster than torch's along the strided dimension)."""
    count, dim = query_desc.shape
    nearest = np.zeros((len(candidate_descs), count), dtype=np.int64)
    mutual = np.zeros((len(candidate_descs), count), dtype=bool)
    most = max((len(rows) for rows in candidate_descs), default=0)
    if count and most:
        query = torch.from_numpy(np.asarray(query_desc, dtype=np.float32))
        step = max(1, MATCH_BYTES // (4 * count * most))
        for first in range(0, len(candidate_descs), step):
            rows, real = padded(candidate_descs[first:first + step], dim)
            similarity = (query @ rows.reshape(-1, dim).T).numpy().reshape(count, len(rows), -1)  # [n, c, m]
            if real is not None:
                similarity[:, ~real.numpy()] = -np.inf
            block = slice(first, first + len(rows))
            nearest[block] = similarity.argmax(axis=2).T
            back = similarity.argmax(axis=0)  # [c, m]: each candidate row's nearest query row
            mutual[block] = np.take_along_axis(back, nearest[block], axis=1) == np.arange(count)
            if real is not None:
                mutual[block] &= real.numpy().any(axis=1)[:, None]
    return torch.from_numpy(nearest), torch.from_numpy(mutual)


def basis_map(x, y):
    """For 4 points, coordinates x, y [4, ...] (contiguous per point): the adjugate's rows (row i the cross product
    of the other two of the first three points, homogeneous), as 3 lists of 3 [...] tensors, and the scales that
    make the first three points sum to the fourth (the adjugate times it), 3 [...] tensors."""
    rows = []
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        rows.append((y[j] - y[k], x[k] - x[j], x[j] * y[k] - x[k] * y[j]))
    return rows, [torch.addcmul(torch.addcmul(c, a, x[3]), b, y[3]) for a, b, c in rows]


def four_point_homographies(source, target):
    """The homographies [..., 3, 3] (up to scale) that map 4 source points [..., 4, 2] onto 4 target points;
    those of degenerate samples (three points on a line) are zero or not finite. Through the projective basis:
    with B = M diag(scales) the map of the basis (e_1, e_2, e_3, 1) onto 4 points (M: the first three as columns,
    homogeneous), H = B_target adj(B_source) = M_target diag(w) adj(M_source), w_i the target's scale i times the
    source's other two; element by element over the samples (products of tiny 3x3 tensors are slow)."""
    sx, sy = source.movedim((-1, -2), (0, 1)).contiguous()
    tx, ty = target.movedim((-1, -2), (0, 1)).contiguous()
    rows, scales = basis_map(sx, sy)
    _, target_scales = basis_map(tx, ty)
    weights = [target_scales[i] * scales[(i + 1) % 3] * scales[(i + 2) % 3] for i in range(3)]
    columns = [[tx[i] * weights[i] for i in range(3)], [ty[i] * weights[i] for i in range(3)], weights]
    entries = [sum(column[i] * rows[i][c] for i in range(3)) for column in columns for c in range(3)]
    return torch.stack(entries, dim=-1).unflatten(-1, (3, 3))


def same_orientation(homographies, source):
    """[...]: whether the homography [..., 3, 3] through a 4-point sample [..., 4, 2] keeps the orientation of all
    four of its triangles, none of them flat (the samples OpenCV's homography RANSAC accepts; a homography through
    the others folds the plane). A triangle's mapped signed area is det(H) det(triangle) / (w_a w_b w_c), w the
    third coordinates of H applied to its corners: the four keep one orientation where the four w have one sign."""
    w = (homographies[..., 2:, :2] @ source.transpose(-1, -2))[..., 0, :] + homographies[..., 2:, 2]  # [..., 4]
    return (w > 0).all(dim=-1) | (w < 0).all(dim=-1)


def within(homographies, source, target, threshold, dtype=torch.float32):
    """[..., h, n]: whether ||target - H(source)|| <= threshold for each homography [..., h, 3, 3] and point
    [..., n, 2], as ||(x', y') - target w'||^2 <= (threshold w')^2 with (x', y', w') = H (x, y, 1), threshold w'
    from the homography's third row times the threshold and target / threshold; in `dtype` once each homography
    is scaled to unit norm. A target that is NaN is no inlier."""
    unit = homographies / torch.linalg.matrix_norm(homographies)[..., None, None]
    scaled = (unit * unit.new_tensor([1, 1, threshold])[:, None]).to(dtype)
    points = torch.cat([source, torch.ones_like(source[..., :1])], dim=-1).to(dtype)  # [..., n, 3]
    projected = scaled.flatten(-3, -2) @ points.transpose(-1, -2)  # [..., 3h, n]
    x, y, w = projected.unflatten(-2, (-1, 3)).unbind(dim=-2)
    u, v = (target.to(dtype) / threshold).unsqueeze(-3).unbind(dim=-1)
    dx, dy = torch.addcmul(x, u, w, value=-1), torch.addcmul(y, v, w, value=-1)
    return torch.addcmul(dx.square_(), dy, dy) <= w.square_()  # NaN compares False


@functools.lru_cache(maxsize=256)
def ransac_samples(count):
    """The 4-point samples [h, 4] (distinct indices below `count`, at most RANSAC_HYPOTHESES) that RANSAC tries in
    turn on `count` matches: seeded, so the same for every pair of images with as many matches."""
    generator = torch.Generator().manual_seed(RANSAC_SEED)
    draws = torch.randint(count, (2 * RANSAC_HYPOTHESES, 4), generator=generator)
    ordered = draws.sort(dim=1).values
    return draws[(ordered[:, 1:] != ordered[:, :-1]).all(dim=1)][:RANSAC_HYPOTHESES]


@functools.lru_cache(maxsize=256)
def sample_table(count):
    """ransac_samples(count) padded to RANSAC_HYPOTHESES rows (index 0), and which rows exist."""
    samples = ransac_samples(count)
    table = torch.zeros(RANSAC_HYPOTHESES, 4, dtype=torch.int64)
    table[:len(samples)] = samples
    return table, torch.arange(RANSAC_HYPOTHESES) < len(samples)


def hypotheses_needed(inliers, count):
    """How many hypotheses RANSAC tries before it stops, once its best has `inliers` of `count` points: enough
    that a sample of 4 inliers was missed with probability 1 - RANSAC_CONFIDENCE (OpenCV's RANSACUpdateNumIters,
    rounded alike), at most RANSAC_HYPOTHESES; none when all points are inliers."""
    missed = 1 - (inliers.double() / count.clamp_min(1)) ** 4  # the probability that a sample is not all inliers
    needed = np.log(1 - RANSAC_CONFIDENCE) / missed.log()  # not positive where no point is an inlier
    needed = torch.where(needed > 0, needed.round().clamp(max=RANSAC_HYPOTHESES), RANSAC_HYPOTHESES)
    return torch.where(missed < np.finfo(np.float64).tiny, 0, needed)


def ransac_inliers(source, target, counts, threshold):
    """Inlier masks [C, n] of the RANSAC homographies that map each candidate's source points [C, n, 2] onto its
    target points, its first counts[c] rows being its matches (as cv2.findHomography(source, target, cv2.RANSAC,
    threshold)'s mask): the inliers (||target - H(source)|| <= threshold) of the best of the homographies through
    the samples of ransac_samples(count) that keep their orientation, tried in turn until hypotheses_needed of
    the best so far. Candidates by blocks of similar counts, at most RANSAC_POINTS matches in all (each block's
    points cut to its largest count). Under 4 matches: no inliers."""
    best = torch.zeros(source.shape[:2], dtype=torch.bool)
    by_count = torch.argsort(counts, stable=True)
    eligible = by_count[counts[by_count] >= 4]
    while len(eligible):
        fits = counts[eligible] * torch.arange(1, len(eligible) + 1) <= RANSAC_POINTS  # block size x largest count
        block, eligible = eligible[:max(1, int(fits.sum()))], eligible[max(1, int(fits.sum())):]
        rows = int(counts[block[-1]])
        best[block, :rows] = block_inliers(source[block, :rows], target[block, :rows], counts[block], threshold)
    return best


def block_inliers(source, target, counts, threshold):
    """ransac_inliers of one block of candidates (all with at least 4 matches): their hypotheses tried together by
    rounds, RANSAC_ROUND samples in the first, four times as many in each next one (most candidates that stop
    early stop in the first); in each round the homographies of all samples, then the inliers of those that keep
    their orientation (moved to the front), each candidate's search stopped exactly where the one-by-one loop
    stops."""
    rows = source.shape[1]
    target = target.masked_fill(torch.arange(rows)[:, None] >= counts[:, None, None], torch.nan)  # never inliers
    tables, exist = zip(*[sample_table(count) for count in counts.tolist()])
    tables, exist = torch.stack(tables), torch.stack(exist)  # [c, RANSAC_HYPOTHESES, 4], [c, RANSAC_HYPOTHESES]
    best = torch.zeros(len(counts), rows, dtype=torch.bool)
    best_count, tried = torch.zeros(len(counts), dtype=torch.int64), torch.zeros(len(counts), dtype=torch.int64)
    ids = torch.arange(len(counts))
    start, size = 0, RANSAC_ROUND
    while len(ids) and start < RANSAC_HYPOTHESES:
        drawn, exists = tables[ids, start:start + size], exist[ids, start:start + size]
        pick = drawn.reshape(len(ids), -1, 1).expand(-1, -1, 2)
        corners = [points[ids].gather(1, pick).reshape(*drawn.shape, 2) for points in (source, target)]
        homographies = four_point_homographies(*corners)
        usable = exists & same_orientation(homographies, corners[0])
        usable_count = usable.sum(dim=1)
        front = torch.argsort(~usable, dim=1, stable=True)[:, :max(1, int(usable_count.max()))]
        homographies = homographies.gather(1, front[..., None, None].expand(-1, -1, 3, 3))
        usable = torch.arange(front.shape[1]) < usable_count[:, None]  # [a, u]
        inliers = within(homographies, source[ids], target[ids], threshold)
        found = torch.where(usable, inliers.sum(dim=2), -1)  # [a, u]
        leading = torch.maximum(found.cummax(dim=1).values, best_count[ids, None])
        turn = tried[ids, None] + torch.arange(1, front.shape[1] + 1)  # the hypothesis' number among those tried
        stops = usable & (turn >= hypotheses_needed(leading, counts[ids, None]))
        stopped = stops.any(dim=1)
        last = torch.where(stopped, stops.int().argmax(dim=1), (usable_count - 1).clamp_min(0))
        final = leading.gather(1, last[:, None])[:, 0]
        improved = final > best_count[ids]
        first_best = (found == final[:, None]).int().argmax(dim=1)
        best[ids[improved]] = inliers[improved, first_best[improved]]
        best_count[ids], tried[ids] = final, tried[ids] + usable_count
        ids = ids[~stopped & exists[:, -1]]
        start, size = start + size, 4 * size
    return best


def spatial_scores(query_points, db_points, matched, anchor):
    """Rapid spatial scoring (the paper's equation) of each candidate's matches: with d_i = db_i - query_i over
    the points [C, n, 2] where matched [C, n], and anchor (x_max, y_max), sum_i (x_max - |d_i,x - mean d_x|)^2 +
    (y_max - |d_i,y - mean d_y|)^2. [C] float64."""
    shifts = db_points.double() - query_points.double()
    weights = matched.double()[..., None]
    mean = (shifts * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1)
    residuals = (shifts - mean).abs()
    return ((torch.as_tensor(anchor, dtype=torch.float64) - residuals) ** 2 * weights).sum(dim=(1, 2))


def size_scores(query, candidates, index, config):
    """The scores of one patch size between a query's PatchFeatures and each candidate's, per query patch (larger
    is better): RANSAC inliers, or the rapid spatial score, of their mutual matches (0 with fewer than the 4
    matches a homography needs, or with none). Returns (scores [C] float64, the matches: nearest [C, n], each
    query patch's candidate patch, and kept [C, n], the query patches whose match counts: the inliers or the
    mutual matches)."""
    query_desc, query_points = query.descriptors[index], torch.from_numpy(query.keypoints[index])
    nearest, mutual = mutual_matches(query_desc, [candidate.descriptors[index] for candidate in candidates])
    if not len(candidates) or not len(query_desc):
        return np.zeros(len(candidates)), nearest, mutual
    db_points, _ = padded([candidate.keypoints[index] for candidate in candidates], 2)
    db_points = db_points.gather(1, nearest[..., None].expand(-1, -1, 2))  # [C, n, 2]: each query patch's match
    if config.matcher == 'spatial':
        anchor = query.keypoints[index].max(axis=0) - query.keypoints[index].min(axis=0)
        scores = spatial_scores(query_points.expand_as(db_points), db_points, mutual, anchor)
        return scores.numpy() / len(query_desc), nearest, mutual
    order = torch.sort((~mutual).int(), dim=1, stable=True).indices  # matches first, in query order
    counts = mutual.sum(dim=1)
    compacted = [points.double().gather(1, order[..., None].expand(-1, -1, 2))
                 for points in (db_points, query_points.expand_as(db_points))]
    inliers = ransac_inliers(*compacted, counts, RANSAC_THRESHOLD * config.strides[index])
    kept = torch.zeros_like(mutual).scatter_(1, order, inliers)
    return kept.sum(dim=1).double().numpy() / len(query_desc), nearest, kept


def fuse_scores(size_scores, weights):
    """[candidates, sizes] scores -> [candidates]: each size's scores z-normalised over the candidates (a size
    whose scores are all equal adds nothing), summed with the config's weights."""
    if not len(size_scores):
        return np.zeros(0)
    mean, std = size_scores.mean(axis=0), size_scores.std(axis=0)
    normalised = np.where(std > 0, (size_scores - mean) / np.where(std > 0, std, 1), 0.0)
    return normalised @ np.asarray(weights, dtype=np.float64)


def rerank(query, candidate_ids, store, config):
    """A query's candidates (database ids from the global search, best first; -1 entries are padding) re-ordered
    by their Patch-NetVLAD score against the query's PatchFeatures.

    Returns (ids [k] by descending score, ties in their global order, padding last; their scores (-inf for
    padding); timing {extraction_s: the query's patch extraction, reading_s: the candidates' rows read from the
    store, matching_s: matching and scoring})."""
    candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
    valid = candidate_ids[candidate_ids >= 0]
    started = time.process_time()
    candidates = store_features(store, valid, config)
    read = time.process_time()
    scores = fuse_scores(np.stack([size_scores(query, candidates, index, config)[0]
                                   for index in range(len(config.patch_sizes))], axis=1), config.patch_weights)
    order = np.argsort(-scores, kind='stable')
    timing = dict(extraction_s=query.extraction_s, reading_s=read - started, matching_s=time.process_time() - read)
    padding = len(candidate_ids) - len(valid)
    return (np.concatenate([valid[order], np.full(padding, -1)]),
            np.concatenate([scores[order], np.full(padding, -np.inf)]), timing)


def matched_points(query, candidate, config):
    """Per patch size, the patch centres (query [k, 2], candidate [k, 2]) of the matches that make the score: the
    RANSAC inliers, or the mutual matches of rapid spatial scoring."""
    pairs = []
    for index in range(len(config.patch_sizes)):
        _, nearest, kept = size_scores(query, [candidate], index, config)
        rows = kept[0].nonzero()[:, 0].numpy()
        pairs.append((query.keypoints[index][rows], candidate.keypoints[index][nearest[0, rows].numpy()]))
    return pairs


def rerank_queries(model, queries, predictions, store, config, device, precision='fp32', batch_size=8, threads=0,
                   on_query=None):
    """Re-rank the global search's candidates of every query image: `queries` a dataset of (image, index) in the
    order of the rows of predictions [Q, k] (database ids). on_query(row, query PatchFeatures, re-ranked ids, store),
    if given, is called after each query. Returns (re-ranked [Q, k], scores [Q, k], timing: per query arrays
    extraction_s, reading_s, matching_s)."""
    return rerank_each(extracted_queries(model, queries, config, device, precision, batch_size, threads),
                       predictions, store, config, on_query)


def extracted_queries(model, queries, config, device, precision, batch_size, threads):
    """Each query's PatchFeatures in turn, extracted batch by batch."""
    batches, on_device = loader(queries, batch_size, threads, device)
    for batch in tqdm(batches, desc=f're-ranking ({config.name})', unit='batch'):
        images = on_device(batch)[0].contiguous(memory_format=torch.channels_last)
        yield from patch_features(model, images, config, precision)[1]


def stored_queries(query_store, count, config, extraction_s):
    """Each query's PatchFeatures in turn, read from a query store (extract_jointly's), with the extraction time
    per query of the pass that wrote it."""
    for row in tqdm(range(count), desc=f're-ranking ({config.name})', unit='query'):
        query = store_features(query_store, [row], config)[0]
        query.extraction_s = extraction_s
        yield query


def rerank_each(queries, predictions, store, config, on_query=None):
    """rerank_queries of the query PatchFeatures given in the order of the rows of predictions."""
    reranked, scores = np.empty_like(predictions), np.empty(predictions.shape)
    timing = {key: np.zeros(len(predictions)) for key in ('extraction_s', 'reading_s', 'matching_s')}
    for row, query in enumerate(queries):
        reranked[row], scores[row], spent = rerank(query, predictions[row], store, config)
        if on_query is not None:
            on_query(row, query, reranked[row], store)
        for key, seconds in spent.items():
            timing[key][row] = seconds
    return reranked, scores, timing


def rerank_candidates(model, database, db_names, queries, candidates, store_dir, config, device, precision='fp32',
                      batch_size=8, threads=0, run='', on_query=None, query_store=None):
    """Re-rank each query's candidates [Q, k] (database ids from the global search, best first): the database's
    store is built (or extended) in store_dir first. database, queries: datasets of (image, index), database in the
    order of db_names, queries in the order of the rows of candidates; on_query: as rerank_queries'. query_store:
    (the path of a store of the queries' patches, extraction seconds per query), as extract_jointly gives it: the
    queries' patches are read from it instead of extracted (queries unused). Returns (re-ranked ids [Q, k], patch
    scores [Q, k], a summary: the config's settings, the store, and seconds per query: in all and of each part)."""
    check_first_image(model, database, config)
    started = time.perf_counter()
    path = build_store(model, database, db_names, store_dir, config, device, precision, batch_size, threads, run)
    store_s = time.perf_counter() - started
    with open_store(store_dir, config) as store:
        if query_store is None:
            reranked, scores, timing = rerank_queries(model, queries, candidates, store, config, device, precision,
                                                      batch_size, threads, on_query)
        else:
            with PatchStore(query_store[0], config.patch_sizes, config.strides, config.pca_dim) as stored:
                reranked, scores, timing = rerank_each(stored_queries(stored, len(candidates), config,
                                                                      query_store[1]), candidates, store, config,
                                                       on_query)
    per_query = {f'{key}_per_query': float(np.mean(values)) if len(values) else 0.0 for key, values in timing.items()}
    summary = dict(config=config.name, patch_sizes=list(config.patch_sizes), strides=list(config.strides),
                   patch_weights=list(config.patch_weights), num_pcs=config.pca_dim, matcher=config.matcher,
                   candidates=int(candidates.shape[1]), store=path, store_s=store_s, **per_query,
                   seconds_per_query=sum(per_query.values()))
    return reranked, scores, summary


def extract_jointly(model, database, db_names, queries, query_names, store_dir, query_dir, config, device,
                    descriptors, precision='fp32', batch_size=8, threads=0, run=''):
    """One encoder pass of each image for a re-ranked search: the database's store built (or extended) in
    store_dir and its global descriptors written to rows 0..len(database) of `descriptors`, the queries' patch
    features into a float32 store in query_dir (the same layout; float32 as the features of queries extracted at
    re-ranking time) and their global descriptors to the rows after. Returns rerank_candidates' query_store
    argument: (the query store's path, the joint pass's process time per query)."""
    check_first_image(model, database, config)
    build_store(model, database, db_names, store_dir, config, device, precision, batch_size, threads, run,
                descriptors=rows_of(descriptors, 0, len(database)))
    started = time.process_time()
    path = build_store(model, queries, query_names, query_dir, config, device, precision, batch_size, threads, run,
                       'float32', rows_of(descriptors, len(database), len(database) + len(queries)))
    return path, (time.process_time() - started) / max(1, len(queries))


# ---------------------------------------------------------------------------------------------- storage

def feature_map_size(arch, height, width):
    """(height, width) of the encoder's feature map for an image of height x width (computed on the meta
    device: no weights, no arithmetic)."""
    with torch.device('meta'):
        return tuple(build_encoder(arch, pretrained=False)(torch.empty(1, 3, height, width)).shape[2:])


def storage_per_image(config, arch, height=480, width=640, dtype='float16'):
    """Bytes one database image of height x width takes in the store under `config`: its patches of every size
    times the config's dimensions, plus its index entries (PatchStore.INDEX_BYTES; its name aside)."""
    grid = feature_map_size(arch, height, width)
    patches = sum(int(np.prod(patch_grid(*grid, size, stride)))
                  for size, stride in zip(config.patch_sizes, config.strides))
    return patches * config.pca_dim * np.dtype(dtype).itemsize + PatchStore.INDEX_BYTES
