"""--mode=cluster: k-means centroids of local descriptors, the file NetVLAD is initialised from (SPEC section 3)."""
import logging
import math
import os
import time

import faiss
import h5py
import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from commons import UserError, make_deterministic, select_device
from models import build_model, model_config
from datasets import load_dataset
from images import image_loader

NUM_DESCRIPTORS = 50000
DESCRIPTORS_PER_IMAGE = 100
KMEANS_ITERATIONS = 100


def centroids_path(opt):
    return os.path.join(opt.dataPath, 'data', 'centroids',
                        f'{opt.arch}_{opt.dataset}_{opt.num_clusters}_desc_cen.hdf5')


def new_model(opt):
    """The untrained network of the flags; seeded, so --fromscratch gives the same weights in every mode."""
    torch.manual_seed(opt.seed)
    return build_model(model_config(opt), pretrained=not opt.fromscratch)


def initialised_model(opt):
    """A new network whose NetVLAD layer is initialised from the cluster file."""
    model = new_model(opt)
    if opt.pooling == 'netvlad':
        path = centroids_path(opt)
        if not os.path.isfile(path):
            raise UserError(f'Cluster file {path} does not exist. Run the cluster mode first with the same flags: '
                            f'python main.py --mode=cluster --arch={opt.arch} --dataset={opt.dataset} '
                            f'--num_clusters={opt.num_clusters} --dataPath={opt.dataPath}')
        with h5py.File(path, 'r') as h5:
            model.pool.init_from_clusters(h5['centroids'][:], h5['descriptors'][:])
    return model


def sample_local_descriptors(model, dataset, opt, device):
    """DESCRIPTORS_PER_IMAGE random L2-normalised local descriptors from each of enough random database images."""
    rng = np.random.default_rng(opt.seed)
    with torch.inference_mode():
        feature_map = model.encoder(dataset[0][0].unsqueeze(0).to(device))
    locations = feature_map.shape[2] * feature_map.shape[3]
    per_image = min(DESCRIPTORS_PER_IMAGE, locations)
    num_images = min(math.ceil(NUM_DESCRIPTORS / per_image), dataset.db_struct.numDb)
    image_indices = np.sort(rng.choice(dataset.db_struct.numDb, num_images, replace=False))
    loader = image_loader(Subset(dataset, image_indices.tolist()), opt, opt.cacheBatchSize)
    generator = torch.Generator().manual_seed(opt.seed)
    samples = []
    with torch.inference_mode(), tqdm(total=num_images, desc='local descriptors', unit='img') as progress:
        for images, _ in loader:
            features = model.encoder(images.to(device)).flatten(2).float().cpu()  # [B, D, HW]
            features = torch.nn.functional.normalize(features, p=2, dim=1)
            chosen = torch.rand(len(features), locations, generator=generator).argsort(dim=1)[:, :per_image]
            samples.append(torch.gather(features.transpose(1, 2), 1,
                                        chosen.unsqueeze(2).expand(-1, -1, features.shape[1])).reshape(-1,
                                                                                                     features.shape[1]))
            progress.update(len(images))
    return torch.cat(samples).numpy()


def cluster(opt):
    if opt.pooling != 'netvlad':
        raise UserError(f'--mode=cluster initialises NetVLAD; --pooling={opt.pooling} needs no clusters.')
    make_deterministic(opt.seed)
    device = select_device(opt)
    started = time.time()
    dataset = load_dataset(opt, 'train')
    model = new_model(opt).to(device).eval()
    descriptors = sample_local_descriptors(model, dataset, opt, device)
    logging.info('Clustering %d descriptors of dimension %d into %d centroids', *descriptors.shape,
                 opt.num_clusters)
    kmeans = faiss.Kmeans(descriptors.shape[1], opt.num_clusters, niter=KMEANS_ITERATIONS, seed=opt.seed,
                          verbose=False)
    kmeans.train(descriptors)
    path = centroids_path(opt)
    write_centroids(path, descriptors, kmeans.centroids)
    logging.info('====> Wrote %d centroids to %s in %.1f s', opt.num_clusters, path, time.time() - started)


def write_centroids(path, descriptors, centroids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = path + '.tmp'
    with h5py.File(tmp_path, 'w') as h5:
        h5.create_dataset('descriptors', data=descriptors.astype(np.float32))
        h5.create_dataset('centroids', data=centroids.astype(np.float32))
    os.replace(tmp_path, path)
