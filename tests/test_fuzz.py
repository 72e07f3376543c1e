"""Seeded fuzzing of what a user hands the toolkit: numeric flags in and out of their declared ranges, and random
byte corruptions of a checkpoint, a centroids file, a dbStruct, a global-feats .h5 and an image. Each either works
or stops with one UserError paragraph (exit 2 from the CLI); nothing ends in a traceback."""
import math
import shutil

import numpy as np
import pytest

from helpers import error_paragraph
from netvlad_toolkit import cli
from netvlad_toolkit.datasets import pittsburgh
from netvlad_toolkit.datasets.images import load_image
from netvlad_toolkit.model.centroids import initialised_model
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.search.global_features import h5_names, read_descriptors, write_groups
from netvlad_toolkit.utils.commons import UserError

SEED = 2026
TRIALS = 12
# What each mode needs on its command line besides the fuzzed flag (only parsed, never run).
REQUIRED = {'prune': ['--resume=run'], 'quantize': ['--resume=run'], 'pca': ['--resume=run'],
            'distill': ['--resume=run'], 'export': ['--resume=run'], 'pairs': ['--descriptors=q.h5', '--num_matched=1', '--output=pairs.txt'],
            'query': ['--query=photo.jpg', '--database=db.h5'], 'extract': ['--image_dir=in', '--export_dir=out'],
            'import': ['--matlab=net.mat']}


def ranged_flags():
    """{flag: (a mode that reads it, its argparse type)} of every flag with a declared numeric range."""
    flags = {}
    for mode in cli.MODES:
        for action in cli.mode_parser(mode)._actions:
            if hasattr(action.type, 'bounds'):
                flags.setdefault(action.dest, (mode, action.type))
    return flags


RANGED = ranged_flags()


def values_around(low, high, low_open, high_open, integer, rng):
    """(value, inside) pairs: random values in the range [low, high] (None: unbounded) and outside it."""
    span_low = low if low is not None else -1e6
    span_high = high if high is not None else span_low + 1e6
    pairs = []
    for _ in range(3):
        value = rng.uniform(span_low, span_high)
        pairs.append(int(math.ceil(value)) if integer else value)
    if low is not None:
        pairs += [low - 1 - rng.integers(0, 1000)] + ([] if integer else [low - rng.uniform(1e-6, 1)])
    if high is not None:
        pairs += [high + 1 + rng.integers(0, 1000)]
    if not integer:
        pairs += [float('nan'), float('inf'), -float('inf')]

    def inside(v):
        if isinstance(v, float) and not math.isfinite(v):
            return False
        above = low is None or v > low or (v == low and not low_open)
        below = high is None or v < high or (v == high and not high_open)
        return above and below
    return [(v, inside(v)) for v in pairs]


@pytest.mark.parametrize('flag', sorted(RANGED))
def test_numeric_flags_in_and_out_of_range(flag, capsys):
    rng = np.random.default_rng([SEED, sum(map(ord, flag))])
    mode, kind = RANGED[flag]
    for value, inside in values_around(*kind.bounds, kind.kind is int, rng):
        argv = [f'--mode={mode}', '--runsPath=/nonexistent/runs', *REQUIRED.get(mode, []), f'--{flag}={value}']
        if inside:
            assert getattr(cli.parse_options(argv), flag) == value
        else:
            assert cli.main(argv) == 2, (flag, value)
            assert f'--{flag}' in error_paragraph(capsys.readouterr().err)


def corrupted_copies(path, tmp_path, rng, trials=TRIALS):
    """Copies of the file at `path`, each with a few random bytes changed, or cut short, or emptied."""
    data = bytearray(path.read_bytes())
    for trial in range(trials):
        copy = bytearray(data)
        kind = trial % 4
        if kind == 0:
            copy = copy[:int(rng.integers(0, len(copy)))]
        else:
            for position in rng.integers(0, len(copy), size=int(rng.integers(1, 64))):
                copy[position] = int(rng.integers(0, 256))
        target = tmp_path / f'{trial}_{path.name}'
        target.write_bytes(bytes(copy))
        yield target


def works_or_user_error(action):
    try:
        action()
    except UserError as error:
        assert str(error).strip() and '\n' not in str(error).strip()


def test_corrupted_checkpoints(float_run, tmp_path):
    rng = np.random.default_rng(SEED)
    source = float_run / 'checkpoints' / 'checkpoint.pth.tar'
    for copy in corrupted_copies(source, tmp_path, rng):
        run = tmp_path / f'run_{copy.name}'
        (run / 'checkpoints').mkdir(parents=True)
        shutil.move(copy, run / 'checkpoints' / 'checkpoint.pth.tar')
        works_or_user_error(lambda: open_run(cli.parse_options(['--mode=test', f'--resume={run}'])))


def test_corrupted_centroids_files(clustered_data, tmp_path):
    rng = np.random.default_rng(SEED + 1)
    folder = clustered_data / 'data' / 'centroids'
    source = next(folder.iterdir())
    for copy in corrupted_copies(source, tmp_path, rng):
        data = tmp_path / f'data_{copy.name}'
        (data / 'data' / 'centroids').mkdir(parents=True)
        shutil.move(copy, data / 'data' / 'centroids' / source.name)
        opt = cli.parse_options(['--mode=train', '--arch=alexnet', '--fromscratch', '--num_clusters=8',
                                  f'--dataPath={data}'])
        works_or_user_error(lambda: initialised_model(opt))


def test_corrupted_db_structs(tiny_data, tmp_path):
    rng = np.random.default_rng(SEED + 2)
    for copy in corrupted_copies(tiny_data / 'datasets' / 'pitts30k_test.mat', tmp_path, rng):
        works_or_user_error(lambda: pittsburgh.parse_db_struct(str(copy)))


def test_corrupted_global_feats_files(tmp_path):
    rng = np.random.default_rng(SEED + 3)
    source = tmp_path / 'feats.h5'
    names = [f'img{i}.jpg' for i in range(4)]
    rows = rng.standard_normal((4, 16)).astype(np.float32)
    write_groups(str(source), names, rows / np.linalg.norm(rows, axis=1, keepdims=True), [(32, 32)] * 4, False)
    for copy in corrupted_copies(source, tmp_path, rng):
        works_or_user_error(lambda: (h5_names(str(copy)),
                                     read_descriptors(str(copy), names, 16, str(tmp_path / 'rows.npy'))))


def test_corrupted_images(tiny_data, tmp_path):
    rng = np.random.default_rng(SEED + 4)
    source = sorted((tiny_data / '000').iterdir())[0]
    for copy in corrupted_copies(source, tmp_path, rng):
        works_or_user_error(lambda: load_image(str(copy)))
