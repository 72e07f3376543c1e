"""The results file every evaluating mode appends to, and --mode=report, which renders it as a Markdown table."""
import copy
import datetime
import json
import logging
import os
import sys

from commons import UserError, atomic_write_text
from measure import latency_ms, model_bytes

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
                  date=datetime.date.today().isoformat(), command='python ' + ' '.join(sys.argv))
    os.makedirs(opt.runsPath, exist_ok=True)
    with open(results_path(opt), 'a') as f:
        f.write(json.dumps(record) + '\n')
    return record


def record_result(opt, model, checkpoint, run_dir, result):
    """Append an evaluated model (--resume's, or the untrained one when checkpoint is None) with its file size, and
    with its CPU latency at --latency_size when --latency asks for it."""
    latency = None
    if opt.latency:
        cpu_model = model if next(model.parameters()).device.type == 'cpu' else copy.deepcopy(model).cpu()
        latency = latency_ms(cpu_model, opt.latency_size, repeats=5, warmup=1)
    variant = checkpoint.get('variant', 'trained') if checkpoint is not None else 'off-the-shelf (k-means init)'
    if opt.precision != 'fp32':
        variant += f' {opt.precision}'
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
    return record['arch'], record['variant'], record['dataset'], record['split']


def read_results(path):
    if not os.path.isfile(path):
        raise UserError(f'Results file {path} does not exist: run --mode=test, prune, quantize or demo first '
                        f'(they append to it), or point --runsPath at the folder that holds it.')
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record['recalls'], record['variant']  # the fields the table needs
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'Results file {path} is corrupt at line {number}: expected one JSON record per '
                                f'line with "variant" and "recalls". Remove or fix that line.') from None
            records.append(record)
    if not records:
        raise UserError(f'Results file {path} is empty: run --mode=test, prune, quantize or demo first.')
    return records


def latest_per_variant(records):
    """The newest record of each (arch, variant, dataset, split), in the order they first appeared."""
    latest = {}
    for record in records:
        latest[record_key(record)] = record
    return list(latest.values())


def markdown_table(records):
    header = ('| Model | Dataset / split | R@1 | R@5 | R@10 | R@20 | Descriptor | Size (MB) | Latency (ms/img) |\n'
              '|---|---|---|---|---|---|---|---|---|')
    rows = []
    for r in latest_per_variant(records):
        recalls = ' | '.join(f'{r["recalls"][n]:.3f}' if n in r['recalls'] else '-' for n in RECALL_COLUMNS)
        rows.append(f'| {r["arch"]} {r["variant"]} | {r["dataset"]} {r["split"]} | {recalls} | '
                    f'{r["descriptor_dim"]} | {r["file_mb"]:.1f} | {latency_cell(r)} |')
    return '\n'.join([header] + rows)


def latency_cell(record):
    if record['latency_ms'] is None:
        return '-'
    return f'{record["latency_ms"]:.1f} (at {record["latency_size"]})'


def report(opt):
    records = read_results(results_path(opt))
    table = markdown_table(records)
    path = os.path.join(opt.runsPath, TABLE_FILE)
    with open(path, 'w') as f:
        f.write(table + '\n')
    logging.info('%s\n\nTable written to %s', table, path)
    return table
