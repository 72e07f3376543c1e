"""Patch-NetVLAD re-ranking on the synthetic test split: Recall@N of the global search and after re-ranking with
each config, time per query (global search, patch extraction, matching) and storage per database image.

    python benchmarks/bench_rerank.py --tiny                      # under 2 minutes: a smoke run
    python benchmarks/bench_rerank.py --workdir /tmp/bench_rerank  # the figures of benchmarks/README.md

The model is built in --workdir (reused when there), as the demo drives the toolkit: the synthetic dataset
(SIZES: images, database and queries), AlexNet from scratch clustered and trained one epoch (the demo's Adam at
1e-5), whitened by --mode=pca (fitted on the training database). Then the test split's global descriptors and the
exact search of each query's top config.num_candidates (at most the database); per config, the database's patch
store, and each query's candidates re-ranked. A config's PCA dimension above the run's is cut to the run's (the
synthetic training database has too few images for 4096). Patch extraction per query includes the encoder pass,
which gives the global descriptor too. The last table is storage at 480x640 for VGG16 and AlexNet
(patch_netvlad.storage_per_image) with the reference configs' dimensions.
"""
import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from driver import SYNTHETIC_ALEXNET, run_command, trained_run  # noqa: E402
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.datasets import load_dataset  # noqa: E402
from netvlad_toolkit.modes.demo import TRAIN_FLAGS  # noqa: E402
from netvlad_toolkit.runs.runs import load_model, place_model  # noqa: E402
from netvlad_toolkit.search import patch_netvlad as pn  # noqa: E402
from netvlad_toolkit.search.patch_features import store_path  # noqa: E402
from netvlad_toolkit.search.retrieval import exact_search, extract_descriptors, recall_curve, recalls_of  # noqa: E402
from netvlad_toolkit.utils.commons import parse_size  # noqa: E402

# full: about 10 minutes on a 2-core CPU; tiny: under 2. AlexNet's feature map is 14x19 at 240x320 and 9x12 at
# 160x208 (room for the performance config's 8x8 patches); the training database (twice synth_db) bounds the PCA.
SIZES = {'full': dict(synth_db=100, synth_queries=50, imsize='240x320', epochs=1, pca_dim=192),
         'tiny': dict(synth_db=30, synth_queries=16, imsize='160x208', epochs=1, pca_dim=32)}
PITTSBURGH_DB = {'Pitts30k': 10000, 'Pitts250k': 83952}


def cpu_name():
    with open('/proc/cpuinfo') as f:
        names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    return names[0] if names else platform.processor()


def whitened_run(work_dir, size, imsize):
    """The trained, PCA-whitened run folder and the flags every command of the benchmark shares."""
    common = [*SYNTHETIC_ALEXNET, '--threads', '0', '--seed', '0', f'--synth_db={size["synth_db"]}',
              f'--synth_queries={size["synth_queries"]}', f'--synth_imsize={imsize}']
    run = trained_run(work_dir, [*TRAIN_FLAGS, '--nEpochs', str(size['epochs'])], common)
    whitened = f'{run}_pca{size["pca_dim"]}'
    if not os.path.exists(os.path.join(whitened, 'checkpoints', 'checkpoint.pth.tar')):
        run_command('--mode=pca', f'--resume={run}', f'--pca_dim={size["pca_dim"]}', '--split=test', *common)
    return whitened, common


def recalls(predictions, positives):
    return recalls_of(recall_curve(predictions, positives))


def global_search(model, dataset, opt, device, k):
    """(predictions [Q, k], search seconds per query, extraction seconds per image)."""
    started = time.perf_counter()
    whole = extract_descriptors(model, dataset, opt, device, 'test descriptors')
    extraction_s = (time.perf_counter() - started) / len(dataset)
    num_db = dataset.db_struct.numDb
    started = time.perf_counter()
    predictions = exact_search(whole[:num_db], whole[num_db:], k)[1]
    return predictions, (time.perf_counter() - started) / (len(dataset) - num_db), extraction_s


def rerank_config(name, model, dataset, predictions, store_dir, device, run):
    config = pn.RERANK_CONFIGS[name]
    config = dataclasses.replace(config, pca_dim=min(config.pca_dim, model.whiten.out_features))
    num_db = dataset.db_struct.numDb
    database = torch.utils.data.Subset(dataset, range(num_db))
    queries = torch.utils.data.Subset(dataset, range(num_db, len(dataset)))
    if os.path.exists(store_path(store_dir, config.name)):
        os.remove(store_path(store_dir, config.name))  # the build is measured
    started = time.perf_counter()
    path = pn.build_store(model, database, dataset.db_struct.db_paths, store_dir, config, device, run=run)
    store_s = (time.perf_counter() - started) / num_db
    candidates = predictions[:, :min(config.num_candidates, num_db)]
    with pn.open_store(store_dir, config) as store:
        reranked, _, timing = pn.rerank_queries(model, queries, candidates, store, config, device)
    return dict(config=config, recalls=recalls(reranked, dataset.positives()), store_s=store_s,
                bytes_per_image=os.path.getsize(path) / num_db, candidates=candidates.shape[1],
                **{key: float(np.mean(values)) for key, values in timing.items()})


def print_results(before, rows, search_s, extraction_s, num_db, num_queries, imsize):
    ns = [n for n in before if n <= 10]
    print(f'\nsynthetic test split: {num_db} database images, {num_queries} queries, {imsize[0]}x{imsize[1]}')
    print('| ranking | PCA dim | candidates | ' + ' | '.join(f'R@{n}' for n in ns)
          + ' | patch extraction (ms/query) | matching (ms/query) | store (KB/image) |')
    print('|---' * (6 + len(ns)) + '|')
    print('| global search | | | ' + ' | '.join(f'{before[n]:.3f}' for n in ns)
          + f' | (global descriptor {1000 * extraction_s:.0f}, search {1000 * search_s:.1f}) | | |')
    for row in rows:
        config = row['config']
        print(f'| re-ranked, {config.name} ({config.matcher}) | {config.pca_dim} | {row["candidates"]} | '
              + ' | '.join(f'{row["recalls"][n]:.3f}' for n in ns)
              + f' | {1000 * row["extraction_s"]:.0f} | {1000 * (row["reading_s"] + row["matching_s"]):.0f} '
                f'(reading {1000 * row["reading_s"]:.0f}) | {row["bytes_per_image"] / 1024:.0f} |')
    for row in rows:
        print(f'{row["config"].name}: database store built at {1000 * row["store_s"]:.0f} ms/image')


def print_storage():
    print('\nstorage of the patch store at 480x640, float16 (reference dimensions)')
    print('| config | patches | dim | arch | per image | Pitts30k db (10,000) | Pitts250k db (83,952) |')
    print('|---|---|---|---|---|---|---|')
    for name, config in pn.RERANK_CONFIGS.items():
        for arch in ('vgg16', 'alexnet'):
            raw_dim = {'vgg16': 512, 'alexnet': 256}[arch] * 64
            for dim in (config.pca_dim, raw_dim) if name == 'speed' else (config.pca_dim,):
                per_image = pn.storage_per_image(dataclasses.replace(config, pca_dim=dim), arch)
                totals = ' | '.join(f'{per_image * n / 1e9:,.1f} GB' for n in PITTSBURGH_DB.values())
                label = f'{dim}' + (' (raw, no PCA)' if dim == raw_dim else '')
                print(f'| {name} | {"/".join(map(str, config.patch_sizes))} | {label} | {arch} | '
                      f'{per_image / 1e6:.2f} MB | {totals} |')


def main_bench():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default=None, help='Data, runs and stores (default: a new temporary folder).')
    parser.add_argument('--tiny', action='store_true', help='A small dataset and model: under 2 minutes.')
    parser.add_argument('--imsize', default=None, help='Synthetic image size HEIGHTxWIDTH (default: the size\'s).')
    parser.add_argument('--configs', default='performance,speed,storage')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads of the measured part (the build before it uses torch\'s default); on a '
                             'shared machine more threads stall the many small tensor operations of matching.')
    args = parser.parse_args()
    size = SIZES['tiny' if args.tiny else 'full']
    imsize = args.imsize or size['imsize']
    work_dir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='bench_rerank_'))
    started = time.time()
    run, common = whitened_run(work_dir, size, imsize)
    torch.set_num_threads(args.threads)
    opt = cli.parse_options(['--mode=test', f'--resume={run}', '--split=test', *common])
    model, _, _ = load_model(opt)
    model, device = place_model(model.eval(), torch.device('cpu'))
    dataset = load_dataset(opt, 'test')
    num_db = dataset.db_struct.numDb
    k = min(max(pn.RERANK_CONFIGS[name].num_candidates for name in args.configs.split(',')), num_db)
    predictions, search_s, extraction_s = global_search(model, dataset, opt, device, k)
    before = recalls(predictions, dataset.positives())
    store_dir = os.path.join(work_dir, 'patch_stores', os.path.basename(run))
    rows = [rerank_config(name, model, dataset, predictions, store_dir, device, run)
            for name in args.configs.split(',')]
    print(f'\n{datetime.date.today()}, {cpu_name()}, {args.threads} torch threads, torch {torch.__version__}; '
          f'AlexNet trained {size["epochs"]} epoch(s), whitened to {model.whiten.out_features}-D; '
          f'total {time.time() - started:.0f} s')
    print_results(before, rows, search_s, extraction_s, num_db, len(dataset) - num_db, parse_size(imsize))
    print_storage()


if __name__ == '__main__':
    main_bench()
