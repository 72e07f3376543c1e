"""The results file under a full disk and with damaged lines: records are appended whole or not at all, and
--mode=report skips a damaged line with a warning and prints the table of the rest."""
import errno
import json
import os

import pytest

from helpers import error_paragraph
from netvlad_toolkit.runs.results import append_result

EVALUATION = dict(recalls={1: 0.5, 5: 0.75, 10: 0.875, 20: 1.0}, curve=[0.5, 0.75], descriptor_dim=2048)


def good_record(variant):
    return dict(variant=variant, arch='alexnet', run=None, dataset='synthetic', split='test',
                recalls={'1': 0.5, '5': 0.75}, curve=[0.5, 0.75], descriptor_dim=2048, file_mb=1.5,
                latency_ms=None, latency_size='64x80', date='2026-12-01', command='python main.py')


def report_lines(run_cli, runs, capsys):
    assert run_cli(['--mode=report', '--runsPath', runs]) == 0
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err
    return captured.out.splitlines()


@pytest.mark.parametrize('failure', ['raises', 'short'])
def test_full_disk_leaves_the_results_file_as_it_was(clustered_data, float_run, tmp_path, run_cli, capsys,
                                                     monkeypatch, failure):
    runs = tmp_path / 'runs'
    runs.mkdir()
    results = runs / 'results.jsonl'
    results.write_text(json.dumps(good_record('trained')) + '\n')
    before = results.read_bytes()
    real_write = os.write

    def full_disk_write(descriptor, data):
        """The results file's disk fills up after half of the bytes: the rest fails, or comes back short."""
        if not os.path.samestat(os.fstat(descriptor), os.stat(results)):
            return real_write(descriptor, data)
        written = real_write(descriptor, data[:len(data) // 2])
        if failure == 'raises':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written

    monkeypatch.setattr(os, 'write', full_disk_write)
    argv = ['--mode=test', '--dataset=synthetic', '--dataPath', clustered_data, '--split=test', '--resume', float_run,
            '--arch=alexnet', '--fromscratch', '--num_clusters=8', '--nocuda', '--threads=0', '--runsPath', runs]
    assert run_cli(argv) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert str(results) in error and 'bytes' in error
    assert results.read_bytes() == before


def test_a_cut_short_last_line_gets_the_next_record_on_its_own_line(tmp_path, make_opt, run_cli, capsys):
    runs = tmp_path / 'runs'
    opt = make_opt(['--mode=test', '--dataset=synthetic', '--split=test', '--arch=alexnet', '--runsPath', runs])
    append_result(opt, 'trained', EVALUATION, 3 * 2 ** 20, 12.5)
    results = runs / 'results.jsonl'
    cut_short = json.dumps(good_record('pruned structured 20%'))[:40]  # what a full disk left of a record
    with open(results, 'a') as f:
        f.write(cut_short)
    append_result(opt, 'int8 static', EVALUATION, 2 ** 20, None)

    lines = results.read_text().split('\n')
    assert lines[1] == cut_short and lines[3] == ''
    assert [json.loads(lines[i])['variant'] for i in (0, 2)] == ['trained', 'int8 static']
    out = report_lines(run_cli, runs, capsys)
    recalls = '0.500 | 0.750 | 0.875 | 1.000'
    timed = '12.5 (at 480x640, 1 thread, process CPU time)'
    assert f'| alexnet trained | synthetic test | {recalls} | 2048 | 3.0 | {timed} |' in out
    assert f'| alexnet int8 static | synthetic test | {recalls} | 2048 | 1.0 | - |' in out
    warnings = [line for line in out if 'skipped' in line]
    assert len(warnings) == 1 and 'line 2 ' in warnings[0] and str(results) in warnings[0]


@pytest.mark.parametrize('damage', ['no arch', 'recalls not a dict', 'arch a list', 'file_mb a string',
                                    'a JSON list', 'not JSON'])
def test_report_skips_a_damaged_record_with_a_warning(tmp_path, run_cli, capsys, damage):
    bad = good_record('int8 qat')
    if damage == 'no arch':
        del bad['arch']
    elif damage == 'recalls not a dict':
        bad['recalls'] = '0.5 0.75'
    elif damage == 'arch a list':
        bad['arch'] = ['alexnet']
    elif damage == 'file_mb a string':
        bad['file_mb'] = 'big'
    bad_line = {'a JSON list': '[1, 2]', 'not JSON': '{"variant": "int8 qat", "rec'}.get(damage, json.dumps(bad))
    results = tmp_path / 'results.jsonl'
    results.write_text('\n'.join([json.dumps(good_record('trained')), bad_line,
                                  json.dumps(good_record('pruned structured 50%'))]) + '\n')

    out = report_lines(run_cli, tmp_path, capsys)
    rows = [line for line in out if line.startswith('| alexnet ')]
    assert rows == ['| alexnet trained | synthetic test | 0.500 | 0.750 | - | - | 2048 | 1.5 | - |',
                    '| alexnet pruned structured 50% | synthetic test | 0.500 | 0.750 | - | - | 2048 | 1.5 | - |']
    warnings = [line for line in out if 'skipped' in line]
    assert len(warnings) == 1 and 'line 2 ' in warnings[0] and str(results) in warnings[0]
    assert (tmp_path / 'results.md').read_text().count('| alexnet ') == 2


def test_report_on_only_damaged_lines_is_a_clear_error(tmp_path, run_cli, capsys):
    record = good_record('trained')
    del record['arch']
    (tmp_path / 'results.jsonl').write_text(json.dumps(record) + '\n')
    assert run_cli(['--mode=report', '--runsPath', tmp_path]) == 2
    error = error_paragraph(capsys.readouterr().err)
    assert 'only damaged lines' in error and str(tmp_path / 'results.jsonl') in error


def test_a_record_says_where_it_came_from(clustered_data, float_run, tmp_path, run_cli):
    import subprocess

    import torch
    runs = tmp_path / 'runs'
    argv = ['--mode=test', '--dataset=synthetic', '--dataPath', str(clustered_data), '--split=test', '--resume',
            str(float_run), '--nocuda', '--threads=0', '--runsPath', str(runs)]
    assert run_cli(argv) == 0
    record = json.loads((runs / 'results.jsonl').read_text().splitlines()[-1])
    assert record['command'] == 'python main.py ' + ' '.join(argv)
    assert record['run'] == str(float_run)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert record['commit'] == (head or None)
    with open('/proc/cpuinfo') as f:
        cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    assert record['cpu'] == cpu and record['torch'] == torch.__version__ and record['gpu'] is None
