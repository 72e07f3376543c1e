"""Images: loading and ImageNet normalisation, image lists by index, and the DataLoader every mode reads through.

An image is read as hloc's reader (OpenCV's imread) reads it: turned upright by its EXIF orientation, 16-bit grey
kept to its top byte, alpha dropped.
"""
import multiprocessing
import multiprocessing.forkserver
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.utils.data as data
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from netvlad_toolkit.model.models import IMAGENET_MEAN, IMAGENET_STD  # the input every model takes
from netvlad_toolkit.utils.commons import UserError

# The shortest side an image may be loaded at: below it AlexNet's trunk (up to conv5) has no output left; VGG16's
# needs less.
MIN_SIDE = 31
SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations whose upright image swaps width and height
# The environment variable that chooses how DataLoader workers start (auto, forkserver, spawn or fork), in every mode
# and in the toolkit used from Python alike.
START_METHOD_VARIABLE = 'NETVLAD_WORKER_START_METHOD'
# What a forkserver imports once, so that the workers forked from it start without importing them; the toolkit's own
# modules are added as imported (toolkit_modules). '__main__' is the script run (main.py), as multiprocessing's default.
HEAVY_MODULES = ['__main__', 'torch', 'torchvision', 'PIL.Image', 'numpy']
# The CPU seconds one DataLoader worker costs before it loads anything, by start method: a spawned worker starts an
# interpreter and imports torch, torchvision and the toolkit's modules afresh; a forked one (from this process, or
# from the forkserver that has them preloaded) imports nothing. benchmarks/bench_workers.py measures them.
WORKER_START_SECONDS = {'fork': 0.02, 'forkserver': 0.02, 'spawn': 3.0}
# How many items of a set are loaded in this process to estimate the loading work of the whole set.
SAMPLED_ITEMS = 4


def read_image(path, read):
    """read(opened PIL image) of the image file at path; a UserError naming a file that is unreadable, corrupt, or
    over PIL's decompression-bomb limit (then it is not decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return read(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UserError(f'Image {path} has more than {Image.MAX_IMAGE_PIXELS} pixels, the limit PIL sets against '
                        f'decompression bombs (PIL.Image.MAX_IMAGE_PIXELS): it is not read. Downscale it to '
                        f'read it.') from None
    # PIL raises SyntaxError and ValueError, not only OSError, for some broken or oversized PNG chunks.
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise UserError(f'Image {path} cannot be read: the file is corrupt or not an image ({error}).') from None


def image_size(path):
    """(width, height) of an image once turned upright by its EXIF orientation, as load_image gives it."""
    return read_image(path, upright_size)


def upright_size(image):
    """(width, height) of an opened image turned upright; for a PNG without EXIF before its pixels PIL decodes them,
    looking for EXIF after them, as ImageOps.exif_transpose does when loading: the two sizes always agree."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in SIDEWAYS else (width, height)


def exif_orientation(image):
    """The EXIF orientation (1-8) of an opened image; 1 (upright) when it has none."""
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def upright_rgb(image):
    """An opened image as 8-bit RGB, turned upright by its EXIF orientation; 16-bit grey (modes I;16 and I) keeps
    its top byte, where PIL's own conversion would clip every value above 255 to white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith('I'):
        image = Image.fromarray(np.clip(np.asarray(image) >> 8, 0, 255).astype(np.uint8))
    return image.convert('RGB')


def load_image(path, resize=None):
    """An RGB image as a normalised [3, H, W] float tensor; a UserError for an unreadable file or one whose loaded
    (resized) size is too small for the encoders."""
    image = read_image(path, upright_rgb)
    loaded = image if resize is None else image.resize((resize[1], resize[0]), Image.BILINEAR)
    check_large_enough(path, image.size, loaded.size)
    return TF.normalize(TF.to_tensor(loaded), IMAGENET_MEAN, IMAGENET_STD)


def check_large_enough(path, size, loaded_size):
    """A UserError naming an image loaded at (width, height) loaded_size with a side under MIN_SIDE."""
    if min(loaded_size) < MIN_SIDE:
        resized = f', resized to {loaded_size[0]}x{loaded_size[1]}' if loaded_size != size else ''
        raise UserError(f'Image {path} is too small: {size[0]}x{size[1]} pixels (width x height){resized}; the '
                        f'encoders need at least {MIN_SIDE} pixels on each side.')


def check_images_exist(paths, hint):
    """A UserError naming the first missing image; `hint` says where the images are expected."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f'{len(missing)} of {len(paths)} images are missing, for example {missing[0]}. {hint}')


class ImageList(data.Dataset):
    """Images by index; returns (image, index). The only work DataLoader workers do is decoding.

    sizes_vary_from: index from which images may differ in size (Tokyo 24/7 queries); those are loaded one per
    batch at full size, as the NetVLAD authors extract them (None: all images have one size).
    """

    def __init__(self, paths, resize=None, sizes_vary_from=None):
        self.paths = paths
        self.resize = resize
        self.sizes_vary_from = None if resize is not None else sizes_vary_from

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.paths[index], self.resize), index


def batches(num_images, batch_size, singles_from):
    """Index batches of batch_size, except that every image from singles_from on is a batch of its own."""
    cut = min(num_images, singles_from)
    return ([list(range(start, min(start + batch_size, cut))) for start in range(0, cut, batch_size)]
            + [[index] for index in range(cut, num_images)])


def sizes_vary_from(dataset):
    """Where a (Subset of an) ImageList starts holding images of varying sizes, else None."""
    if isinstance(dataset, data.Subset):
        return 0 if sizes_vary_from(dataset.dataset) is not None else None
    return getattr(dataset, 'sizes_vary_from', None)


def stack_images(batch):
    """Default collation, with a UserError instead of torch's when images of one batch differ in size."""
    check_one_size({tuple(image.shape[1:]) for image, _ in batch})
    return data.default_collate(batch)


def check_one_size(sizes):
    """A UserError when the (height, width) sizes of one batch's images are not all one."""
    if len(sizes) > 1:
        raise UserError(f'Images of one batch have different sizes ({", ".join(f"{h}x{w}" for h, w in sorted(sizes))}'
                        f'): give --resize HEIGHTxWIDTH so that all images have one size.')


class TripletImages(data.Dataset):
    """Images of one (query, positive, negatives...) tuple per item: [2 + n, 3, H, W] and n. Here, not with the
    training that uses it, so that the modules a worker needs to unpickle it are those a forkserver has preloaded
    (see loading) from the first extraction of a run on."""

    def __init__(self, whole_set, triplets):
        self.whole_set = whole_set
        self.triplets = triplets  # list of (query row, positive row, [negative rows])

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, index):
        query, positive, negatives = self.triplets[index]
        images = [self.whole_set[i][0] for i in (query, positive, *negatives)]
        return torch.stack(images), len(negatives)


def collate_triplets(items):
    """A batch of TripletImages items: their images concatenated [sum(2 + n), 3, H, W], and each n."""
    return torch.cat([images for images, _ in items]), [count for _, count in items]


def image_loader(dataset, opt, batch_size, shuffle=False, generator=None, collate_fn=stack_images):
    """The DataLoader of an image list: decoding in --threads workers, pinned memory on CUDA."""
    singles_from = None if shuffle else sizes_vary_from(dataset)
    batching = (dict(batch_size=batch_size, shuffle=shuffle, generator=generator) if singles_from is None else
                dict(batch_sampler=batches(len(dataset), batch_size, singles_from)))
    return data.DataLoader(dataset, collate_fn=collate_fn, **loading(opt, dataset), **batching)


def loading(opt, dataset):
    """How every DataLoader of the project reads `dataset`: in --threads workers (at most one per core, and only as
    many as the set's loading work repays, see worker_count), started as $NETVLAD_WORKER_START_METHOD says; pinned
    memory on CUDA."""
    method = start_method(os.environ.get(START_METHOD_VARIABLE, 'auto'))
    most = min(opt.threads, os.cpu_count() or 1)
    workers = worker_count(most, loading_seconds(dataset) if most else 0.0, WORKER_START_SECONDS[method])
    context = dict(multiprocessing_context=worker_context(method)) if workers else {}
    return dict(num_workers=workers, pin_memory=opt.cuda and torch.cuda.is_available(), persistent_workers=False,
                **context)


def worker_count(most, work_seconds, start_seconds):
    """How many workers, up to `most`, to load a set whose loading takes `work_seconds` of CPU in one process, when
    one worker costs `start_seconds` before it loads anything: as many as each take over at least their own start
    cost of loading (a worker's start is paid on the cores this process computes on, before its first item), so
    none for a set that loads here faster than one worker starts."""
    return most if start_seconds <= 0 else min(most, int(work_seconds // start_seconds))


def loading_seconds(dataset, clock=time.process_time):
    """The CPU time it takes to load every item of `dataset`, estimated from up to SAMPLED_ITEMS items spread over
    it, loaded here as a worker loads them (whatever an item is: an image, a tuple of images, a file's bytes): the
    median item's time times the number of items (the median: the first item loaded in a process may pay one-time
    costs)."""
    count = len(dataset)
    seconds = []
    for index in sorted({round(i) for i in np.linspace(0, count - 1, min(count, SAMPLED_ITEMS))}):
        started = clock()
        dataset[index]
        seconds.append(clock() - started)
    return statistics.median(seconds) * count if seconds else 0.0


def start_method(chosen):
    """The start method of DataLoader workers that $NETVLAD_WORKER_START_METHOD names; auto: forkserver where it
    exists, except on macOS (whose system libraries are unsafe in a forked child, which is why Python spawns there),
    else spawn. Never the interpreter's default: fork from this process, whose OpenMP and other threads may hold
    locks, can deadlock a worker."""
    methods = ['auto', *multiprocessing.get_all_start_methods()]
    if chosen not in methods:
        raise UserError(f'The environment variable {START_METHOD_VARIABLE} is {chosen!r}; expected one of '
                        f'{", ".join(methods)} (how DataLoader workers start; auto when it is not set).')
    if chosen != 'auto':
        return chosen
    return 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() and sys.platform != 'darwin' \
        else 'spawn'


def worker_context(method):
    """The multiprocessing context of `method`; a forkserver, started here unless it runs, has the heavy modules and
    the toolkit's modules imported so far loaded."""
    if method == 'forkserver':
        multiprocessing.set_forkserver_preload(HEAVY_MODULES + toolkit_modules())
        start_forkserver()
    return multiprocessing.get_context(method)


def start_forkserver():
    """Start the forkserver (a no-op when it runs) with the folder the toolkit is imported from on its PYTHONPATH:
    in Python 3.11 to 3.13 the server ignores this process's sys.path, so that its preloading of the toolkit's modules
    would fail (silently) wherever the current folder is not the toolkit's, and every worker would import them."""
    previous = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [toolkit_import_root(), previous]))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ['PYTHONPATH']
        else:
            os.environ['PYTHONPATH'] = previous


def toolkit_modules():
    """Names of the toolkit's modules imported so far: the modules of this module's package."""
    package = __name__.partition('.')[0]
    return sorted(name for name in list(sys.modules) if name == package or name.startswith(package + '.'))


def toolkit_import_root():
    """The sys.path folder the toolkit's package is imported from."""
    package = sys.modules[__name__.partition('.')[0]]
    return os.path.dirname(os.path.abspath(list(package.__path__)[0]))
