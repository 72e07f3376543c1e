"""--mode=export --format onnx: the model of a run folder as one ONNX graph, for onnxruntime, TensorRT or OpenVINO.

    python main.py --mode=export --format onnx --resume=<run> --export_path model.onnx

Input `image` [batch, 3, height, width] float32, all three axes dynamic: RGB in [0, 1] minus `mean`, divided by `std`
(ImageNet's, in the metadata): the very tensor this project's image loader gives every model. Whatever else a run
applies lives inside the graph, as it lives inside the PyTorch model: an imported MATLAB network's re-normalisation to
0-255 minus the authors' average image (models.InputNormalization), the PCA whitening. So every exported model takes
the same input, and a user needs only the metadata to feed it.
Output `descriptor` [batch, descriptor_dim] float32, L2-normalised: the descriptor test mode searches.
Metadata (metadata_props, strings): arch, num_clusters (K), dim (D, local), descriptor_dim, whitening (its output
dimension or "none"), mean and std (JSON lists), input ("RGB in [0, 1], (x - mean) / std"), variant, source run.

Float, pruned (structured or unstructured) and whitened runs export; NetVLAD is one batched product, so the graph
has a fixed number of nodes whatever K is (the reference port's per-cluster loop unrolls into K copies). int8 runs
are refused: their encoder is a torch.export program lowered for x86 oneDNN; export the float run they came from.
The exporter is torch.onnx's TorchScript-based one (dynamo=False): torch 2.14's default, torch.export-based exporter
needs the onnxscript package, which this project does not depend on. The file is written through a temporary file,
checked with onnx.checker, and onnxruntime's output is compared with PyTorch's on a random batch before it is kept.
"""
import json
import logging
import os
import warnings

import numpy as np
import torch

from checkpoint import checkpoint_path, load_model_from_checkpoint, read_checkpoint
from commons import UserError
from models import IMAGENET_MEAN, IMAGENET_STD

OPSET = 17
CHECK_SIZE = (2, 3, 128, 160)  # the random batch onnxruntime and PyTorch are compared on
CHECK_TOLERANCE = 1e-4


def export_path(opt):
    return opt.export_path or os.path.join(opt.resume, 'model.onnx')


def check_request(opt):
    if not opt.resume:
        raise UserError('--mode=export needs --resume=<run folder>: the run whose model to export.')
    checkpoint = read_checkpoint(checkpoint_path(opt.resume, opt.ckpt), opt.unsafe_load)
    if 'quantized' in checkpoint:
        raise UserError(f'--resume={opt.resume} holds an int8 model (--mode=quantize), whose encoder is a torch.export '
                        f'program for x86 oneDNN kernels that ONNX export cannot take. Export the float run it was '
                        f'made from ({checkpoint.get("source_run", "its source run")}) instead.')
    folder = os.path.dirname(os.path.abspath(export_path(opt)))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--export_path {export_path(opt)}: {folder} is a file, not a folder.')


def metadata(model, checkpoint, opt):
    pool = model.pool
    return dict(arch=opt.arch, num_clusters=str(getattr(pool, 'num_clusters', 0)), dim=str(pool.dim),
                pooling=opt.pooling, descriptor_dim=str(model.output_dim),
                whitening=str(model.whiten.out_features) if hasattr(model, 'whiten') else 'none',
                mean=json.dumps(IMAGENET_MEAN), std=json.dumps(IMAGENET_STD),
                input='image [batch, 3, height, width] float32: RGB in [0, 1], (x - mean) / std per channel',
                output='descriptor [batch, descriptor_dim] float32, L2-normalised',
                variant=checkpoint.get('variant', 'trained'), source_run=os.path.abspath(opt.resume))


def write_onnx(model, path, props):
    """torch.onnx export with dynamic batch, height and width, then the metadata, written atomically."""
    import onnx
    tmp_path = path + '.tmp'
    example = torch.rand(CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export', category=DeprecationWarning)
            warnings.filterwarnings('ignore', message='.*feature will be removed', category=DeprecationWarning)
            torch.onnx.export(model, (example,), tmp_path, dynamo=False, opset_version=OPSET,
                              input_names=['image'], output_names=['descriptor'],
                              dynamic_axes={'image': {0: 'batch', 2: 'height', 3: 'width'},
                                            'descriptor': {0: 'batch'}})
        graph = onnx.load(tmp_path)
        onnx.helper.set_model_props(graph, props)
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp_path)
        difference = onnxruntime_difference(model, tmp_path, example)
        if difference > CHECK_TOLERANCE:
            raise RuntimeError(f'onnxruntime and PyTorch differ by {difference:.2e} on a random batch')
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    os.replace(tmp_path, path)
    return graph, difference


def onnxruntime_difference(model, path, images):
    """Max absolute difference of the descriptors onnxruntime (CPU) and PyTorch compute for `images`."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    (onnx_desc,) = session.run(None, {'image': images.numpy()})
    with torch.no_grad():
        torch_desc = model(images).numpy()
    return float(np.abs(onnx_desc - torch_desc).max())


def export(opt):
    if opt.format != 'onnx':
        raise UserError(f'--format {opt.format}: only onnx is supported.')
    check_request(opt)
    model, checkpoint = load_model_from_checkpoint(opt)
    model = model.cpu().float().eval()
    path = export_path(opt)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    props = metadata(model, checkpoint, opt)
    graph, difference = write_onnx(model, path, props)
    logging.info('Exported %s (%s, %s-D descriptor) to %s: %d graph nodes, %.1f MB; onnxruntime vs PyTorch on a '
                 'random %s batch: max abs difference %.1e', opt.resume, props['variant'], props['descriptor_dim'],
                 path, len(graph.graph.node), os.path.getsize(path) / 1e6, 'x'.join(map(str, CHECK_SIZE)), difference)
    return dict(path=path, nodes=len(graph.graph.node), difference=difference, metadata=props)
