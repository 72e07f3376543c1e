"""The CUDA paths in one prepared run, for a lent GPU machine: latency per precision, extraction images/s, and the
trunk-cache training benchmark.

Sections (each runs on its own, so that one failure leaves the others' numbers):
  environment  the card, torch, cuDNN;
  latency      one 480x640 image (batch 1) and a batch of --batch, per precision: fp32 with TF32 off, fp32 as PyTorch
               runs it by default (cuDNN convolutions in TF32), bf16 and fp16 autocast; channels-last, CUDA events,
               median of --repeats. Then the int8 program of --mode=quantize (torchao PT2E, x86 target) moved to the
               card, to show what int8 is there;
  extraction   benchmarks/bench_extract.py --device cuda: images/s of retrieval.extract_descriptors on 480x640 JPEGs
               decoded by --workers DataLoader workers, fp32 and bf16, and the fp32/bf16 recall check;
  train_<arch> benchmarks/bench_train.py --device cuda: one epoch with the trunk cache, without it and reference-style,
               at 240x320 with 2 x --train_db training-database images (VGG16 first: its CPU arms take hours).
Everything printed also goes to --out (bench_cuda.log, one JSON line per latency row in bench_cuda.jsonl).
Usage: python benchmarks/bench_cuda.py --out $OUT
       python benchmarks/bench_cuda.py --device cpu --train_db 40 --extract_images 8 --repeats 2   (a dry run)
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
import main as cli  # noqa: E402
from centroids import new_model  # noqa: E402
from retrieval import autocast  # noqa: E402

IMAGE_SIZE = (480, 640)
PRECISIONS = ['fp32 strict', 'fp32 (TF32)', 'bf16', 'fp16']


class Log:
    """print, and the same line appended to bench_cuda.log under --out."""

    def __init__(self, out):
        self.path = os.path.join(out, 'bench_cuda.log')

    def __call__(self, *parts):
        line = ' '.join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, 'a') as f:
            f.write(line + '\n')


def environment(log, device):
    log('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version(), 'CPUs', os.cpu_count())
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        log('card', props.name, f'{props.total_memory / 2 ** 30:.0f} GiB,', props.multi_processor_count, 'SMs')


def elapsed_ms(device, run):
    """Milliseconds of run(): CUDA events on the card, the wall clock on the CPU."""
    if device.type != 'cuda':
        started = time.perf_counter()
        run()
        return (time.perf_counter() - started) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def per_image_ms(model, images, precision, device, repeats, warmup=5):
    """Median milliseconds per image of model(images) under `precision` (one of PRECISIONS)."""
    amp = {'bf16': 'bf16', 'fp16': 'fp16'}.get(precision, 'fp32')
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision != 'fp32 strict'
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: the NetVLAD head's matmuls stay fp32
    try:
        with torch.inference_mode(), autocast(amp, device):
            for _ in range(warmup):
                model(images)
            times = [elapsed_ms(device, lambda: model(images)) / len(images) for _ in range(repeats)]
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    return statistics.median(times)


def float_model(arch, device):
    opt = cli.parse_options(['--mode=test', f'--arch={arch}', '--fromscratch', '--nocuda'])
    return new_model(opt).eval().to(device).to(memory_format=torch.channels_last)


def latency(args, log, device):
    with open(os.path.join(args.out, 'bench_cuda.jsonl'), 'a', buffering=1) as jsonl:
        for arch in args.archs:
            latency_of_arch(arch, args, log, device, jsonl)


def latency_of_arch(arch, args, log, device, jsonl):
    """The rows of one arch: batch 1 and --batch in every precision, then the int8 program."""
    model = float_model(arch, device)
    for batch in (1, args.batch):
        images = torch.randn(batch, 3, *IMAGE_SIZE, device=device).contiguous(memory_format=torch.channels_last)
        for precision in PRECISIONS:
            ms = per_image_ms(model, images, precision, device, args.repeats)
            row = dict(arch=arch, batch=batch, precision=precision, ms_per_image=ms, images_per_s=1000 / ms)
            jsonl.write(json.dumps(row) + '\n')
            log(f'latency {arch:8s} batch {batch:3d} {precision:12s} {ms:8.3f} ms/img  {1000 / ms:8.1f} img/s')
    int8_latency(arch, model, args, log, device, jsonl)


def int8_latency(arch, model, args, log, device, jsonl):
    """The int8 encoder program of --mode=quantize (static, calibrated on random images), moved to `device` and run
    as a program: on CUDA its convolutions have no int8 kernel, so this is what the CPU artifact costs there."""
    try:
        from torch.export.passes import move_to_device_pass

        from int8 import converted_program
        from quantize import quantize_static
        calibration = torch.utils.data.TensorDataset(torch.randn(4, 3, 240, 320), torch.zeros(4))
        prepared, _, _ = quantize_static(model.cpu(), torch.utils.data.DataLoader(calibration, batch_size=2))
        program = converted_program(prepared, calibration.tensors[0][:2])
        model.to(device)
        encoder = move_to_device_pass(program, str(device)).module()
        images = torch.randn(1, 3, *IMAGE_SIZE, device=device).contiguous(memory_format=torch.channels_last)
        int8_ms = per_image_ms(encoder, images, 'fp32 (TF32)', device, args.repeats)
        float_ms = per_image_ms(model.encoder, images, 'fp32 (TF32)', device, args.repeats)
        jsonl.write(json.dumps(dict(arch=arch, batch=1, precision='int8 program (encoder)', ms_per_image=int8_ms,
                                    float_encoder_ms=float_ms)) + '\n')
        log(f'latency {arch:8s} batch   1 int8 program, encoder only {int8_ms:8.3f} ms/img '
            f'(fp32 encoder {float_ms:.3f} ms/img)')
    except Exception as error:  # a torchao or torch.export the card's image lacks: say so, keep the other numbers
        log(f'latency {arch:8s} int8 program: not measured ({type(error).__name__}: {error})')


def run_script(log, name, arguments, timeout, out):
    """A benchmark script of this folder in its own process group (killed whole after `timeout` s); its whole output
    goes to <out>/<label>.out, the end of it to the log."""
    label = f'{name[:-3]}_{arguments[arguments.index("--arch") + 1]}' if '--arch' in arguments else name[:-3]
    started = time.time()
    log(f'--- {label}: {name} {" ".join(arguments)}')
    with subprocess.Popen([sys.executable, os.path.join(HERE, name), *arguments], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as process:
        try:
            output, status = process.communicate(timeout=timeout)[0], process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, status = process.communicate()[0], f'killed after {timeout} s'
    lines = [line.split('\r')[-1] for line in output.splitlines()]
    with open(os.path.join(out, f'{label}.out'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    log('\n'.join([line for line in lines if '%|' not in line][-25:]))
    log(f'--- {label}: exit {status}, {time.time() - started:.0f} s')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='.', help='folder for bench_cuda.log and bench_cuda.jsonl')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'], help='cpu: a dry run of the script')
    p.add_argument('--archs', nargs='*', default=['alexnet', 'vgg16'])
    p.add_argument('--batch', type=int, default=32, help='the batch of the throughput rows and of extraction')
    p.add_argument('--repeats', type=int, default=30, help='timed forward passes per latency row')
    p.add_argument('--workers', type=int, default=12, help='DataLoader workers of extraction and training')
    p.add_argument('--extract_images', type=int, default=1024, help='480x640 JPEGs timed per arch and precision')
    p.add_argument('--train_db', type=int, default=1000, help='bench_train.py --db (the train split gets twice)')
    p.add_argument('--sections', default='environment,train_vgg16,latency,extraction,train_alexnet',
                   help='in this order; train_<arch> runs bench_train.py for that arch')
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log, device = Log(args.out), torch.device(args.device)
    train_dir = tempfile.mkdtemp(prefix='bench_cuda_train_')  # one generated dataset for both archs
    steps = dict(
        environment=lambda: environment(log, device),
        latency=lambda: latency(args, log, device),
        extraction=lambda: run_script(log, 'bench_extract.py', [
            '--device', args.device, '--workers', str(args.workers), '--images', str(args.extract_images),
            '--batch', str(args.batch), '--archs', *args.archs, '--recall_archs', *args.archs],
            timeout=150, out=args.out))
    for arch, timeout in (('vgg16', 240), ('alexnet', 120)):
        steps[f'train_{arch}'] = lambda arch=arch, timeout=timeout: run_script(log, 'bench_train.py', [
            '--device', args.device, '--threads', str(args.workers), '--arch', arch, '--db', str(args.train_db),
            '--workdir', train_dir], timeout=timeout, out=args.out)
    sections = args.sections.split(',')
    for name in sections:
        started = time.time()
        try:
            steps[name]()
        except Exception:
            log(f'{name} failed:\n{traceback.format_exc()}')
        log(f'=== {name}: {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
