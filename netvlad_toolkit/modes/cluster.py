"""--mode=cluster: k-means centroids of local descriptors, the file NetVLAD is initialised from."""
import logging
import math
import time

import faiss
import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.datasets.gpu_decode import image_batches
from netvlad_toolkit.model.centroids import centroids_path, encoder_attributes, new_model, write_centroids
from netvlad_toolkit.utils.commons import UserError, make_deterministic, select_device
from netvlad_toolkit.utils.options import add_common_flags, add_dataset_flags, add_extraction_flags, add_network_flags

NUM_DESCRIPTORS = 50000
DESCRIPTORS_PER_IMAGE = 100
KMEANS_ITERATIONS = 100


def add_flags(p):
    add_common_flags(p)
    add_dataset_flags(p)
    add_network_flags(p)
    add_extraction_flags(p)


def sample_local_descriptors(model, dataset, opt, device):
    """DESCRIPTORS_PER_IMAGE random L2-normalised local descriptors from each of enough random database images."""
    rng = np.random.default_rng(opt.seed)
    with torch.inference_mode():
        feature_map = model.encoder(dataset[0][0].unsqueeze(0).to(device))
    locations = feature_map.shape[2] * feature_map.shape[3]
    per_image = min(DESCRIPTORS_PER_IMAGE, locations)
    num_images = min(math.ceil(NUM_DESCRIPTORS / per_image), dataset.db_struct.numDb)
    image_indices = np.sort(rng.choice(dataset.db_struct.numDb, num_images, replace=False))
    loader, on_device = image_batches(Subset(dataset, image_indices.tolist()), opt, opt.cacheBatchSize, device)
    generator = torch.Generator().manual_seed(opt.seed)
    samples = []
    with torch.inference_mode(), tqdm(total=num_images, desc='local descriptors', unit='img') as progress:
        for batch in loader:
            images, _ = on_device(batch)
            features = model.encoder(images).flatten(2).float().cpu()  # [B, D, HW]
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
    if len(descriptors) < opt.num_clusters:
        raise UserError(f'--num_clusters={opt.num_clusters} is more than the {len(descriptors)} local descriptors '
                        f'sampled from the training database: give fewer clusters.')
    logging.info('Clustering %d descriptors of dimension %d into %d centroids', *descriptors.shape,
                 opt.num_clusters)
    # every descriptor, as the authors' yael_kmeans: faiss would otherwise subsample to 256 per centroid
    kmeans = faiss.Kmeans(descriptors.shape[1], opt.num_clusters, niter=KMEANS_ITERATIONS, seed=opt.seed,
                          verbose=False, max_points_per_centroid=math.ceil(len(descriptors) / opt.num_clusters))
    kmeans.train(descriptors)
    path = centroids_path(opt)
    write_centroids(path, descriptors, kmeans.centroids, encoder_attributes(opt, model.encoder))
    logging.info('====> Wrote %d centroids to %s in %.1f s', opt.num_clusters, path, time.time() - started)

