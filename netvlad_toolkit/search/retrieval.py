"""Descriptors and retrieval, the service every mode that evaluates or searches uses: batched descriptor
extraction (to memory or to a descriptor file), exact and approximate nearest-neighbour search, Recall@N.

Memory does not grow with the split: descriptors go to a file as they are computed (descriptors.py), the exact
search reads it in chunks and keeps only each query's top 25, and recall needs only those. --index ivfpq|hnsw
searches an approximate faiss index instead (on the GPU when faiss-gpu and CUDA are there, as is the exact search).
A split's protocol rules (datasets.GroundTruth: one image per panorama, database images a query's ranking skips,
queries that are not scored) apply to the ranking before Recall@N is counted.
"""
import contextlib
import logging
import os
import time

import faiss
import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from netvlad_toolkit.datasets.gpu_decode import image_batches
from netvlad_toolkit.search.descriptors import DescriptorFile, DescriptorParts, cache_folder

RECALL_NS = [1, 5, 10, 20]
CURVE_MAX_N = 25
SEARCH_CHUNK_BYTES = 512 * 2 ** 20   # float32 bytes of one database or query chunk of the exact search
APPROX_TRAIN_BYTES = 2 ** 30         # float32 bytes of the database sample an IVF-PQ index is trained on
IVF_NPROBE = 32                      # inverted lists visited per query
PQ_MAX_BYTES = 64                    # product-quantizer code bytes per database image (8-bit sub-quantizers)
HNSW_M, HNSW_EF_SEARCH = 32, 128     # graph degree; candidate list length at search
TIME_EXCLUSION_FACTOR = 10           # TokyoTM val: retrieve 10x, then drop the query's time (dbTokyoTimeMachine.m)
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(precision, device):
    """Mixed precision for the convolutions; a no-op in fp32."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def extract_descriptors(model, dataset, opt, device, description='descriptors', path=None):
    """Descriptors of every image of `dataset`, in dataset order: [N, D] float32 in memory or, given `path`, a
    DescriptorFile there (dtype --desc_dtype) written batch by batch as they are computed.

    On CUDA a batch's descriptors are copied back while the next batch is decoded and run (HostCopy), and JPEGs
    are decoded on the card (gpu_decode.image_batches)."""
    loader, on_device = image_batches(dataset, opt, opt.cacheBatchSize, device)
    if path is None:
        descriptors = np.empty((len(dataset), model.output_dim), dtype=np.float32)
    else:
        descriptors = DescriptorFile.create(path, len(dataset), model.output_dim,
                                            getattr(opt, 'desc_dtype', 'float32'))
    model.eval()
    start, pending = 0, None
    with torch.inference_mode(), autocast(opt.precision, device):
        for batch in tqdm(loader, desc=description, unit='batch'):
            images = on_device(batch)[0].contiguous(memory_format=torch.channels_last)
            copy = HostCopy(model(images).float(), start)
            if pending is not None:
                pending.write_to(descriptors)
            pending, start = copy, start + len(images)
    if pending is not None:
        pending.write_to(descriptors)
    return descriptors


class HostCopy:
    """A batch's output on its way to host memory: on CUDA copied into pinned memory without waiting, so that the
    card runs on while the host prepares the next batch; write_to waits for the copy only then."""

    def __init__(self, output, start):
        self.start = start
        if output.device.type != 'cuda':
            self.host, self.done = output, None
            return
        self.host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
        self.host.copy_(output, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def write_to(self, descriptors):
        if self.done is not None:
            self.done.synchronize()
        descriptors[self.start:self.start + len(self.host)] = self.host.numpy()


# ---------------------------------------------------------------------------------------------- search

def chunk_rows(dim, chunk_bytes=None):
    """Rows of a [rows, dim] float32 chunk of at most chunk_bytes (default SEARCH_CHUNK_BYTES)."""
    return max(1, (chunk_bytes or SEARCH_CHUNK_BYTES) // (4 * dim))


def as_float32(rows):
    return np.ascontiguousarray(rows, dtype=np.float32)


def rows_of(descriptors, start, stop):
    """Rows start..stop of an array (a view) or of a DescriptorFile or DescriptorParts (a view, nothing read)."""
    return descriptors[start:stop] if isinstance(descriptors, np.ndarray) else descriptors.view(start, stop)


def faiss_gpu_available():
    """faiss built with GPU support (faiss-gpu) and a CUDA device it can see."""
    return hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


def on_gpu(index, gpu):
    """The index moved to the GPU when `gpu` (faiss GPU resources) is given, else the index itself."""
    return index if gpu is None else faiss.index_cpu_to_gpu(gpu, 0, index)


def merge_top_k(best_dist, best_index, dist, found, k):
    """The k smallest of two [Q, *] candidate lists (ties keep the earlier list, i.e. the lower database rows)."""
    dist = np.where(found < 0, np.inf, dist)
    merged_dist = np.concatenate([best_dist, dist], axis=1)
    merged_index = np.concatenate([best_index, found], axis=1)
    order = np.argsort(merged_dist, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(merged_dist, order, axis=1), np.take_along_axis(merged_index, order, axis=1)


def exact_search(db_desc, query_desc, k, db_chunk=None, query_chunk=None, use_gpu=False):
    """Exact L2 top-k (faiss flat): [numQ, k] squared distances and database indices, nearest first.

    db_desc, query_desc: [N, D] arrays or DescriptorFiles. Each database chunk is read once and searched by every
    query chunk; a chunk holds at most SEARCH_CHUNK_BYTES of float32 (by default), and only [numQ, k] results are
    kept, so memory does not grow with the database and no numQ x numDb matrix is ever formed.
    """
    dim = db_desc.shape[1]
    k = min(k, len(db_desc))
    db_chunk = db_chunk or chunk_rows(dim)
    query_chunk = query_chunk or chunk_rows(dim)
    best_dist = np.full((len(query_desc), k), np.inf, dtype=np.float32)
    best_index = np.full((len(query_desc), k), -1, dtype=np.int64)
    gpu = faiss.StandardGpuResources() if use_gpu else None
    for db_start in range(0, len(db_desc), db_chunk):
        index = on_gpu(faiss.IndexFlatL2(dim), gpu)
        index.add(as_float32(db_desc[db_start:db_start + db_chunk]))
        for q_start in range(0, len(query_desc), query_chunk):
            rows = slice(q_start, q_start + query_chunk)
            dist, found = index.search(as_float32(query_desc[rows]), k)
            best_dist[rows], best_index[rows] = merge_top_k(best_dist[rows], best_index[rows], dist,
                                                            np.where(found < 0, -1, found + db_start), k)
    return best_dist, best_index


def top_k_by_dot(query_desc, db_desc, k, query_ids=None, db_ids=None, min_score=None, chunk_bytes=None):
    """Exact top-k by dot product (highest first): [numQ, k] similarities and database indices; a slot left empty
    (fewer than k valid candidates) holds -inf and -1.

    query_desc, db_desc: [N, D] arrays or DescriptorFiles (float16 or float32), read in chunks of at most
    chunk_bytes of float32 each (default SEARCH_CHUNK_BYTES); the similarity block of one query sub-chunk against
    one database chunk stays within chunk_bytes too, so memory is about three chunks whatever the sizes. Pairs
    with query_ids[i] == db_ids[j] (e.g. an image and itself) are excluded, and so are similarities below
    min_score.
    """
    dim = db_desc.shape[1]
    k = min(k, len(db_desc))
    rows = chunk_rows(dim, chunk_bytes)
    block_rows = max(1, (chunk_bytes or SEARCH_CHUNK_BYTES) // (4 * min(rows, len(db_desc))))
    negated = np.full((len(query_desc), k), np.inf, dtype=np.float32)  # -similarity: merge_top_k keeps the smallest
    best_index = np.full((len(query_desc), k), -1, dtype=np.int64)
    for q_start in range(0, len(query_desc), rows):
        queries = torch.from_numpy(as_float32(query_desc[q_start:q_start + rows]))
        for db_start in range(0, len(db_desc), rows):
            database = torch.from_numpy(as_float32(db_desc[db_start:db_start + rows]))
            for b_start in range(0, len(queries), block_rows):
                block = queries[b_start:b_start + block_rows]
                at = slice(q_start + b_start, q_start + b_start + len(block))
                scores = block @ database.T  # [block, db chunk]
                if query_ids is not None:
                    same = query_ids[at, None] == db_ids[None, db_start:db_start + len(database)]
                    scores.masked_fill_(torch.from_numpy(same), -np.inf)
                if min_score is not None:
                    scores.masked_fill_(scores < min_score, -np.inf)
                top = torch.topk(scores, min(k, len(database)), dim=1)
                negated[at], best_index[at] = merge_top_k(negated[at], best_index[at], -top.values.numpy(),
                                                          top.indices.numpy() + db_start, k)
    best_index[~np.isfinite(negated)] = -1
    return -negated, best_index


def approximate_index(kind, db_desc, gpu=None):
    """A faiss IVF-PQ or HNSW index over the database, trained on (a strided sample of) the database itself."""
    num_db, dim = db_desc.shape
    if kind == 'hnsw':
        index = faiss.index_factory(dim, f'HNSW{HNSW_M}')
        index.hnsw.efSearch = HNSW_EF_SEARCH
        logging.info('HNSW index: M=%d, efSearch=%d; it holds the database as float32 in memory (%.1f GB)',
                     HNSW_M, HNSW_EF_SEARCH, num_db * dim * 4 / 1e9)
    else:
        train = training_sample(db_desc)
        nlist = 2 ** int(np.log2(max(1, min(4 * np.sqrt(num_db), len(train) / 39))))
        nbits = min(8, int(np.log2(len(train))))
        subquantizers = max(m for m in range(1, PQ_MAX_BYTES + 1) if dim % m == 0)
        index = faiss.index_factory(dim, f'IVF{nlist},PQ{subquantizers}x{nbits}')
        ivf = faiss.downcast_index(index)
        ivf.do_polysemous_training = False  # Hamming filtering is not used; its training is slow and noisy
        ivf.nprobe = min(IVF_NPROBE, nlist)
        index.train(train)
        logging.info('IVF-PQ index: %d lists (nprobe %d), %d sub-quantizers x %d bits (%d bytes per image), '
                     'trained on %d database descriptors', nlist, min(IVF_NPROBE, nlist), subquantizers, nbits,
                     subquantizers * nbits // 8, len(train))
        if gpu is not None:
            try:
                index = on_gpu(index, gpu)
            except RuntimeError as error:  # code sizes the GPU kernels do not support
                logging.info('IVF-PQ stays on the CPU: faiss GPU refused it (%s)', str(error).splitlines()[0])
    step = chunk_rows(dim)
    for start in range(0, num_db, step):
        index.add(as_float32(db_desc[start:start + step]))
    return index


def training_sample(db_desc):
    """Every s-th database descriptor, at most APPROX_TRAIN_BYTES of float32 of them, as one array."""
    num_db, dim = db_desc.shape
    stride = -(-num_db // max(1, min(num_db, APPROX_TRAIN_BYTES // (4 * dim))))
    step = chunk_rows(dim) // stride * stride or stride
    return np.concatenate([as_float32(db_desc[start:start + step])[::stride] for start in range(0, num_db, step)])


def approximate_search(kind, db_desc, query_desc, k, use_gpu=False):
    """Top-k database indices [numQ, k] from an approximate index (see approximate_index)."""
    index = approximate_index(kind, db_desc, faiss.StandardGpuResources() if use_gpu else None)
    return search_index(index, query_desc, min(k, len(db_desc)))[1]


def search_index(index, query_desc, k):
    """[numQ, k] (squared distances as the index estimates them, database indices), nearest first."""
    step = chunk_rows(query_desc.shape[1])
    found = [index.search(as_float32(query_desc[start:start + step]), k) for start in range(0, len(query_desc), step)]
    return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- protocol rules

def candidates_to_search(protocol, n):
    """How many neighbours to retrieve so that (up to) n remain after the protocol's ranking rules."""
    if protocol is None:
        return n
    if protocol.db_panorama is not None:  # the largest panorama: the authors' 12 x N for Tokyo 24/7
        n *= int(np.bincount(protocol.db_panorama).max())
    if protocol.exclude_same_time:
        n *= TIME_EXCLUSION_FACTOR
    return n


def first_of_each_panorama(predictions, db_panorama):
    """[Q, k] mask of the best-ranked database image of each panorama in each ranking (-1 entries: False)."""
    k = predictions.shape[1]
    position = np.arange(k)
    panorama = np.where(predictions >= 0, db_panorama[predictions], -1 - position)  # padding: all distinct
    key = np.sort(panorama * k + position, axis=1)  # by panorama, then by rank within it: its best comes first
    group = key // k
    first_in_group = np.ones(key.shape, dtype=bool)
    first_in_group[:, 1:] = group[:, 1:] != group[:, :-1]
    first = np.zeros(key.size, dtype=bool)
    first[(np.arange(0, key.size, k)[:, None] + key % k).ravel()] = first_in_group.ravel()
    return first.reshape(key.shape) & (predictions >= 0)


def keep_ranked(dist, predictions, keep, n):
    """The first n kept entries of each ranking, in order; rows with fewer are padded with inf / -1."""
    n = min(n, predictions.shape[1])
    slot = np.cumsum(keep, axis=1) - 1  # where each kept entry goes in its row
    rows, columns = np.nonzero(keep & (slot < n))
    kept_dist = np.full((len(predictions), n), np.inf, dtype=dist.dtype)
    kept = np.full((len(predictions), n), -1, dtype=predictions.dtype)
    kept_dist[rows, slot[rows, columns]] = dist[rows, columns]
    kept[rows, slot[rows, columns]] = predictions[rows, columns]
    return kept_dist, kept


def apply_ranking_rules(dist, predictions, protocol, n):
    """Top n after the protocol's rules: skipped database images (TokyoTM val), one image per panorama (Tokyo 24/7)."""
    if protocol is None:
        return dist[:, :n], predictions[:, :n]
    keep = protocol.kept_in_ranking(predictions)
    if protocol.db_panorama is not None:
        dist, predictions = keep_ranked(dist, predictions, keep, predictions.shape[1])
        keep = first_of_each_panorama(predictions, protocol.db_panorama)
    return keep_ranked(dist, predictions, keep, n)


def scored_queries(positives, protocol):
    """Indices of the queries Recall@N counts; logs how many queries have no positive and what happens to them."""
    without = sum(len(p) == 0 for p in positives)
    radius = f'{protocol.posDistThr:g} m' if protocol is not None else 'the positive distance'
    if protocol is not None and protocol.only_queries_with_positives:
        logging.info('%d of %d queries have no database image within %s: not scored (MSLS protocol).', without,
                     len(positives), radius)
        return np.array([q for q, p in enumerate(positives) if len(p) > 0], dtype=np.int64)
    if without:
        logging.info('%d of %d queries have no database image within %s: they count as misses.', without,
                     len(positives), radius)
    return np.arange(len(positives))


# ---------------------------------------------------------------------------------------------- recall

def recall_curve(predictions, positives):
    """Share of queries with a correct database image among the top N, for N = 1 .. predictions.shape[1]."""
    hits = np.zeros(predictions.shape, dtype=bool)
    for query, (predicted, correct) in enumerate(zip(predictions, positives)):
        hits[query] = np.isin(predicted, correct)
    return np.logical_or.accumulate(hits, axis=1).mean(axis=0)


def recalls_of(curve):
    return {n: float(curve[n - 1]) for n in RECALL_NS if n <= len(curve)}


def search_and_recall(whole, num_db, positives, opt, protocol=None, rerank=None, rerank_top=0):
    """Search the queries (rows num_db..) of a whole-set descriptor array or file among its database rows.

    protocol: the split's GroundTruth, whose rules (panorama suppression, skipped database images, queries not
    scored) apply; None: plain ranking, every query scored. rerank: a function that re-orders each query's first
    rerank_top candidates ([Q, rerank_top] database ids -> the same ids in a new order) before Recall@N. Returns
    recalls, curve, descriptor_dim, search_s, queries_scored, predictions and distances (descriptor L2, [numQ,
    max(25, --save_predictions, rerank_top)]), with a re-ranking also the global search's own global_recalls; with --index ivfpq|hnsw also `index`, and with --compare_exact the
    exact search's `exact` recalls and time beside them.
    """
    db_desc, query_desc = rows_of(whole, 0, num_db), rows_of(whole, num_db, len(whole))
    use_gpu = opt.cuda and faiss_gpu_available()
    index = getattr(opt, 'index', 'flat')
    kept = max(CURVE_MAX_N, getattr(opt, 'save_predictions', 0) or 0, rerank_top if rerank else 0)
    k = candidates_to_search(protocol, kept)
    scored = scored_queries(positives, protocol)
    started = time.time()
    if index == 'flat':
        dist, predictions = exact_search(db_desc, query_desc, k, use_gpu=use_gpu)
    else:
        built = approximate_index(index, db_desc, faiss.StandardGpuResources() if use_gpu else None)
        build_s = time.time() - started
        dist, predictions = search_index(built, query_desc, min(k, len(db_desc)))
        del built
    dist, predictions = apply_ranking_rules(dist, predictions, protocol, kept)
    search_s = time.time() - started
    before = {}
    if rerank is not None:
        before = dict(global_recalls=recalls_of(scored_recall_curve(predictions, positives, scored)))
        dist, predictions = reorder_first(dist, predictions, rerank(predictions[:, :rerank_top]))
    curve = scored_recall_curve(predictions, positives, scored)
    result = dict(recalls=recalls_of(curve), curve=curve.tolist(), descriptor_dim=int(whole.shape[1]),
                  search_s=search_s, queries_scored=len(scored), predictions=predictions,
                  distances=np.sqrt(np.maximum(dist, 0)), **before)
    if index != 'flat':
        result.update(index=index, index_build_s=build_s)  # search_s includes the build
        logging.info('%s index built in %.1f s, queries searched in %.1f s', index, build_s,
                     result['search_s'] - build_s)
    if index != 'flat' and getattr(opt, 'compare_exact', False):
        started = time.time()
        exact_predictions = apply_ranking_rules(*exact_search(db_desc, query_desc, k, use_gpu=use_gpu), protocol,
                                                kept)[1]
        exact = dict(recalls=recalls_of(scored_recall_curve(exact_predictions, positives, scored)),
                     search_s=time.time() - started)
        result['exact'] = exact
        logging.info('%-10s %10s %10s %10s', 'Recall@N', 'exact', index, 'change')
        for n, recall in result['recalls'].items():
            logging.info('%-10d %10.4f %10.4f %+10.4f', n, exact['recalls'][n], recall, recall - exact['recalls'][n])
        logging.info('%-10s %10.1f %10.1f', 'search s', exact['search_s'], result['search_s'])
    return result


def reorder_first(dist, predictions, reordered):
    """dist and predictions [Q, k] with each row's first n entries put in the order of reordered [Q, n] (the same
    database ids, re-ranked; padding -1 last, as in predictions)."""
    n = reordered.shape[1]
    source = np.argmax(reordered[:, :, None] == predictions[:, None, :n], axis=2)  # [Q, n]: where each id was
    dist, predictions = dist.copy(), predictions.copy()
    dist[:, :n] = np.take_along_axis(dist[:, :n], source, axis=1)
    predictions[:, :n] = reordered
    return dist, predictions


def scored_recall_curve(predictions, positives, scored):
    """Recall@1..CURVE_MAX_N over the scored queries."""
    return recall_curve(predictions[scored, :CURVE_MAX_N], [positives[q] for q in scored])


def evaluate(model, dataset, opt, device, rerank=None, rerank_top=0, db_model=None):
    """Recall@N of `model` on a whole-set dataset, with the descriptor extraction rate (rerank, rerank_top: as
    search_and_recall's). db_model: the model that describes the database images, when it is not `model`
    (asymmetric search: a distilled student's queries in its teacher's database).

    The descriptors are streamed to a file in --cachePath (default: a new temporary folder), searched there in
    chunks, and deleted afterwards.
    """
    with cache_folder(getattr(opt, 'cachePath', None)) as folder:
        started = time.time()
        if db_model is None:
            whole = extract_descriptors(model, dataset, opt, device, f'{dataset.split} descriptors',
                                        path=os.path.join(folder, f'{dataset.split}.npy'))
        else:
            whole = asymmetric_descriptors(db_model, model, dataset, opt, device, folder)
        extraction_s = time.time() - started
        result = search_and_recall(whole, dataset.db_struct.numDb, dataset.positives(), opt, dataset.db_struct,
                                   rerank, rerank_top)
    return dict(result, extraction_s=extraction_s, images_per_s=len(dataset) / extraction_s)


def asymmetric_descriptors(db_model, query_model, dataset, opt, device, folder):
    """The descriptors of a whole-set dataset, its database images described by db_model and its queries by
    query_model, as one [N, D] array of two files in `folder`."""
    num_db = dataset.db_struct.numDb
    sides = [(db_model, range(num_db), 'database'), (query_model, range(num_db, len(dataset)), 'query')]
    return DescriptorParts([extract_descriptors(model, Subset(dataset, rows), opt, device,
                                                f'{dataset.split} {side} descriptors',
                                                path=os.path.join(folder, f'{dataset.split}_{side}.npy'))
                            for model, rows, side in sides])


def log_recalls(recalls):
    for n, recall in recalls.items():
        logging.info('====> Recall@%d: %.4f', n, recall)

