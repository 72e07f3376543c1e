"""NetVLAD layer: the vectorised layer of netvlad.py against the reference port's loop over clusters.

Each (variant, pass) runs in its own subprocess, so that its peak resident memory (ru_maxrss) is its own.
Times are the best of --reps runs after a warm-up (the best, not the median: the machine is shared), as wall-clock
and as the process's CPU time (user + system, all threads), which time-sharing with other jobs disturbs less.
Usage: python benchmarks/bench_netvlad.py [--batch 24] [--dim 512] [--height 30] [--width 40] [--clusters 64] [--reps 3]
       [--threads 1]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from netvlad_toolkit.model.netvlad import NetVLAD  # noqa: E402


def loop_netvlad(layer, x):
    """The reference port's formulation: for each cluster, residuals x - c_k at all locations [B, D, HW], weighted
    by that cluster's soft-assignment and summed."""
    batch, dim = x.shape[:2]
    x = F.normalize(x, p=2, dim=1)
    soft_assign = F.softmax(layer.conv(x).flatten(2), dim=1)  # [B, K, HW]
    x_flat = x.flatten(2)  # [B, D, HW]
    rows = []
    for k in range(layer.num_clusters):
        residual = x_flat - layer.centroids[k][None, :, None]  # [B, D, HW]
        residual = residual * soft_assign[:, k:k + 1, :]
        rows.append(residual.sum(dim=-1))  # [B, D]
    vlad = torch.stack(rows, dim=1)  # [B, K, D]
    vlad = F.normalize(vlad, p=2, dim=2)
    return F.normalize(vlad.reshape(batch, -1), p=2, dim=1)


def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def run_one(args):
    """In the subprocess: time one variant and pass; print a JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = NetVLAD(args.clusters, args.dim)
    x = torch.randn(args.batch, args.dim, args.height, args.width)
    forward = layer if args.variant == 'vectorised' else (lambda x: loop_netvlad(layer, x))
    baseline = rss_mib()
    times, cpu_times = [], []
    for rep in range(args.reps + 1):  # the first is a warm-up
        started, cpu_started = time.perf_counter(), time.process_time()
        if args.pass_ == 'forward':
            with torch.no_grad():
                forward(x)
        else:
            layer.zero_grad()
            x.requires_grad_(True)
            forward(x).sum().backward()
            x.grad = None
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(seconds=min(times[1:]), cpu_seconds=min(cpu_times[1:]), peak_extra_mib=peak - baseline)))


def check_agreement(args):
    torch.manual_seed(0)
    layer = NetVLAD(args.clusters, args.dim)
    x = torch.randn(2, args.dim, args.height, args.width)
    with torch.no_grad():
        return float((layer(x) - loop_netvlad(layer, x)).abs().max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=24)
    p.add_argument('--dim', type=int, default=512)
    p.add_argument('--height', type=int, default=30)
    p.add_argument('--width', type=int, default=40)
    p.add_argument('--clusters', type=int, default=64)
    p.add_argument('--reps', type=int, default=3, help='timed repetitions after one warm-up (the best is reported)')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: on a shared 2-core machine, 2 threads wait on each other)')
    p.add_argument('--variant', choices=['vectorised', 'loop'], help=argparse.SUPPRESS)
    p.add_argument('--pass', dest='pass_', choices=['forward', 'forward+backward'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return run_one(args)

    shape = f'{args.batch}x{args.dim}x{args.height}x{args.width}, K={args.clusters}'
    print(f'NetVLAD on {shape}; torch {torch.__version__}, {args.threads} threads, '
          f'best of {args.reps} after a warm-up')
    print(f'max |vectorised - loop| on a 2-image batch: {check_agreement(args):.2e}')
    common = [f'--{k}={getattr(args, k)}' for k in ('batch', 'dim', 'height', 'width', 'clusters', 'reps', 'threads')]
    for pass_ in ('forward', 'forward+backward'):
        result = {}
        for variant in ('vectorised', 'loop'):
            out = subprocess.run([sys.executable, __file__, f'--variant={variant}', f'--pass={pass_}', *common],
                                 check=True, capture_output=True, text=True).stdout
            result[variant] = json.loads(out.strip().splitlines()[-1])
            print(f'{pass_:17s} {variant:10s} {result[variant]["seconds"] * 1000:9.1f} ms wall '
                  f'{result[variant]["cpu_seconds"] * 1000:9.1f} ms CPU   '
                  f'peak memory +{result[variant]["peak_extra_mib"]:7.0f} MiB')
        ratio = lambda key: result['loop'][key] / result['vectorised'][key]
        print(f'{pass_:17s} speed-up {ratio("seconds"):.1f}x wall, {ratio("cpu_seconds"):.1f}x CPU time; '
              f'peak memory {result["loop"]["peak_extra_mib"] / max(result["vectorised"]["peak_extra_mib"], 1):.1f}x '
              f'less')


if __name__ == '__main__':
    main()
