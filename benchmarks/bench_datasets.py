"""Protocol rules and dataset reading at real scale: panorama suppression (Tokyo 24/7: 75,984 database cutouts,
12 per panorama) vectorised against a per-query loop, and parsing folder-format names at pitts250k size.

python benchmarks/bench_datasets.py [--queries 10000] [--names 100000]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from netvlad_toolkit.datasets.folder_dataset import utm_from_filename  # noqa: E402
from netvlad_toolkit.search.retrieval import first_of_each_panorama, keep_ranked  # noqa: E402

TOKYO_DB, CUTOUTS, TOP_N = 75984, 12, 25


def loop_suppression(predictions, panorama, n):
    """One query at a time: the first image of each panorama, in ranking order (np.unique per row)."""
    kept = np.full((len(predictions), n), -1)
    for row, ranked in enumerate(predictions):
        _, first = np.unique(panorama[ranked], return_index=True)
        chosen = ranked[np.sort(first)][:n]
        kept[row, :len(chosen)] = chosen
    return kept


def best_of(function, repeats=3):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--queries', type=int, default=10000)
    parser.add_argument('--names', type=int, default=100000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    panorama = np.arange(TOKYO_DB) // CUTOUTS
    # rankings that revisit panoramas, as real ones do: cutouts of a few nearby panoramas
    centres = rng.integers(0, TOKYO_DB // CUTOUTS, size=(args.queries, 1))
    predictions = (centres + rng.integers(-20, 20, size=(args.queries, CUTOUTS * TOP_N))).clip(0, TOKYO_DB // CUTOUTS - 1)
    predictions = predictions * CUTOUTS + rng.integers(0, CUTOUTS, size=predictions.shape)
    dist = np.sort(rng.random(predictions.shape), axis=1)
    vector_s, (_, vectorised) = best_of(
        lambda: keep_ranked(dist, predictions, first_of_each_panorama(predictions, panorama), TOP_N))
    loop_s, looped = best_of(lambda: loop_suppression(predictions, panorama, TOP_N))
    assert (vectorised == looped).all()
    print(f'panorama suppression, {args.queries} queries x {CUTOUTS * TOP_N} candidates: vectorised '
          f'{vector_s * 1e3:.0f} ms, per-query loop {loop_s * 1e3:.0f} ms, ratio {loop_s / vector_s:.1f}x')
    names = [f'/data/images/test/database/@{585000 + i * 0.37:.2f}@{4477000 + i * 0.11:.2f}@17@T@40.4@-79.9@{i // 24}'
             f'@{i % 24}@@@@@@@.jpg' for i in range(args.names)]
    parse_s, _ = best_of(lambda: [utm_from_filename(name) for name in names])
    print(f'utm_from_filename: {args.names} names in {parse_s:.2f} s ({parse_s / args.names * 1e6:.1f} us per name)')


if __name__ == '__main__':
    main()
