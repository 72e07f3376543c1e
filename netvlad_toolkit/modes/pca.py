"""--mode=pca: PCA whitening of the NetVLAD descriptor, as in the paper (32768 -> 4096 for VGG16).

Fitted on the descriptors of --pca_images random training-database images (never on the evaluated split), and
stored as a linear layer after the pooling (`whiten.weight` [pca_dim, D], `whiten.bias` [pca_dim]; EmbedNet
L2-normalises its output) in a new run folder `<resume>_pca<pca_dim>/`, so that test, prune and quantize of that
folder use the whitened descriptor. The mode then evaluates the raw and the whitened descriptor on --split and
reports both.

    python main.py --mode=pca --resume=vgg16_netvlad_checkpoint/vgg16_netvlad_checkpoint/ --split=val
    python main.py --mode=test --split=test --resume=vgg16_netvlad_checkpoint/vgg16_netvlad_checkpoint_pca4096/
"""
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from netvlad_toolkit.datasets.datasets import load_dataset, training_database_sample
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.runs.results import record_result, variant_of
from netvlad_toolkit.runs.runs import check_derived_target, copy_flags, derived_run_folder, load_model
from netvlad_toolkit.search.descriptors import DescriptorFile, cache_folder
from netvlad_toolkit.search.retrieval import as_float32, chunk_rows, extract_descriptors, log_recalls, search_and_recall
from netvlad_toolkit.utils.commons import (
    UserError,
    atomic_write_json,
    building_folder,
    make_deterministic,
    select_device,
    setup_logging,
)
from netvlad_toolkit.utils.options import (
    AT_LEAST_1,
    add_evaluating_flags,
    add_latency_flags,
    add_overwrite_flag,
    number_in,
)

WHITENING_EPS = 1e-9       # added to each eigenvalue before 1/sqrt, as in the MATLAB release
COLUMN_BLOCK = 2048        # descriptor dimensions per block of the float64 products
RANK_TOLERANCE = 1e-10     # eigenvalues below this share of the largest count as zero


# ---------------------------------------------------------------------------------------------- the maths

def add_flags(p):
    add_evaluating_flags(p)
    add_latency_flags(p, optional=True)
    add_overwrite_flag(p)
    group = p.add_argument_group('pca')
    group.add_argument('--pca_dim', type=AT_LEAST_1, default=4096,
                       help='Output dimension of the PCA-whitening layer (the paper uses 4096). It cannot exceed the '
                            'rank of the training sample (--pca_images - 1); the default is lowered to it with a '
                            'message, a value given explicitly is an error.')
    group.add_argument('--pca_images', type=number_in(int, 2), default=10000,
                       help='Random training-database images whose descriptors the whitening is fitted on (all of '
                            'them when the database is smaller).')


def fit_whitening(descriptors, dim, eps=WHITENING_EPS):
    """PCA whitening of n descriptors [n, D] (an array or a DescriptorFile), in float64.

    With (lambda_i, u_i) the `dim` largest eigenpairs of the sample covariance and m the sample mean, returns
    weight W = diag(1 / sqrt(lambda_i + eps)) [u_1 .. u_dim]^T  [dim, D], bias -W m  [dim] (both float32), and
    lambda [dim] (float64): W x + bias has identity covariance on the sample. When D > n the eigenvectors come from
    the n x n Gram matrix of the centred sample (u_i = X^T v_i / sqrt((n - 1) lambda_i)), never a D x D matrix.
    """
    sample = torch.from_numpy(as_float32(descriptors[:]))  # [n, D]
    n, total_dim = sample.shape
    if not 1 <= dim <= min(total_dim, n - 1):
        raise ValueError(f'PCA of {n} samples of dimension {total_dim} has at most {min(total_dim, n - 1)} '
                         f'components; {dim} asked for')
    blocks = [slice(start, start + COLUMN_BLOCK) for start in range(0, total_dim, COLUMN_BLOCK)]
    mean = torch.cat([sample[:, block].double().mean(dim=0) for block in blocks])  # [D]
    centred = lambda block: sample[:, block].double() - mean[block]  # [n, block]
    if total_dim <= n:
        covariance = torch.cat([centred(slice(None)).T @ centred(block) for block in blocks], dim=1) / (n - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, directions = eigenvalues.flip(0)[:dim], eigenvectors.flip(1)[:, :dim]  # [dim], [D, dim]
        check_rank(eigenvalues, dim, n, total_dim)
    else:
        gram = torch.zeros(n, n, dtype=torch.float64)
        for block in blocks:
            gram.addmm_(centred(block), centred(block).T)
        eigenvalues, eigenvectors = torch.linalg.eigh(gram.div_(n - 1))  # [n, n]
        del gram
        eigenvalues, coefficients = eigenvalues.flip(0)[:dim], eigenvectors.flip(1)[:, :dim].contiguous()
        del eigenvectors  # [dim], [n, dim] kept
        check_rank(eigenvalues, dim, n, total_dim)
        directions = torch.cat([centred(block).T @ coefficients for block in blocks])  # [D, dim]
        directions /= ((n - 1) * eigenvalues).sqrt()
    directions *= directions[directions.abs().argmax(dim=0), torch.arange(dim)].sign()  # fixed signs
    weight = directions.T.div_((eigenvalues.clamp_min(0) + eps).sqrt()[:, None])  # [dim, D], in place
    return weight.float(), (-weight @ mean).float(), eigenvalues


def check_rank(eigenvalues, dim, n, total_dim):
    rank = int((eigenvalues > RANK_TOLERANCE * eigenvalues[0]).sum())
    if rank < dim:
        raise UserError(f'The descriptors of the {n} training images span only {rank} dimensions (of {total_dim}); '
                        f'whitening to {dim} would divide by zero. Use --pca_dim {rank} or less, or more distinct '
                        f'images (--pca_images).')


def whitening_layer(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def whiten_descriptors(raw, layer, path, dtype='float32'):
    """The L2-normalised whitened descriptors of a raw descriptor array or file, written chunk by chunk to `path`."""
    whitened = DescriptorFile.create(path, len(raw), layer.out_features, dtype)
    step = chunk_rows(raw.shape[1])
    with torch.inference_mode():
        for start in range(0, len(raw), step):
            rows = layer(torch.from_numpy(as_float32(raw[start:start + step])))
            whitened[start:start + len(rows)] = F.normalize(rows, p=2, dim=1).numpy()
    return whitened


# ---------------------------------------------------------------------------------------------- the mode

def whitening_dim(opt, descriptor_dim, num_images):
    """--pca_dim, checked against what num_images samples of descriptor_dim can give."""
    limit = min(descriptor_dim, num_images - 1)
    if opt.pca_dim < 1:
        raise UserError(f'--pca_dim {opt.pca_dim}: the whitened descriptor needs at least one dimension.')
    if opt.pca_dim <= limit:
        return opt.pca_dim
    reason = (f'the {descriptor_dim}-D descriptor has' if descriptor_dim <= num_images - 1 else
              f'{num_images} training images span at most')
    if 'pca_dim' in getattr(opt, 'explicit', ()):
        raise UserError(f'--pca_dim {opt.pca_dim} is more than {reason} {limit} dimensions. Use --pca_dim {limit} '
                        f'or less{"" if descriptor_dim <= num_images - 1 else ", or more images (--pca_images)"}.')
    logging.info('--pca_dim %d (the default) is more than %s %d dimensions: whitening to %d dimensions.',
                 opt.pca_dim, reason, limit, limit)
    return limit


def training_sample(opt):
    """--pca_images random training-database images (seeded): the only images the whitening is fitted on."""
    sample = training_database_sample(opt, opt.pca_images, '--mode=pca fits the whitening')
    if len(sample) < 2:
        raise UserError(f'--pca_images {opt.pca_images}: PCA needs at least 2 training images.')
    return sample


def check_source(model, checkpoint, run_dir):
    if checkpoint is not None and 'quantized' in checkpoint:
        raise UserError(f'{run_dir} holds an int8 model: fit the whitening on the float model it was quantised '
                        f'from (--mode=pca), then quantise the whitened run.')


def drop_whitening(model, checkpoint, run_dir):
    """A whitened source (e.g. an imported MATLAB network) gets a new whitening in place of its own: the checkpoint
    with the variant the raw descriptor is recorded under."""
    logging.info('%s already holds a %d-D whitening: fitting a new one on its raw %d-D descriptor in its place.',
                 run_dir, model.output_dim, model.pool.output_dim)
    del model.whiten
    return dict(checkpoint, variant=f'{variant_of(checkpoint)} without its whitening')


def pca(opt):
    make_deterministic(opt.seed)
    device = select_device(opt)
    model, checkpoint, run_dir = load_model(opt)
    check_source(model, checkpoint, run_dir)
    if hasattr(model, 'whiten'):
        checkpoint = drop_whitening(model, checkpoint, run_dir)
    sample_set = training_sample(opt)
    raw_dim = model.output_dim
    dim = whitening_dim(opt, raw_dim, len(sample_set))
    out_dir = derived_run_folder(run_dir, f'pca{dim}')
    check_derived_target(out_dir, opt)
    eval_set = load_dataset(opt, opt.split)
    with building_folder(out_dir) as folder:
        setup_logging(folder)
        copy_flags(run_dir, folder)
        results, state, path = whiten_into(folder, model, checkpoint, run_dir, sample_set, eval_set, dim, opt, device)
    record_result(opt, model, state, out_dir, results['whitened'])
    logging.info('Whitened model in %s; raw and whitened results in %s',
                 os.path.join(out_dir, 'checkpoints', 'checkpoint.pth.tar'), os.path.join(out_dir, path))
    return dict(results, run=out_dir, pca_dim=dim)


def whiten_into(out_dir, model, checkpoint, run_dir, sample_set, eval_set, dim, opt, device):
    """Fit the whitening, evaluate raw and whitened, save the whitened model into out_dir: (results, its checkpoint,
    the results file's name)."""
    raw_dim = model.output_dim
    model = model.to(device).to(memory_format=torch.channels_last)
    started = time.time()
    with cache_folder(opt.cachePath) as folder:
        sample = extract_descriptors(model, sample_set, opt, device, 'PCA sample',
                                     path=os.path.join(folder, 'pca_sample.npy'))
        weight, bias, eigenvalues = fit_whitening(sample, dim)
    layer = whitening_layer(weight, bias)
    logging.info('====> PCA whitening %d -> %d fitted on %d training-database images in %.1f s', raw_dim, dim,
                 len(sample_set), time.time() - started)
    with cache_folder(opt.cachePath) as folder:
        raw = extract_descriptors(model, eval_set, opt, device, f'{opt.split} descriptors',
                                  path=os.path.join(folder, 'raw.npy'))
        whitened = whiten_descriptors(raw, layer, os.path.join(folder, 'whitened.npy'), opt.desc_dtype)
        num_db, positives = eval_set.db_struct.numDb, eval_set.positives()
        results = dict(raw=search_and_recall(raw, num_db, positives, opt, eval_set.db_struct),
                       whitened=search_and_recall(whitened, num_db, positives, opt, eval_set.db_struct))
    for result in results.values():
        del result['predictions'], result['distances']
    record_result(opt, model, checkpoint, run_dir, results['raw'])
    model.whiten = layer.to(device)
    info = dict(dim=dim, images=len(sample_set), eps=WHITENING_EPS, source=run_dir, descriptor_dim=raw_dim,
                eigenvalues=eigenvalues.tolist())
    state = dict(model_state(model), epoch=checkpoint.get('epoch', 0) if checkpoint else 0, recalls={},
                 best_score=checkpoint.get('best_score', 0.0) if checkpoint else 0.0, parallel=False,
                 variant=f'{variant_of(checkpoint)} + PCA-whitening {dim}', pca=info)
    save_checkpoint(state, out_dir, is_best=False)
    report(results, raw_dim, dim)
    name = f'pca_{opt.split}.json'
    atomic_write_json(dict(results, split=opt.split, dataset=opt.dataset, pca=info), os.path.join(out_dir, name))
    return results, state, name


def report(results, raw_dim, dim):
    raw, whitened = results['raw'], results['whitened']
    logging.info('%-10s %14s %16s', 'Recall@N', f'raw {raw_dim}-D', f'whitened {dim}-D')
    for n in raw['recalls']:
        logging.info('%-10d %14.4f %16.4f', n, raw['recalls'][n], whitened['recalls'][n])
    logging.info('%-10s %14.2f %16.2f', 'search s', raw['search_s'], whitened['search_s'])
    log_recalls(whitened['recalls'])
