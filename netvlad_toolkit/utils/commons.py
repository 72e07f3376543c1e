"""Small helpers every mode uses: user-facing errors, seeding, device choice, logging, atomic file writes."""
import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input (a flag, a file): printed as one paragraph, without a traceback."""


def user_error_text(error):
    """The paragraph of a UserError, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(error)
    marker = 'UserError: '
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text


def error_summary(error):
    """An exception as one short line: its type and the first line of its message (which may be empty)."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def plural(count, noun, nouns=None):
    """'1 query', '2 queries': a count with its noun (nouns: the plural when it is not noun + 's')."""
    return f'{count} {noun if count == 1 else nouns or noun + "s"}'


def parse_size(text):
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise UserError(f'Image size "{text}" is not of the form HEIGHTxWIDTH, e.g. 120x160.') from None
    if height < 32 or width < 32:
        raise UserError(f'Image size {text} is too small: both sides must be at least 32 pixels.')
    return height, width


def make_deterministic(seed):
    """Seed every generator; on CUDA also pick deterministic cuDNN algorithms (no autotuning)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def torchrun_process():
    """(rank, world size) of this process under torchrun (its RANK and WORLD_SIZE), else (0, 1)."""
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def select_device(opt):
    """CUDA when asked for (--nGPU > 0, no --nocuda) and present, else the CPU with one line saying so."""
    if opt.nocuda or opt.nGPU == 0:
        return torch.device('cpu')
    if not torch.cuda.is_available():
        logging.info('No CUDA device found: running on the CPU (--nGPU %d ignored).', opt.nGPU)
        return torch.device('cpu')
    return torch.device('cuda')


def setup_logging(log_dir=None, rank=0):
    """Log to the console (plain lines, which users' scripts parse) and, when log_dir is given, to log_dir/log.txt
    as well, each line there with its date and time."""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter('%(message)s'))
    handlers = [console]
    if log_dir is not None and rank == 0:
        os.makedirs(log_dir, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(log_dir, 'log.txt'))
        log_file.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S'))
        handlers.append(log_file)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True)
    logging.getLogger('faiss.loader').setLevel(logging.WARNING)


def log_exception_to_file(error):
    """Write an unexpected exception's traceback to the log files (log.txt); the terminal gets it when it is
    re-raised."""
    record = logging.LogRecord('netvlad', logging.ERROR, __file__, 0, 'Unexpected error:', None,
                               (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def atomic_write(path, write, mode='wb'):
    """write(f) into a temporary file beside `path`, flushed to disk (fsync), then renamed over `path`: a killed run
    or a power cut leaves either the old file or the new one, never a half-written one. Each writer has its own
    temporary name (two processes never write into one), removed when writing fails; a full disk is a UserError."""
    folder = os.path.dirname(path) or '.'
    check_output_path(path)
    os.makedirs(folder, exist_ok=True)
    descriptor, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        os.fchmod(descriptor, new_file_mode())  # mkstemp's file is private (0600); the result is not
        with os.fdopen(descriptor, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise_if_disk_full(error, path)
        raise
    fsync_folder(folder)


def new_file_mode():
    """The mode open() gives a new file: 0o666 less the process's umask (a run folder shared by a lab, or read by
    hloc under another account, needs its files readable as the user's umask says)."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def check_output_path(path, folder=False, flag=None):
    """An output file's path must not be a folder (an output folder's not a file), nor lie under a file."""
    name = f'{flag}={path}' if flag else path
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UserError(f'The output path {name} is a {"file" if folder else "folder"}; give the path of a '
                        f'{"folder" if folder else "file"} to write.')
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f'The output path {name} lies under {parent}, which is a file, not a folder.')


def raise_if_disk_full(error, path, needed_bytes=None):
    """A full disk (or quota) while writing `path` as a UserError naming the path (and the bytes needed, if known)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f' about {needed_bytes / 1e6:.1f} MB are needed;' if needed_bytes else ''
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise UserError(f'The disk is full while writing {path}:{needed} {free / 1e6:.1f} MB are free there. '
                        f'Nothing was left under that name (the previous file, if any, is intact); free some '
                        f'space and run the command again.') from None


def fsync_folder(folder):
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_copy(source_path, path):
    """The file at source_path copied to `path` through atomic_write."""
    with open(source_path, 'rb') as source:
        atomic_write(path, lambda f: shutil.copyfileobj(source, f))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text), mode='w')


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2), path)


def replace_folder(new, target):
    """Rename the complete folder `new` to `target`, replacing a previous `target` as a unit: the old one is first
    renamed to <target>.previous and removed once the new one is in place, so a kill at any moment leaves whole
    folders only (never files of the old one beside files of the new one)."""
    previous = target + '.previous'
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, previous)
    os.replace(new, target)
    fsync_folder(os.path.dirname(target) or '.')
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def locked_folder(path, rank=0):
    """Hold an exclusive lock on the folder `path` while the block runs: a second process that
    writes the same run stops with one paragraph instead of mixing its files with this one's. Rank 0 locks for all
    ranks of a torchrun job."""
    if rank != 0 or not os.path.isdir(path):  # a folder that does not exist is reported by the block's own checks
        yield
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f'Another process is writing the run folder {path} (it holds the folder\'s lock). Wait '
                            f'for it to end, or give another folder (--savePath for a new training run).') from None
        yield
    finally:
        os.close(descriptor)


def empty_folder(path):
    """Remove everything inside the folder `path`, keeping the folder."""
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        shutil.rmtree(entry) if os.path.isdir(entry) else os.remove(entry)


@contextlib.contextmanager
def building_folder(target):
    """Build the run folder `target` whole: the block writes into <target>.incomplete (locked against a second
    build), which replaces `target` as a unit only when the block succeeds. A failed build removes its files and a
    killed one leaves them in .incomplete, which the next build clears; `target` is always the old folder or the new."""
    staging = target.rstrip('/' + os.sep) + '.incomplete'
    os.makedirs(staging, exist_ok=True)
    with locked_folder(staging):
        empty_folder(staging)  # a killed build's files
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_folder(staging, target)
