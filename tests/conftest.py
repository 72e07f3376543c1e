"""Shared fixtures: a tiny synthetic dataset in the Pittsburgh layout, and helpers that run the CLI in-process."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))
torch.set_num_threads(1)  # the machine is small and shared

import main  # noqa: E402
import synthetic  # noqa: E402

TINY_SIZE = (64, 80)  # AlexNet conv5 on 64x80 images: a 3x4 feature map, 12 local descriptors per image


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A read-only-by-convention synthetic dataset: 60 db / 30 queries for val and test, twice that for train."""
    path = tmp_path_factory.mktemp('tiny_synthetic')
    synthetic.generate(str(path), num_db=60, num_queries=30, image_size=TINY_SIZE, seed=0)
    return path


@pytest.fixture
def tiny_copy(tiny_data, tmp_path):
    """A private copy of the tiny dataset, for tests that break or add files."""
    return Path(shutil.copytree(tiny_data, tmp_path / 'data_copy'))


@pytest.fixture
def run_cli():
    """run_cli([...flags...]) runs the CLI (main.main) in this process and returns its exit code."""
    return lambda argv: main.main([str(arg) for arg in argv])


@pytest.fixture
def make_opt():
    """make_opt([...flags...]) is the options object the CLI builds from these flags (main.parse_options)."""
    return lambda argv: main.parse_options([str(arg) for arg in argv])
