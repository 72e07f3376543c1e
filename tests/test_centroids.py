"""The centroids file records the encoder it was clustered with; a model is initialised only from a file that fits
its encoder, a file of the reference port (no record) with a warning, and a damaged file is a one-paragraph error."""
import hashlib
import logging
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision

from helpers import error_paragraph, files_under
from netvlad_toolkit.model.centroids import initialised_model

SEED = 123


def flags(root, runs, *more):
    return [str(a) for a in ['--dataset=synthetic', '--dataPath', root, '--arch=alexnet', '--fromscratch',
                             '--nocuda', '--threads=0', '--runsPath', runs, *more]]


@pytest.fixture(scope='module')
def clustered_file(tiny_data, tmp_path_factory):
    """The centroids file `--mode=cluster --seed 123` writes for the tiny dataset (kept aside, never modified)."""
    from netvlad_toolkit import cli
    root = tmp_path_factory.mktemp('centroids') / 'data'
    shutil.copytree(tiny_data, root)
    assert cli.main(['--mode=cluster'] + flags(root, root.parent / 'runs')) == 0
    return root / 'data' / 'centroids' / 'alexnet_synthetic_64_desc_cen.hdf5'


@pytest.fixture
def data_with_file(tiny_data, clustered_file, tmp_path):
    """A fresh copy of the tiny dataset holding a copy of the clustered file: (root, runs, file)."""
    root = tmp_path / 'data'
    shutil.copytree(tiny_data, root)
    path = root / 'data' / 'centroids' / clustered_file.name
    path.parent.mkdir(parents=True)
    shutil.copy(clustered_file, path)
    return root, tmp_path / 'runs', path


def seeded_alexnet_hash(seed):
    """sha256 over AlexNet `features` tensors (names, then bytes), key order, as --fromscratch --seed draws them."""
    torch.manual_seed(seed)
    digest = hashlib.sha256()
    for name, tensor in torchvision.models.alexnet().features.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_file_records_its_encoder(clustered_file):
    with h5py.File(clustered_file, 'r') as h5:
        assert set(h5) == {'descriptors', 'centroids'}  # the reference's datasets, nothing more
        attributes = dict(h5.attrs)
    assert attributes['arch'] == 'alexnet'
    assert bool(attributes['fromscratch']) is True
    assert int(attributes['seed']) == SEED
    assert attributes['encoder_sha256'] == seeded_alexnet_hash(SEED)
    assert attributes['encoder_sha256'] != seeded_alexnet_hash(7)


def test_train_with_another_seed_stops_and_names_both_seeds(data_with_file, run_cli, capsys):
    root, runs, path = data_with_file
    before = files_under(root)
    assert run_cli(['--mode=train', '--nEpochs=1', '--seed=7'] + flags(root, runs)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert str(path) in error
    assert '--seed=123' in error  # train with the file's seed ...
    assert '--mode=cluster' in error and '--seed=7' in error  # ... or cluster with this one
    assert files_under(root) == before and not runs.exists()


def test_offtheshelf_test_with_another_seed_stops(data_with_file, run_cli, capsys):
    root, runs, path = data_with_file
    assert run_cli(['--mode=test', '--split=test', '--seed=7'] + flags(root, runs)) == 2
    assert str(path) in error_paragraph(capsys.readouterr().err)
    assert not runs.exists()


def test_file_of_another_encoder_with_the_same_seed_stops(data_with_file, make_opt):
    root, runs, path = data_with_file
    with h5py.File(path, 'r+') as h5:
        h5.attrs['encoder_sha256'] = hashlib.sha256(b'other weights').hexdigest()
    from netvlad_toolkit.utils.commons import UserError
    with pytest.raises(UserError, match='--mode=cluster'):
        initialised_model(make_opt(['--mode=test'] + flags(root, runs)))


def test_reference_file_without_record_is_used_with_a_warning(data_with_file, make_opt, caplog):
    root, runs, path = data_with_file
    with h5py.File(path, 'r+') as h5:
        for name in list(h5.attrs):
            del h5.attrs[name]
        centroids, descriptors = h5['centroids'][:], h5['descriptors'][:]
    with caplog.at_level(logging.WARNING):
        model = initialised_model(make_opt(['--mode=test', '--seed=7'] + flags(root, runs)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and 'does not record the encoder' in warnings[0]
    np.testing.assert_array_equal(model.pool.centroids.detach().numpy(), centroids)
    assert len(descriptors) > 0


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'no_centroids'])
def test_damaged_file_is_one_paragraph_error(data_with_file, run_cli, capsys, damage):
    root, runs, path = data_with_file
    if damage == 'garbage':
        path.write_bytes(b'this is not an HDF5 file\n' * 10)
    elif damage == 'truncated':
        path.write_bytes(path.read_bytes()[:3000])
    else:
        with h5py.File(path, 'r+') as h5:
            del h5['centroids']
    assert run_cli(['--mode=train', '--nEpochs=1'] + flags(root, runs)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert str(path) in error and '--mode=cluster' in error
    assert not runs.exists()


def test_centroids_of_the_wrong_dimension_are_an_error(data_with_file, run_cli, capsys):
    root, runs, path = data_with_file
    with h5py.File(path, 'r+') as h5:
        del h5['centroids']
        h5.create_dataset('centroids', data=np.zeros((64, 128), dtype=np.float32))
    assert run_cli(['--mode=test', '--split=test'] + flags(root, runs)) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert str(path) in error and '(64, 128)' in error and '256' in error
