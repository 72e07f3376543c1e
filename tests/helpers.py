"""Independent reference computations for the tests, written from the paper and the data layout, not from the code
under test: NetVLAD with a loop over clusters, AlexNet's conv trunk from its weights, image loading, positives and
recall by brute force."""
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

# The real Pittsburgh 30k test geometry, beside the repository (never part of it).
REAL_GEOMETRY = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'pitts30k_test_geometry' / 'pitts30k_test.mat'


def netvlad_reference(x, weight, bias, centroids, normalize_input=True):
    """The paper's NetVLAD, one cluster at a time, in float64 torch (differentiable).

    x [B, D, H, W]; weight [K, D] and bias [K] (or None) of the soft-assignment; centroids [K, D]. Returns [B, K*D].
    """
    x, weight, centroids = x.double(), weight.double(), centroids.double()
    batch, dim = x.shape[:2]
    local = x.reshape(batch, dim, -1)  # [B, D, N]
    if normalize_input:
        local = local / local.pow(2).sum(dim=1, keepdim=True).sqrt()
    logits = torch.einsum('kd,bdn->bkn', weight, local)
    if bias is not None:
        logits = logits + bias.double()[None, :, None]
    assign = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    assign = assign / assign.sum(dim=1, keepdim=True)  # softmax over clusters: [B, K, N]
    rows = []
    for k in range(len(centroids)):
        residuals = local - centroids[k][None, :, None]  # x_i - c_k: [B, D, N]
        v_k = (assign[:, k:k + 1, :] * residuals).sum(dim=2)  # [B, D]
        rows.append(v_k / v_k.pow(2).sum(dim=1, keepdim=True).sqrt())  # intra-normalisation
    vlad = torch.cat(rows, dim=1)  # cluster-major: [v_1, v_2, ..., v_K]
    return vlad / vlad.pow(2).sum(dim=1, keepdim=True).sqrt()


def alexnet_trunk(images, state):
    """AlexNet `features` up to conv5 before its ReLU (torchvision indices 0, 3, 6, 8, 10), from a state dict."""
    w = {k: v.double() for k, v in state.items()}
    x = images.double()
    x = F.max_pool2d(F.relu(F.conv2d(x, w['encoder.0.weight'], w['encoder.0.bias'], stride=4, padding=2)), 3, 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, w['encoder.3.weight'], w['encoder.3.bias'], padding=2)), 3, 2)
    x = F.relu(F.conv2d(x, w['encoder.6.weight'], w['encoder.6.bias'], padding=1))
    x = F.relu(F.conv2d(x, w['encoder.8.weight'], w['encoder.8.bias'], padding=1))
    return F.conv2d(x, w['encoder.10.weight'], w['encoder.10.bias'], padding=1)


def read_image(path):
    """An RGB image as [3, H, W] float64, normalised with the ImageNet mean and standard deviation."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert('RGB'), dtype=np.float64) / 255.0
    pixels = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def read_geometry(mat_path):
    """Names and UTM of a dbStruct file, read directly with scipy: (db names, utm_db [N,2], q names, utm_q [M,2])."""
    fields = scipy.io.loadmat(mat_path)['dbStruct'][0, 0]
    names = lambda cell: [str(c[0][0]) if isinstance(c[0], np.ndarray) else str(c[0]) for c in cell]
    return names(fields[1]), fields[2].T.astype(np.float64), names(fields[3]), fields[4].T.astype(np.float64)


def brute_force_positives(utm_db, utm_q, radius):
    """For each query, the set of database indices within `radius` metres, from the full distance matrix."""
    dist = np.sqrt(((utm_q[:, None, :] - utm_db[None, :, :]) ** 2).sum(axis=2))
    return [set(np.flatnonzero(row <= radius).tolist()) for row in dist]


def brute_force_recalls(db_desc, q_desc, positives, ns):
    """Recall@N from the full distance matrix: share of queries with a positive among their N nearest."""
    dist = ((q_desc[:, None, :] - db_desc[None, :, :]) ** 2).sum(axis=2)
    ranking = np.argsort(dist, axis=1, kind='stable')
    return {n: float(np.mean([bool(set(ranking[q, :n].tolist()) & positives[q]) for q in range(len(q_desc))]))
            for n in ns}


def error_paragraph(stderr):
    """The one 'Error: ...' paragraph of a failed run's stderr (progress bars aside); fails on a traceback."""
    assert 'Traceback' not in stderr, stderr
    paragraphs = [p for p in stderr.replace('\r', '\n').split('\n') if p.startswith('Error:')]
    assert len(paragraphs) == 1, stderr
    return paragraphs[0]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob('*') if p.is_file())


def reference_quantization(weight):
    """int8 per-output-channel symmetric quantisation, from its definition: scale = max|w| / 127.5."""
    scale = (weight.abs().amax(dim=(1, 2, 3)) / 127.5).clamp_min(2 ** -12)
    return torch.clamp(torch.round(weight / scale[:, None, None, None]), -128, 127).to(torch.int8), scale
