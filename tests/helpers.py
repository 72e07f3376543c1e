"""Independent reference computations for the tests, written from the paper and the data layout, not from the code
under test: NetVLAD with a loop over clusters, AlexNet's conv trunk from its weights, image loading, positives and
recall by brute force."""
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import build_model

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


# ---------------------------------------------------------------------------------------------- the authors' MATLAB network

VGG16_LAYER_TYPES = ['conv', 'relu', 'conv', 'relu', 'pool'] * 2 + (['conv', 'relu'] * 3 + ['pool']) * 2 + [
    'conv', 'relu', 'conv', 'relu', 'conv']  # conv1_1 .. conv5_3, as MATLAB layers 0..28


def matlab_network(rng, widths, clusters, out_dim, average_image):
    """The `net` struct of the authors' struct export (net_class2struct.m), as dicts and cells for scipy.io.savemat:
    VGG16 layers 0..28 (kernels S x S x IN x OUT), preL2 at 29, NetVLAD at 30 (assignment D x K, centroids D x K
    negated), intra-normalisation 31, postL2 32, whitening 33 (1 x 1 x D*K x P on the d*K + k flattening), finalL2 34."""
    layers, in_channels, convs = [], 3, iter(widths)
    for index, kind in enumerate(VGG16_LAYER_TYPES):
        if kind == 'conv':
            out_channels = next(convs)
            kernel = rng.normal(0, np.sqrt(2 / (9 * in_channels)), (3, 3, in_channels, out_channels))
            layers.append(dict(name=f'conv{index}', type='conv', pad=1, stride=1,
                               weights=cell([kernel.astype(np.float32),
                                             rng.normal(0, 0.1, out_channels).astype(np.float32)])))
            in_channels = out_channels
        else:
            layers.append(dict(name=f'{kind}{index}', type=kind) if kind == 'relu' else
                          dict(name=f'pool{index}', type='pool', method='max', pool=np.array([2., 2.]), stride=2., pad=0.))
    dim = in_channels
    layers.append(dict(name='preL2', type='normalize', param=np.array([1024, 1e-12, 1, 0.5])))
    layers.append(dict(name='vlad_core', type='custom', K=float(clusters),
                       weights=cell([rng.normal(0, 5, (dim, clusters)).astype(np.float32),
                                     rng.normal(0, 0.1, (dim, clusters)).astype(np.float32)])))
    layers.append(dict(name='vlad_intranorm', type='normalize', param=np.array([2 * dim, 1e-12, 1, 0.5])))
    layers.append(dict(name='postL2', type='custom'))
    layers.append(dict(name='WPCA', type='conv', pad=0., stride=1.,
                       weights=cell([rng.normal(0, 1, (1, 1, dim * clusters, out_dim)).astype(np.float32),
                                     rng.normal(0, 0.01, out_dim).astype(np.float32)])))
    layers.append(dict(name='finalL2', type='custom'))
    return dict(layers=cell(layers), meta=dict(normalization=dict(averageImage=average_image, border=np.array([0, 0]))))


def cell(items):
    """A MATLAB cell array for scipy.io.savemat."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def write_matlab_network(path, net):
    scipy.io.savemat(str(path), {'net': net})


def matlab_forward(net, rgb255):
    """The authors' network from the description, in float64: rgb255 [B, 3, H, W] (0-255) -> descriptor [B, P].

    Subtract averageImage pixel [0, 0]; VGG16 to conv5_3; L2-normalise each local descriptor; soft-assign with the
    D x K weights; sum the assignment-weighted x + C (C: the stored, negated, centroids); L2-normalise each cluster;
    flatten dimension-major (d*K + k); L2-normalise; whiten (x W + b); L2-normalise."""
    unit = lambda t, dim: t / torch.sqrt(t.pow(2).sum(dim=dim, keepdim=True) + 1e-12)
    as64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    average = np.asarray(net['meta']['normalization']['averageImage'], dtype=np.float64)
    average = average[0, 0] if average.ndim == 3 else average
    x = rgb255.double() - as64(average)[None, :, None, None]
    for layer in net['layers'][:29]:
        if layer['type'] == 'conv':
            kernel, bias = layer['weights']
            x = F.conv2d(x, as64(kernel).permute(3, 2, 0, 1), as64(bias), padding=1)  # kernel[h, w, in, out]
        elif layer['type'] == 'relu':
            x = F.relu(x)
        else:
            x = F.max_pool2d(x, 2, 2)
    local = unit(x.flatten(2), 1)  # [B, D, N]
    assignment, centroids = (as64(w) for w in net['layers'][30]['weights'])  # [D, K] each
    soft = torch.softmax(torch.einsum('dk,bdn->bkn', assignment, local), dim=1)  # [B, K, N]
    vlad = torch.einsum('bkn,bdn->bdk', soft, local) + centroids[None] * soft.sum(dim=2)[:, None, :]  # [B, D, K]
    vlad = unit(unit(vlad, 1).reshape(len(vlad), -1), 1)  # intra-normalised, flattened d*K + k
    projection, bias = net['layers'][33]['weights']
    whitened = vlad @ as64(projection).reshape(vlad.shape[1], -1) + as64(bias)
    return unit(whitened, 1)


def free_port():
    """A TCP port on the loopback interface that nothing listens on now (for a torchrun rendezvous)."""
    import socket
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def run_killed(argv, module, function, call, after=False, cwd=None):
    """Run cli.main(argv) in a child process that kills itself (SIGKILL) at the `call`-th call of module.function,
    before that call runs (or right after it returns, with after=True). Returns the child's exit status."""
    import subprocess
    import sys
    import textwrap
    repo = str(Path(__file__).resolve().parents[1])
    code = textwrap.dedent(f'''
        import os, signal, sys
        sys.path.insert(0, {repo!r})
        import importlib
        from netvlad_toolkit import cli
        target = importlib.import_module({module!r})
        original, calls = target.{function}, [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == {call} and not {after}:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if calls[0] == {call} and {after}:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        target.{function} = wrapped
        sys.exit(cli.main({[str(a) for a in argv]!r}))
    ''')
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True).returncode


# Random models of three kinds of run, saved as run folders for the tests of extraction, query and images.
CONFIGS = {
    'float': dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None,
                  pca_dim=None),
    'pruned': dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False,
                   encoder_channels=[48, 160, 320, 200, 192], pca_dim=None),
    'whitened': dict(arch='alexnet', pooling='netvlad', num_clusters=8, vladv2=False, encoder_channels=None,
                     pca_dim=32),
}


def save_run(path, config, seed=0):
    """A run folder holding a random model of `config`; returns the model (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    save_checkpoint(dict(model_state(model), epoch=0, recalls={}, best_score=0.0), str(path), True)
    return model
