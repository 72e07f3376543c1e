"""hloc's global-feats HDF5 file: written from a folder of images (resumable), and read back by name.

Layout (hloc's extract_features / pairs_from_retrieval): one group per image, named by the image's path relative
to the image folder in POSIX form (a `/` nests groups, as h5py does), holding `global_descriptor` (D,) float32
(float16 with --as_half) and `image_size` int64 [width, height] of the original image. hloc lists the names as
the parent groups of the datasets (list_h5_names); `h5_names` below does the same.

A run writes to `<file>.partial` and renames it to the file when every image is done. A killed run leaves the
.partial; the same command then continues it, skipping images whose group is complete (both datasets there). A
.partial that HDF5 cannot open (a run killed while writing it leaves it marked open for writing; a copy cut short
leaves it truncated) is replaced by a new one.

Before each write, the room it needs is allocated at the end of the file (HDF5 writes into it and trims the rest on
closing): a full disk then stops the run with a UserError and a .partial that can be continued, instead of inside
HDF5, which crashes the process after a failed write.
"""
import argparse
import contextlib
import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from netvlad_toolkit.datasets.folder_dataset import images_in
from netvlad_toolkit.datasets.images import ImageList, image_size, load_image
from netvlad_toolkit.search.descriptors import DescriptorFile
from netvlad_toolkit.search.retrieval import extract_descriptors
from netvlad_toolkit.utils.commons import UserError, error_summary, user_error_text

FEATURES_FILE = 'global-feats-netvlad.h5'  # hloc's name for NetVLAD global features ("global-feats-netvlad")
CHUNK_BATCHES = 16  # batches extracted between two writes to the file: what a killed run can lose
READ_CHUNK_BYTES = 256 * 2 ** 20
GROUP_BYTES = 4096  # an upper bound of the HDF5 bookkeeping of one image's group and its two datasets
ROOM_MARGIN = 2 ** 20  # room allocated beyond the estimate of a write, for the growing index of the groups


# ---------------------------------------------------------------------------------------------- image folders

def find_images(image_dir, flag):
    """Names (POSIX paths relative to image_dir, sorted) of the .jpg/.jpeg/.png files under it, any case; `flag`
    names where the folder came from, for the error when it holds none."""
    root = Path(image_dir)
    return sorted(Path(path).relative_to(root).as_posix() for path in images_in(image_dir, flag))


def resized(size, resize_max):
    """(height, width) to load an image of size [width, height] at: its longest side at most resize_max
    (hloc's rounding), or None to keep it."""
    if not resize_max or max(size) <= resize_max:
        return None
    scale = resize_max / max(size)
    return int(round(size[1] * scale)), int(round(size[0] * scale))


# ---------------------------------------------------------------------------------------------- the file

def h5_names(path):
    """Image names in a global-feats file, as hloc lists them: the parent groups of its datasets."""
    return sorted({parent for parent, _ in dataset_paths(path)})


def dataset_paths(path):
    """(parent group, dataset name) of every dataset in an HDF5 file, listed by the low-level visitor: h5py's
    visititems builds a Python object per node, about 1 ms each, which adds up to minutes over a large database."""
    found = []

    def visit(name, info):
        if info.type == h5py.h5o.TYPE_DATASET:
            parent, _, dataset = name.decode().rpartition('/')
            found.append((parent, dataset))
    with reading_h5(path) as f:
        h5py.h5o.visit(f.id, visit, info=True)
    return found


def open_h5(path, mode='r'):
    try:
        return h5py.File(path, mode, libver='latest')
    except OSError as error:
        raise UserError(f'{path} cannot be opened as an HDF5 file ({error}).') from None


@contextlib.contextmanager
def reading_h5(path):
    """Open a global-feats file for reading; a damaged one (HDF5 read errors, wrong kinds of objects) is a UserError."""
    try:
        with open_h5(path) as f:
            yield f
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f'{path} is damaged: reading it failed ({error_summary(error)}). Extract it again.') from None


def complete_groups(path, dim):
    """Names of the groups of a global-feats file that hold both datasets; a UserError if its descriptors are not
    dim-D (a file of another model cannot be mixed with this one's descriptors). Only the first descriptor's
    shape is read here; read_descriptors checks every row it reads."""
    paths = dataset_paths(path)
    descriptors = [parent for parent, dataset in paths if dataset == 'global_descriptor']
    sizes = {parent for parent, dataset in paths if dataset == 'image_size'}
    if descriptors:
        with reading_h5(path) as f:
            check_dims(path, {descriptors[0]: f[descriptors[0]]['global_descriptor'].shape}, dim)
    return {name for name in descriptors if name in sizes}


def check_dims(path, shapes, dim):
    """A UserError naming the first of the {name: shape} that is not (dim,)."""
    wrong = sorted((name, shape) for name, shape in shapes.items() if shape != (dim,))
    if wrong:
        name, shape = wrong[0]
        raise UserError(f'{path} holds descriptors of shape {shape} (e.g. image "{name}"), not ({dim},) as this '
                        f'model gives: it was written by another model or settings. Write to another file, or use '
                        f'the model that wrote it.')


def check_float(path, names, rows):
    """Descriptors must be finite float16/float32/float64 numbers."""
    for name, row in zip(names, rows):
        if row.dtype.kind != 'f' or not np.isfinite(row).all():
            raise UserError(f'{path}: the global_descriptor of "{name}" is not finite floating-point numbers '
                            f'(dtype {row.dtype}); the file was not written by an extraction or is damaged.')


def write_groups(path, names, descriptors, sizes, as_half):
    """Add (or replace) one group per image; the file is closed after each call so that what is written stays."""
    dtype = np.float16 if as_half else np.float32
    with open_h5(path, 'a') as f:
        for name, descriptor, size in zip(names, descriptors, sizes):
            if name in f:
                del f[name]
            group = f.create_group(name)
            group.create_dataset('global_descriptor', data=descriptor.astype(dtype))
            group.create_dataset('image_size', data=np.asarray(size, dtype=np.int64))


def read_descriptors(path, names, dim, target_path):
    """The descriptors of `names` (in that order) copied from a global-feats file into a DescriptorFile at
    target_path (float16 if the file holds float16, else float32), chunk by chunk: the search then reads
    contiguous rows instead of one HDF5 group per image."""
    target = None
    step = max(1, READ_CHUNK_BYTES // (4 * dim))
    with reading_h5(path) as f:
        for start in range(0, len(names), step):
            chunk = names[start:start + step]
            missing = [name for name in chunk if f'{name}/global_descriptor' not in f]
            if missing:
                raise UserError(f'{path} has no global_descriptor for image "{missing[0]}" ({len(missing)} of the '
                                f'names asked for are missing here).')
            rows = [np.asarray(f[name]['global_descriptor'][()]) for name in chunk]
            check_dims(path, {name: row.shape for name, row in zip(chunk, rows)}, dim)
            check_float(path, chunk, rows)
            if target is None:
                dtype = 'float16' if rows[0].dtype == np.float16 else 'float32'
                target = DescriptorFile.create(target_path, len(names), dim, dtype)
            target[start:start + len(chunk)] = np.stack(rows)
    return target


def descriptor_dim(path, name):
    """The descriptor dimension of a global-feats file, read from the group of image `name`."""
    with reading_h5(path) as f:
        if f'{name}/global_descriptor' not in f:
            raise UserError(f'{path} has no global_descriptor for image "{name}".')
        shape = f[name]['global_descriptor'].shape
    if len(shape) != 1:
        raise UserError(f'{path}: global_descriptor of "{name}" has shape {shape}; expected (D,).')
    return shape[0]


# ---------------------------------------------------------------------------------------------- extraction

def extraction_settings(device, batch_size=24, precision='fp32', threads=0, as_half=False, resize_max=None,
                        skip_unreadable=False):
    """What the extraction functions read, under the names of the flags that set them (--cacheBatchSize, ...), for
    callers that have no parsed command line."""
    return argparse.Namespace(cacheBatchSize=batch_size, precision=precision, threads=threads,
                              cuda=torch.device(device).type == 'cuda', as_half=as_half, resize_max=resize_max,
                              skip_unreadable=skip_unreadable)


def extract_folder(model, image_dir, names, path, opt, device, skip_existing=False, known=None):
    """Write the descriptors of the images `names` (find_images) under image_dir into the global-feats file at
    `path`.

    Groups of other images already in the file stay; those of these images are replaced, or kept with
    skip_existing (a cache). Images of one (original) size are extracted in batches, each size group on its own.
    known: {name: descriptor} of images described by another pass already (written as they are, not extracted).
    """
    partial = path + '.partial'
    image_bytes = model.output_dim * (2 if opt.as_half else 4) + GROUP_BYTES
    done = resume_state(path, partial, model.output_dim, names, skip_existing, len(names) * image_bytes)
    todo = [name for name in names if name not in done]
    if not todo:
        if os.path.exists(partial):
            os.replace(partial, path)
        logging.info('All %d images of %s are in %s already.', len(names), image_dir, path)
        return path
    logging.info('Extracting %d of the %d images of %s into %s (%d done before)', len(todo), len(names), image_dir,
                 path, len(names) - len(todo))
    step, finished = opt.cacheBatchSize * CHUNK_BATCHES, 0
    for size, group in size_groups([os.path.join(image_dir, n) for n in todo], opt.skip_unreadable).items():
        for start in range(0, len(group), step):
            chunk = [todo[i] for i in group[start:start + step]]
            bytes_left = (len(todo) - finished) * image_bytes + ROOM_MARGIN
            finished += len(chunk)
            kept, descriptors = extract_unknown(model, [os.path.join(image_dir, n) for n in chunk],
                                                [(known or {}).get(n) for n in chunk],
                                                resized(size, opt.resize_max), opt, device,
                                                f'images {finished}/{len(todo)}')
            if kept:
                write_chunk(partial, path, [chunk[i] for i in kept], descriptors, size, opt.as_half,
                            len(kept) * image_bytes + ROOM_MARGIN, bytes_left)
    if not os.path.exists(partial):
        raise UserError(f'None of the {len(todo)} images of {image_dir} could be read.')
    os.replace(partial, path)
    return path


def extract_unknown(model, paths, known, resize, opt, device, description):
    """extract_images of the paths whose known descriptor (None or a row, one per path) is None; the others kept
    with theirs. Returns (indices of the images described, their descriptors), in path order."""
    unknown = [i for i, row in enumerate(known) if row is None]
    if len(unknown) == len(paths):
        return extract_images(model, paths, resize, opt, device, description)
    found, rows = extract_images(model, [paths[i] for i in unknown], resize, opt, device, description) if unknown \
        else ([], None)
    described = {i: row for i, row in enumerate(known) if row is not None}
    described.update({unknown[f]: row for f, row in zip(found, rows if found else [])})
    kept = sorted(described)
    return kept, np.stack([described[i] for i in kept]).astype(np.float32)


def write_chunk(partial, path, names, descriptors, size, as_half, room, bytes_left):
    """write_groups into the .partial (a new one if there is none yet), after allocating `room` bytes for it; a
    failure (a full disk) becomes a UserError that names bytes_left, about what the rest of the run needs."""
    if not os.path.exists(partial):
        start_partial(partial, path, [], bytes_left)
    try:
        make_room(partial, room)
    except OSError as error:
        raise write_error(partial, error, bytes_left, f'the images written so far stay in {partial}: make room and '
                                                      f'run the same command again to continue.') from None
    try:
        write_groups(partial, names, descriptors, [size] * len(names), as_half)
    except OSError as error:
        os.remove(partial)
        raise write_error(partial, error, bytes_left, f'{partial} was removed, as the failed write may have left it '
                                                      f'inconsistent; {path} is as it was.') from None


def resume_state(path, partial, dim, names, skip_existing, new_bytes):
    """Names already done: those complete in the .partial of a killed run (or, with skip_existing, in the file).
    A new run starts its .partial from the groups of the existing file that it keeps, so that a kill leaves the
    file as it was; new_bytes is about what the images to extract need, for the error of a full disk."""
    if os.path.exists(partial):
        problem = open_problem(partial)
        if problem is None:
            done = complete_groups(partial, dim)
            logging.info('Continuing the interrupted extraction in %s: %d images done.', partial, len(done))
            return done if skip_existing else done & set(names)
        logging.warning('Replacing %s, which cannot be continued (%s): the run writing it was killed or failed '
                        'while writing; its images are extracted again.', partial, problem)
        os.remove(partial)
    if not os.path.exists(path):
        return set()
    existing = complete_groups(path, dim)
    if skip_existing and set(names) <= existing:
        return existing
    # The kept groups go into a new file: replacing groups in place would leave the old ones' space unused, and
    # the file would grow by its size at every re-extraction.
    kept = h5_names(path) if skip_existing else sorted(set(h5_names(path)) - set(names))
    if kept:
        start_partial(partial, path, kept, new_bytes)
    return existing if skip_existing else set()


def open_problem(path):
    """Why HDF5 cannot open the file at `path` (marked open for writing, truncated, not HDF5), or None."""
    try:
        h5py.File(path, 'r', libver='latest').close()
    except OSError as error:
        return str(error)
    return None


def start_partial(partial, path, kept, bytes_left):
    """A new .partial holding the groups `kept` copied from the file at `path` (none: an empty file), made under a
    temporary name and renamed when complete, so that a kill never leaves a truncated .partial; a failure (a full
    disk) becomes a UserError that names bytes_left."""
    tmp_path = partial + '.tmp'
    room = os.path.getsize(path) + len(kept) * GROUP_BYTES + ROOM_MARGIN if kept else 0
    try:
        h5py.File(tmp_path, 'w', libver='latest').close()
        if kept:
            make_room(tmp_path, room)
            with open_h5(path) as f, h5py.File(tmp_path, 'r+', libver='latest') as target:
                for name in kept:
                    f.copy(f[name], target, name=name)
    except OSError as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise write_error(tmp_path, error, room + bytes_left, f'{path} is as it was.') from None
    os.replace(tmp_path, partial)


def make_room(path, size):
    """Allocate `size` bytes of disk at the end of the HDF5 file at `path`, for HDF5's next writes into it; an
    OSError (a full disk) leaves the file as it was."""
    end = os.path.getsize(path)
    with open(path, 'r+b') as f:
        try:
            if hasattr(os, 'posix_fallocate'):
                os.posix_fallocate(f.fileno(), end, size)
            elif shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError:
            f.truncate(end)
            raise


def write_error(path, error, bytes_needed, state):
    """The UserError of a failed write to `path`, a full disk most often: the cause, about how many bytes the rest
    of the run needs, and what is left on disk (`state`)."""
    return UserError(f'Cannot write {path}: {error.strerror or error}. The rest of the extraction needs about '
                     f'{bytes_needed / 2 ** 20:.0f} MB free there; {state}')


def readable_indices(paths, skip_unreadable):
    """The indices of the paths whose image headers read, in order (size_groups' rule for the others)."""
    return sorted(index for group in size_groups(paths, skip_unreadable).values() for index in group)


def size_groups(paths, skip_unreadable):
    """{(width, height): [indices into paths]} from the image headers; unreadable images stop the run or, with
    skip_unreadable, are left out with a warning naming each."""
    groups = {}
    for index, path in enumerate(paths):
        try:
            size = image_size(path)
        except UserError as error:
            if not skip_unreadable:
                raise UserError(f'{error} Remove it, or pass --skip_unreadable to leave such images out.') from None
            logging.warning('Skipped: %s', user_error_text(error))
            continue
        groups.setdefault(size, []).append(index)
    return groups


class PhotoList(ImageList):
    """Photos of any sizes, each loaded as describe_images loads it (its longest side at most resize_max), one per
    batch: (image, index)."""

    def __init__(self, paths, resize_max=None):
        super().__init__(paths, sizes_vary_from=0)
        self.resize_max = resize_max

    def __getitem__(self, index):
        path = self.paths[index]
        return load_image(path, resized(image_size(path), self.resize_max)), index


def describe_images(model, paths, opt, device):
    """(indices of the images described, their descriptors [n, D] in that order), images of one size batched."""
    kept, descriptors = [], []
    for size, group in size_groups(paths, opt.skip_unreadable).items():
        found, rows = extract_images(model, [paths[i] for i in group], resized(size, opt.resize_max), opt, device)
        kept += [group[i] for i in found]
        descriptors.append(rows)
    order = np.argsort(kept, kind='stable')
    return [kept[i] for i in order], np.concatenate(descriptors)[order] if kept else None


def extract_images(model, paths, resize, opt, device, description='images'):
    """(indices of the images extracted, their descriptors [n, D]): all in batches or, when one cannot be decoded
    and --skip_unreadable is given, one at a time without the unreadable ones."""
    try:
        return list(range(len(paths))), extract_descriptors(model, ImageList(paths, resize), opt, device,
                                                            description)
    except UserError as error:
        if not opt.skip_unreadable:
            raise UserError(f'{user_error_text(error)} Remove it, or pass --skip_unreadable to leave such images '
                            f'out.') from None
    kept, descriptors = [], []
    for index, path in enumerate(paths):
        try:
            descriptors.append(extract_descriptors(model, ImageList([path], resize), opt, device, path)[0])
            kept.append(index)
        except UserError as error:
            logging.warning('Skipped: %s', user_error_text(error))
    return kept, np.stack(descriptors) if descriptors else np.empty((0, model.output_dim), np.float32)


def cache_path(cache_root, image_dir):
    """Where the global-feats file of a database folder is cached: one subfolder per folder."""
    return os.path.join(cache_root, path_key(image_dir), FEATURES_FILE)


def path_key(path):
    """A file or folder's name plus a hash of its absolute path: two of the same name get different keys."""
    absolute = os.path.realpath(path)
    return f'{os.path.basename(absolute)}_{hashlib.sha1(absolute.encode()).hexdigest()[:10]}'
