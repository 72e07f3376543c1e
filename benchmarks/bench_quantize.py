"""int8 quantization: CPU latency per image (fp32 eager, bf16 autocast, int8 PT2E), file sizes, and Recall@N.

    python benchmarks/bench_quantize.py                              # the speed and size table, 480x640
    python benchmarks/bench_quantize.py --recall_dir /tmp/qbench     # also Recall@N of fp32, static and QAT

Speed: each encoder (random weights) with its NetVLAD head (K=64) is timed in one process, all variants in
alternating rounds (as the prune and quantize modes do), so that load from other processes falls on all alike; the
ratios are to fp32 eager of the same round set. Every float variant runs as --mode=test runs it: channels-last
weights and input, the memory format the int8 convs use too. Each pass is timed as process CPU time (the figure to
compare on a shared machine, with --threads 1) and as wall time. Variants: fp32 eager; bf16 autocast (eager); int8 = the
quantize mode's artifact (torchao PT2E, X86InductorQuantizer, convert_pt2e, torch.export.save/load, Inductor with
freezing) run through int8.QuantizedEmbedNet; and, to show what compilation alone gives, fp32 and bf16 under
Inductor with freezing. Calibration for the speed table uses random images (latency does not depend on the scales).
Sizes: the fp32 state dict against the saved int8 program plus the float head.

Recall: AlexNet trained from scratch on the default synthetic dataset (cluster, --train_epochs of Adam at 1e-5;
reused when already in --recall_dir), then `--mode=quantize --ckpt=best` static and qat (QAT: --qat_epochs of Adam,
given the training --lr 1e-5, which QAT divides by 10), evaluated on the test split, calibrated on the train split,
read from their quantize_report.json.
"""
import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from driver import SYNTHETIC_ALEXNET, run_command, trained_run  # noqa: E402
from netvlad_toolkit.model import int8  # noqa: E402
from netvlad_toolkit.model.checkpoint import model_state  # noqa: E402
from netvlad_toolkit.model.models import build_model  # noqa: E402
from netvlad_toolkit.modes import quantize  # noqa: E402
from netvlad_toolkit.utils.commons import parse_size  # noqa: E402


class Compiled(torch.nn.Module):
    """A float model under torch.compile with Inductor freezing (and optional bf16 autocast of the encoder)."""

    def __init__(self, model, dtype=None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, images):
        with torch._inductor.config.patch(freezing=True), torch.autocast('cpu', dtype=self.dtype,
                                                                         enabled=self.dtype is not None):
            return self.compiled(images)


class Autocast(torch.nn.Module):
    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, images):
        with torch.autocast('cpu', dtype=self.dtype):
            return self.model(images)


def int8_model(model, image_size, folder, calib_batches=2):
    """The static int8 artifact of `model`, saved and loaded back as --mode=test does; returns it and its size."""
    images = torch.randn(2 * calib_batches, 3, *image_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(len(images))), 2)
    prepared, head_model, record = quantize.quantize_static(model, loader)
    int8.save_encoder(prepared, record, folder)
    checkpoint = dict(quantized='static', state_dict=int8.head_state(head_model),
                      config=dict(arch=arch_of(model), pooling='netvlad', num_clusters=model.pool.num_clusters,
                                  vladv2=False, encoder_channels=None, pca_dim=None, input_norm=False))
    torch.save(checkpoint, os.path.join(folder, 'checkpoint.pth.tar'))
    size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    return int8.load_quantized_model(checkpoint, os.path.dirname(folder)), size


def arch_of(model):
    return 'alexnet' if model.encoder[0].kernel_size == (11, 11) else 'vgg16'


def cpu_and_wall_ms(model, image_size, repeats):
    """Medians of one forward pass (after a warm-up): process CPU time and wall time, in ms. With one thread, CPU
    time counts only this process's work, so other jobs on a shared machine disturb it far less than wall time."""
    images = torch.randn(1, 3, *image_size).contiguous(memory_format=torch.channels_last)
    cpu, wall = [], []
    with torch.inference_mode():
        model(images)
        for _ in range(repeats):
            cpu_started, started = time.process_time(), time.perf_counter()
            model(images)
            cpu.append((time.process_time() - cpu_started) * 1000)
            wall.append((time.perf_counter() - started) * 1000)
    return statistics.median(cpu), statistics.median(wall)


def serialized_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def speed_table(archs, image_size, rounds, repeats, compiled_float):
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        config = dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None)
        model = build_model(config).eval()
        fp32_bytes = serialized_bytes(model_state(model))
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, 'checkpoints'))
            started = time.time()
            int8, int8_bytes = int8_model(copy.deepcopy(model), image_size, os.path.join(tmp, 'checkpoints'))
            quantize_s = time.time() - started
        fp32 = model.to(memory_format=torch.channels_last)
        variants = {'fp32 eager': fp32, 'bf16 autocast': Autocast(fp32, torch.bfloat16), 'int8 PT2E': int8}
        if compiled_float:
            variants.update({'fp32 Inductor': Compiled(copy.deepcopy(fp32)),
                             'bf16 Inductor': Compiled(copy.deepcopy(fp32), torch.bfloat16)})
        first_call = {}
        for name, variant in variants.items():  # compilation (one shape) is timed apart from the latency
            started = time.time()
            with torch.inference_mode():
                variant(torch.randn(1, 3, *image_size).contiguous(memory_format=torch.channels_last))
            first_call[name] = time.time() - started
        samples = {name: [] for name in variants}
        for _ in range(rounds):
            for name, variant in variants.items():
                samples[name].append(cpu_and_wall_ms(variant, image_size, repeats))
        base_cpu, base = (statistics.median(times) for times in zip(*samples['fp32 eager']))
        for name in variants:
            cpu, latency = (statistics.median(times) for times in zip(*samples[name]))
            rows.append(dict(arch=arch, variant=name, latency_ms=latency, speedup=base / latency,
                             cpu_ms=cpu, cpu_speedup=base_cpu / cpu,
                             first_call_s=first_call[name],
                             file_mb=(int8_bytes if name == 'int8 PT2E' else fp32_bytes) / 2 ** 20,
                             size_ratio=fp32_bytes / (int8_bytes if name == 'int8 PT2E' else fp32_bytes)))
        print(f'{arch}: quantization (export, calibration on {2 * 2} random images, convert, save, load) '
              f'{quantize_s:.1f} s', flush=True)
    return rows


def print_speed_table(rows, image_size):
    print(f'| model | variant | CPU time (ms/img, {image_size[0]}x{image_size[1]}) | speed-up (CPU time) '
          f'| latency (wall, ms/img) | speed-up (wall) | first call (s) | file (MB) | smaller |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["arch"]} | {r["variant"]} | {r["cpu_ms"]:.1f} | {r["cpu_speedup"]:.2f}x '
              f'| {r["latency_ms"]:.0f} | {r["speedup"]:.2f}x | '
              f'{r["first_call_s"]:.1f} | {r["file_mb"]:.1f} | {r["size_ratio"]:.2f}x |')


def recall_runs(work_dir, train_epochs, qat_epochs, calib_images):
    """Train AlexNet on the synthetic dataset (if not done yet), quantize it both ways, return both reports."""
    adam = ['--optim', 'ADAM', '--lr', '0.00001']
    run = trained_run(work_dir, adam + ['--nEpochs', str(train_epochs)])
    quantize_flags = ['--mode=quantize', '--split=test', f'--resume={run}', '--ckpt=best',
                      f'--calib_images={calib_images}', '--latency_size=480x640']
    for kind, extra in [('static', []), ('qat', [f'--qat_epochs={qat_epochs}', *adam])]:
        if not os.path.exists(f'{run}_quantized_{kind}/quantize_report.json'):
            run_command(*quantize_flags, f'--quantization_type={kind}', *extra, *SYNTHETIC_ALEXNET)
    reports = {}
    for kind in ('static', 'qat'):
        with open(f'{run}_quantized_{kind}/quantize_report.json') as f:
            reports[kind] = json.load(f)
    return reports


def print_recall_table(reports):
    print('| AlexNet, synthetic test | R@1 | R@5 | R@10 | R@20 | file (MB) | latency (ms/img, 480x640) |')
    print('|---|---|---|---|---|---|---|')
    rows = [('fp32', reports['static']['before'])] + [(f'int8 {kind}', reports[kind]['after']) for kind in reports]
    for name, record in rows:
        recalls = ' | '.join(f'{record[f"recall@{n}"]:.3f}' for n in (1, 5, 10, 20))
        print(f'| {name} | {recalls} | {record["file_bytes"] / 2 ** 20:.2f} | {record["latency_ms"]:.0f} |')


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--archs', default='vgg16,alexnet')
    parser.add_argument('--size', default='480x640', type=parse_size)
    parser.add_argument('--rounds', type=int, default=5, help='Alternating latency rounds per variant.')
    parser.add_argument('--repeats', type=int, default=2, help='Timed forward passes per round.')
    parser.add_argument('--no_compiled_float', action='store_true', help='Skip the fp32/bf16 Inductor variants.')
    parser.add_argument('--recall_dir', default=None, help='Work folder of the recall experiment (skipped if unset).')
    parser.add_argument('--train_epochs', type=int, default=3)
    parser.add_argument('--qat_epochs', type=int, default=1)
    parser.add_argument('--calib_images', type=int, default=256)
    parser.add_argument('--skip_speed', action='store_true')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (this machine\'s 2 cores are shared: 2 threads stall on each other).')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}')
    if not args.skip_speed:
        rows = speed_table(args.archs.split(','), args.size, args.rounds, args.repeats, not args.no_compiled_float)
        print_speed_table(rows, args.size)
    if args.recall_dir:
        os.makedirs(args.recall_dir, exist_ok=True)
        print_recall_table(recall_runs(args.recall_dir, args.train_epochs, args.qat_epochs, args.calib_images))
    print(f'load average at the end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main_cli()
