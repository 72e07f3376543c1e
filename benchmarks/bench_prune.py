"""Structured pruning: CPU latency, parameters and MACs before and after, for VGG16 and AlexNet (random weights).

    python benchmarks/bench_prune.py --threads 1            # the speed table, 480x640, amounts 0.2 and 0.5
    python benchmarks/bench_prune.py --recall_dir /tmp/rec  # instead: Recall@N after fine-tuning, synthetic data

Latencies of the model before and after pruning are taken in one process, in alternating rounds (as the prune
mode does), so that load from other processes on the machine falls on all models alike.
The recall part trains AlexNet from scratch on the default synthetic dataset as the demo does (cluster, then
--train_epochs of Adam at 1e-5, reused if already in --recall_dir), prunes it (structured, each --amounts and
--criteria, --finetune_epochs), and reads Recall@N on the test split from the prune reports.
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from driver import SYNTHETIC_ALEXNET, run_command, trained_run  # noqa: E402
from netvlad_toolkit.model.models import build_model, conv_indices  # noqa: E402
from netvlad_toolkit.modes.prune import interleaved_latency, prune_structured  # noqa: E402
from netvlad_toolkit.runs.measure import count_macs, count_parameters  # noqa: E402
from netvlad_toolkit.utils.commons import parse_size  # noqa: E402


def speed_table(archs, amounts, image_size, rounds, repeats):
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        config = dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None)
        original = build_model(config).eval().to(memory_format=torch.channels_last)  # as the modes run it
        pruned = [prune_structured(copy.deepcopy(original), amount, conv_indices(original.encoder))
                  .to(memory_format=torch.channels_last) for amount in amounts]
        latencies = interleaved_latency([original, *pruned], image_size, rounds, repeats)
        for amount, model, latency in zip([0.0, *amounts], [original, *pruned], latencies):
            rows.append(dict(arch=arch, amount=amount, parameters=count_parameters(model)[1],
                             macs=count_macs(model, image_size), latency_ms=latency,
                             descriptor_dim=model.output_dim))
    return rows


def print_speed_table(rows, image_size):
    print(f'| model | amount | params (M) | MACs (G) | MACs ratio | latency (ms, {image_size[0]}x{image_size[1]}) '
          f'| speed-up | descriptor |')
    print('|---|---|---|---|---|---|---|---|')
    for row in rows:
        base = next(r for r in rows if r['arch'] == row['arch'] and r['amount'] == 0.0)
        print(f'| {row["arch"]} | {row["amount"]:g} | {row["parameters"] / 1e6:.2f} | {row["macs"] / 1e9:.2f} '
              f'| {row["macs"] / base["macs"]:.3f} | {row["latency_ms"]:.0f} '
              f'| {base["latency_ms"] / row["latency_ms"]:.2f}x | {row["descriptor_dim"]} |')


def recall_after_finetuning(work_dir, amounts, criteria, train_epochs, finetune_epochs):
    """Train AlexNet on the synthetic dataset as the demo does (if not done yet), prune it with each amount and
    criterion, and return the prune reports: {(amount, criterion): report}."""
    adam = ['--optim', 'ADAM', '--lr', '0.00001']
    run = trained_run(work_dir, adam + ['--nEpochs', str(train_epochs)])
    reports = {}
    for amount in amounts:
        for criterion in criteria:
            flags = ['--mode=prune', '--pruning_type=structured', f'--pruning_amount={amount}', '--split=test',
                     f'--pruning_criterion={criterion}', f'--finetune_epochs={finetune_epochs}', f'--resume={run}']
            run_command(*flags, *adam, *SYNTHETIC_ALEXNET)
            folder = f'{run}_pruned_structured_{round(100 * amount)}'
            with open(os.path.join(folder, 'prune_report.json')) as f:
                reports[amount, criterion] = json.load(f)
            os.replace(folder, f'{folder}_{criterion}')
    return reports


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', default='vgg16,alexnet')
    parser.add_argument('--amounts', default='0.2,0.5')
    parser.add_argument('--size', default='480x640', type=parse_size)
    parser.add_argument('--rounds', type=int, default=5, help='Alternating latency rounds per model.')
    parser.add_argument('--repeats', type=int, default=3, help='Timed forward passes per round.')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(),
                        help='CPU threads of the latency runs (default: all cores).')
    parser.add_argument('--recall_dir', default=None,
                        help='Run the recall experiment in this work folder instead of the speed table.')
    parser.add_argument('--train_epochs', type=int, default=3)
    parser.add_argument('--finetune_epochs', type=int, default=1)
    parser.add_argument('--criteria', default='activation,l2', help='--pruning_criterion values to compare.')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    amounts = [float(a) for a in args.amounts.split(',')]
    if args.recall_dir:
        os.makedirs(args.recall_dir, exist_ok=True)
        reports = recall_after_finetuning(args.recall_dir, amounts, args.criteria.split(','), args.train_epochs,
                                          args.finetune_epochs)
        print('| amount | criterion | Recall@1 before -> after | @5 | @10 | @20 |')
        print('|---|---|---|---|---|---|')
        for (amount, criterion), report in reports.items():
            cells = ' | '.join(f'{report["before"][f"recall@{n}"]:.4f} -> {report["after"][f"recall@{n}"]:.4f}'
                               for n in (1, 5, 10, 20))
            print(f'| {amount:g} | {criterion} | {cells} |')
        return
    rows = speed_table(args.archs.split(','), amounts, args.size, args.rounds, args.repeats)
    print_speed_table(rows, args.size)


if __name__ == '__main__':
    main_cli()
