"""The user's train command, one epoch, on a generated Pittsburgh-layout set: val Recall@1 over seeds.

The data: places 30 m apart on a line, each a textured facade; two database views of each place (crops at other
offsets, within 1 m of the place) and one query 0-8 m from it, photometrically changed (gain, gamma, colour cast,
noise). Train: 260 places (520 database images, 260 queries); val and test: 60 places each (120 / 60); 240x320
JPEGs. Every query's positives are its place's two views, and both are training positives (within 10 m).
For each seed: `--mode=cluster --arch=alexnet --fromscratch --seed S`, then one epoch of the user's
`--mode=train --arch=alexnet --fromscratch --optim ADAM --lr 0.0001 --seed S`, both with `--threads 0
--cacheBatchSize 24` on the CPU; the val Recall@N printed after the epoch is recorded.
--code runs another checkout's main.py on the same data (to compare commits); the data never changes with it.
--port runs the reference port's own code instead: a checkout of Nanne/pytorch-NetVlad (it also needs
scikit-learn) with four local edits that current libraries need, never part of this project: pittsburgh.py's
`root_dir` read from the environment variable NETVLAD_PORT_ROOT, `int()` around `numDb` and `numQ` there,
main.py's CUDA memory prints removed, and `np.in1d` replaced by `np.isin`. It gets the same flags.
Usage: python benchmarks/bench_train_protocol.py [--seeds 123 7 99 1 2 3] [--code DIR | --port DIR] [--workdir DIR]
       [--results FILE] [--extra FLAG ...]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import scipy.io
from PIL import Image

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
PLACES = {'train': 260, 'val': 60, 'test': 60}
PLACE_SPACING_M = 30.0
HEIGHT, WIDTH = 240, 320
MARGIN = 48  # pixels of facade around a view: the views of one place are crops at other offsets
RECALL_LINE = re.compile(r'====> Recall@(\d+): ([0-9.]+)')


def facade(rng):
    """A place's texture: smooth colour noise under random rectangles and discs, (H + 2M) x (W + 2M) x 3."""
    height, width = HEIGHT + 2 * MARGIN, WIDTH + 2 * MARGIN
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    for _ in range(rng.integers(12, 24)):
        top, left = rng.integers(0, height - 20), rng.integers(0, width - 20)
        h, w = rng.integers(10, 80), rng.integers(10, 80)
        colour = rng.uniform(0, 255, size=3)
        if rng.random() < 0.5:
            pixels[top:top + h, left:left + w] = colour
        else:
            yy, xx = np.ogrid[:height, :width]
            pixels[(yy - top) ** 2 + (xx - left) ** 2 < (h / 2) ** 2] = colour
    return pixels


def view(texture, rng, query):
    top, left = rng.integers(0, 2 * MARGIN + 1, size=2)
    pixels = texture[top:top + HEIGHT, left:left + WIDTH]
    if query:
        gain, gamma, cast = rng.uniform(0.6, 1.4), rng.uniform(0.7, 1.4), rng.uniform(0.8, 1.2, size=3)
        pixels = 255.0 * (pixels / 255.0) ** gamma * gain * cast + rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def cell(names):
    column = np.empty((len(names), 1), dtype=object)
    column[:, 0] = names
    return column


def write_split(root, split, first_place, seed):
    rng = np.random.default_rng([seed, first_place])
    db_names, q_names, utm_db, utm_q = [], [], [], []
    for place in range(first_place, first_place + PLACES[split]):
        centre = np.array([550000.0 + place * PLACE_SPACING_M, 4470000.0])
        texture = facade(rng)
        for v in range(2):
            db_names.append(f'000/{place:06d}_view{v}.jpg')
            view(texture, rng, query=False).save(os.path.join(root, db_names[-1]), quality=90)
            utm_db.append(centre + rng.uniform(-1, 1, size=2))
        q_names.append(f'{place:06d}_query.jpg')
        view(texture, rng, query=True).save(os.path.join(root, 'queries_real', q_names[-1]), quality=90)
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0, 8)
        utm_q.append(centre + radius * np.array([np.cos(angle), np.sin(angle)]))
    struct = dict(whichSet=split, dbImageFns=cell(db_names), utmDb=np.array(utm_db).T, qImageFns=cell(q_names),
                  utmQ=np.array(utm_q).T, numImages=float(len(db_names)), numQueries=float(len(q_names)),
                  posDistThr=25.0, posDistSqThr=625.0, nonTrivPosDistSqThr=100.0)
    scipy.io.savemat(os.path.join(root, 'datasets', f'pitts30k_{split}.mat'), {'dbStruct': struct})


def generate(root, seed=0):
    """The three splits under root (skipped when already there); places of different splits never overlap.
    Fewer than 1000 places in all: every database image lies in 000/."""
    if os.path.isfile(os.path.join(root, 'datasets', 'pitts30k_test.mat')):
        return
    first_place = 0
    for split in PLACES:
        for folder in ('datasets', 'queries_real', '000'):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        write_split(root, split, first_place, seed)
        first_place += PLACES[split] + 100  # 3 km between splits


def seed_data(root, workdir, seed):
    """A data folder of the seed's own (its centroids file) whose images and .mat files link to the shared ones."""
    path = os.path.join(workdir, f'data_seed{seed}')
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(root):
        link = os.path.join(path, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(root, name), link)
    return path


def main_py(code, args, log, env=None):
    command = [sys.executable, os.path.join(code, 'main.py'), *args]
    result = subprocess.run(command, cwd=code, capture_output=True, text=True, env=env)
    with open(log, 'a') as f:
        f.write(' '.join(command) + '\n' + result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(command)} failed with exit {result.returncode}; see {log}')
    return result.stdout + result.stderr


def run_seed(code, root, workdir, seed, extra, port=False):
    data = seed_data(root, workdir, seed)
    common = ['--arch=alexnet', '--fromscratch', '--nocuda', '--threads', '0', '--cacheBatchSize', '24',
              '--seed', str(seed), '--dataPath', data]
    log = os.path.join(workdir, f'seed{seed}.log')
    save = os.path.join(workdir, f'run_seed{seed}_{int(time.time())}')
    # the port reads the images from NETVLAD_PORT_ROOT, its caches from TMPDIR, and writes runs under --runsPath
    env = dict(os.environ, NETVLAD_PORT_ROOT=root + os.sep, TMPDIR=data) if port else None
    where = ['--runsPath', save] if port else ['--savePath', save]
    started = time.time()
    main_py(code, ['--mode=cluster', *common], log, env)
    output = main_py(code, ['--mode=train', *common, '--optim', 'ADAM', '--lr', '0.0001', '--nEpochs', '1',
                            *where, *extra], log, env)
    recalls = {int(n): float(r) for n, r in RECALL_LINE.findall(output)}
    return dict(seed=seed, recalls=recalls, seconds=round(time.time() - started, 1))


def git_commit(code):
    result = subprocess.run(['git', '-C', code, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[123, 7, 99, 1, 2, 3])
    parser.add_argument('--code', default=ROOT, help='Checkout whose main.py runs (default: this one).')
    parser.add_argument('--port', default=None, help='A checkout of the reference port (with the four edits above) '
                                                     'to run instead of this project.')
    parser.add_argument('--workdir', default=None, help='Data and runs (default: a new temporary folder).')
    parser.add_argument('--results', default=None, help='Append one JSON line per seed to this file.')
    parser.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='More flags for the train command.')
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix='train_protocol_')
    root = os.path.join(workdir, 'data')
    generate(root)
    code = os.path.abspath(args.port or args.code)
    commit = ('port ' if args.port else '') + git_commit(code)
    recall1 = []
    for seed in args.seeds:
        result = dict(run_seed(code, root, workdir, seed, args.extra, port=bool(args.port)), commit=commit,
                      extra=args.extra)
        recall1.append(result['recalls'].get(1, float('nan')))
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, 'a') as f:
                f.write(json.dumps(result) + '\n')
    values = np.array(recall1)
    error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    print(f'commit {commit}: val Recall@1 mean {values.mean():.3f} +- {error:.3f} '
          f'(standard error) over seeds {args.seeds}: {" ".join(f"{v:.2f}" for v in values)}')


if __name__ == '__main__':
    main()
