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
  correctness  the CUDA path against the CPU path on the same --check_images JPEGs (480x640 crops of a few
               generated scenes, so that queries have real matches): the pixels nvjpeg decodes, the global and
               Patch-NetVLAD descriptors (AlexNet at ImageNet layout, random weights, NetVLAD and PCA whitening;
               TF32 off), the trunk cache on the card, and the re-ranked order of every query (each scene's first
               crop a query, the others its database), within CHECK_TOLERANCES; it fails loudly where not.
Everything printed also goes to --out (bench_cuda.log, one JSON line per latency row in bench_cuda.jsonl).
Usage: python benchmarks/bench_cuda.py --out $OUT
       python benchmarks/bench_cuda.py --device cpu --train_db 40 --extract_images 8 --repeats 2   (a dry run)
(On the CPU the correctness section compares the CPU path with itself: a dry run of the script, not a check.)
"""
import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.datasets.gpu_decode import image_batches  # noqa: E402
from netvlad_toolkit.datasets.images import ImageList  # noqa: E402
from netvlad_toolkit.model.centroids import new_model  # noqa: E402
from netvlad_toolkit.model.models import build_model  # noqa: E402
from netvlad_toolkit.search import patch_netvlad as pn  # noqa: E402
from netvlad_toolkit.search.retrieval import autocast  # noqa: E402
from netvlad_toolkit.training import trunk_cache  # noqa: E402

IMAGE_SIZE = (480, 640)
# largest absolute differences allowed between the CUDA and the CPU path: nvjpeg's IDCT and chroma upsampling differ
# from libjpeg's by a few levels at some pixels (normalised pixels: a level is about 0.017), which moves unit
# descriptors by about 1e-3; the trunk cache holds float32 conv outputs of the same pixels
CHECK_TOLERANCES = dict(pixels=0.15, trunk=0.05, global_desc=0.01, patch_desc=0.03)
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

        from netvlad_toolkit.model.int8 import converted_program
        from netvlad_toolkit.modes.quantize import quantize_static
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


def scene_crops(folder, scenes, per_scene, seed=0):
    """JPEG paths: per scene (a smooth random picture larger than IMAGE_SIZE), `per_scene` crops of IMAGE_SIZE at
    offsets a few dozen pixels apart. Scene by scene, the first crop is the query."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    paths = []
    for scene in range(scenes):
        coarse = rng.uniform(0, 255, size=(height // 16 + 8, width // 16 + 8, 3)).astype(np.uint8)
        picture = Image.fromarray(coarse).resize((width + 128, height + 128), Image.BICUBIC)
        detail = rng.normal(0, 12, size=(height + 128, width + 128, 3))
        picture = Image.fromarray(np.clip(np.asarray(picture) + detail, 0, 255).astype(np.uint8))
        for crop in range(per_scene):
            left, top = (int(v) for v in rng.integers(0, 128, size=2))
            paths.append(os.path.join(folder, f'scene{scene}_crop{crop}.jpg'))
            picture.crop((left, top, left + width, top + height)).save(paths[-1], quality=90)
    return paths


def path_features(model, images, config, device):
    """(pixels, global descriptors, PatchFeatures) of an ImageList, its batches decoded as the device's path
    decodes them (nvjpeg on CUDA)."""
    model = model.to(device)
    pixels, global_desc, patches = [], [], []
    loader, on_device = image_batches(images, types.SimpleNamespace(threads=0, cuda=device.type == 'cuda'), 4,
                                      device)
    for batch in loader:
        batch_pixels = on_device(batch)[0]
        pixels.append(batch_pixels.cpu())
        described, features = pn.patch_features(model, batch_pixels, config)
        global_desc.append(torch.from_numpy(described))
        patches += features
    return torch.cat(pixels), torch.cat(global_desc), patches


def reranked_orders(patches, scenes, per_scene, config):
    """Each scene's first crop re-ranked against all the other crops: the database ids by fused patch score."""

    queries = list(range(0, scenes * per_scene, per_scene))
    database = [i for i in range(scenes * per_scene) if i not in queries]
    orders = []
    for q in queries:
        scores = np.stack([pn.size_scores(patches[q], [patches[d] for d in database], index, config)[0]
                           for index in range(len(config.patch_sizes))], axis=1)
        orders.append(np.asarray(database)[np.argsort(-pn.fuse_scores(scores, config.patch_weights), kind='stable')])
    return orders


def correctness(args, log, device):
    """The CUDA path's pixels, descriptors, trunk cache and re-ranked orders against the CPU path's."""
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model(dict(arch='alexnet', pooling='netvlad', num_clusters=16, vladv2=False, encoder_channels=None,
                             pca_dim=128, first_trainable=8)).eval()
    config = dataclasses.replace(pn.RERANK_CONFIGS['performance'], pca_dim=128)
    scenes, per_scene = 4, max(2, args.check_images // 4)
    folder = tempfile.mkdtemp(prefix='bench_cuda_check_')
    images = ImageList(scene_crops(folder, scenes, per_scene))
    cpu = path_features(model, images, config, torch.device('cpu'))
    card = path_features(model, images, config, device)
    differences = dict(pixels=(card[0] - cpu[0]).abs().max().item(),
                       global_desc=(card[1] - cpu[1]).abs().max().item(),
                       patch_desc=max(float(abs(a - b).max()) for x, y in zip(card[2], cpu[2])
                                      for a, b in zip(x.descriptors, y.descriptors)))
    opt = types.SimpleNamespace(precision='fp32', trunk_cache_dtype='float32', cacheBatchSize=4, threads=0,
                                cuda=device.type == 'cuda')
    cached = trunk_cache.compute(model.to(device), images, opt, device, folder)
    with torch.inference_mode():
        expected = model.cpu().frozen_trunk(cpu[0])
    differences['trunk'] = (cached.rows(list(range(len(images)))).cpu() - expected).abs().max().item()
    cached.release()
    same = [bool((a == b).all()) for a, b in zip(reranked_orders(card[2], scenes, per_scene, config),
                                                 reranked_orders(cpu[2], scenes, per_scene, config))]
    failed = [f'{key} {value:.2e} > {CHECK_TOLERANCES[key]}' for key, value in differences.items()
              if not value <= CHECK_TOLERANCES[key]] + ([] if all(same) else [f're-ranked orders differ: {same}'])
    log(f'correctness, {len(images)} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {device} against cpu: largest differences '
        + ', '.join(f'{key} {value:.2e} (tolerance {CHECK_TOLERANCES[key]})' for key, value in differences.items())
        + f'; re-ranked orders identical for {sum(same)}/{len(same)} queries'
        + ('' if device.type == 'cuda' else ' (a dry run: the CPU path against itself)'))
    if failed:
        raise AssertionError('the CUDA path differs from the CPU path: ' + '; '.join(failed))


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
    p.add_argument('--check_images', type=int, default=8, help='JPEGs of the correctness section')
    p.add_argument('--sections', default='environment,correctness,train_vgg16,latency,extraction,train_alexnet',
                   help='in this order; train_<arch> runs bench_train.py for that arch')
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log, device = Log(args.out), torch.device(args.device)
    train_dir = tempfile.mkdtemp(prefix='bench_cuda_train_')  # one generated dataset for both archs
    steps = dict(
        environment=lambda: environment(log, device),
        correctness=lambda: correctness(args, log, device),
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
