"""Image batches on the device every extraction loop reads (image_batches): on CUDA, JPEGs decoded on the card.

The DataLoader workers of a CUDA run read each JPEG's bytes and EXIF orientation only; the main process decodes a
batch of them at once with nvjpeg (torchvision.io.decode_jpeg on the device), then turns them upright, resizes and
normalises them on the card, so the host's decoding no longer bounds the throughput. The result is load_image's
within JPEG decoder tolerance: the two decoders' IDCTs and chroma upsampling differ by a few levels at some
pixels, and the resize is torch's antialiased bilinear, not PIL's. Files that are not JPEG, and JPEGs that nvjpeg
refuses (CMYK, some progressive files), are decoded on the CPU by load_image, as on the CPU path.
"""
import collections
import warnings

import torch
import torch.nn.functional as F
import torch.utils.data as data
from torchvision.io import ImageReadMode, decode_jpeg

from netvlad_toolkit.datasets.images import (
    ImageList,
    check_large_enough,
    check_one_size,
    exif_orientation,
    image_loader,
    load_image,
    read_image,
)
from netvlad_toolkit.model.models import IMAGENET_MEAN, IMAGENET_STD

JPEG_START = b'\xff\xd8\xff'  # the SOI marker and the first marker's 0xff: every JPEG file starts so
EncodedImage = collections.namedtuple('EncodedImage', 'data orientation path')


class EncodedImages(data.Dataset):
    """The images of an ImageList as (EncodedImage, index) for JPEGs (their bytes as a uint8 tensor, EXIF
    orientation and path), and (load_image's tensor, index) for other files."""

    def __init__(self, images):
        self.paths, self.resize, self.sizes_vary_from = images.paths, images.resize, images.sizes_vary_from

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        with open(path, 'rb') as f:
            encoded = f.read()
        if not encoded.startswith(JPEG_START):
            return load_image(path, self.resize), index
        orientation = read_image(path, exif_orientation)  # the header only: PIL decodes no pixels here
        return EncodedImage(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), orientation, path), index


def listed(batch):
    """A batch of EncodedImages items as (items, indices), not stacked: the images are decoded later."""
    return [item for item, _ in batch], torch.tensor([index for _, index in batch])


def upright(pixels, orientation):
    """An image [C, H, W] turned upright by its EXIF orientation (1-8), as PIL's ImageOps.exif_transpose."""
    turns = {2: lambda x: x.flip(-1), 3: lambda x: x.flip(-1, -2), 4: lambda x: x.flip(-2),
             5: lambda x: x.transpose(-1, -2), 6: lambda x: torch.rot90(x, -1, (-2, -1)),
             7: lambda x: x.transpose(-1, -2).flip(-1, -2), 8: lambda x: torch.rot90(x, 1, (-2, -1))}
    return turns[orientation](pixels) if orientation in turns else pixels


def prepared(pixels, item, resize, mean, std):
    """Decoded RGB pixels [3, H, W] (uint8, on the device) as load_image's tensor: upright, resized to (height,
    width) `resize` (None: as they are), scaled to 0-1 and normalised with the ImageNet mean and std ([3, 1, 1] on
    the device)."""
    image = upright(pixels, item.orientation).float().div_(255)
    size = (image.shape[2], image.shape[1])
    loaded = size if resize is None else (resize[1], resize[0])
    check_large_enough(item.path, size, loaded)
    if resize is not None:
        image = F.interpolate(image[None], size=tuple(resize), mode='bilinear', antialias=True,
                              align_corners=False)[0]
    return image.sub_(mean).div_(std)


def decode(encoded, device):
    """RGB pixels [3, H, W] uint8 on `device` of each JPEG of `encoded` (byte tensors), decoded in one call; one
    by one where the batch fails, None for an image the decoder refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torchvision's image decoders announce TorchCodec
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pixels = []
            for data_bytes in encoded:
                try:
                    pixels.append(decode_jpeg(data_bytes, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    pixels.append(None)
            return pixels


def decode_batch(items, resize, device):
    """A batch of EncodedImages items as normalised images [B, 3, H, W] on `device`."""
    jpegs = [i for i, item in enumerate(items) if isinstance(item, EncodedImage)]
    images = [None if isinstance(item, EncodedImage) else item.to(device, non_blocking=True) for item in items]
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]  # once per batch: each is a host-to-device copy
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    for i, pixels in zip(jpegs, decode([items[i].data for i in jpegs], device) if jpegs else []):
        images[i] = (load_image(items[i].path, resize).to(device) if pixels is None else
                     prepared(pixels, items[i], resize, mean, std))
    check_one_size({tuple(image.shape[1:]) for image in images})
    return torch.stack(images)


def base_of(dataset):
    """(the dataset under any Subsets of it, the indices into it that they select, or None for all)."""
    if isinstance(dataset, data.Subset):
        base, indices = base_of(dataset.dataset)
        return base, [int(i) if indices is None else indices[int(i)] for i in dataset.indices]
    return dataset, None


def image_batches(dataset, opt, batch_size, device):
    """(loader, on_device) of an image dataset: the batches (of --cacheBatchSize, decoded by --threads DataLoader
    workers) and the function that turns one of them into (images [B, 3, H, W] on `device`, indices). On CUDA the
    JPEGs of an ImageList are decoded on the card (see the module's docstring). A dataset that gathers its own rows
    (the trunk cache: `rows(indices)`) hands out each batch by one index operation, on the device it lives on."""
    base, indices = base_of(dataset)
    if hasattr(base, 'rows'):
        order = list(range(len(base))) if indices is None else indices
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        return chunks, lambda rows: (base.rows(rows).to(device, non_blocking=True), torch.tensor(rows))
    if device.type != 'cuda' or not isinstance(base, ImageList):
        def on_device(batch):
            return batch[0].to(device, non_blocking=True), batch[1]
        return image_loader(dataset, opt, batch_size), on_device
    encoded = EncodedImages(base)
    encoded = encoded if indices is None else data.Subset(encoded, indices)
    loader = image_loader(encoded, opt, batch_size, collate_fn=listed)
    return loader, lambda batch: (decode_batch(batch[0], base.resize, device), batch[1])
