"""--mode=test: descriptors of a split, exact nearest neighbours, Recall@N (SPEC section 5)."""
import contextlib
import copy
import logging
import os
import time

import faiss
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_model_from_checkpoint
from cluster import initialised_model
from commons import atomic_write_json, make_deterministic, select_device
from measure import latency_ms, model_bytes
from pittsburgh import WholeDataset, image_loader
from results import append_result

RECALL_NS = [1, 5, 10, 20]
CURVE_MAX_N = 25
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(precision, device):
    """Mixed precision for the convolutions; a no-op in fp32."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def extract_descriptors(model, dataset, opt, device, description='descriptors'):
    """Descriptors of every image of `dataset`, [N, D] float32, in dataset order."""
    loader = image_loader(dataset, opt, opt.cacheBatchSize)
    descriptors = np.empty((len(dataset), model.output_dim), dtype=np.float32)
    model.eval()
    start = 0
    with torch.inference_mode(), autocast(opt.precision, device):
        for images, _ in tqdm(loader, desc=description, unit='batch'):
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            descriptors[start:start + len(images)] = model(images).float().cpu().numpy()
            start += len(images)
    return descriptors


def exact_search(db_desc, query_desc, k, db_chunk=50000):
    """Exact L2 top-k (faiss flat) over database chunks, merged: [numQ, k] distances and indices."""
    k = min(k, len(db_desc))
    best_dist = np.full((len(query_desc), k), np.inf, dtype=np.float32)
    best_index = np.full((len(query_desc), k), -1, dtype=np.int64)
    queries = np.ascontiguousarray(query_desc, dtype=np.float32)
    for start in range(0, len(db_desc), db_chunk):
        index = faiss.IndexFlatL2(queries.shape[1])
        index.add(np.ascontiguousarray(db_desc[start:start + db_chunk], dtype=np.float32))
        dist, found = index.search(queries, k)
        merged_dist = np.concatenate([best_dist, dist], axis=1)
        merged_index = np.concatenate([best_index, found + start], axis=1)
        order = np.argsort(merged_dist, axis=1, kind='stable')[:, :k]
        best_dist = np.take_along_axis(merged_dist, order, axis=1)
        best_index = np.take_along_axis(merged_index, order, axis=1)
    return best_dist, best_index


def recall_curve(predictions, positives):
    """Share of queries with a correct database image among the top N, for N = 1 .. predictions.shape[1]."""
    hits = np.zeros(predictions.shape, dtype=bool)
    for query, (predicted, correct) in enumerate(zip(predictions, positives)):
        hits[query] = np.isin(predicted, correct)
    return np.logical_or.accumulate(hits, axis=1).mean(axis=0)


def evaluate(model, dataset, opt, device):
    """Recall@N of `model` on a whole-set dataset, with the descriptor extraction rate."""
    started = time.time()
    descriptors = extract_descriptors(model, dataset, opt, device, f'{dataset.split} descriptors')
    extraction_s = time.time() - started
    num_db = dataset.db_struct.numDb
    _, predictions = exact_search(descriptors[:num_db], descriptors[num_db:], CURVE_MAX_N)
    curve = recall_curve(predictions, dataset.positives())
    recalls = {n: float(curve[n - 1]) for n in RECALL_NS if n <= len(curve)}
    return dict(recalls=recalls, curve=curve.tolist(), descriptor_dim=int(descriptors.shape[1]),
                extraction_s=extraction_s, images_per_s=len(dataset) / extraction_s,
                search_s=time.time() - started - extraction_s, predictions=predictions)


def log_recalls(recalls):
    for n, recall in recalls.items():
        logging.info('====> Recall@%d: %.4f', n, recall)


def load_model(opt):
    """Model, checkpoint and run folder of --resume or, without it, of the cluster-initialised untrained network."""
    if opt.resume:
        return (*load_model_from_checkpoint(opt), opt.resume)
    return initialised_model(opt), None, os.path.join(opt.runsPath, f'{opt.arch}_offtheshelf')


def record_result(opt, model, checkpoint, run_dir, result):
    """Append the evaluated model, its size and its CPU latency to the results file (see results.py)."""
    cpu_model = model if next(model.parameters()).device.type == 'cpu' else copy.deepcopy(model).cpu()
    with autocast(opt.precision, torch.device('cpu')):
        latency = latency_ms(cpu_model, opt.latency_size, repeats=5, warmup=1)
    default_variant = 'trained' if checkpoint is not None else 'off-the-shelf (k-means init)'
    variant = checkpoint.get('variant', default_variant) if checkpoint is not None else default_variant
    if opt.precision != 'fp32':
        variant += f' {opt.precision}'
    return append_result(opt, variant, result, model_bytes(model, checkpoint, run_dir), latency)


def test(opt):
    make_deterministic(opt.seed)
    device = select_device(opt)
    dataset = WholeDataset(opt.dataPath, opt.split, opt.resize)
    model, checkpoint, run_dir = load_model(opt)
    if getattr(model, 'cpu_only', False) and device.type != 'cpu':  # the int8 model of --mode=quantize
        logging.info('This model runs on the CPU (int8 x86 kernels): evaluating on the CPU instead of %s.', device)
        device = torch.device('cpu')
    model = model.to(device).to(memory_format=torch.channels_last)
    logging.info('Testing %s on %s split %s: %d database images, %d queries', run_dir, opt.dataset, opt.split,
                 dataset.db_struct.numDb, dataset.db_struct.numQ)
    result = evaluate(model, dataset, opt, device)
    predictions = result.pop('predictions')
    log_recalls(result['recalls'])
    result.update(split=opt.split, dataset=opt.dataset, run=run_dir, precision=opt.precision,
                  device=str(device))
    path = os.path.join(run_dir, f'test_{opt.split}.json')
    atomic_write_json(result, path)
    record_result(opt, model, checkpoint, run_dir, result)
    logging.info('Tested %d images at %.1f images/s; results in %s', len(dataset), result['images_per_s'], path)
    return dict(result, predictions=predictions)
