"""Descriptor extraction, fp32 against bf16 autocast: speed at 480x640 and Recall@N on the synthetic test split.

Speed: images/s of retrieval.extract_descriptors on generated 480x640 JPEGs (on CUDA decoded on the card), random
--fromscratch weights, NetVLAD initialised from the images' own local features, beside the model alone on one batch
already on the device, at the same batch and precision. Recall: the CLI's cluster mode, then test mode in both precisions.

Usage: python benchmarks/bench_extract.py [--archs alexnet vgg16] [--images 8] [--batch 4]
       [--recall_archs alexnet vgg16] [--synth_queries 150] [--threads N] [--device cuda --workers 12]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.images import ImageList  # noqa: E402
from netvlad_toolkit.model.centroids import new_model  # noqa: E402
from netvlad_toolkit.runs.runs import place_model  # noqa: E402
from netvlad_toolkit.search.retrieval import autocast, extract_descriptors  # noqa: E402

PRECISIONS = ['fp32', 'bf16']


def write_images(folder, count, size=(480, 640), seed=0):
    """Smooth random colour fields with some edges, as JPEGs of the Pittsburgh size."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, size=(size[0] // 16, size[1] // 16, 3), dtype=np.uint8))
        image = coarse.resize((size[1], size[0]), Image.BICUBIC)
        paths.append(os.path.join(folder, f'{i:03d}.jpg'))
        image.save(paths[-1], quality=90)
    return paths


def init_netvlad_from_images(model, images, num_clusters):
    """Centroids: random L2-normalised local features of these images (random centroids in [0, 1]^D would give
    every image nearly the same descriptor, hiding any precision loss)."""
    with torch.no_grad():
        local = torch.nn.functional.normalize(model.encoder(images).flatten(2), dim=1)  # [B, D, HW]
    local = local.transpose(1, 2).reshape(-1, local.shape[1]).numpy()
    chosen = np.random.default_rng(0).choice(len(local), num_clusters, replace=False)
    model.pool.init_from_clusters(local[chosen], local)


def device_flags(args):
    """The CLI flags of --device and --workers (DataLoader workers decoding the JPEGs)."""
    return [f'--threads={args.workers}', *(['--nocuda'] if args.device == 'cpu' else [])]


def model_alone_rate(model, images, precision, device, batches):
    """images/s of the model alone on one batch already on the device, run `batches` times (after two warm-up
    passes), at the precision extraction uses."""
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision, device):
        for _ in range(2):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            model(images).float()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return batches * len(images) / (time.perf_counter() - started)


def extraction_speed(arch, paths, args):
    """images/s per precision of a whole extraction and of the model alone (at the same batch), and the mean
    cosine between the fp32 and bf16 descriptors of the same images."""
    dataset = ImageList(paths)
    rates, alone, descriptors = {}, {}, {}
    for precision in PRECISIONS:
        opt = cli.parse_options(['--mode=test', f'--arch={arch}', '--fromscratch', *device_flags(args),
                                  f'--cacheBatchSize={args.batch}', f'--precision={precision}'])
        model = new_model(opt).eval()
        init_netvlad_from_images(model, torch.stack([dataset[i][0] for i in range(2)]), opt.num_clusters)
        model, device = place_model(model, torch.device(args.device))
        extract_descriptors(model, ImageList(paths[:args.batch]), opt, device, 'warm-up')
        started = time.perf_counter()
        descriptors[precision] = extract_descriptors(model, dataset, opt, device, f'{arch} {precision}')
        rates[precision] = len(paths) / (time.perf_counter() - started)
        batch = torch.stack([dataset[i][0] for i in range(min(args.batch, len(paths)))])
        alone[precision] = model_alone_rate(model, batch, precision, device, -(-len(paths) // len(batch)))
    cosine = float(np.mean(np.sum(descriptors['fp32'] * descriptors['bf16'], axis=1)))
    return rates, alone, cosine


def recalls_by_precision(arch, folder, synth_queries, args):
    """Off-the-shelf (k-means initialised) Recall@N on the synthetic test split, fp32 and bf16."""
    data, runs = os.path.join(folder, 'synthetic'), os.path.join(folder, 'runs')
    common = ['--dataset=synthetic', '--dataPath', data, f'--arch={arch}', '--fromscratch', *device_flags(args),
              '--runsPath', runs, f'--synth_queries={synth_queries}']
    assert cli.main(['--mode=cluster', *common]) == 0
    recalls = {}
    for precision in PRECISIONS:
        assert cli.main(['--mode=test', '--split=test', f'--precision={precision}', *common]) == 0
        with open(os.path.join(runs, f'{arch}_offtheshelf', 'test_test.json')) as f:
            recalls[precision] = {int(n): r for n, r in json.load(f)['recalls'].items()}
    return recalls


def main_():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', nargs='*', default=['alexnet', 'vgg16'], help='archs for the speed measurement')
    p.add_argument('--images', type=int, default=8, help='480x640 images to time (after a one-batch warm-up)')
    p.add_argument('--batch', type=int, default=4, help='--cacheBatchSize')
    p.add_argument('--recall_archs', nargs='*', default=['alexnet', 'vgg16'], help='archs for the recall check')
    p.add_argument('--threads', type=int, default=0, help='torch threads (default: torch\'s own choice)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where the models run')
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers decoding the JPEGs (0: in the loop)')
    p.add_argument('--synth_queries', type=int, default=150,
                   help='queries of the synthetic test split (150, the CLI default: one query is 0.0067 of recall)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(folder, args.images)
        for arch in args.archs:
            rates, alone, cosine = extraction_speed(arch, paths, args)
            summary.append(f'{arch:8s} 480x640 batch {args.batch}: fp32 {rates["fp32"]:.2f} img/s, '
                           f'bf16 {rates["bf16"]:.2f} img/s, bf16 speed-up {rates["bf16"] / rates["fp32"]:.2f}x; '
                           f'descriptors: mean 1 - cosine(fp32, bf16) {1 - cosine:.1e}')
            summary += [f'{arch:8s} {precision}: extraction {rates[precision]:.1f} img/s = '
                        f'{100 * rates[precision] / alone[precision]:.0f}% of the model alone '
                        f'({alone[precision]:.1f} img/s at batch {args.batch})' for precision in PRECISIONS]
        for arch in args.recall_archs:
            recalls = recalls_by_precision(arch, os.path.join(folder, arch), args.synth_queries, args)
            worst = max(abs(recalls['fp32'][n] - recalls['bf16'][n]) for n in recalls['fp32'])
            table = ', '.join(f'R@{n} {recalls["fp32"][n]:.4f}/{recalls["bf16"][n]:.4f}' for n in recalls['fp32'])
            summary.append(f'{arch:8s} synthetic test ({args.synth_queries} queries), off-the-shelf, fp32/bf16: '
                           f'{table}; max |diff| {worst:.4f} ({"within" if worst <= 0.005 + 1e-9 else "NOT within"} 0.005)')
    print(f'\ntorch {torch.__version__}, {torch.get_num_threads()} threads')
    print('\n'.join(summary))


if __name__ == '__main__':
    main_()
