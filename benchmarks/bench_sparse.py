"""Unstructured sparsity on this CPU: do the sparse kernels of the installed torch beat the dense convolution?

For each of AlexNet's convs at 480x640 (one image), with random weights of which the smallest-magnitude fraction is
zeroed (as --pruning_type=unstructured does), the dense conv (oneDNN, channels-last, as --mode=test runs it) is
timed against the same conv computed as unfold + a sparse-weight product: CSR (torch.sparse.mm) and COO. Times
are the median process CPU time of --repeats passes after a warm-up, 1 thread (CPU time: the machine may be
shared). torch's semi-structured 2:4 sparsity (to_sparse_semi_structured) runs on CUDA only, so it is not tried.
Usage: python benchmarks/bench_sparse.py [--sparsities 0.5,0.8,0.9,0.95,0.99] [--repeats 5]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# AlexNet's convs at 480x640: (input channels, input height, width, output channels, kernel, stride, padding)
ALEXNET_CONVS = [(3, 480, 640, 64, 11, 4, 2), (64, 59, 79, 192, 5, 1, 2), (192, 29, 39, 384, 3, 1, 1),
                 (384, 29, 39, 256, 3, 1, 1), (256, 29, 39, 256, 3, 1, 1)]


def cpu_ms(function, repeats):
    function()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def magnitude_pruned(weight, sparsity):
    threshold = weight.abs().flatten().kthvalue(max(1, int(sparsity * weight.numel()))).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros_like(weight))


def sparse_conv(x, sparse_weight, out_channels, kernel, stride, padding, out_size):
    """conv2d as unfold + (sparse weight [Cout, Cin*k*k]) @ (patches [Cin*k*k, L])."""
    patches = F.unfold(x, kernel, padding=padding, stride=stride)[0]  # [Cin*k*k, L]
    return torch.sparse.mm(sparse_weight, patches).reshape(1, out_channels, *out_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sparsities', default='0.5,0.8,0.9,0.95,0.99')
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, 1 thread; median CPU ms per conv (one 480x640 image); speed-up = dense / sparse')
    print('| conv (Cin→Cout, k) | dense oneDNN | sparsity | CSR | COO | best sparse speed-up |')
    print('|---|---|---|---|---|---|')
    with torch.inference_mode():
        for cin, height, width, cout, kernel, stride, padding in ALEXNET_CONVS:
            x = torch.randn(1, cin, height, width).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(cout, cin, kernel, kernel)
            dense_weight = weight.contiguous(memory_format=torch.channels_last)
            out_size = F.conv2d(x, weight, stride=stride, padding=padding).shape[2:]
            dense = cpu_ms(lambda: F.conv2d(x, dense_weight, stride=stride, padding=padding), args.repeats)
            for sparsity in map(float, args.sparsities.split(',')):
                flat = magnitude_pruned(weight, sparsity).reshape(cout, -1)
                csr, coo = flat.to_sparse_csr(), flat.to_sparse().coalesce()
                expected = F.conv2d(x, flat.reshape(weight.shape), stride=stride, padding=padding)
                got = sparse_conv(x, csr, cout, kernel, stride, padding, out_size)
                assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
                times = [cpu_ms(lambda: sparse_conv(x, w, cout, kernel, stride, padding, out_size), args.repeats)
                         for w in (csr, coo)]
                print(f'| {cin}→{cout}, {kernel}×{kernel} | {dense:.1f} | {sparsity:g} | {times[0]:.1f} | '
                      f'{times[1]:.1f} | {dense / min(times):.2f}× |', flush=True)


if __name__ == '__main__':
    main()
