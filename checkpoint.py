"""Checkpoints in the reference port's layout (SPEC section 4): reading, writing, and building the model they hold."""
import os
import pickle

import numpy as np
import torch

from commons import UserError, atomic_torch_save
from int8 import load_quantized_model
from models import build_model, config_from_state_dict

CHECKPOINT_NAMES = {'latest': 'checkpoint.pth.tar', 'best': 'model_best.pth.tar'}
# Older reference checkpoints pickle numpy scalars (best_score, recalls); these globals rebuild them safely.
# Files written under numpy 1.x name the scalar builder numpy.core.multiarray.scalar (numpy 2 moved it to _core).
NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, (np._core.multiarray.scalar, 'numpy.core.multiarray.scalar'),
                        np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]


def checkpoint_path(run_dir, which='latest'):
    return os.path.join(run_dir, 'checkpoints', CHECKPOINT_NAMES[which])


def read_checkpoint(path, unsafe=False):
    """Load a checkpoint dict with weights_only=True (numpy scalars allowed); --unsafe_load for anything else."""
    if not os.path.isfile(path):
        raise UserError(f'Checkpoint file {path} does not exist. --resume=DIR expects DIR/checkpoints/'
                        f'checkpoint.pth.tar (or model_best.pth.tar with --ckpt=best).')
    try:
        if unsafe:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f'Checkpoint {path} holds Python objects that the safe loader (torch.load weights_only=True) refuses '
            f'({str(error).splitlines()[0]}). If you trust the file, run again with --unsafe_load.') from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f'Checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint '
                        f'({type(error).__name__}: {str(error).splitlines()[0]}).') from None
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise UserError(f'Checkpoint {path} is not in the expected layout: a dict with a "state_dict" entry.')
    if 'packed_state_dict' in checkpoint:
        checkpoint['state_dict'] = unpack_state_dict(checkpoint['state_dict'], checkpoint.pop('packed_state_dict'))
    checkpoint['state_dict'] = {key.replace('module.', ''): value for key, value in checkpoint['state_dict'].items()}
    return plain_numbers(checkpoint)


def unpack_state_dict(state_dict, packed):
    """The state dict with the sparse weights that prune.py stored packed put back, dense, at their positions.

    Each packed weight: `shape`, `mask` (np.packbits of its nonzero entries, row-major, uint8), `values` (those
    entries in order) and `position` (its index in the full state dict, whose order gives the conv widths).
    """
    items = list(state_dict.items())
    for key, item in sorted(packed.items(), key=lambda pair: pair[1]['position']):
        numel = int(np.prod(item['shape']))
        nonzero = torch.from_numpy(np.unpackbits(item['mask'].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=item['values'].dtype)
        dense[nonzero] = item['values']
        items.insert(item['position'], (key, dense.reshape(item['shape'])))
    return dict(items)


def plain_numbers(value):
    """Numpy scalars and arrays of old checkpoints as plain Python numbers, recursively (tensors untouched)."""
    if isinstance(value, dict):
        return {key: plain_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_config_against_flags(config, opt, path):
    """A checkpoint whose architecture contradicts a flag the user gave explicitly is an error naming the flag;
    flags the user did not give take the checkpoint's values (so results are recorded under the right arch)."""
    for flag in ('arch', 'num_clusters', 'pooling', 'vladv2'):
        given = getattr(opt, flag)
        if config[flag] is None or given == config[flag]:
            continue
        if flag in opt.explicit:
            raise UserError(f'Checkpoint {path} holds a model with {flag}={config[flag]}, but the command line '
                            f'asks for --{flag}={given}. Drop the flag or pass the matching checkpoint.')
        setattr(opt, flag, config[flag])


def load_model_from_checkpoint(opt, which=None):
    """The model and checkpoint dict stored in run folder opt.resume."""
    path = checkpoint_path(opt.resume, which or opt.ckpt)
    checkpoint = read_checkpoint(path, opt.unsafe_load)
    state_dict = checkpoint['state_dict']
    if 'quantized' in checkpoint:
        return load_quantized_model(checkpoint, opt.resume), checkpoint
    if 'encoder.0.weight' not in state_dict:
        raise UserError(f'Checkpoint {path} has no encoder weights (encoder.0.weight): not a NetVLAD model.')
    config = config_from_state_dict(state_dict, checkpoint.get('pooling', opt.pooling))
    check_config_against_flags(config, opt, path)
    model = build_model(config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UserError(f'Checkpoint {path} does not match the model it describes: '
                        f'{" ".join(str(error).split())}') from None
    return model, checkpoint


def save_checkpoint(state, run_dir, is_best):
    """checkpoint.pth.tar always, model_best.pth.tar when best; each written atomically."""
    atomic_torch_save(state, checkpoint_path(run_dir, 'latest'))
    if is_best:
        atomic_torch_save(state, checkpoint_path(run_dir, 'best'))


def model_state(model):
    """The parts of a checkpoint that describe the model: its weights, plus the pooling the weights cannot show."""
    return {'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
            'pooling': 'netvlad' if hasattr(model.pool, 'centroids') else model.pool.mode}
