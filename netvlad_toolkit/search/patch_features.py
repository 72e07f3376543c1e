"""The database's Patch-NetVLAD features on disk: one HDF5 file per config beside the global descriptors, written
once in chunks as they are computed, and read back for only the candidates of a query.

Layout of `<folder>/patch-feats-netvlad-<config>.h5`:
    descriptors  [rows, dim] float16 (or float32): the rows of image 0 (its patches of every size, in the
                 config's order, each size row-major), then those of image 1, ...; chunked, so that reading an
                 image's rows reads about that many bytes
    offsets      [N + 1] int64: image i's rows are offsets[i]:offsets[i + 1]
    grid         [N, 2] int32: image i's feature-map (height, width), from which its patch grids and keypoints follow
    names        [N] the images' names, in order
    attributes   patch_sizes, strides, dim, model (a fingerprint of the model's weights), run
A build writes to `<file>.partial`, closed after every chunk (offsets last: the images it counts are complete),
and renames it to the file when every image is done. A killed build leaves the .partial, which the same call
continues; one that HDF5 cannot open, or of another model or settings, is replaced. A finished file whose
names are the first of the names asked for is extended in the same way. As in global_features.py, the room a
chunk needs is allocated before HDF5 writes it, so that a full disk is a UserError, not a crash inside HDF5.
"""
import hashlib
import logging
import os

import h5py
import numpy as np
import torch

from netvlad_toolkit.search.global_features import make_room, open_h5, open_problem, write_error
from netvlad_toolkit.utils.commons import UserError, check_output_path, error_summary

CHUNK_BYTES = 128 * 2 ** 10       # bytes of one HDF5 chunk of descriptor rows
ROOM_MARGIN = 2 ** 20             # room allocated beyond a chunk's rows, for HDF5's bookkeeping
FINGERPRINT_VALUES = 4096         # values of each weight tensor the fingerprint reads (evenly spaced)
SETTINGS = ('patch_sizes', 'strides', 'dim')


def store_path(folder, config_name):
    return os.path.join(folder, f'patch-feats-netvlad-{config_name}.h5')


def model_fingerprint(model):
    """A hash of every tensor of the model's state (up to FINGERPRINT_VALUES evenly spaced values of each): a
    store written by another model, or by this run before it was retrained, does not match."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().flatten()
        sample = flat[::max(1, flat.numel() // FINGERPRINT_VALUES)].contiguous().cpu()
        digest.update(name.encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_of(patch_sizes, strides, dim):
    return dict(patch_sizes=[int(s) for s in patch_sizes], strides=[int(s) for s in strides], dim=int(dim))


def stored_settings(f):
    return {key: (f.attrs[key].tolist() if key != 'dim' else int(f.attrs[key])) for key in SETTINGS}


def stored_names(f):
    return [name.decode() if isinstance(name, bytes) else name for name in f['names'][()]]


class PatchStore:
    """A store file opened for reading: the rows of any image, by its index in the database."""

    INDEX_BYTES = 8 + 2 * 4  # per image besides its rows and name: its offset (int64) and grid (2 x int32)

    def __init__(self, path, patch_sizes, strides, dim):
        if not os.path.isfile(path):
            raise UserError(f'There is no Patch-NetVLAD store at {path}: build the database\'s patch features '
                            f'first (patch_netvlad.build_store).')
        self.path = path
        self.file = open_h5(path)
        try:
            settings, wanted = stored_settings(self.file), settings_of(patch_sizes, strides, dim)
            self.offsets = self.file['offsets'][()]
            self.grid = self.file['grid'][()]
            self.descriptors = self.file['descriptors']
        except (KeyError, OSError, ValueError) as error:
            self.file.close()
            raise UserError(f'{path} is not a complete Patch-NetVLAD store ({error_summary(error)}). Remove it and '
                            f'build it again.') from None
        if settings != wanted:
            self.file.close()
            raise UserError(f'The Patch-NetVLAD store {path} holds patch sizes {settings["patch_sizes"]}, strides '
                            f'{settings["strides"]}, {settings["dim"]}-D descriptors; the config asks for '
                            f'{wanted["patch_sizes"]}, {wanted["strides"]}, {wanted["dim"]}-D. Build a store for '
                            f'these settings (another folder), or re-rank with the store\'s.')

    def __len__(self):
        return len(self.grid)

    @property
    def names(self):
        return stored_names(self.file)

    def rows(self, index):
        """(descriptor rows [n, dim] float32, feature-map (height, width)) of database image `index`."""
        if not 0 <= index < len(self):
            raise UserError(f'Database image {index} is not in the Patch-NetVLAD store {self.path}, which holds '
                            f'{len(self)} images: it was built for another database.')
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.descriptors[start:stop].astype(np.float32), tuple(int(v) for v in self.grid[index])

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoreWriter:
    """Writes the store file at `path` for the images `names`: `done` images are there already (a continued or
    extended build), `append` adds the next images' PatchFeatures, `finish` renames the complete file into
    place."""

    def __init__(self, path, names, patch_sizes, strides, dim, fingerprint, run='', dtype='float16'):
        self.path, self.partial = path, path + '.partial'
        self.names = list(names)
        self.settings = settings_of(patch_sizes, strides, dim)
        self.fingerprint, self.run = fingerprint, run
        self.dtype = np.dtype(dtype)
        self.done = self.resume()

    def matches(self, f):
        return all(key in f.attrs for key in SETTINGS) and stored_settings(f) == self.settings and \
            f.attrs.get('model') == self.fingerprint

    def resume(self):
        """How many images are done, after putting the file to continue (if any) at self.partial."""
        if os.path.exists(self.path):
            with open_h5(self.path) as f:
                try:
                    same, names, run = self.matches(f), stored_names(f), f.attrs.get('run', '')
                except KeyError as error:
                    raise UserError(f'{self.path} is not a complete Patch-NetVLAD store ({error_summary(error)}). '
                                    f'Remove it and build it again.') from None
            if not same or names != self.names[:len(names)]:
                raise UserError(f'The Patch-NetVLAD store {self.path} was written by another model or with other '
                                f'settings (run {run!r}, {len(names)} images), or for another database. Remove it to '
                                f'build it again, or give another folder.')
            if len(names) == len(self.names):
                return len(names)
            logging.info('Extending the Patch-NetVLAD store %s from %d to %d images.', self.path, len(names),
                         len(self.names))
            os.replace(self.path, self.partial)
        if os.path.exists(self.partial):
            done = self.continued()
            if done is not None:
                return done
            os.remove(self.partial)
        self.create()
        return 0

    def continued(self):
        """Images done in the .partial, cut back to its last complete chunk; None if it cannot be continued."""
        problem = open_problem(self.partial)
        if problem is None:
            with open_h5(self.partial, 'a') as f:
                done = len(f['offsets']) - 1 if 'offsets' in f else -1
                if done >= 0 and self.matches(f) and stored_names(f)[:done] == self.names[:done]:
                    for name, rows in (('descriptors', f['offsets'][-1]), ('grid', done), ('names', done)):
                        f[name].resize(rows, axis=0)
                    logging.info('Continuing the Patch-NetVLAD store %s: %d of %d images done.', self.partial, done,
                                 len(self.names))
                    return done
            problem = 'another model, settings or database'
        logging.warning('Replacing %s, which cannot be continued (%s).', self.partial, problem)
        return None

    def create(self):
        dim = self.settings['dim']
        chunk_rows = max(1, CHUNK_BYTES // (dim * self.dtype.itemsize))
        check_output_path(self.path)
        os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
        with h5py.File(self.partial, 'w', libver='latest') as f:
            f.create_dataset('descriptors', (0, dim), self.dtype, maxshape=(None, dim), chunks=(chunk_rows, dim))
            f.create_dataset('offsets', data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
            f.create_dataset('grid', (0, 2), np.int32, maxshape=(None, 2), chunks=(4096, 2))
            f.create_dataset('names', (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
            for key, value in self.settings.items():
                f.attrs[key] = value
            f.attrs['model'], f.attrs['run'] = self.fingerprint, self.run

    def append(self, features):
        """Write the PatchFeatures of the next len(features) images."""
        if not features:
            return
        rows = np.concatenate([np.concatenate(image.descriptors) for image in features]).astype(self.dtype)
        names = self.names[self.done:self.done + len(features)]
        bytes_left = (len(self.names) - self.done) * (rows.nbytes / len(features)) + ROOM_MARGIN
        try:
            make_room(self.partial, rows.nbytes + ROOM_MARGIN)
        except OSError as error:
            raise write_error(self.partial, error, bytes_left, f'the images written so far stay in {self.partial}: '
                                                               f'make room and run the same command again to '
                                                               f'continue.') from None
        try:
            with open_h5(self.partial, 'a') as f:
                first = len(f['descriptors'])
                counts = [sum(len(d) for d in image.descriptors) for image in features]
                for name, values in (('descriptors', rows), ('grid', np.array([image.grid for image in features])),
                                     ('names', np.array(names, dtype=object)),
                                     ('offsets', first + np.cumsum(counts))):  # offsets last: they commit the chunk
                    dataset = f[name]
                    start = len(dataset)
                    dataset.resize(start + len(values), axis=0)
                    dataset[start:] = values
        except OSError as error:
            os.remove(self.partial)
            raise write_error(self.partial, error, bytes_left, f'{self.partial} was removed, as the failed write may '
                                                               f'have left it inconsistent.') from None
        self.done += len(features)

    def finish(self):
        """The store's path, once every image is written."""
        if self.done != len(self.names):
            raise RuntimeError(f'{self.partial}: {self.done} of {len(self.names)} images written')
        if os.path.exists(self.partial):
            os.replace(self.partial, self.path)
        return self.path
