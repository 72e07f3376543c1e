"""What compression is judged by: parameters, MACs, file size and CPU latency of a model, before against after."""
import contextlib
import io
import logging
import os
import statistics
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from netvlad_toolkit.utils.commons import atomic_write_json


def count_parameters(model):
    """Parameters that are not exactly zero (pruned weights do not count) and the total."""
    tensors = list(model.state_dict().values())
    total = sum(t.numel() for t in tensors if t.is_floating_point())
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors if t.is_floating_point())
    return nonzero, total


def count_macs(model, image_size):
    """Multiply-accumulates of one forward pass on a [1, 3, H, W] image: convs, linears and NetVLAD's products."""
    macs = []

    def conv_hook(layer, inputs, output):
        macs.append(output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1])

    def linear_hook(layer, inputs, output):
        macs.append(output.numel() * layer.in_features)

    def netvlad_hook(layer, inputs, output):
        locations = inputs[0].shape[2] * inputs[0].shape[3]
        macs.append(2 * layer.num_clusters * layer.dim * locations)  # soft-assignment logits and residual sums

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
        elif hasattr(module, 'num_clusters'):
            hooks.append(module.register_forward_hook(netvlad_hook))
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, *image_size))
    for hook in hooks:
        hook.remove()
    return sum(macs)


# Every latency the toolkit reports: on this many CPU threads, in process CPU time (which other processes' load on a
# shared machine does not inflate, as it does wall time).
LATENCY_THREADS = 1
LATENCY_CLOCK = 'process CPU time'
LATENCY_TEXT = f'{LATENCY_THREADS} CPU thread{"s" if LATENCY_THREADS > 1 else ""}, {LATENCY_CLOCK}'


@contextlib.contextmanager
def torch_threads(count):
    """torch's intra-op thread count set to `count` while the block runs, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_ms(model, image_size, repeats=20, warmup=3, batch=1):
    """Median time of one forward pass per image, in milliseconds (LATENCY_TEXT: threads and clock)."""
    images = torch.randn(batch, 3, *image_size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), torch_threads(LATENCY_THREADS):
        for i in range(warmup + repeats):
            started = time.process_time()
            model(images)
            if i >= warmup:
                times.append((time.process_time() - started) * 1000 / batch)
    return statistics.median(times)


def interleaved_latency(models, image_size, rounds=5, repeats=4):
    """Median latency per image of each model (latency_ms), timed in alternating rounds so that whatever else the
    machine does falls on all models alike."""
    times = [[] for _ in models]
    for _ in tqdm(range(rounds), desc='latency', unit='round'):
        for model, samples in zip(models, times):
            samples.append(latency_ms(model.cpu().eval(), image_size, repeats=repeats, warmup=1))
    return [statistics.median(samples) for samples in times]


def directory_size(path):
    """Bytes of the model files of a run folder (checkpoints/ without the training-only flags)."""
    folder = os.path.join(path, 'checkpoints')
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if name.endswith(('.pth.tar', '.pth', '.pt2')) and name != 'model_best.pth.tar')


def model_bytes(model, checkpoint, run_dir):
    """Bytes needed to store the model: its run folder's model files, or, for an untrained model or a training
    checkpoint (which also holds optimizer state), its serialised state dict."""
    if checkpoint is None or 'optimizer' in checkpoint:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell()
    return directory_size(run_dir)


def compare(before, after, path, title):
    """Print a before/after table with ratios and write it, with both records, as JSON to `path` (in a folder
    being built: the caller names the report's final path once the folder is in place)."""
    rows = [key for key in before if isinstance(before[key], (int, float)) and key in after]
    ratios = {key: after[key] / before[key] for key in rows if before[key]}
    logging.info('%s\n%-24s %14s %14s %8s', title, 'metric', 'before', 'after', 'ratio')
    for key in rows:
        logging.info('%-24s %14.4g %14.4g %8.3f', key, before[key], after[key], ratios.get(key, float('nan')))
    report = dict(title=title, before=before, after=after, ratio_after_over_before=ratios)
    atomic_write_json(report, path)
    return report
