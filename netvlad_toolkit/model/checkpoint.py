"""Checkpoint files in the reference port's layout: reading and writing them (runs.py builds the
model a run folder holds)."""
import os
import pickle
import re
import zipfile

import numpy as np
import torch

from netvlad_toolkit.model.models import layer_name
from netvlad_toolkit.utils.commons import UserError, atomic_torch_save, error_summary

CHECKPOINT_NAMES = {'latest': 'checkpoint.pth.tar', 'best': 'model_best.pth.tar'}
# The entries torch.save writes below the archive's root folder.
TORCH_ENTRIES = re.compile(r'\w[^/]*/(data\.pkl|data/\d+|version|byteorder|\.format_version|\.storage_alignment'
                           r'|\.data/version|\.data/serialization_id)')
# Bounds on what a checkpoint's pickle may hold: its size, and the values and nesting of its plain data.
MAX_PICKLE_BYTES = 64 * 2 ** 20
MAX_PLAIN_ITEMS = 1_000_000
MAX_PLAIN_DEPTH = 32
# Older reference checkpoints pickle numpy scalars (best_score, recalls); these globals rebuild them safely. The scalar
# builder is taken from a scalar's own pickling recipe (public API); files written under numpy 1.x name it
# numpy.core.multiarray.scalar, numpy 2 names it numpy._core.multiarray.scalar.
_SCALAR_BUILDER = np.float64(0).__reduce__()[0]
NUMPY_SCALAR_GLOBALS = [(_SCALAR_BUILDER, 'numpy._core.multiarray.scalar'),
                        (_SCALAR_BUILDER, 'numpy.core.multiarray.scalar'),
                        np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]


def checkpoint_path(run_dir, which='latest'):
    return os.path.join(run_dir, 'checkpoints', CHECKPOINT_NAMES[which])


def read_checkpoint(path, unsafe=False):
    """Load a checkpoint dict with weights_only=True (numpy scalars allowed); --unsafe_load for anything else."""
    if not os.path.isfile(path):
        interrupted = os.path.isdir(os.path.dirname(path) + '.previous')
        raise UserError(f'Checkpoint file {path} does not exist. --resume=DIR expects DIR/checkpoints/'
                        f'checkpoint.pth.tar (or model_best.pth.tar with --ckpt=best).'
                        + (' A --mode=quantize that wrote this folder was interrupted while it replaced checkpoints/ '
                           '(the previous one is checkpoints.previous/): run it again.' if interrupted else ''))
    if not unsafe:
        check_archive(path)
    try:
        if unsafe:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f'Checkpoint {path} holds Python objects that the safe loader (torch.load weights_only=True) refuses '
            f'({error_summary(error)}). If you trust the file, run again with --unsafe_load.') from None
    except Exception as error:  # any other failure to read: truncated, empty, not a PyTorch file
        raise UserError(f'Checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint '
                        f'({error_summary(error)}).') from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
        raise UserError(f'Checkpoint {path} is not in the expected layout: a dict with a "state_dict" entry that '
                        f'maps parameter names to tensors.')
    if 'packed_state_dict' in checkpoint:
        try:
            checkpoint['state_dict'] = unpack_state_dict(checkpoint['state_dict'], checkpoint.pop('packed_state_dict'))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise UserError(f'Checkpoint {path} has a damaged packed_state_dict ({error_summary(error)}).') from None
    checkpoint['state_dict'] = {str(key).replace('module.', ''): value
                                for key, value in checkpoint['state_dict'].items()}
    check_state_dict(checkpoint, path)
    try:
        return plain_numbers(checkpoint, [MAX_PLAIN_ITEMS])
    except ValueError:
        raise UserError(f'Checkpoint {path} holds more than {MAX_PLAIN_ITEMS} values or values nested deeper than '
                        f'{MAX_PLAIN_DEPTH}; a checkpoint of this toolkit holds a state dict and a few numbers. It is '
                        f'not loaded.') from None


def check_archive(path):
    """The zip archive of a checkpoint as torch.save writes it, before torch reads it: entries of torch's names
    below one root folder, each once (names compared as a case-insensitive reader would, `./` removed), stored
    uncompressed, each local header naming the entry the central directory names, the pickle at most
    MAX_PICKLE_BYTES. The pickle is then read by the restricted unpickler in time linear in its size. A file in
    torch's legacy (pre-zip) format is one pickle stream, read by the same unpickler."""
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':  # torch takes anything else for its legacy format
            return
    seen = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                key = name.replace('/./', '/').lower()
                if key in seen or not TORCH_ENTRIES.fullmatch(name) or info.compress_type != zipfile.ZIP_STORED or \
                        name.endswith('/data.pkl') and info.file_size > MAX_PICKLE_BYTES:
                    raise ValueError(f'entry {name[:120]!r}')
                seen.add(key)
                archive.open(info).close()  # the local header must name the same entry
    except (ValueError, zipfile.BadZipFile, OSError, NotImplementedError) as error:
        raise UserError(f'Checkpoint {path} is not in the format torch.save writes (one root folder with '
                        f'data.pkl, data/<n> and version entries, each once, stored uncompressed, the pickle at most '
                        f'{MAX_PICKLE_BYTES // 2 ** 20} MiB): {error_summary(error)}. It is not loaded; load it only '
                        f'if you trust its source, with --unsafe_load.') from None
    if len({name.split('/', 1)[0] for name in seen}) != 1:
        raise UserError(f'Checkpoint {path} is not in the format torch.save writes: its entries lie below '
                        f'{"several root folders" if seen else "no root folder"}. It is not loaded; load it only if '
                        f'you trust its source, with --unsafe_load.')


def check_state_dict(checkpoint, path):
    """Every entry a tensor, every float weight finite, the first trainable layer (if stored) an encoder index."""
    for key, value in checkpoint['state_dict'].items():
        if not torch.is_tensor(value):
            raise UserError(f'Checkpoint {path}: state_dict entry {key} is a {type(value).__name__}, not a tensor.')
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f'Checkpoint {path}: state_dict entry {key} holds NaN or infinite values; the run it '
                            f'comes from diverged or the file is damaged. Use an earlier checkpoint.')
    first = checkpoint.get('first_trainable', 0)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise UserError(f'Checkpoint {path}: first_trainable is {first!r}; it must be the encoder index (a whole '
                        f'number from 0) of the first layer that trains.')


def check_entries(state, expected, path, int8_names=()):
    """Each entry of `state` is one of `expected` (a model's state dict, which may be on the meta device) with its
    shape and a dtype it can hold: floating point where the model's is, the model's own otherwise (int8 for
    `int8_names`); none is missing. A UserError names the first entry that is not so."""
    for key in expected:
        if key not in state:
            raise UserError(f'Checkpoint {path} has no entry {key}, which the model it describes needs.')
    for key, value in state.items():
        if key not in expected:
            raise UserError(f'Checkpoint {path} holds an entry {key} that the model it describes does not have.')
        want = expected[key]
        if key in int8_names:
            fits = value.dtype == torch.int8
        else:
            fits = value.is_floating_point() if want.is_floating_point() else value.dtype == want.dtype
        if not fits or value.shape != want.shape:
            needed = 'int8' if key in int8_names else 'floating point' if want.is_floating_point() else want.dtype
            raise UserError(f'Checkpoint {path}: entry {key} is {value.dtype} of shape {list(value.shape)}; the '
                            f'model it describes needs {needed} of shape {list(want.shape)}. The file is damaged or '
                            f'was not written for this model.')


def unpack_state_dict(state_dict, packed):
    """The state dict with the sparse weights that prune.py stored packed put back, dense, at their positions.

    Each packed weight: `shape`, `mask` (np.packbits of its nonzero entries, row-major, uint8), `values` (those
    entries in order) and `position` (its index in the full state dict, whose order gives the conv widths).
    """
    items = list(state_dict.items())
    for key, item in sorted(packed.items(), key=lambda pair: pair[1]['position']):
        numel = int(np.prod(item['shape'], dtype=object))
        if item['mask'].numel() != (numel + 7) // 8:  # the mask is in the file: the dense weight's size is bounded
            raise ValueError(f'the mask of {key} does not have one bit per entry of its shape')
        nonzero = torch.from_numpy(np.unpackbits(item['mask'].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=item['values'].dtype)
        dense[nonzero] = item['values']
        items.insert(item['position'], (key, dense.reshape(item['shape'])))
    return dict(items)


def plain_numbers(value, budget, depth=0):
    """Numpy scalars and arrays of old checkpoints as plain Python numbers, recursively (tensors untouched). A
    ValueError past MAX_PLAIN_DEPTH levels or once budget[0] values are spent (a pickle can share one list many times
    over, which a walk would visit an exponential number of times)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_PLAIN_DEPTH:
        raise ValueError('checkpoint too large or too deep')
    if isinstance(value, dict):
        return {key: plain_numbers(item, budget, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(item, budget, depth + 1) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(state, run_dir, is_best):
    """checkpoint.pth.tar always, model_best.pth.tar when best, in run_dir/checkpoints; each written atomically."""
    write_checkpoint_files(state, os.path.dirname(checkpoint_path(run_dir)), is_best)


def write_checkpoint_files(state, folder, is_best):
    # model_best first: a kill between the two writes leaves the previous latest checkpoint beside a newer best, and
    # never a latest checkpoint that says it is the best without its model_best
    if is_best:
        atomic_torch_save(state, os.path.join(folder, CHECKPOINT_NAMES['best']))
    atomic_torch_save(state, os.path.join(folder, CHECKPOINT_NAMES['latest']))


def is_best_state(checkpoint):
    """Whether a training checkpoint is its run's best: its epoch is the recorded best epoch (or, in files that do
    not record it, its own val Recall@5 is the best score)."""
    if 'best_epoch' in checkpoint:
        return checkpoint['best_epoch'] == checkpoint.get('epoch')
    recall5 = (checkpoint.get('recalls') or {}).get(5)
    return recall5 is not None and checkpoint.get('best_score', 0) > 0 and recall5 == checkpoint['best_score']


def model_state(model):
    """The parts of a checkpoint that describe the model: its weights, plus what the weights cannot show: the
    pooling, a distilled student's output stride, and the first encoder layer that trains (its index and name; the
    layers before it stay frozen)."""
    return {'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
            'pooling': 'netvlad' if hasattr(model.pool, 'centroids') else model.pool.mode,
            **({'output_stride': model.output_stride} if hasattr(model, 'output_stride') else {}),
            **trainable_state(model)}


def trainable_state(model):
    return dict(first_trainable=model.frozen_layers, first_trainable_layer=layer_name(model.arch, model.frozen_layers))
