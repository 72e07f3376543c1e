"""Descriptor files: [N, D] float16/float32 arrays in the .npy format, written as they are computed and read back
in chunks, so that evaluation memory depends on the chunk size, not on the size of the split.

A DescriptorFile is indexed like an array by row slices (`desc[a:b]` reads those rows, `desc[a:b] = x` writes
them), so the search and recall code takes files and in-memory arrays alike. Reads and writes are explicit file
I/O at the row offset rather than through a memory map: pages of a map that has been read stay in the process's
resident set, and a 32k-D pitts250k database is 5.5 GB (float16) or 11 GB (float32). Any .npy reader can still
open the files, e.g. `np.load(path, mmap_mode='r')`.
"""
import contextlib
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from netvlad_toolkit.utils.commons import UserError

DTYPES = {'float16': np.float16, 'float32': np.float32}
NORM_TOLERANCE = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-3}
CHECK_CHUNK_BYTES = 256 * 2 ** 20
PART_PATTERN = re.compile(r'^(.+)_(\d+)d_part(\d+)of(\d+)\.npy$')


class DescriptorFile:
    """Rows [first_row, first_row + rows) of a 2-D .npy file on disk."""

    def __init__(self, path, shape, dtype, data_offset, first_row=0, rows=None):
        self.path = path
        self.dim = shape[1]
        self.dtype = np.dtype(dtype)
        self.data_offset = data_offset
        self.first_row = first_row
        self.rows = shape[0] - first_row if rows is None else rows
        self._total_rows = shape[0]

    @classmethod
    def create(cls, path, rows, dim, dtype='float32'):
        """A new file of `rows` x `dim` (contents unset until written), replacing any file at `path`."""
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        dtype = np.dtype(DTYPES.get(dtype, dtype))
        header = dict(descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False, shape=(rows, dim))
        with open(path, 'wb') as f:
            np.lib.format.write_array_header_1_0(f, header)
            data_offset = f.tell()
            f.truncate(data_offset + rows * dim * dtype.itemsize)  # sparse until written
        return cls(path, (rows, dim), dtype, data_offset)

    @property
    def shape(self):
        return self.rows, self.dim

    def __len__(self):
        return self.rows

    def view(self, start, stop):
        """Rows start..stop of this file, without reading them."""
        start, stop, _ = slice(start, stop).indices(self.rows)
        return DescriptorFile(self.path, (self._total_rows, self.dim), self.dtype, self.data_offset,
                              self.first_row + start, max(0, stop - start))

    def _offset(self, row):
        return self.data_offset + (self.first_row + row) * self.dim * self.dtype.itemsize

    def _rows_of(self, key):
        if not isinstance(key, slice):
            raise TypeError('DescriptorFile is indexed by row slices only, e.g. desc[a:b]')
        start, stop, step = key.indices(self.rows)
        if step != 1:
            raise TypeError('DescriptorFile slices must be contiguous (step 1)')
        return start, max(start, stop)

    def __getitem__(self, key):
        start, stop = self._rows_of(key)
        with open(self.path, 'rb') as f:
            f.seek(self._offset(start))
            data = np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.dim)
        if len(data) != (stop - start) * self.dim:
            raise UserError(f'Descriptor file {self.path} is truncated: rows {start}..{stop} are not all there.')
        return data.reshape(stop - start, self.dim)

    def __setitem__(self, key, values):
        start, stop = self._rows_of(key)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape != (stop - start, self.dim):
            raise ValueError(f'writing {values.shape} into rows {start}..{stop} of a [{self.rows}, {self.dim}] file')
        with open(self.path, 'r+b') as f:
            f.seek(self._offset(start))
            f.write(values.tobytes())

    def __repr__(self):
        return f'DescriptorFile({self.path!r}, rows {self.first_row}..{self.first_row + self.rows}, {self.dim}-D ' \
               f'{self.dtype.name})'


def load_descriptor_file(path, expected_rows=None, expected_dim=None, check_values=True):
    """Open a descriptor file written by this project, checking that it is what the caller expects.

    A missing file, a header that is not .npy, a dtype other than float16/float32, a shape other than
    [expected_rows, expected_dim], a file shorter or longer than its header says, and (with check_values)
    rows that are not finite unit vectors are each a UserError naming the file.
    """
    if not os.path.isfile(path):
        raise UserError(f'Descriptor file {path} does not exist.')
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f'unsupported .npy format version {version}')
            shape, fortran_order, dtype = read_header(f)
            data_offset = f.tell()
    except (ValueError, OSError, SyntaxError) as error:
        raise UserError(f'Descriptor file {path} is not a .npy array file: its header cannot be read '
                        f'({" ".join(str(error).split())}). It is corrupt, or not a descriptor file.') from None
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)) or len(shape) != 2 or fortran_order:
        raise UserError(f'Descriptor file {path} holds a {"x".join(map(str, shape))} {dtype} array'
                        f'{" in Fortran order" if fortran_order else ""}; expected a 2-D row-major float16 or '
                        f'float32 array of descriptors.')
    if expected_dim is not None and shape[1] != expected_dim:
        raise UserError(f'Descriptor file {path} holds {shape[1]}-D descriptors, but the model gives '
                        f'{expected_dim}-D ones: it was written by another model.')
    if expected_rows is not None and shape[0] != expected_rows:
        raise UserError(f'Descriptor file {path} holds {shape[0]} descriptors; expected {expected_rows}.')
    expected_bytes = data_offset + shape[0] * shape[1] * dtype.itemsize
    actual_bytes = os.path.getsize(path)
    if actual_bytes != expected_bytes:
        raise UserError(f'Descriptor file {path} is {"truncated" if actual_bytes < expected_bytes else "too long"}: '
                        f'{actual_bytes} bytes where its header ({shape[0]}x{shape[1]} {dtype}) needs '
                        f'{expected_bytes}. Write it again.')
    descriptors = DescriptorFile(path, shape, dtype, data_offset)
    if check_values:
        check_unit_rows(descriptors)
    return descriptors


def check_unit_rows(descriptors):
    """Every row finite with L2 norm 1 (the network's output): a corrupt or unwritten region fails."""
    tolerance = NORM_TOLERANCE[descriptors.dtype]
    step = max(1, CHECK_CHUNK_BYTES // (descriptors.dim * descriptors.dtype.itemsize))
    for start in range(0, len(descriptors), step):
        rows = descriptors[start:start + step].astype(np.float32)
        norms = np.sqrt(np.einsum('ij,ij->i', rows, rows))
        bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1) > tolerance))
        if len(bad):
            raise UserError(f'Descriptor file {descriptors.path} is corrupt: row {start + bad[0]} (and '
                            f'{len(bad) - 1} more in rows {start}..{start + len(rows)}) is not a finite unit '
                            f'vector (norm {norms[bad[0]]:.4g}). Write it again.')


@contextlib.contextmanager
def cache_folder(cache_path=None, prefix='netvlad_descriptors_'):
    """A fresh folder (inside cache_path, or the system's temporary folder) removed with its files on exit. Its name
    holds this process's id, so that the folders of killed processes are found and removed the next time."""
    root = cache_path or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    remove_orphan_folders(root, prefix)
    folder = tempfile.mkdtemp(prefix=f'{prefix}{os.getpid()}_', dir=root)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphan_folders(root, prefix):
    """Remove the cache folders under `root` whose process (the id in their name) no longer runs."""
    for name in os.listdir(root):
        owner = name[len(prefix):].split('_')[0]
        if not name.startswith(prefix) or not owner.isdigit() or process_runs(int(owner)):
            continue
        logging.info('Removing %s, left by a process that was killed.', os.path.join(root, name))
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def process_runs(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def part_name(split, dim, rank, world):
    return f'{split}_{dim}d_part{rank:03d}of{world:03d}.npy'


def part_rows(total, rank, world):
    """Rows [start, stop) of the whole set that part `rank` of `world` holds: contiguous, sizes differ by <= 1."""
    return total * rank // world, total * (rank + 1) // world


class DescriptorParts:
    """Several DescriptorFiles read as one [N, D] array of their rows in order, indexed like a DescriptorFile
    (`parts[a:b]` reads rows a..b across files, `parts.view(a, b)` reads nothing): the parts of a sharded
    extraction are searched where they lie, without a merged copy."""

    def __init__(self, files):
        self.files = files
        self.dim = files[0].dim
        self.dtype = files[0].dtype
        self.starts = np.cumsum([0] + [len(f) for f in files])

    @property
    def shape(self):
        return int(self.starts[-1]), self.dim

    def __len__(self):
        return int(self.starts[-1])

    def _pieces(self, start, stop):
        """(file, start, stop) of each file's share of rows start..stop."""
        for file, first, end in zip(self.files, self.starts[:-1], self.starts[1:]):
            if first < stop and start < end:
                yield file, max(start, first) - first, min(stop, end) - first

    def view(self, start, stop):
        start, stop, _ = slice(start, stop).indices(len(self))
        pieces = [file.view(a, b) for file, a, b in self._pieces(start, stop)]
        return DescriptorParts(pieces or [self.files[0].view(0, 0)])

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError('DescriptorParts is indexed by contiguous row slices only, e.g. desc[a:b]')
        start, stop, _ = key.indices(len(self))
        rows = [file[a:b] for file, a, b in self._pieces(start, stop)]
        return np.concatenate(rows) if rows else np.empty((0, self.dim), self.dtype)


def open_parts(paths, split, total_rows, dim):
    """The part files of one sharded extraction of `split` (one part per rank, all of the same run, one dtype),
    checked, as one DescriptorParts in rank order."""
    parts = {}
    for path in paths:
        match = PART_PATTERN.search(os.path.basename(path))
        if match is None:
            raise UserError(f'Descriptor file {path} is not named like a part of a sharded extraction '
                            f'(<split>_<dim>d_partRRRofWWW.npy, as --mode=test under torchrun writes them).')
        if match.group(1) != split:
            raise UserError(f'Descriptor file {path} holds descriptors of split {match.group(1)} (its name says so), '
                            f'but --split={split}: give the parts of the split you evaluate, or change --split.')
        rank, world = int(match.group(3)), int(match.group(4))
        if (rank, world) in parts:
            raise UserError(f'Descriptor parts {parts[rank, world]} and {path} are both part {rank} of {world}.')
        parts[rank, world] = path
    worlds = {world for _, world in parts}
    if len(worlds) != 1:
        raise UserError(f'The descriptor parts come from runs with different numbers of processes '
                        f'({", ".join(map(str, sorted(worlds)))}): give the parts of one run.')
    world = worlds.pop()
    missing = sorted(set(range(world)) - {rank for rank, _ in parts})
    if missing:
        raise UserError(f'Descriptor parts {", ".join(map(str, missing))} of {world} are missing: give all '
                        f'{world} files of the sharded extraction.')
    files = []
    for rank in range(world):
        start, stop = part_rows(total_rows, rank, world)
        files.append(load_descriptor_file(parts[rank, world], stop - start, dim))
    dtypes = {f.dtype.name for f in files}
    if len(dtypes) != 1:
        raise UserError(f'The descriptor parts {", ".join(parts[r, world] for r in range(world))} mix dtypes '
                        f'({", ".join(sorted(dtypes))}): write all parts with one --desc_dtype.')
    return DescriptorParts(files)
