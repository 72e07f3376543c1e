"""The centroids file NetVLAD is initialised from, and the encoder it belongs to.

HDF5 datasets `descriptors` [N, D] and `centroids` [K, D] float32, as the reference port writes them. Centroids fit
only the encoder whose local features they cluster, and with --fromscratch that encoder's weights come from --seed,
which the file name does not hold. So the file's attributes record the encoder: `arch`, `fromscratch`, `seed`, and
`encoder_sha256`, a hash of its weights; a model is initialised only from a file whose hash matches its encoder.
"""
import hashlib
import logging
import os

import h5py
import numpy as np
import torch

from netvlad_toolkit.model.models import build_model, model_config
from netvlad_toolkit.utils.commons import UserError, atomic_write


def centroids_path(opt):
    return os.path.join(opt.dataPath, 'data', 'centroids',
                        f'{opt.arch}_{opt.dataset}_{opt.num_clusters}_desc_cen.hdf5')


def new_model(opt):
    """The untrained network of the flags; seeded, so --fromscratch gives the same weights in every mode."""
    torch.manual_seed(opt.seed)
    return build_model(model_config(opt), pretrained=not opt.fromscratch)


def encoder_hash(encoder):
    """sha256 over the encoder's state-dict tensors (names and bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_attributes(opt, encoder):
    """What the file records about the encoder its descriptors came from."""
    return dict(arch=opt.arch, fromscratch=bool(opt.fromscratch), seed=int(opt.seed),
                encoder_sha256=encoder_hash(encoder))


def write_centroids(path, descriptors, centroids, attributes):
    def write(f):
        with h5py.File(f, 'w') as h5:
            h5.create_dataset('descriptors', data=descriptors.astype(np.float32))
            h5.create_dataset('centroids', data=centroids.astype(np.float32))
            h5.attrs.update(attributes)
    atomic_write(path, write, mode='w+b')


def cluster_command(opt, seed):
    return (f'python main.py --mode=cluster --arch={opt.arch} --dataset={opt.dataset} '
            f'--num_clusters={opt.num_clusters} --dataPath={opt.dataPath}'
            + (f' --fromscratch --seed={seed}' if opt.fromscratch else ''))


def read_centroids(path, opt):
    """(centroids [K, D], descriptors [N, D], attributes) of the file; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f'Cluster file {path} does not exist. Run the cluster mode first with the same flags: '
                        f'{cluster_command(opt, opt.seed)}')
    try:
        with h5py.File(path, 'r') as h5:
            return h5['centroids'][:], h5['descriptors'][:], dict(h5.attrs)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise UserError(f'Cluster file {path} is not a readable HDF5 file with the datasets "centroids" and '
                        f'"descriptors" ({type(error).__name__}: {error}); it may be damaged or incomplete. '
                        f'Delete it and cluster again: {cluster_command(opt, opt.seed)}') from None


def check_shapes(path, centroids, descriptors, layer):
    expected = (layer.num_clusters, layer.dim)
    if centroids.ndim != 2 or centroids.shape != expected or descriptors.ndim != 2 or \
            descriptors.shape[1] != layer.dim or len(descriptors) < 2:
        raise UserError(f'Cluster file {path} holds centroids of shape {centroids.shape} and descriptors of shape '
                        f'{descriptors.shape}; this model needs {expected[0]} centroids of dimension {expected[1]} '
                        f'and at least two descriptors of that dimension (--num_clusters, --arch).')
    for name, values in (('centroids', centroids), ('descriptors', descriptors)):
        if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
            raise UserError(f'Cluster file {path}: its {name} are not all finite numbers ({values.dtype}); the file '
                            f'is damaged. Delete it and cluster again.')


def check_fits_encoder(path, attributes, opt, encoder):
    """The file must have been clustered with this very encoder; the reference's files, which record none, pass
    with a warning."""
    if 'encoder_sha256' not in attributes:
        logging.warning('Cluster file %s does not record the encoder it was computed with (a file of the reference '
                        'port?): it is used as it is. Its centroids fit only if it was clustered with --arch=%s and '
                        'the same encoder weights as this run%s.', path, opt.arch,
                        f' (--fromscratch --seed={opt.seed})' if opt.fromscratch else ' (ImageNet)')
        return
    if attributes['encoder_sha256'] == encoder_hash(encoder):
        return
    stored = (f'--fromscratch --seed={int(attributes["seed"])}' if attributes.get('fromscratch')
              else 'ImageNet weights')
    this_run = f'--fromscratch --seed={opt.seed}' if opt.fromscratch else 'ImageNet weights'
    if attributes.get('fromscratch') and opt.fromscratch and int(attributes['seed']) != opt.seed:
        remedy = f'Either run with --seed={int(attributes["seed"])}, or cluster with this seed first: '
    else:
        remedy = 'Cluster again with this run\'s encoder: '
    raise UserError(f'Cluster file {path} was computed with the {attributes.get("arch")} encoder of {stored}, '
                    f'and this run\'s encoder ({opt.arch}, {this_run}) has other weights, so the centroids do not '
                    f'fit its features. {remedy}{cluster_command(opt, opt.seed)}')


def initialised_model(opt):
    """A new network whose NetVLAD layer is initialised from the cluster file of its own encoder."""
    model = new_model(opt)
    if opt.pooling == 'netvlad':
        path = centroids_path(opt)
        centroids, descriptors, attributes = read_centroids(path, opt)
        check_shapes(path, centroids, descriptors, model.pool)
        check_fits_encoder(path, attributes, opt, model.encoder)
        model.pool.init_from_clusters(centroids, descriptors)
    return model
