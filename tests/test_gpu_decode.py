"""The JPEG path of CUDA runs (gpu_decode): torchvision's decoder, the EXIF turn, the antialiased resize and the
normalisation against load_image (PIL), on the CPU decoder here and on nvjpeg where a card has it."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from netvlad_toolkit import cli
from netvlad_toolkit.datasets import gpu_decode
from netvlad_toolkit.datasets.datasets import SplitImages, load_dataset
from netvlad_toolkit.datasets.images import ImageList, load_image

LEVEL = 1 / 255 / 0.225  # one 8-bit level after normalisation (the smallest ImageNet std)


def photo(path, size=(131, 97), orientation=1, mode='RGB'):
    """A smooth JPEG (gradients and a disc: what a decoder's IDCT reproduces within a level or two), with an EXIF
    orientation tag."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, ((x - width / 2) ** 2 + (y - height / 2) ** 2 <
                                                             (height / 3) ** 2) * 200 + 30], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return str(path)


def decoded(paths, resize, device):
    encoded = gpu_decode.EncodedImages(ImageList(paths, resize))
    return gpu_decode.decode_batch([encoded[i][0] for i in range(len(paths))], resize, torch.device(device))


def assert_decoder_tolerance(got, expected):
    """Two JPEG decoders (and PIL's resize against torch's) agree within a few levels at a few pixels and within
    a fraction of a level on average."""
    difference = (got.cpu() - expected).abs()
    assert got.shape == expected.shape
    assert difference.max() <= 6 * LEVEL and difference.mean() <= 0.5 * LEVEL


@pytest.mark.parametrize('orientation', range(1, 9))
def test_every_exif_orientation_is_turned_as_pil_turns_it(tmp_path, orientation):
    path = photo(tmp_path / f'o{orientation}.jpg', orientation=orientation)
    with Image.open(path) as image:
        assert ImageOps.exif_transpose(image).size == ((97, 131) if orientation >= 5 else (131, 97))
    assert_decoder_tolerance(decoded([path], None, 'cpu')[0], load_image(path))


@pytest.mark.parametrize('resize', [(64, 80), (200, 300)])
def test_resized_and_grey_jpegs_match_load_image(tmp_path, resize):
    paths = [photo(tmp_path / 'colour.jpg', orientation=6), photo(tmp_path / 'grey.jpg', mode='L')]
    batch = decoded(paths, resize, 'cpu')
    assert batch.shape == (2, 3, *resize)
    for image, path in zip(batch, paths):
        assert_decoder_tolerance(image, load_image(path, resize))


def test_files_that_are_not_jpeg_are_load_images_own(tmp_path):
    png = tmp_path / 'a.png'
    Image.open(photo(tmp_path / 'a.jpg')).save(png)
    item = gpu_decode.EncodedImages(ImageList([str(png)]))[0][0]
    assert torch.equal(item, load_image(str(png)))


def test_a_subset_of_a_subset_reads_the_right_images(tiny_data):
    split = load_dataset(cli.parse_options(['--mode=test', f'--dataPath={tiny_data}', '--split=test']), 'test')
    assert isinstance(split, SplitImages)
    inner = torch.utils.data.Subset(split, [5, 9, 2, 40])
    base, indices = gpu_decode.base_of(torch.utils.data.Subset(inner, [3, 0]))
    assert base is split and indices == [40, 5]
    assert gpu_decode.base_of(split) == (split, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='nvjpeg needs a CUDA device')
def test_nvjpeg_matches_load_image(tmp_path):
    paths = [photo(tmp_path / f'{o}.jpg', orientation=o) for o in (1, 3, 6)]
    batch = decoded(paths, (96, 128), 'cuda')
    assert batch.device.type == 'cuda'
    for image, path in zip(batch, paths):
        assert_decoder_tolerance(image, load_image(path, (96, 128)))
