"""Retrieval pairs at scale: the chunked dot-product top-k that --mode=pairs runs (retrieval.top_k_by_dot), for
1,000,000 database images at 4096-D (a PCA-whitened NetVLAD), in bounded RAM.

    python benchmarks/bench_pairs.py --workdir /tmp/bench_pairs                    # 1,000 of the 1M queries
    python benchmarks/bench_pairs.py --workdir /tmp/bench_pairs --queries 20000    # more of them

The database is generated once into --workdir as a float16 .npy DescriptorFile (1M x 4096 x 2 bytes = 8.2 GB;
random unit vectors, seeded), as --mode=pairs holds it after copying the rows out of the global-feats .h5. The
queries are its first --queries rows, searched against all 1M rows with pairs mode's settings (self-matches
excluded by name id, min_score 0, k = --num_matched): the 1M x 1M job restricted to a slice of its queries.
All 1M queries would run the same loop 1M / --queries times over, with one more read of the database per
query chunk (chunk_rows(4096) = 32,768 queries): the script prints that extrapolation beside the measured time.
Peak RSS is this process's getrusage ru_maxrss; the resident size before the search is printed too.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netvlad_toolkit.search.descriptors import DescriptorFile, load_descriptor_file  # noqa: E402
from netvlad_toolkit.search.retrieval import as_float32, chunk_rows, top_k_by_dot  # noqa: E402

GENERATE_ROWS = 32768


def database(path, rows, dim, seed):
    """The float16 database file, generated (unit rows, chunk by chunk) unless it is there already."""
    if os.path.exists(path):
        existing = load_descriptor_file(path, check_values=False)
        if existing.shape == (rows, dim):
            return existing
    started = time.time()
    target = DescriptorFile.create(path + '.tmp', rows, dim, 'float16')
    rng = np.random.default_rng(seed)
    for start in range(0, rows, GENERATE_ROWS):
        block = rng.standard_normal((min(GENERATE_ROWS, rows - start), dim), dtype=np.float32)
        target[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    os.replace(path + '.tmp', path)
    print(f'generated {rows} x {dim} float16 ({rows * dim * 2 / 1e9:.1f} GB) in {time.time() - started:.0f} s; '
          f'measuring in a fresh process (so that its peak RSS is the search\'s alone)', flush=True)
    os.execv(sys.executable, [sys.executable] + sys.argv)


def rss_mib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmRSS'))


def read_pass_s(db):
    """Seconds to read the whole database once, chunk by chunk into float32 (what each query chunk costs in I/O)."""
    started = time.time()
    step = chunk_rows(db.shape[1])
    for start in range(0, len(db), step):
        as_float32(db[start:start + step])
    return time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True, help='Folder for the generated database (8.2 GB, kept).')
    parser.add_argument('--db', type=int, default=1_000_000, help='Database images.')
    parser.add_argument('--dim', type=int, default=4096, help='Descriptor dimension.')
    parser.add_argument('--queries', type=int, default=1000, help='Queries searched (the first rows).')
    parser.add_argument('--num_matched', type=int, default=20, help='Pairs per query.')
    parser.add_argument('--threads', type=int, default=2, help='torch threads.')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    db = database(os.path.join(args.workdir, f'db_{args.db}x{args.dim}_f16.npy'), args.db, args.dim, seed=0)
    read_s = read_pass_s(db)
    ids = np.arange(args.db)
    queries = db.view(0, args.queries)
    before = rss_mib()
    started = time.time()
    scores, found = top_k_by_dot(queries, db, args.num_matched, ids[:args.queries], ids, min_score=0.0)
    search_s = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert not (found == ids[:args.queries, None]).any() and (scores[found >= 0] >= 0).all()
    query_chunk = chunk_rows(args.dim)
    passes = -(-args.db // query_chunk)
    compute_s = max(search_s - read_s, 0.0)  # the measured search read the database once
    full_s = compute_s * args.db / args.queries + read_s * passes
    print(f'database {args.db} x {args.dim} float16 on disk; {args.queries} queries; k={args.num_matched}; '
          f'{args.threads} threads')
    print(f'one read of the database: {read_s:.1f} s')
    print(f'search: {search_s:.1f} s ({search_s / args.queries * 1000:.1f} ms per query against {args.db})')
    print(f'RSS before the search {before:.0f} MiB (imports), peak {peak:.0f} MiB: the search and the read pass '
          f'added at most {peak - before:.0f} MiB')
    print(f'extrapolated to {args.db} queries: {compute_s:.1f} s x {args.db / args.queries:.0f} + {passes} reads '
          f'x {read_s:.1f} s = {full_s:.0f} s = {full_s / 3600:.1f} h')


if __name__ == '__main__':
    main()
