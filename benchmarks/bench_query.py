"""Query time once the database exists: one --mode=query call for one photo, against the forward pass and search it
contains.

    python benchmarks/bench_query.py --workdir /tmp/bench_query
    python benchmarks/bench_query.py --workdir /tmp/bench_query --db 100000 --arch vgg16

A random (k-means-free) AlexNet NetVLAD, K=64 (16,384-D), in a run folder; a global-feats .h5 of --db random unit
descriptors written as --mode=extract writes it; one 480x640 photo. Measured in this process, after a warm-up
query: the forward pass of the photo alone, the exact search alone (retrieval.top_k_by_dot against the database
rows in memory), and the whole query (query.query: model loading, the photo's descriptor, copying the database
rows out of the .h5, the search, the CSV and the picture). Each is the median of --repeats.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.images import load_image  # noqa: E402
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint  # noqa: E402
from netvlad_toolkit.model.models import build_model  # noqa: E402
from netvlad_toolkit.modes.query import query  # noqa: E402
from netvlad_toolkit.search.descriptors import cache_folder  # noqa: E402
from netvlad_toolkit.search.global_features import h5_names, read_descriptors, write_groups  # noqa: E402
from netvlad_toolkit.search.retrieval import top_k_by_dot  # noqa: E402

WRITE_ROWS = 4096


def median_s(action, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prepare(workdir, arch, num_db):
    """(run folder, database .h5, photo path, model), written once into workdir."""
    run_dir = os.path.join(workdir, f'{arch}_run')
    torch.manual_seed(0)
    model = build_model(dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None,
                             pca_dim=None)).eval()
    save_checkpoint(dict(model_state(model), epoch=0, recalls={}, best_score=0.0), run_dir, True)
    h5_path = os.path.join(workdir, f'db_{num_db}x{model.output_dim}.h5')
    if not os.path.exists(h5_path):
        rng = np.random.default_rng(0)
        for start in range(0, num_db, WRITE_ROWS):
            rows = rng.standard_normal((min(WRITE_ROWS, num_db - start), model.output_dim), dtype=np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            names = [f'db/{i:07d}.jpg' for i in range(start, start + len(rows))]
            write_groups(h5_path + '.tmp', names, rows, [(640, 480)] * len(rows), as_half=False)
        os.replace(h5_path + '.tmp', h5_path)
    photo = os.path.join(workdir, 'photo.jpg')
    pixels = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    return run_dir, h5_path, photo, model


def main_bench():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--db', type=int, default=10000, help='Database images.')
    parser.add_argument('--arch', default='alexnet', choices=['alexnet', 'vgg16'])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2, help='torch threads.')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    run_dir, h5_path, photo, model = prepare(args.workdir, args.arch, args.db)
    opt = cli.parse_options(['--mode=query', f'--resume={run_dir}', '--query', photo, f'--database={h5_path}',
                              f'--export_dir={os.path.join(args.workdir, "answers")}', '--nGPU', '0',
                              '--threads', '0'])
    cli.setup_logging()
    image = load_image(photo)[None]
    with torch.inference_mode():
        forward_s = median_s(lambda: model(image), args.repeats)
        query_desc = model(image).numpy()
    names = h5_names(h5_path)
    with cache_folder() as folder:
        target = os.path.join(folder, 'db.npy')
        read_s = median_s(lambda: read_descriptors(h5_path, names, model.output_dim, target), args.repeats)
        db_rows = read_descriptors(h5_path, names, model.output_dim, target)[:]
    search_s = median_s(lambda: top_k_by_dot(query_desc, db_rows, 5), args.repeats)
    query(opt)  # warm-up
    query_s = median_s(lambda: query(opt), args.repeats)
    print(f'{args.arch} NetVLAD {model.output_dim}-D, 480x640 photo, database of {args.db} images '
          f'({os.path.getsize(h5_path) / 1e9:.2f} GB .h5), {args.threads} threads')
    print(f'forward pass {forward_s * 1000:.0f} ms, search {search_s * 1000:.0f} ms, copying the database rows '
          f'out of the .h5 {read_s * 1000:.0f} ms')
    print(f'whole query {query_s * 1000:.0f} ms = {query_s / (forward_s + search_s):.2f}x (forward + search), '
          f'{query_s / (forward_s + search_s + read_s):.2f}x (forward + search + copy)')

if __name__ == '__main__':
    main_bench()
