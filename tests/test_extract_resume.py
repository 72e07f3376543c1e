"""--mode=extract after a killed or failed run: a .partial left open for writing, a truncated one, a kill while a new
run copies the existing file's groups, a full disk; and re-extracting into the same file, which must not grow it."""
import errno
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import error_paragraph
from netvlad_toolkit.search import global_features

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '2']
FILE = 'global-feats-netvlad.h5'


@pytest.fixture
def images(tiny_data, tmp_path):
    """Eight images of the tiny dataset, some in a subfolder."""
    root = tmp_path / 'images'
    (root / 'sub').mkdir(parents=True)
    for index, source in enumerate(sorted((tiny_data / '000').glob('*.jpg'))[:8]):
        shutil.copy(source, root / ('sub' if index % 2 else '') / source.name)
    return root


def extract_cli(run_cli, run_dir, image_dir, export_dir):
    return run_cli(['--mode=extract', f'--resume={run_dir}', f'--image_dir={image_dir}', f'--export_dir={export_dir}',
                    *FAST])


def read_h5(path):
    """{image name: (descriptor, image size)} read with plain h5py."""
    found = {}
    with h5py.File(path, 'r') as f:
        f.visititems(lambda name, obj: found.setdefault(obj.parent.name.strip('/'), None)
                     if isinstance(obj, h5py.Dataset) else None)
        return {name: (f[name]['global_descriptor'][()], f[name]['image_size'][()]) for name in found}


def assert_same_descriptors(path, expected_path):
    written, expected = read_h5(path), read_h5(expected_path)
    assert sorted(written) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(written[name][0], expected[name][0], atol=1e-6)
        np.testing.assert_array_equal(written[name][1], expected[name][1])


@pytest.fixture
def straight(float_run, images, tmp_path, run_cli):
    """The file of an uninterrupted run."""
    assert extract_cli(run_cli, float_run, images, tmp_path / 'straight') == 0
    return tmp_path / 'straight' / FILE


def leave_open_for_write(path):
    """What a run killed while writing leaves: a child process opens the file as the extraction does, writes a
    group and dies without closing it, so that the file's HDF5 'open for write' flag stays set."""
    code = ('import os, sys, h5py, numpy\n'
            'f = h5py.File(sys.argv[1], "a", libver="latest")\n'
            'f.create_group("killed.jpg").create_dataset("global_descriptor", data=numpy.ones(4, "f4"))\n'
            'f.flush()\n'
            'os._exit(0)\n')
    subprocess.run([sys.executable, '-c', code, str(path)], check=True)


def test_partial_left_open_for_write_is_replaced(float_run, images, straight, tmp_path, run_cli, capsys):
    partial = tmp_path / 'out' / f'{FILE}.partial'
    partial.parent.mkdir()
    leave_open_for_write(partial)
    with pytest.raises(OSError, match='already open for write'):
        h5py.File(partial, 'r')
    capsys.readouterr()
    assert extract_cli(run_cli, float_run, images, partial.parent) == 0
    log = [line for line in capsys.readouterr().out.splitlines() if str(partial) in line]
    assert len(log) == 1 and 'Replacing' in log[0] and 'open for write' in log[0]
    assert not partial.exists()
    assert_same_descriptors(partial.parent / FILE, straight)


def test_truncated_partial_is_replaced(float_run, images, straight, tmp_path, run_cli, capsys):
    partial = tmp_path / 'out' / f'{FILE}.partial'
    partial.parent.mkdir()
    partial.write_bytes(straight.read_bytes()[:straight.stat().st_size // 2])
    capsys.readouterr()
    assert extract_cli(run_cli, float_run, images, partial.parent) == 0
    log = [line for line in capsys.readouterr().out.splitlines() if str(partial) in line]
    assert len(log) == 1 and 'Replacing' in log[0] and 'truncated' in log[0]
    assert_same_descriptors(partial.parent / FILE, straight)


class Killed(Exception):
    """Stands for the process being killed."""


def test_kill_while_copying_the_existing_file_leaves_no_partial(float_run, images, straight, tmp_path, run_cli,
                                                                monkeypatch):
    path = tmp_path / 'out' / FILE
    path.parent.mkdir()
    shutil.copy(straight, path)
    descriptor = next(iter(read_h5(straight).values()))[0]
    with h5py.File(path, 'a') as f:  # a group of another folder: the new run copies it into its .partial
        f.create_group('elsewhere/x.jpg').create_dataset('global_descriptor', data=descriptor)
        f['elsewhere/x.jpg'].create_dataset('image_size', data=np.array([1, 1], np.int64))
    before = path.read_bytes()
    real_copy = h5py.Group.copy

    def killed_after_one(self, *args, **kwargs):
        real_copy(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(h5py.Group, 'copy', killed_after_one)
    with pytest.raises(Killed):
        extract_cli(run_cli, float_run, images, path.parent)
    assert not path.with_name(f'{FILE}.partial').exists() and path.read_bytes() == before
    monkeypatch.undo()
    assert extract_cli(run_cli, float_run, images, path.parent) == 0
    written = read_h5(path)
    assert 'elsewhere/x.jpg' in written
    del written['elsewhere/x.jpg']
    expected = read_h5(straight)
    assert sorted(written) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(written[name][0], expected[name][0], atol=1e-6)


def test_reextracting_does_not_grow_the_file(float_run, images, straight, tmp_path, run_cli):
    out = tmp_path / 'out'
    sizes = []
    for _ in range(3):
        assert extract_cli(run_cli, float_run, images, out) == 0
        sizes.append((out / FILE).stat().st_size)
    assert max(sizes) <= 1.2 * sizes[0]
    assert sizes[0] <= 1.2 * straight.stat().st_size
    assert_same_descriptors(out / FILE, straight)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_is_one_paragraph(float_run, images, straight, tmp_path, run_cli, capsys,
                                                  monkeypatch):
    before = straight.read_bytes()
    monkeypatch.setattr(global_features, 'write_groups', no_space)
    assert extract_cli(run_cli, float_run, images, straight.parent) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(straight) in message and 'MB' in message and os.strerror(errno.ENOSPC) in message
    assert straight.read_bytes() == before
    assert not straight.with_name(f'{FILE}.partial').exists()


def test_full_disk_found_before_writing_leaves_the_partial_resumable(float_run, images, straight, tmp_path, run_cli,
                                                                     capsys, monkeypatch):
    """The room for each chunk is taken before HDF5 writes it: when the disk has none, the .partial is left as the
    last complete chunk made it, and the same command continues it once there is room."""
    monkeypatch.setattr(global_features, 'CHUNK_BATCHES', 1)
    out = tmp_path / 'out'
    calls = []
    real_allocate = os.posix_fallocate

    def full_after_one(*args):
        calls.append(args)
        if len(calls) > 1:  # the first chunk's room is there, the second's is not
            no_space()
        real_allocate(*args)

    monkeypatch.setattr(os, 'posix_fallocate', full_after_one)
    assert extract_cli(run_cli, float_run, images, out) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(out / f'{FILE}.partial') in message and 'MB' in message and 'same command' in message
    assert len(read_h5(out / f'{FILE}.partial')) == 2
    monkeypatch.undo()
    assert extract_cli(run_cli, float_run, images, out) == 0
    assert 'Continuing' in capsys.readouterr().out
    assert_same_descriptors(out / FILE, straight)
