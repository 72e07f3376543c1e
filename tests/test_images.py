"""Image reading: 16-bit PNGs, EXIF orientation, and images too small for the encoders or over PIL's
decompression-bomb limit, each checked against pixels computed here or through --mode=extract."""
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import ExifTags, Image

from helpers import CONFIGS, error_paragraph, read_image, save_run
from netvlad_toolkit.datasets import images
from test_extract import extract_cli, hloc_names

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def normalised(rgb8):
    """[H, W, 3] uint8 as the [3, H, W] ImageNet-normalised array a loaded image must equal."""
    return ((rgb8 / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def test_16_bit_png_keeps_its_top_byte(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    assert Image.open(tmp_path / 'ramp.png').mode.startswith('I')  # PIL reads it as 16-bit grey
    expected = np.repeat((ramp // 256).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_allclose(images.load_image(tmp_path / 'ramp.png').numpy(), normalised(expected), atol=1e-5)


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: the stored pixels are shown turned a quarter clockwise, so a 64x40 file shows 40x64."""
    rng = np.random.default_rng(0)
    stored = np.repeat(np.repeat(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8), 4, 0), 4, 1)  # [40, 64, 3]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(tmp_path / 'turned.jpg', exif=exif.tobytes(), quality=95)
    decoded = np.asarray(Image.open(tmp_path / 'turned.jpg').convert('RGB'))  # as stored, JPEG loss included
    upright = np.rot90(decoded, k=-1)  # a quarter turn clockwise: [64, 40, 3]
    assert images.image_size(tmp_path / 'turned.jpg') == (40, 64)  # (width, height)
    np.testing.assert_allclose(images.load_image(tmp_path / 'turned.jpg').numpy(), normalised(upright), atol=1e-5)


def test_extract_records_the_upright_size(tmp_path, tiny_data, run_cli):
    source = np.asarray(Image.open(sorted((tiny_data / '000').glob('*.jpg'))[0]).convert('RGB'))  # 64 high, 80 wide
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    (tmp_path / 'images').mkdir()
    Image.fromarray(source).save(tmp_path / 'images' / 'turned.jpg', exif=exif.tobytes(), quality=95)
    upright_path = tmp_path / 'upright.png'
    Image.fromarray(np.rot90(np.asarray(Image.open(tmp_path / 'images' / 'turned.jpg')))).save(upright_path)
    model = save_run(tmp_path / 'run', CONFIGS['float'])
    assert extract_cli(run_cli, tmp_path / 'run', tmp_path / 'images', tmp_path / 'out') == 0
    with h5py.File(tmp_path / 'out' / 'global-feats-netvlad.h5', 'r') as f:
        assert list(f['turned.jpg']['image_size'][()]) == [64, 80]  # [width, height] upright
        descriptor = f['turned.jpg']['global_descriptor'][()]
    with torch.inference_mode():
        expected = model(read_image(upright_path).float()[None])[0].numpy()
    np.testing.assert_allclose(descriptor, expected, atol=1e-5)


def test_min_side_is_where_alexnet_stops():
    """MIN_SIDE is the smallest side AlexNet's trunk up to conv5 (before its last ReLU and max-pool) takes."""
    trunk = torchvision.models.alexnet().features[:-2].eval()
    with torch.inference_mode():
        assert trunk(torch.zeros(1, 3, images.MIN_SIDE, 200)).shape[2] == 1
        with pytest.raises(RuntimeError):
            trunk(torch.zeros(1, 3, images.MIN_SIDE - 1, 200))


# ---------------------------------------------------------------------------------------------- through --mode=extract

BOMB_LIMIT = 100 * 100  # Image.MAX_IMAGE_PIXELS during these tests; the tiny dataset's images are 80x64


@pytest.fixture
def bad_images(tiny_data, tmp_path, monkeypatch):
    """A folder of two good images and {kind: name} of one image of each kind that cannot be read."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', BOMB_LIMIT)
    root = tmp_path / 'images'
    root.mkdir()
    good = sorted((tiny_data / '000').glob('*.jpg'))[:2]
    for index, source in enumerate(good):
        shutil.copy(source, root / f'good{index}.jpg')
    Image.new('RGB', (20, 24), 'gray').save(root / 'tiny.jpg')
    Image.new('RGB', (120, 120), 'gray').save(root / 'bomb.png')  # over the limit: PIL warns
    Image.new('RGB', (150, 150), 'gray').save(root / 'big_bomb.png')  # over twice the limit: PIL raises
    (root / 'empty.jpg').write_bytes(b'')
    (root / 'text.jpg').write_text('not an image')
    data = good[0].read_bytes()
    (root / 'truncated.jpg').write_bytes(data[:len(data) // 3])
    return root, dict(tiny='tiny.jpg', bomb='bomb.png', big_bomb='big_bomb.png', empty='empty.jpg',
                      text='text.jpg', truncated='truncated.jpg')


@pytest.mark.parametrize('kind', ['tiny', 'bomb', 'big_bomb'])
def test_unreadable_image_is_one_error(kind, bad_images, tmp_path, run_cli, capsys):
    root, names = bad_images
    for other in set(names) - {kind}:
        (root / names[other]).unlink()
    save_run(tmp_path / 'run', CONFIGS['float'])
    assert extract_cli(run_cli, tmp_path / 'run', root, tmp_path / 'out') == 2
    message = error_paragraph(capsys.readouterr().err)
    assert str(root / names[kind]) in message and '--skip_unreadable' in message
    if kind == 'tiny':
        assert '20x24' in message and f'at least {images.MIN_SIDE} pixels' in message
    else:
        assert str(BOMB_LIMIT) in message
    assert not (tmp_path / 'out' / 'global-feats-netvlad.h5').exists()


def test_skip_unreadable_skips_every_kind_with_one_line(bad_images, tmp_path, run_cli, capsys):
    root, names = bad_images
    save_run(tmp_path / 'run', CONFIGS['float'])
    assert extract_cli(run_cli, tmp_path / 'run', root, tmp_path / 'out', '--skip_unreadable') == 0
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err
    lines = captured.out.splitlines()
    for name in names.values():
        naming = [line for line in lines if str(root / name) in line]
        assert len(naming) == 1 and naming[0].startswith('Skipped: '), (name, captured.out)
    assert hloc_names(tmp_path / 'out' / 'global-feats-netvlad.h5') == ['good0.jpg', 'good1.jpg']
