"""Small helpers every mode uses: user-facing errors, seeding, device choice, logging, atomic file writes."""
import json
import logging
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input (a flag, a file): printed as one paragraph, without a traceback."""


def user_error_text(error):
    """The paragraph of a UserError, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(error)
    marker = 'UserError: '
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise UserError(f'Image size "{text}" is not of the form HEIGHTxWIDTH, e.g. 120x160.') from None
    if height < 32 or width < 32:
        raise UserError(f'Image size {text} is too small: both sides must be at least 32 pixels.')
    return height, width


def make_deterministic(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(opt):
    """CUDA when asked for (--nGPU > 0, no --nocuda) and present, else the CPU with one line saying so."""
    if opt.nocuda or opt.nGPU == 0:
        return torch.device('cpu')
    if not torch.cuda.is_available():
        logging.info('No CUDA device found: running on the CPU (--nGPU %d ignored).', opt.nGPU)
        return torch.device('cpu')
    return torch.device('cuda')


def setup_logging(log_dir=None, rank=0):
    """Log to the console and, when log_dir is given, to log_dir/log.txt as well."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_dir is not None and rank == 0:
        os.makedirs(log_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(log_dir, 'log.txt')))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format='%(message)s', handlers=handlers, force=True)
    logging.getLogger('faiss.loader').setLevel(logging.WARNING)


def atomic_torch_save(obj, path):
    """torch.save through a temporary file and a rename, so a killed run never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp_path = path + '.tmp'
    torch.save(obj, tmp_path)
    os.replace(tmp_path, path)


def atomic_write_text(text, path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp_path = path + '.tmp'
    with open(tmp_path, 'w') as f:
        f.write(text)
    os.replace(tmp_path, path)


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2), path)
