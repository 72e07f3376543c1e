"""--mode=export --format onnx: the model of a run folder as one ONNX graph, for onnxruntime, TensorRT or OpenVINO.

    python main.py --mode=export --format onnx --resume=<run> --export_path model.onnx

Input `image` [batch, 3, height, width] float32, all three axes dynamic: RGB in [0, 1] minus `mean`, divided by `std`
(ImageNet's, in the metadata): the very tensor this project's image loader gives every model. Whatever else a run
applies lives inside the graph, as it lives inside the PyTorch model: an imported MATLAB network's re-normalisation to
0-255 minus the authors' average image (models.InputNormalization), the PCA whitening. So every exported model takes
the same input, and a user needs only the metadata to feed it.
Output `descriptor` [batch, descriptor_dim] float32, L2-normalised: the descriptor test mode searches.
Metadata (metadata_props, strings): arch, num_clusters (K), dim (D, local), descriptor_dim, whitening (its output
dimension or "none"), mean and std (JSON lists), input ("RGB in [0, 1], (x - mean) / std"), variant, source run,
and for an imported network in_graph_preprocessing (its own mean, std and scale, applied inside the graph).

Float, pruned (structured or unstructured) and whitened runs export; NetVLAD is one batched product, so the graph
has a fixed number of nodes whatever K is (the reference port's per-cluster loop unrolls into K copies). int8 runs
are refused: their encoder is a torch.export program lowered for x86 oneDNN; export the float run they came from.
--onnx_int8 also writes model_int8.onnx beside model.onnx: onnxruntime's static quantisation of the convs (QDQ, int8
per-channel weights, uint8 activations), calibrated on --calib_images training-database images (never the evaluated
split), evaluated on --split (Recall@N, file size, CPU latency at --latency_size against the PyTorch float model) and
appended to the results file, where it stands beside torchao's int8 of --mode=quantize.
The exporter is torch.onnx's TorchScript-based one (dynamo=False): torch 2.14's default, torch.export-based exporter
needs the onnxscript package, which this project does not depend on. The file is written through a temporary file,
checked with onnx.checker, and onnxruntime's output is compared with PyTorch's on a random batch before it is kept.
"""
import json
import logging
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn
from onnxruntime import quantization as ort_quantization

from netvlad_toolkit.datasets.datasets import load_dataset, training_database_sample
from netvlad_toolkit.datasets.images import image_loader
from netvlad_toolkit.model.checkpoint import checkpoint_path, read_checkpoint
from netvlad_toolkit.model.models import IMAGENET_MEAN, IMAGENET_STD
from netvlad_toolkit.runs.measure import LATENCY_THREADS, interleaved_latency
from netvlad_toolkit.runs.results import append_result
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.search.retrieval import evaluate, log_recalls
from netvlad_toolkit.utils.commons import UserError, atomic_copy, make_deterministic
from netvlad_toolkit.utils.options import add_calibration_flag, add_evaluating_flags, add_latency_flags

OPSET = 17
CHECK_SIZE = (2, 3, 128, 160)  # the random batch onnxruntime and PyTorch are compared on
CHECK_TOLERANCE = 1e-4


def add_flags(p):
    add_evaluating_flags(p, run_required=True)
    add_latency_flags(p, optional=False)
    group = p.add_argument_group('export')
    group.add_argument('--format', default='onnx', choices=['onnx'], help='The file format of the exported model.')
    group.add_argument('--export_path', default=None, metavar='FILE',
                       help='The file to write (default: <resume>/model.onnx). Input: images normalised as the project '
                            'loads them (mean and std in its metadata); output: the L2-normalised descriptor.')
    group.add_argument('--onnx_int8', action='store_true',
                       help='Also write FILE_int8.onnx beside FILE.onnx, onnxruntime\'s static int8 quantization of the '
                            'convs calibrated on --calib_images training-database images, and evaluate it on --split '
                            '(Recall@N, size, latency; appended to the results file).')
    add_calibration_flag(group)
    group.add_argument('--overwrite', action='store_true',
                       help='Replace an existing FILE (and FILE_int8.onnx); without it, an existing one is refused.')


def export_path(opt):
    return opt.export_path or os.path.join(opt.resume, 'model.onnx')


def check_request(opt):
    checkpoint = read_checkpoint(checkpoint_path(opt.resume, opt.ckpt), opt.unsafe_load)
    if 'quantized' in checkpoint:
        raise UserError(f'--resume={opt.resume} holds an int8 model (--mode=quantize), whose encoder is a torch.export '
                        f'program for x86 oneDNN kernels that ONNX export cannot take. Export the float run it was '
                        f'made from ({checkpoint.get("source_run", "its source run")}) instead.')
    if opt.onnx_int8 and opt.split.startswith('train'):
        raise UserError(f'--split={opt.split}: --onnx_int8 calibrates on the training database; evaluate the int8 '
                        f'model on val or test instead.')
    folder = os.path.dirname(os.path.abspath(export_path(opt)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--export_path {export_path(opt)}: {folder} is a file, not a folder.')
    written = [export_path(opt)] + ([int8_path(export_path(opt))] if opt.onnx_int8 else [])
    existing = [path for path in written if os.path.exists(path)]
    if existing and not opt.overwrite:
        raise UserError(f'{" and ".join(existing)} already exist{"s" if len(existing) == 1 else ""} (from an earlier '
                        f'--mode=export). Add --overwrite to replace {"it" if len(existing) == 1 else "them"}, or give '
                        f'another --export_path. Nothing was written.')


def metadata(model, checkpoint, opt):
    pool = model.pool
    return dict(arch=opt.arch, num_clusters=str(getattr(pool, 'num_clusters', 0)), dim=str(pool.dim),
                pooling=opt.pooling, descriptor_dim=str(model.output_dim),
                whitening=str(model.whiten.out_features) if hasattr(model, 'whiten') else 'none',
                mean=json.dumps(IMAGENET_MEAN), std=json.dumps(IMAGENET_STD),
                input='image [batch, 3, height, width] float32: RGB in [0, 1], (x - mean) / std per channel',
                output='descriptor [batch, descriptor_dim] float32, L2-normalised',
                variant=checkpoint.get('variant', 'trained'), source_run=os.path.abspath(opt.resume),
                **({'in_graph_preprocessing': json.dumps(model.input_norm.record())} if hasattr(model, 'input_norm')
                   else {}))


def write_onnx(model, path, props):
    """torch.onnx export with dynamic batch, height and width, then the metadata, checked against PyTorch in a
    scratch folder and written to `path` atomically (commons.atomic_write)."""
    example = torch.rand(CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = os.path.join(scratch, os.path.basename(path))
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export', category=DeprecationWarning)
            warnings.filterwarnings('ignore', message='.*feature will be removed', category=DeprecationWarning)
            torch.onnx.export(model, (example,), scratch_path, dynamo=False, opset_version=OPSET,
                              input_names=['image'], output_names=['descriptor'],
                              dynamic_axes={'image': {0: 'batch', 2: 'height', 3: 'width'},
                                            'descriptor': {0: 'batch'}})
        graph = onnx.load(scratch_path)
        onnx.helper.set_model_props(graph, props)
        onnx.checker.check_model(graph)
        onnx.save(graph, scratch_path)
        difference = onnxruntime_difference(model, scratch_path, example)
        if difference > CHECK_TOLERANCE:
            raise RuntimeError(f'onnxruntime and PyTorch differ by {difference:.2e} on a random batch')
        atomic_copy(scratch_path, path)
    return graph, difference


def onnxruntime_difference(model, path, images):
    """Max absolute difference of the descriptors onnxruntime (CPU) and PyTorch compute for `images`."""
    with torch.no_grad():
        return float((OnnxRuntimeModel(path, model.output_dim)(images) - model(images)).abs().max())


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, shaped as this project's models (image batch -> descriptors), so
    that evaluation and latency measurement take it. Threads: `threads`, or as many as torch uses."""

    cpu_only = True

    def __init__(self, path, output_dim, threads=None):
        super().__init__()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.output_dim = output_dim

    def _apply(self, fn, recurse=True):
        return self  # device and dtype moves do not apply to an onnxruntime CPU session

    def forward(self, images):
        pixels = np.ascontiguousarray(images.to('cpu', torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {'image': pixels})[0])


# ---------------------------------------------------------------------------------------------- onnxruntime int8

class CalibrationImages(ort_quantization.CalibrationDataReader):
    """The calibration batches as onnxruntime's quantizer reads them."""

    def __init__(self, loader):
        self.batches = iter(loader)

    def get_next(self):
        images = next(self.batches, None)
        return None if images is None else {'image': images[0].numpy()}


def int8_path(path):
    return os.path.splitext(path)[0] + '_int8.onnx'


def quantize_onnx(float_path, out_path, calib_loader):
    """onnxruntime static quantisation of the convs (QDQ; int8 per-channel weights, uint8 activations, min-max
    ranges on the calibration images), as torchao's int8 of --mode=quantize: NetVLAD and whitening stay float."""
    with tempfile.TemporaryDirectory() as scratch:
        prepared, quantized = os.path.join(scratch, 'prepared.onnx'), os.path.join(scratch, 'int8.onnx')
        ort_quantization.quant_pre_process(float_path, prepared)
        ort_quantization.quantize_static(
            prepared, quantized, CalibrationImages(calib_loader), quant_format=ort_quantization.QuantFormat.QDQ,
            op_types_to_quantize=['Conv'], per_channel=True, activation_type=ort_quantization.QuantType.QUInt8,
            weight_type=ort_quantization.QuantType.QInt8)  # the calibration graph outputs only per-tensor min/max
        atomic_copy(quantized, out_path)


def export_int8(model, float_path, opt, calib_set, eval_set):
    """The onnxruntime int8 model beside the float one, evaluated on --split against the PyTorch float model: Recall@N,
    file size and CPU latency, appended to the results file beside torchao's int8 of --mode=quantize."""
    path = int8_path(float_path)
    quantize_onnx(float_path, path, image_loader(calib_set, opt, opt.cacheBatchSize))
    int8 = OnnxRuntimeModel(path, model.output_dim)
    result = evaluate(int8, eval_set, opt, torch.device('cpu'))
    result.pop('predictions')
    log_recalls(result['recalls'])
    timed = OnnxRuntimeModel(path, model.output_dim, threads=LATENCY_THREADS)  # a session's threads are fixed
    float_ms, int8_ms = interleaved_latency([model, timed], opt.latency_size)
    size = os.path.getsize(path)
    append_result(opt, 'onnxruntime int8 static', result, size, int8_ms, run_dir=opt.resume)
    logging.info('====> onnxruntime int8 model %s: %.1f MB (float ONNX %.1f MB), %.1f ms per %s image on the CPU '
                 '(PyTorch float %.1f ms: %.2fx), Recall@1 %.4f', path, size / 1e6, os.path.getsize(float_path) / 1e6,
                 int8_ms, 'x'.join(map(str, opt.latency_size)), float_ms, float_ms / int8_ms, result['recalls'][1])
    return dict(path=path, recalls=result['recalls'], file_bytes=size, latency_ms=int8_ms, float_latency_ms=float_ms)


def export(opt):
    if opt.format != 'onnx':
        raise UserError(f'--format {opt.format}: only onnx is supported.')
    check_request(opt)
    make_deterministic(opt.seed)
    if opt.onnx_int8:  # read before anything is written: they may be missing
        calib_set = training_database_sample(opt, opt.calib_images, '--onnx_int8 calibrates the int8 activations')
        eval_set = load_dataset(opt, opt.split)
    model, checkpoint = open_run(opt)
    model = model.cpu().float().eval()
    path = export_path(opt)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    props = metadata(model, checkpoint, opt)
    graph, difference = write_onnx(model, path, props)
    logging.info('Exported %s (%s, %s-D descriptor) to %s: %d graph nodes, %.1f MB; onnxruntime vs PyTorch on a '
                 'random %s batch: max abs difference %.1e', opt.resume, props['variant'], props['descriptor_dim'],
                 path, len(graph.graph.node), os.path.getsize(path) / 1e6, 'x'.join(map(str, CHECK_SIZE)), difference)
    exported = dict(path=path, nodes=len(graph.graph.node), difference=difference, metadata=props)
    if opt.onnx_int8:
        exported['int8'] = export_int8(model, path, opt, calib_set, eval_set)
    return exported
