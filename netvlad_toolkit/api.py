"""The toolkit from Python: a run folder as a model with its preprocessing, and images as descriptors.

    from netvlad_toolkit.api import load_run, describe
    model, preprocess = load_run('alexnet_netvlad_checkpoint/alexnet_netvlad_checkpoint', device='cpu')
    descriptors = describe(model, ['a.jpg', 'b.jpg'])          # [2, D] float32 numpy, L2-normalised

Any run folder works (trained, pruned, int8, whitened, imported MATLAB networks): runs.open_run reads it, safely
unless unsafe_load=True. `hubconf.py` serves load_run to torch.hub.
"""
import numpy as np
import torch

from netvlad_toolkit import cli
from netvlad_toolkit.datasets.images import ImageList, load_image
from netvlad_toolkit.runs.runs import open_run, place_model
from netvlad_toolkit.search.global_features import extraction_settings
from netvlad_toolkit.search.retrieval import extract_descriptors
from netvlad_toolkit.utils.commons import select_device


def run_options(run_dir, ckpt='latest', unsafe_load=False):
    """The options a test-mode command line with these values would give (every other flag at its default)."""
    return cli.parse_options(['--mode=test', f'--resume={run_dir}', f'--ckpt={ckpt}', '--threads=0',
                            *(['--unsafe_load'] if unsafe_load else [])])


def load_run(run_dir, device='cpu', ckpt='latest', unsafe_load=False):
    """(model in eval mode on `device`, preprocess): preprocess(path, resize=None) gives the normalised [3, H, W]
    tensor the model takes (RGB, EXIF-upright, ImageNet mean and std). An int8 model stays on the CPU."""
    opt = run_options(run_dir, ckpt, unsafe_load)
    opt.nocuda = torch.device(device).type != 'cuda'
    model, _ = open_run(opt)
    model, _ = place_model(model, torch.device(device) if opt.nocuda else select_device(opt))
    return model.eval(), load_image


def describe(model, images, batch_size=24, precision='fp32'):
    """Descriptors [N, D] (float32 numpy) of image paths (each at its own size, batched by size) or of a normalised
    [N, 3, H, W] tensor."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    if torch.is_tensor(images):
        with torch.inference_mode():
            return model.eval()(images.to(device).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
    settings = extraction_settings(device, batch_size, precision)
    sizes = {}
    for index, path in enumerate(images):
        sizes.setdefault(load_image(path).shape[1:], []).append(index)
    descriptors = np.empty((len(images), model.output_dim), dtype=np.float32)
    for group in sizes.values():
        descriptors[group] = extract_descriptors(model, ImageList([images[i] for i in group]), settings, device)
    return descriptors
