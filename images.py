"""Images: loading and ImageNet normalisation, image lists by index, and the DataLoader every mode reads through.

An image is read as hloc's reader (OpenCV's imread) reads it: turned upright by its EXIF orientation, 16-bit grey
kept to its top byte, alpha dropped.
"""
import os
import warnings

import numpy as np
import torch
import torch.utils.data as data
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from commons import UserError
from models import IMAGENET_MEAN, IMAGENET_STD  # the input every model takes

# The shortest side an image may be loaded at: below it AlexNet's trunk (up to conv5) has no output left; VGG16's
# needs less.
MIN_SIDE = 31
SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations whose upright image swaps width and height


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


def image_loader(dataset, opt, batch_size, shuffle=False, generator=None, collate_fn=stack_images):
    """The DataLoader of an image list: decoding in --threads workers, pinned memory on CUDA."""
    singles_from = None if shuffle else sizes_vary_from(dataset)
    batching = (dict(batch_size=batch_size, shuffle=shuffle, generator=generator) if singles_from is None else
                dict(batch_sampler=batches(len(dataset), batch_size, singles_from)))
    return data.DataLoader(dataset, collate_fn=collate_fn, **loading(opt), **batching)


def loading(opt):
    """How every DataLoader of the project reads: decoding in --threads workers (at most one per core), pinned
    memory on CUDA."""
    return dict(num_workers=min(opt.threads, os.cpu_count() or 1), pin_memory=opt.cuda and torch.cuda.is_available(),
                persistent_workers=False)
