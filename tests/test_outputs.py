"""Outputs: every output path is checked before any work, and the scratch folders of killed processes are removed."""
import os
import subprocess
import sys

import pytest

from helpers import error_paragraph
from netvlad_toolkit import cli
from netvlad_toolkit.search.descriptors import cache_folder


@pytest.mark.parametrize('flags, message', [
    (['--mode=pairs', '--output', '{folder}', '--descriptors=q.h5', '--num_matched=1'], 'is a folder'),
    (['--mode=export', '--export_path', '{file}/model.onnx', '--resume=run'], 'which is a file'),
    (['--mode=extract', '--export_dir', '{file}', '--image_dir=images'], 'is a file'),
    (['--mode=test', '--runsPath', '{file}/runs'], 'which is a file'),
    (['--mode=test', '--cachePath', '{file}'], 'is a file'),
])
def test_output_paths_are_checked_before_any_work(flags, message, tmp_path, capsys):
    file = tmp_path / 'a_file'
    file.write_text('')
    argv = [flag.format(folder=tmp_path, file=file) for flag in flags]
    before = sorted(os.listdir(tmp_path))
    assert cli.main(argv) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert message in paragraph and argv[1] in paragraph
    assert sorted(os.listdir(tmp_path)) == before


def test_scratch_folders_of_killed_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    orphan = tmp_path / f'netvlad_descriptors_{dead.stdout.strip()}_abc'
    (orphan / 'rows.npy').parent.mkdir()
    (orphan / 'rows.npy').write_bytes(b'x' * 100)
    living = tmp_path / f'netvlad_descriptors_{os.getpid()}_def'
    living.mkdir()
    other = tmp_path / 'netvlad_descriptors_notapid'
    other.mkdir()
    with cache_folder(str(tmp_path)) as folder:
        assert os.path.isdir(folder)
    assert not orphan.exists() and living.exists() and other.exists()
    assert not os.path.exists(folder)
