"""onnxruntime int8 (--mode=export --onnx_int8) beside torchao's int8 (--mode=quantize static) of the same float run.

    python benchmarks/bench_onnx_int8.py --dir /tmp/onnxbench                 # AlexNet, default synthetic dataset
    python benchmarks/bench_onnx_int8.py --dir /tmp/onnxbench --arch vgg16 --skip_recall

Recall: AlexNet trained from scratch for --train_epochs on the default synthetic dataset (reused when already in
--dir), then the CLI's own modes on that run: test (PyTorch fp32), quantize --quantization_type=static (torchao PT2E),
export --onnx_int8 (onnxruntime QDQ); both int8 flows calibrate on the same --calib_images training images and are
evaluated on the test split. The report table is `--mode=report` of their results file.
Speed: one --latency_size image, --threads threads, all four models (PyTorch fp32, torchao int8, ONNX fp32,
onnxruntime int8) timed in alternating rounds in one process; random weights suffice for latency.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from driver import run_command  # noqa: E402
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint  # noqa: E402
from netvlad_toolkit.model.models import build_model  # noqa: E402
from netvlad_toolkit.modes.export_onnx import OnnxRuntimeModel, int8_path, quantize_onnx, write_onnx  # noqa: E402
from netvlad_toolkit.modes.quantize import quantize_static, save_quantized  # noqa: E402
from netvlad_toolkit.runs.measure import interleaved_latency  # noqa: E402
from netvlad_toolkit.runs.runs import open_run  # noqa: E402


def recall_table(folder, epochs, calib):
    data, runs = os.path.join(folder, 'data'), os.path.join(folder, 'runs')
    common = ['--dataset', 'synthetic', f'--dataPath={data}', f'--runsPath={runs}', '--arch=alexnet', '--nGPU=0',
              '--fromscratch', '--threads=0', '--latency_size=480x640']
    run = os.path.join(runs, 'alexnet_netvlad_checkpoint', 'alexnet_netvlad_checkpoint')
    if not os.path.isfile(os.path.join(run, 'checkpoints', 'model_best.pth.tar')):
        run_command('--mode=cluster', *common)
        run_command('--mode=train', *common, '--optim=ADAM', '--lr=0.00001', f'--nEpochs={epochs}')
    run_command('--mode=test', *common, '--split=test', f'--resume={run}', '--ckpt=best')
    run_command('--mode=quantize', *common, '--split=test', f'--resume={run}', '--ckpt=best', '--quantization_type=static',
        f'--calib_images={calib}')
    run_command('--mode=export', *common, '--split=test', f'--resume={run}', '--ckpt=best', '--onnx_int8',
        f'--calib_images={calib}', '--export_path', os.path.join(folder, 'alexnet.onnx'))
    run_command('--mode=report', f'--runsPath={runs}')
    with open(os.path.join(runs, 'results.md')) as f:
        print(f.read())


def speed_table(arch, size, threads, folder):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None,
                             pca_dim=None)).eval()
    run = os.path.join(folder, f'{arch}_random')
    save_checkpoint(dict(model_state(model), epoch=0, recalls={}, best_score=0.0, parallel=False), run, False)
    images = torch.rand(4, 3, *size)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(4)), batch_size=2)
    # torchao int8 through the quantize mode's own functions, saved and reloaded as --mode=test runs it
    opt = cli.parse_options(['--mode=quantize', f'--resume={run}', '--quantization_type=static'])
    prepared, head, record = quantize_static(model, loader)
    config = dict(arch=arch, pooling='netvlad', num_clusters=64, vladv2=False, encoder_channels=None, pca_dim=None,
                  input_norm=False)
    save_quantized(prepared, record, head, config, {}, opt, run + '_int8', len(images))
    torchao_int8 = open_run(cli.parse_options(['--mode=test', f'--resume={run}_int8']))[0]
    float_path = os.path.join(folder, f'{arch}.onnx')
    write_onnx(model, float_path, {})
    quantize_onnx(float_path, int8_path(float_path), loader)
    models = dict(pytorch_fp32=model, torchao_int8=torchao_int8,
                  onnx_fp32=OnnxRuntimeModel(float_path, model.output_dim),
                  onnxruntime_int8=OnnxRuntimeModel(int8_path(float_path), model.output_dim))
    latencies = interleaved_latency(list(models.values()), size, rounds=5, repeats=2)
    sizes = dict(pytorch_fp32=sum(v.numel() * 4 for v in model.state_dict().values()),
                 torchao_int8=sum(os.path.getsize(os.path.join(run + '_int8', 'checkpoints', n))
                                  for n in os.listdir(os.path.join(run + '_int8', 'checkpoints'))
                                  if n != 'model_best.pth.tar'),
                 onnx_fp32=os.path.getsize(float_path), onnxruntime_int8=os.path.getsize(int8_path(float_path)))
    print(f'| model | variant | latency {threads} thread(s) (ms) | speed-up | file (MB) |')
    print('|---|---|---|---|---|')
    for (name, latency) in zip(models, latencies):
        print(f'| {arch} | {name} | {latency:.0f} | {latencies[0] / latency:.2f}x | {sizes[name] / 1e6:.1f} |')


def main_():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dir', default=None, help='Working folder (default: a temporary one).')
    parser.add_argument('--arch', default='alexnet', choices=['alexnet', 'vgg16'], help='Speed table encoder.')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--size', default='480x640')
    parser.add_argument('--train_epochs', type=int, default=1)
    parser.add_argument('--calib_images', type=int, default=64)
    parser.add_argument('--skip_recall', action='store_true')
    parser.add_argument('--skip_speed', action='store_true')
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix='onnxbench_')
    os.makedirs(folder, exist_ok=True)
    np.random.seed(0)
    if not args.skip_speed:
        speed_table(args.arch, tuple(int(v) for v in args.size.split('x')), args.threads, folder)
    if not args.skip_recall:
        recall_table(folder, args.train_epochs, args.calib_images)


if __name__ == '__main__':
    main_()
