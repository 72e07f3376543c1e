"""--mode=extract: the global descriptor of every image under --image_dir, written to
--export_dir/global-feats-netvlad.h5 in hloc's layout (see global_features.py), for hloc's pairs_from_retrieval
or this toolkit's --mode=pairs and --mode=query.

Any run folder works (--resume: float, pruned, int8, whitened; none: the off-the-shelf k-means-initialised
network). Images are normalised as in training (RGB scaled to 0-1, ImageNet mean and std), not as hloc's own
NetVLAD port (RGB 0-255 minus the mean): descriptors of the two are not comparable.
"""
import logging
import os

import torch

from netvlad_toolkit.runs.runs import load_model, place_model
from netvlad_toolkit.search.global_features import (
    FEATURES_FILE,
    extract_folder,
    extraction_settings,
    find_images,
    h5_names,
)
from netvlad_toolkit.utils.commons import make_deterministic, plural, select_device
from netvlad_toolkit.utils.options import add_describing_flags, add_image_folder_flags


def add_flags(p):
    add_describing_flags(p)
    group = p.add_argument_group('extract (hloc\'s flag names)')
    group.add_argument('--image_dir', required=True,
                       help='Folder of the images (.jpg/.jpeg/.png, any case, searched recursively).')
    group.add_argument('--export_dir', required=True, help='Folder that receives global-feats-netvlad.h5.')
    add_image_folder_flags(group)


def extract(opt):
    make_deterministic(opt.seed)
    model, _, run_dir = load_model(opt)
    model, device = place_model(model, select_device(opt))
    logging.info('Model %s: %d-D descriptors', run_dir or 'off-the-shelf', model.output_dim)
    return extract_features(model, opt.image_dir, opt.export_dir, device, opt.cacheBatchSize, opt.precision,
                            opt.threads, opt.as_half, opt.resize_max, opt.skip_unreadable)


def extract_features(model, image_dir, export_dir, device='cpu', batch_size=24, precision='fp32', threads=0,
                     as_half=False, resize_max=None, skip_unreadable=False):
    """hloc's extract_features step: the descriptor of every image under image_dir (searched recursively) into
    export_dir/global-feats-netvlad.h5, resumable; the parameters are the flags of the same names (batch_size:
    --cacheBatchSize). Returns the file's path."""
    names = find_images(image_dir, '--image_dir')
    path = os.path.join(export_dir, FEATURES_FILE)
    os.makedirs(export_dir, exist_ok=True)
    settings = extraction_settings(device, batch_size, precision, threads, as_half, resize_max, skip_unreadable)
    extract_folder(model, image_dir, names, path, settings, torch.device(device))
    written = len(set(h5_names(path)).intersection(names))  # --skip_unreadable leaves some out
    logging.info('====> Wrote the descriptors of %s to %s%s', plural(written, 'image'), path,
                 f' ({len(names) - written} unreadable left out)' if written < len(names) else '')
    return path
