"""The results file every evaluating mode appends to, and --mode=report, which renders it as a Markdown table."""
import copy
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import platform
import subprocess
import sys

import torch

from netvlad_toolkit.runs.measure import LATENCY_CLOCK, LATENCY_THREADS, latency_ms, model_bytes
from netvlad_toolkit.utils.commons import UserError, atomic_write_text
from netvlad_toolkit.utils.options import add_common_flags

RESULTS_FILE = 'results.jsonl'
TABLE_FILE = 'results.md'
RECALL_COLUMNS = ['1', '5', '10', '20']


def results_path(opt):
    return os.path.join(opt.runsPath, RESULTS_FILE)


def append_result(opt, variant, evaluation, file_bytes, latency_ms, run_dir=None):
    """One line of JSON per evaluated model: what it is (and its run folder, None for the untrained network), where
    it was evaluated, how it did, what it costs (latency_ms None when it was not timed)."""
    record = dict(variant=variant, arch=opt.arch, run=run_dir, dataset=opt.dataset, split=opt.split,
                  recalls={str(n): r for n, r in evaluation['recalls'].items()}, curve=evaluation['curve'],
                  descriptor_dim=evaluation['descriptor_dim'], file_mb=file_bytes / 2 ** 20,
                  latency_ms=latency_ms, latency_size='x'.join(map(str, opt.latency_size)),
                  latency_threads=LATENCY_THREADS, latency_clock=LATENCY_CLOCK,
                  date=datetime.date.today().isoformat(), **provenance(opt))
    if 'rerank' in evaluation:
        record['rerank'] = rerank_record(evaluation['rerank'])
    record.update({key: evaluation[key] for key in ('teacher', 'query_encoder', 'database_encoder')
                   if key in evaluation})
    os.makedirs(opt.runsPath, exist_ok=True)
    append_line(results_path(opt), json.dumps(record) + '\n')
    return record


def rerank_record(summary):
    """What the results file keeps of a Patch-NetVLAD re-ranking: its settings, the global search's Recall@N before
    it, and its time per query (the query's
    patch extraction, reading and matching its candidates), in process CPU time on the torch threads it ran with."""
    kept = ('config', 'patch_sizes', 'strides', 'patch_weights', 'num_pcs', 'matcher', 'candidates',
            'global_recalls')
    return dict({key: summary[key] for key in kept}, ms_per_query=1000 * summary['seconds_per_query'],
                clock=LATENCY_CLOCK, threads=torch.get_num_threads())


def provenance(opt):
    """Where a record comes from: the stage's own command line, the code's git commit (None outside a checkout), the
    CPU and GPU it ran on, and the torch version."""
    command = getattr(opt, 'command', None) or 'python main.py ' + ' '.join(sys.argv[1:])
    return dict(command=command, commit=code_commit(), cpu=cpu_model(), gpu=gpu_model(), torch=torch.__version__)


def gpu_model():
    """The first CUDA device's name, or None (no CUDA, or a driver that does not answer)."""
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except (RuntimeError, AssertionError):
        return None


@functools.lru_cache(maxsize=1)
def code_commit():
    """The toolkit's git commit, when the package is a folder of a git checkout (None once pip-installed, and never the
    commit of another repository that happens to hold an installed copy)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        result = subprocess.run(['git', '-C', package_root, 'rev-parse', '--show-toplevel', 'HEAD'],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(package_root):
        return None
    return lines[1]


@functools.lru_cache(maxsize=1)
def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_line(path, line):
    """Append `line` (newline included) to `path` whole or not at all, flushed to disk (fsync). One os.write of the
    whole line on a descriptor opened with O_APPEND puts it at the end of the file in one piece, so lines of two
    processes appending at once never interleave (POSIX, for regular files). A write that fails (a full disk) is cut
    back to the previous size; the lock keeps other appenders waiting meanwhile, so that only this line is cut."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open()
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by os.close
        size = os.fstat(descriptor).st_size
        damaged_tail = size > 0 and os.pread(descriptor, 1, size - 1) != b'\n'
        data = (b'\n' if damaged_tail else b'') + line.encode()  # never glued onto a cut-short line
        try:
            if os.write(descriptor, data) < len(data):  # a short write: the disk filled up during it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(descriptor)
        except OSError as error:
            os.ftruncate(descriptor, size)
            raise UserError(f'Could not append the results record to {path} ({error.strerror}): it needs '
                            f'{len(data)} bytes. The file was left as it was; free some space there (or give '
                            f'another --runsPath) and rerun the evaluation.') from None
    finally:
        os.close(descriptor)


def variant_of(checkpoint):
    """The name the results file gives a model: its checkpoint's variant ('trained' for a training run), or the
    untrained network's when checkpoint is None."""
    if checkpoint is None:
        return 'off-the-shelf (k-means init)'
    return checkpoint.get('variant', 'trained')


def record_result(opt, model, checkpoint, run_dir, result):
    """Append an evaluated model (--resume's, or the untrained one when checkpoint is None) with its file size, and
    with its CPU latency at --latency_size when --latency asks for it."""
    latency = None
    if opt.latency:
        cpu_model = model if next(model.parameters()).device.type == 'cpu' else copy.deepcopy(model).cpu()
        latency = latency_ms(cpu_model, opt.latency_size, repeats=5, warmup=1)
    variant = variant_of(checkpoint)
    if opt.precision != 'fp32':
        variant += f' {opt.precision}'
    if 'rerank' in result:
        variant += f' + patch re-ranking ({result["rerank"]["config"]})'
    if 'database_encoder' in result:
        variant += f', queries against the {result["database_encoder"]["name"]} database'
    return append_result(opt, variant, result, model_bytes(model, checkpoint, run_dir), latency,
                         run_dir if checkpoint is not None else None)


def set_latencies(path, latencies):
    """Replace the latency of the newest record of each (arch, variant, dataset, split) key of `latencies`
    ({key: (ms, 'HxW')}), rewriting the results file atomically: rows timed together in one process compare."""
    records = read_results(path)
    newest = {record_key(record): index for index, record in enumerate(records)}
    for key, (ms, size) in latencies.items():
        records[newest[key]].update(latency_ms=ms, latency_size=size)
    atomic_write_text(''.join(json.dumps(record) + '\n' for record in records), path)


def record_key(record):
    return record['arch'], record['variant'], record['dataset'], record['split'], record.get('run')


def read_results(path):
    """The records of the results file, in order. A damaged line (cut short by a full disk, or another tool's text)
    is skipped with a warning naming it; the other records still count."""
    if not os.path.isfile(path):
        raise UserError(f'Results file {path} does not exist: run --mode=test, prune, quantize or demo first '
                        f'(they append to it), or point --runsPath at the folder that holds it.')
    records = []
    with open(path, 'rb') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = parsed_record(line)
            if record is None:
                logging.warning('Warning: skipped line %d of results file %s: not a complete results record (one '
                                'JSON object per line with the fields of the table). Remove or fix that line.',
                                number, path)
                continue
            records.append(record)
    if not records:
        raise UserError(f'Results file {path} is empty or holds only damaged lines: run --mode=test, prune, '
                        f'quantize or demo first.')
    return records


def parsed_record(line):
    """The record of one line of the results file, or None when the line is not JSON, not an object, or lacks a
    field of the table or holds one of the wrong type: a line is good when its table row renders."""
    try:
        record = json.loads(line)
        hash(record_key(record))  # the table keeps the newest record of each key
        table_row(record)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return record


def latest_per_variant(records):
    """The newest record of each (arch, variant, dataset, split, run folder), in the order they first appeared."""
    latest = {}
    for record in records:
        latest[record_key(record)] = record
    return list(latest.values())


def markdown_table(records):
    header = ('| Model | Dataset / split | R@1 | R@5 | R@10 | R@20 | Descriptor | Size (MB) | Latency (ms/img) |\n'
              '|---|---|---|---|---|---|---|---|---|')
    shown = latest_per_variant(records)
    runs_of = {}  # the run folders of each model label: two runs of one label are told apart by their folder
    for r in shown:
        runs_of.setdefault((r['arch'], r['variant']), set()).add(r.get('run'))
    return '\n'.join([header] + [table_row(r, len(runs_of[r['arch'], r['variant']]) > 1) for r in shown])


def table_row(r, name_run=False):
    recalls = ' | '.join(f'{r["recalls"][n]:.3f}' if n in r['recalls'] else '-' for n in RECALL_COLUMNS)
    run = f' ({r["run"]})' if name_run and r.get('run') else ''
    return (f'| {r["arch"]} {r["variant"]}{run} | {r["dataset"]} {r["split"]} | {recalls} | '
            f'{r["descriptor_dim"]} | {r["file_mb"]:.1f} | {latency_cell(r)} |')


def latency_cell(record):
    rerank = record.get('rerank')
    added = (f' + {rerank["ms_per_query"]:.0f} re-ranking per query ({rerank["threads"]} thread'
             f'{"s" if rerank["threads"] != 1 else ""}, {rerank["clock"]})' if rerank else '')
    if record['latency_ms'] is None:
        return '-' + added
    threads, clock = record.get('latency_threads'), record.get('latency_clock')
    how = f', {threads} thread{"s" if threads != 1 else ""}, {clock}' if threads and clock else ''
    return f'{record["latency_ms"]:.1f} (at {record["latency_size"]}{how}){added}'


def add_flags(p):
    add_common_flags(p)


def report(opt):
    records = read_results(results_path(opt))
    table = markdown_table(records)
    path = os.path.join(opt.runsPath, TABLE_FILE)
    atomic_write_text(table + '\n', path)
    logging.info('%s\n\nTable written to %s', table, path)
    return table
