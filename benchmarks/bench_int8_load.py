"""Loading an int8 run folder: the tensors-only encoder (encoder_int8.pth, read with torch.load(weights_only=True) and
rebuilt from the float architecture: export, prepare, observers filled, convert_pt2e, export) against the former
torch.export program (encoder_int8.pt2, torch.export.load, which --unsafe_load alone still reads).

    python benchmarks/bench_int8_load.py              # AlexNet and VGG16, random weights, K=64, one thread

Both files are written from the same calibrated encoder (random images) into a temporary run folder; each load is
int8.load_quantized_model, as --mode=test calls it, timed in process CPU time (and wall time beside it) on one
thread, alternating the two layouts, and checked to give the same descriptors. Compilation (at the first batch, for
both alike) is not part of a load and is left out.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netvlad_toolkit.model import int8  # noqa: E402
from netvlad_toolkit.model.models import build_model  # noqa: E402
from netvlad_toolkit.modes import quantize  # noqa: E402


def both_layouts(arch, folder):
    """A run folder per layout, from one calibrated encoder: (checkpoint dict, run folder) for each."""
    config = dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None, pca_dim=None,
                  input_norm=False)
    model = build_model(config).eval()
    images = torch.rand(4, 3, 240, 320)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(4)), batch_size=2)
    prepared, head_model, record = quantize.quantize_static(model, loader)
    head = dict(quantized='static', state_dict=int8.head_state(head_model), config=config)
    runs = {}
    for layout in ('tensors', 'program'):
        run = os.path.join(folder, f'{arch}_{layout}')
        os.makedirs(os.path.join(run, 'checkpoints'))
        runs[layout] = (head, run)
    int8.save_encoder(prepared, record, os.path.join(runs['tensors'][1], 'checkpoints'))
    program = int8.converted_program(prepared, images[:2])
    torch.export.save(program, os.path.join(runs['program'][1], 'checkpoints', int8.LEGACY_PROGRAM_NAME))
    runs['program'] = (dict(head, encoder_program=int8.LEGACY_PROGRAM_NAME), runs['program'][1])
    return runs


def timed_load(checkpoint, run):
    cpu, wall = time.process_time(), time.perf_counter()
    model = int8.load_quantized_model(checkpoint, run, unsafe='encoder_program' in checkpoint)
    return model, time.process_time() - cpu, time.perf_counter() - wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--archs', nargs='+', default=['alexnet', 'vgg16'])
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ[int8.COMPILE_ENV] = '0'
    print('| encoder | layout | load, CPU s (median) | load, wall s (median) | file (MB) |')
    print('|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            runs = both_layouts(arch, folder)
            times = {layout: ([], []) for layout in runs}
            descriptors, image = {}, torch.rand(1, 3, 240, 320, generator=torch.Generator().manual_seed(0))
            for _ in range(args.repeats):
                for layout, (checkpoint, run) in runs.items():
                    model, cpu, wall = timed_load(checkpoint, run)
                    times[layout][0].append(cpu)
                    times[layout][1].append(wall)
                    with torch.inference_mode():
                        descriptors[layout] = model(image)
            assert torch.equal(descriptors['tensors'], descriptors['program']), 'the layouts give other descriptors'
            for layout, (checkpoint, run) in runs.items():
                name = int8.ENCODER_NAME if layout == 'tensors' else int8.LEGACY_PROGRAM_NAME
                size = os.path.getsize(os.path.join(run, 'checkpoints', name)) / 2 ** 20
                print(f'| {arch} | {name} | {statistics.median(times[layout][0]):.2f} | '
                      f'{statistics.median(times[layout][1]):.2f} | {size:.1f} |')


if __name__ == '__main__':
    main()
