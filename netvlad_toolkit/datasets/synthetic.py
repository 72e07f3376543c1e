"""A small, seeded, synthetic place-recognition dataset written in the Pittsburgh on-disk layout.

Each split is a set of straight streets (geographically apart, like Pittsburgh's splits). A street is one long
facade strip: buildings drawn from a few shared templates (so different places look alike: perceptual
aliasing), each with its own colours, windows, doors and signs. A database image looks at the facade from a
point every `spacing` metres; a query looks from a random point of the same street with another viewpoint
(zoom, perspective, shift), lighting, colour cast, blur, noise and occluders (cars, pedestrians, poles).
The files are read by the same loader as Pittsburgh: datasets/pitts30k_{train,val,test}.mat, database images
under 000/, 001/, ... and queries under queries_real/.
"""
import logging
import os

import numpy as np
import scipy.io
from PIL import Image, ImageFilter
from tqdm import tqdm

from netvlad_toolkit.utils.commons import UserError, building_folder, parse_size
from netvlad_toolkit.utils.options import add_common_flags, add_synthetic_flags

PIXELS_PER_METRE = 8
FACADE_HEIGHT = 120          # pixels: 15 m of facade
VIEW_WIDTH_M = 20.0          # metres of facade a database view covers
DB_SPACING_M = 5.0
IMAGES_PER_STREET = 60       # database views per street
SPLIT_SEEDS = {'train': 1, 'val': 2, 'test': 3}
SPLIT_SCALE = {'train': 2, 'val': 1, 'test': 1}   # the train split is twice as large
NUM_TEMPLATES = 6
PALETTE = np.array([[184, 92, 70], [150, 75, 60], [205, 190, 160], [120, 120, 125], [225, 220, 205],
                    [170, 140, 100], [95, 105, 120], [200, 170, 130], [140, 150, 110], [210, 200, 185]],
                   dtype=np.float32)


def dataset_ready(path):
    return all(os.path.isfile(os.path.join(path, 'datasets', f'pitts30k_{split}.mat')) for split in SPLIT_SEEDS)


def add_flags(p):
    add_common_flags(p)
    group = p.add_argument_group('synthetic dataset')
    group.add_argument('--dataPath', default='synthetic_data', help='Folder to write the synthetic dataset into.')
    add_synthetic_flags(group)


def ensure_synthetic(opt):
    """Generate the synthetic dataset into opt.dataPath unless it is already there: built whole beside it and
    swapped in (a killed generation leaves no half dataset; the next one starts clean)."""
    if dataset_ready(opt.dataPath):
        return
    if os.path.isdir(opt.dataPath) and os.listdir(opt.dataPath):
        raise UserError(f'--dataPath {opt.dataPath} is not empty and holds no complete synthetic dataset; '
                        f'give an empty or new folder for --dataset synthetic.')
    with building_folder(opt.dataPath) as folder:
        generate(folder, opt.synth_db, opt.synth_queries, parse_size(opt.synth_imsize), opt.seed)


def synth(opt):
    """--mode=synth: the synthetic dataset in --dataPath, whatever --dataset says (the other modes read it with
    --dataset synthetic)."""
    ensure_synthetic(opt)
    logging.info('====> Synthetic dataset in %s; read it with --dataset synthetic --dataPath %s', opt.dataPath,
                 opt.dataPath)


def generate(path, num_db, num_queries, image_size, seed):
    """Write all three splits into `path`, each split's .mat file after its images."""
    logging.info('Generating the synthetic dataset in %s (%d db / %d queries for val and test, twice that for '
                 'train, %dx%d images)', path, num_db, num_queries, *image_size)
    templates = make_templates(np.random.default_rng(seed))
    first_db, first_query = 0, 0
    for split, split_seed in SPLIT_SEEDS.items():
        rng = np.random.default_rng([seed, split_seed])
        scale = SPLIT_SCALE[split]
        struct = write_split(path, split, rng, templates, num_db * scale, num_queries * scale,
                             image_size, first_db, first_query)
        first_db += len(struct['dbImageFns'])
        first_query += len(struct['qImageFns'])
    logging.info('Synthetic dataset ready: %d database images and %d queries.', first_db, first_query)


def make_templates(rng):
    """Building templates shared by all streets and splits: window grid geometry and door placement."""
    return [dict(window_w=rng.integers(6, 16), window_h=rng.integers(8, 20), gap_x=rng.integers(6, 16),
                 gap_y=rng.integers(8, 18), door=rng.random() < 0.6, stripes=rng.random() < 0.4)
            for _ in range(NUM_TEMPLATES)]


def write_split(path, split, rng, templates, num_db, num_queries, image_size, first_db, first_query):
    num_streets = max(1, int(np.ceil(num_db / IMAGES_PER_STREET)))
    db_per_street = np.diff(np.linspace(0, num_db, num_streets + 1).round().astype(int))
    q_per_street = np.diff(np.linspace(0, num_queries, num_streets + 1).round().astype(int))
    db_names, q_names, utm_db, utm_q = [], [], [], []
    origin = np.array([585000.0, 4477000.0]) + 20000.0 * SPLIT_SEEDS[split]
    with tqdm(total=num_db + num_queries, desc=f'synthetic {split}', unit='img') as progress:
        for street in range(num_streets):
            length_m = db_per_street[street] * DB_SPACING_M + VIEW_WIDTH_M
            facade = render_facade(rng, templates, length_m)
            start = origin + np.array([0.0, 1000.0 * street])  # streets 1 km apart: no cross-street positives
            direction = rng.normal(size=2)
            direction /= np.linalg.norm(direction)
            db_positions = VIEW_WIDTH_M / 2 + DB_SPACING_M * np.arange(db_per_street[street])
            q_positions = rng.uniform(db_positions[0], db_positions[-1], size=q_per_street[street])
            for position in db_positions:
                name = f'{(first_db + len(db_names)) // 1000:03d}/{first_db + len(db_names):06d}_pitch1_yaw1.jpg'
                save_jpeg(render_view(facade, position, image_size, rng, hard=False), os.path.join(path, name))
                db_names.append(name)
                utm_db.append(start + position * direction)
                progress.update()
            for position in q_positions:
                index = first_query + len(q_names)
                name = f'{index // 1000:03d}/{index:06d}_pitch1_yaw1.jpg'
                save_jpeg(render_view(facade, position, image_size, rng, hard=True),
                          os.path.join(path, 'queries_real', name))
                q_names.append(name)
                utm_q.append(start + position * direction)
                progress.update()
    struct = dict(whichSet=split, dbImageFns=cell(db_names), utmDb=np.array(utm_db).T, qImageFns=cell(q_names),
                  utmQ=np.array(utm_q).T, numImages=float(len(db_names)), numQueries=float(len(q_names)),
                  posDistThr=25.0, posDistSqThr=625.0, nonTrivPosDistSqThr=100.0)
    mat_path = os.path.join(path, 'datasets', f'pitts30k_{split}.mat')
    os.makedirs(os.path.dirname(mat_path), exist_ok=True)
    scipy.io.savemat(mat_path, {'dbStruct': struct})
    return struct


def cell(names):
    column = np.empty((len(names), 1), dtype=object)
    column[:, 0] = names
    return column


def save_jpeg(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, quality=90)


def render_facade(rng, templates, length_m):
    """One street's facade strip [FACADE_HEIGHT, length_m * PIXELS_PER_METRE, 3] as uint8."""
    width = int(length_m * PIXELS_PER_METRE)
    strip = np.empty((FACADE_HEIGHT, width, 3), dtype=np.float32)
    sky = np.linspace(0, 1, FACADE_HEIGHT)[:, None, None]
    strip[:] = (1 - sky) * np.array([120, 160, 220]) + sky * np.array([200, 215, 235])
    x = 0
    while x < width:
        building_w = int(rng.uniform(6, 16) * PIXELS_PER_METRE)
        draw_building(strip[:, x:x + building_w], rng, templates[rng.integers(len(templates))])
        x += building_w + int(rng.integers(0, 2) * rng.uniform(1, 3) * PIXELS_PER_METRE)
    strip[-12:] = np.array([90, 90, 95]) + rng.normal(0, 6, size=(12, width, 1))  # pavement
    return strip.clip(0, 255)


def draw_building(area, rng, template):
    """Draw one building into `area` (a view of the strip): wall, window grid, door, stripes and signs."""
    height, width = area.shape[:2]
    top = int(rng.integers(5, 45))
    wall = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.85, 1.15)
    area[top:] = wall + rng.normal(0, 4, size=(height - top, width, 1))
    if template['stripes']:
        for y in range(top + 4, height - 12, int(template['gap_y'] + template['window_h'])):
            area[y:y + 2] = wall * 0.7
    window = np.array([40, 50, 70]) if rng.random() < 0.5 else np.array([170, 190, 210])
    window = window * rng.uniform(0.7, 1.3, size=3)
    ww, wh, gx, gy = (int(template[k]) for k in ('window_w', 'window_h', 'gap_x', 'gap_y'))
    for y in range(top + gy // 2 + 2, height - 30, wh + gy):
        for x in range(gx // 2, width - ww, ww + gx):
            area[y:y + wh, x:x + ww] = window * rng.uniform(0.8, 1.2)
            area[y + wh:y + wh + 2, x - 1:x + ww + 1] = wall * 1.2  # sill
    if template['door'] and width > 30:
        x = int(rng.integers(4, width - 20))
        area[height - 34:height - 12, x:x + 12] = PALETTE[rng.integers(len(PALETTE))] * 0.5
    for _ in range(rng.integers(1, 4)):  # signs and posters: what makes one place unique
        sign_w, sign_h = int(rng.integers(10, 40)), int(rng.integers(6, 18))
        x, y = int(rng.integers(0, max(1, width - sign_w))), int(rng.integers(top, height - 12 - sign_h))
        area[y:y + sign_h, x:x + sign_w] = rng.uniform(0, 255, size=3)
        bars = np.repeat(rng.uniform(0, 255, size=(1, sign_w // 3 + 1, 3)), 3, axis=1)
        band = area[y + sign_h // 3:y + 2 * sign_h // 3, x:x + sign_w]
        band[:] = bars[:, :band.shape[1]]


def render_view(facade, position_m, image_size, rng, hard):
    """The image seen from `position_m` along the street: a perspective crop plus photometric changes."""
    height, width = image_size
    centre = position_m * PIXELS_PER_METRE
    half_w = VIEW_WIDTH_M * PIXELS_PER_METRE / 2
    zoom = rng.uniform(0.75, 1.3) if hard else rng.uniform(0.95, 1.05)
    shift = rng.normal(0, 10 if hard else 2)
    slant = rng.uniform(-0.25, 0.25) if hard else rng.uniform(-0.03, 0.03)  # perspective: one side taller
    half_w /= zoom
    top, bottom = FACADE_HEIGHT * (1 - 1 / zoom) / 2, FACADE_HEIGHT * (1 + 1 / zoom) / 2
    left, right = centre - half_w + shift, centre + half_w + shift
    span = bottom - top
    quad = (left, top + slant * span, left, bottom - slant * span, right, bottom + slant * span, right,
            top - slant * span)
    image = Image.fromarray(facade.astype(np.uint8)).transform((width, height), Image.QUAD, quad,
                                                               Image.BILINEAR)
    if hard and rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    pixels = np.asarray(image, dtype=np.float32)
    if hard:
        pixels = add_occluders(pixels, rng)
    return photometric(pixels, rng, hard)


def add_occluders(pixels, rng):
    """Cars, pedestrians and poles in front of the facade: solid boxes of random colour."""
    height, width = pixels.shape[:2]
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        if kind == 0:    # car
            box_w, box_h = int(width * rng.uniform(0.2, 0.4)), int(height * rng.uniform(0.15, 0.3))
        elif kind == 1:  # pedestrian
            box_w, box_h = int(width * rng.uniform(0.04, 0.08)), int(height * rng.uniform(0.3, 0.5))
        else:            # pole
            box_w, box_h = int(width * rng.uniform(0.01, 0.03)), height
        x = int(rng.integers(0, max(1, width - box_w)))
        pixels[height - box_h:, x:x + box_w] = rng.uniform(0, 255, size=3)
    return pixels


def photometric(pixels, rng, hard):
    """Lighting (gain, gamma), colour cast and sensor noise; stronger for queries."""
    gain = rng.uniform(0.6, 1.4) if hard else rng.uniform(0.9, 1.1)
    gamma = rng.uniform(0.7, 1.4) if hard else 1.0
    cast = rng.uniform(0.8, 1.2, size=3) if hard else rng.uniform(0.97, 1.03, size=3)
    noise = rng.normal(0, rng.uniform(2, 10) if hard else 2, size=pixels.shape)
    pixels = 255.0 * (pixels / 255.0).clip(0, 1) ** gamma
    return (pixels * gain * cast + noise).clip(0, 255).astype(np.uint8)
