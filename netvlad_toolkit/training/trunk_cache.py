"""The frozen trunk's output for every training image, computed once per fit (--trunk_cache).

With ImageNet weights the encoder layers before the first trainable one (conv5 / conv5_1) never change, so their
output for a training image is the same at every descriptor-cache refresh and in every training step. fit computes
it once for every image of the training split (database and queries), then refreshes the descriptor cache and
trains through the trainable layers only: no image is decoded again during that fit.

Where it is kept: in a CUDA run on the card when it fits GPU_FRACTION of the card's free memory (each batch's rows
are then gathered there, and nothing crosses the bus during training); otherwise in RAM when it fits RAM_FRACTION of
the memory available (MemAvailable, shared among the ranks of one machine); otherwise in
<run folder>/trunk_cache_rank<r>.npy, read back as a memory map and deleted when fit ends (a killed run leaves it;
resuming recomputes and replaces it, so a file is never trusted across processes). --trunk_cache_dtype auto keeps
float32 where float32 fits (descriptors, mining and losses then equal the uncached run's up to float rounding), and
float16 otherwise (half the bytes, about 1e-3 relative error on the
features, which can change a close mining decision); float16 / float32 force one.
Under torchrun every rank computes the whole cache: its share of the triplets may use any image.
"""
import copy
import logging
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from netvlad_toolkit.datasets.gpu_decode import image_batches
from netvlad_toolkit.datasets.images import sizes_vary_from
from netvlad_toolkit.search.retrieval import autocast

RAM_FRACTION = 0.5  # of MemAvailable: the rest stays for the model, the loaders and the other processes
GPU_FRACTION = 0.6  # of the card's free memory: the rest for the trainable layers' activations and gradients
DTYPES = {'float16': np.float16, 'float32': np.float32}


class TrunkFeatures(Dataset):
    """The cached trunk output of each whole-set image: (float32 tensor [C, h, w], index), as ImageList gives
    (image, index). `features` is a tensor in RAM or a read-only memory map of the file at `path`."""

    def __init__(self, features, path=None):
        self.features = features
        self.path = path

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.rows([index])[0], index

    def rows(self, indices):
        """The cached rows `indices` as one float32 tensor [len(indices), C, h, w], gathered by one index operation
        (from the memory map: read into a float32 copy)."""
        if isinstance(self.features, np.ndarray):
            return torch.from_numpy(np.asarray(self.features[np.asarray(indices)], dtype=np.float32))
        return self.features[torch.as_tensor(indices, device=self.features.device)].float()

    def release(self):
        """Free the memory and delete the file, if any."""
        self.features = None
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


class TrainableLayers(nn.Module):
    """The layers of an EmbedNet after its frozen trunk, as a network whose input is the trunk's output (so that
    DDP / DataParallel wrap what trains; the parameters are the EmbedNet's own, in the same order)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def output_dim(self):
        return self.model.output_dim

    def forward(self, trunk_output):
        return self.model.forward_from_trunk(trunk_output)


def applies(model, whole, opt):
    """Whether fit uses the trunk cache for the training images `whole`: --trunk_cache auto, frozen layers, an
    encoder that can be cut, and images of one size."""
    if opt.trunk_cache == 'off' or model.frozen_layers == 0:
        return False
    if sizes_vary_from(whole) is not None:
        logging.info('Trunk cache off: the training images differ in size (give --resize to use it).')
        return False
    if not isinstance(model.encoder, nn.Sequential):
        logging.info('Trunk cache off: the encoder is one exported program (QAT) whose frozen layers cannot be run '
                     'apart; every refresh and step runs the whole encoder.')
        return False
    return True


def available_memory():
    """Bytes of memory available to new allocations (MemAvailable; free pages where /proc/meminfo is absent)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def storage(num_values, requested, local_world, device=torch.device('cpu')):
    """(numpy dtype, where: 'cuda', 'ram' or 'disk') of a cache of num_values values under --trunk_cache_dtype
    `requested`: on the card when it fits GPU_FRACTION of its free memory (CUDA runs), else in RAM when it fits
    RAM_FRACTION of the available memory, else in a file; auto is float32 where float32 fits, else float16."""
    budgets = [('ram', RAM_FRACTION * available_memory() / local_world)]
    if device.type == 'cuda':
        budgets.insert(0, ('cuda', GPU_FRACTION * torch.cuda.mem_get_info(device)[0]))
    for where, budget in budgets:
        dtype = cache_dtype(requested, num_values, budget)
        if num_values * np.dtype(dtype).itemsize <= budget:
            return dtype, where
    return cache_dtype(requested, num_values, budgets[-1][1]), 'disk'


def cache_dtype(requested, num_values, budget):
    if requested == 'auto':
        requested = 'float32' if 4 * num_values <= budget else 'float16'
    return DTYPES[requested]


def trunk_shape(model, dataset, opt, device):
    """[C, h, w] of the trunk output of one image of `dataset` (all images of a split have one size)."""
    with torch.inference_mode(), autocast(opt.precision, device):
        return tuple(model.frozen_trunk(dataset[0][0][None].to(device)).shape[1:])


def allocate(shape, dtype, where, run_dir, rank, device):
    if where != 'disk':
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name),
                           device=device if where == 'cuda' else 'cpu'), None
    os.makedirs(run_dir, exist_ok=True)  # a rank on another machine may not have the run folder
    path = os.path.join(run_dir, f'trunk_cache_rank{rank}.npy')
    return np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=shape), path


def compute(model, whole, opt, device, run_dir, rank=0, local_world=1):
    """The trunk output of every image of `whole` (a TrunkFeatures), computed in one pass of the images."""
    shape = (len(whole), *trunk_shape(model, whole, opt, device))
    dtype, where = storage(int(np.prod(shape)), opt.trunk_cache_dtype, local_world, device)
    features, path = allocate(shape, dtype, where, run_dir, rank, device)
    logging.info('Trunk cache: output of the %d frozen encoder layers for %d training images, %s each, %s, %.2f GB '
                 '%s', model.frozen_layers, len(whole), 'x'.join(map(str, shape[1:])), np.dtype(dtype).name,
                 features.nbytes / 1e9, {'cuda': 'on the card', 'ram': 'in RAM'}.get(where, f'on disk ({path})'))
    model.eval()
    start = 0
    loader, on_device = image_batches(whole, opt, opt.cacheBatchSize, device)
    with torch.inference_mode(), autocast(opt.precision, device):
        for batch in tqdm(loader, desc='trunk cache', unit='batch'):
            images = on_device(batch)[0].contiguous(memory_format=torch.channels_last)
            trunk = model.frozen_trunk(images).float()
            if path is None:
                features[start:start + len(images)] = trunk.to(features.device, features.dtype)
            else:
                features[start:start + len(images)] = trunk.cpu().numpy()
            start += len(images)
    if path is not None:
        features.flush()
        features = np.load(path, mmap_mode='r')
    return TrunkFeatures(features, path)


def loader_options(opt):
    """The options of loaders that read the trunk cache: no DataLoader workers (rows are copied, not decoded)."""
    cached_opt = copy.copy(opt)
    cached_opt.threads = 0
    return cached_opt
