"""The NetVLAD layer against the paper's equations (a float64 loop over clusters), its two initialisations against
numpy, its gradients, and the global poolings."""
import math

import numpy as np
import pytest
import torch

from helpers import netvlad_reference
from netvlad_toolkit.model.netvlad import GlobalPool, NetVLAD


def make_layer(vladv2, normalize_input=True, num_clusters=8, dim=16, seed=0):
    torch.manual_seed(seed)
    layer = NetVLAD(num_clusters, dim, vladv2=vladv2, normalize_input=normalize_input)
    with torch.no_grad():  # assignment weights large enough that the softmax is neither uniform nor one-hot
        layer.conv.weight.normal_(0, 2.0)
        if vladv2:
            layer.conv.bias.normal_(0, 1.0)
        layer.centroids.normal_(0, 0.3)
    return layer


def layer_params(layer):
    weight = layer.conv.weight[:, :, 0, 0]
    return weight, layer.conv.bias, layer.centroids


def relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize('vladv2', [False, True], ids=['v1', 'v2'])
@pytest.mark.parametrize('normalize_input', [True, False])
def test_forward_matches_paper_equations(vladv2, normalize_input):
    layer = make_layer(vladv2, normalize_input)
    x = torch.randn(3, 16, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x)
        expected = netvlad_reference(x, *layer_params(layer), normalize_input=normalize_input)
    assert out.shape == (3, 8 * 16) and out.dtype == torch.float32
    assert relative_error(out, expected) <= 1e-5
    # every cluster's block is unit length before the final L2, so each block has norm 1/sqrt(K) after it
    block_norms = out.reshape(3, 8, 16).norm(dim=2)
    assert torch.allclose(block_norms, torch.full_like(block_norms, 1 / math.sqrt(8)), atol=1e-5)


def test_forward_realistic_shape():
    """K=64, D=256 on a feature map of AlexNet's size at 120x160: float32 layer vs float64 reference."""
    torch.manual_seed(3)
    layer = NetVLAD(64, 256)
    centroids = torch.nn.functional.normalize(torch.randn(64, 256), dim=1)
    descriptors = torch.nn.functional.normalize(torch.randn(2000, 256), dim=1)
    layer.init_from_clusters(centroids.numpy(), descriptors.numpy())
    x = torch.relu(torch.randn(2, 256, 7, 9))
    with torch.no_grad():
        out = layer(x)
        expected = netvlad_reference(x, *layer_params(layer))
    assert relative_error(out, expected) <= 1e-5


def v1_init_reference(centroids, descriptors):
    c = centroids.astype(np.float64)
    unit = c / np.linalg.norm(c, axis=1, keepdims=True)
    dots = unit @ descriptors.astype(np.float64).T  # [K, N]
    top = -np.sort(-dots, axis=0)  # descending over clusters, per descriptor
    alpha = -np.log(0.01) / np.mean(top[0] - top[1])
    return alpha * unit


def v2_init_reference(centroids, descriptors):
    c, d = centroids.astype(np.float64), descriptors.astype(np.float64)
    sq_dist = ((d[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)  # [N, K]
    nearest = np.sort(sq_dist, axis=1)[:, :2]  # each descriptor's two nearest centroids (the authors' yael_nn)
    alpha = -np.log(0.01) / np.mean(nearest[:, 1] - nearest[:, 0])
    return 2 * alpha * c, -alpha * (c ** 2).sum(axis=1)


def cluster_data(seed=0, k=8, dim=16, n=400):
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(n, dim))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    centroids = descriptors[rng.choice(n, k, replace=False)] * 0.8 + rng.normal(0, 0.05, size=(k, dim))
    return centroids.astype(np.float32), descriptors.astype(np.float32)


def test_init_from_clusters_v1():
    centroids, descriptors = cluster_data()
    layer = NetVLAD(8, 16, vladv2=False)
    layer.init_from_clusters(centroids, descriptors)
    assert layer.conv.bias is None
    np.testing.assert_allclose(layer.conv.weight[:, :, 0, 0].detach().numpy(),
                               v1_init_reference(centroids, descriptors), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.centroids.detach().numpy(), centroids)


def test_init_from_clusters_v2():
    centroids, descriptors = cluster_data(seed=1)
    layer = NetVLAD(8, 16, vladv2=True)
    layer.init_from_clusters(centroids, descriptors)
    weight, bias = v2_init_reference(centroids, descriptors)
    np.testing.assert_allclose(layer.conv.weight[:, :, 0, 0].detach().numpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.conv.bias.detach().numpy(), bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(layer.centroids.detach().numpy(), centroids)


def test_v2_init_assigns_like_nearest_centroid():
    """With v2 weights the assignment logit is -alpha*||x - c_k||^2 + alpha*||x||^2: its argmax is the nearest c_k."""
    centroids, descriptors = cluster_data(seed=2)
    layer = NetVLAD(8, 16, vladv2=True, normalize_input=False)
    layer.init_from_clusters(centroids, descriptors)
    x = torch.from_numpy(descriptors[:50]).T.reshape(1, 16, 50, 1)
    with torch.no_grad():
        logits = layer.conv(x)[0, :, :, 0]  # [K, 50]
    sq_dist = ((descriptors[:50, None, :] - centroids[None]) ** 2).sum(axis=2)  # [50, K]
    np.testing.assert_array_equal(logits.argmax(dim=0).numpy(), sq_dist.argmin(axis=1))


@pytest.mark.parametrize('vladv2', [False, True], ids=['v1', 'v2'])
@pytest.mark.parametrize('normalize_input', [True, False])
def test_gradients_match_reference(vladv2, normalize_input):
    """The layer's hand-written backward equals autograd through the per-cluster float64 reference."""
    layer = make_layer(vladv2, normalize_input)
    x = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    probe = torch.randn(2, 8 * 16, generator=torch.Generator().manual_seed(5))
    out = layer(x)
    assert 'NetVLADFunction' in type(out.grad_fn).__name__  # the hand-written backward, not autograd's
    (out * probe).sum().backward()
    params = [p for p in (layer.conv.weight, layer.conv.bias, layer.centroids) if p is not None]
    got = [x.grad] + [p.grad for p in params]

    ref_x = x.detach().double().requires_grad_()
    ref_params = [p.detach().double().requires_grad_() for p in params]
    weight = ref_params[0][:, :, 0, 0]
    bias = ref_params[1] if vladv2 else None
    reference = netvlad_reference(ref_x, weight, bias, ref_params[-1], normalize_input=normalize_input)
    (reference * probe.double()).sum().backward()
    expected = [ref_x.grad] + [p.grad for p in ref_params]
    for actual, wanted in zip(got, expected):
        assert relative_error(actual, wanted) <= 1e-4


def test_gradients_realistic_shape():
    """K=64, D=256 on AlexNet's feature map at 120x160, with ReLU features and a k-means-like init: the float32
    hand-written backward against the float64 reference's autograd."""
    torch.manual_seed(8)
    layer = NetVLAD(64, 256)
    layer.init_from_clusters(torch.nn.functional.normalize(torch.randn(64, 256), dim=1).numpy(),
                             torch.nn.functional.normalize(torch.randn(2000, 256), dim=1).numpy())
    x = torch.relu(torch.randn(3, 256, 7, 9)).requires_grad_()
    probe = torch.randn(3, 64 * 256)
    (layer(x) * probe).sum().backward()
    ref_x = x.detach().double().requires_grad_()
    ref_weight = layer.conv.weight.detach()[:, :, 0, 0].double().requires_grad_()
    ref_centroids = layer.centroids.detach().double().requires_grad_()
    (netvlad_reference(ref_x, ref_weight, None, ref_centroids) * probe.double()).sum().backward()
    for actual, wanted in [(x.grad, ref_x.grad), (layer.conv.weight.grad[:, :, 0, 0], ref_weight.grad),
                           (layer.centroids.grad, ref_centroids.grad)]:
        assert relative_error(actual, wanted) <= 1e-4


def test_inference_path_matches_training_path():
    """Under no_grad the layer skips the autograd.Function: both paths give the same descriptor."""
    layer = make_layer(vladv2=True)
    x = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        inference = layer(x)
    training = layer(x)
    assert training.grad_fn is not None and inference.grad_fn is None
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize('vladv2', [False, True], ids=['v1', 'v2'])
def test_gradcheck_double(vladv2):
    layer = make_layer(vladv2, num_clusters=3, dim=4).double()
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6),
                    requires_grad=True)
    params = [p for p in (layer.conv.weight, layer.conv.bias, layer.centroids) if p is not None]

    def function(x, *values):
        return torch.func.functional_call(layer, dict(zip(
            ['conv.weight', 'conv.bias', 'centroids'] if vladv2 else ['conv.weight', 'centroids'], values)), (x,))

    assert torch.autograd.gradcheck(function, (x, *[p.detach().clone().requires_grad_() for p in params]))


@pytest.mark.parametrize('mode', ['max', 'avg'])
def test_global_pool(mode):
    x = torch.randn(3, 10, 4, 6, generator=torch.Generator().manual_seed(7))
    pool = GlobalPool(10, mode)
    array = x.double().numpy().reshape(3, 10, -1)
    pooled = array.max(axis=2) if mode == 'max' else array.mean(axis=2)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(pool(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert pool.output_dim == 10


def test_output_dim_and_repr():
    layer = NetVLAD(64, 512, vladv2=True)
    assert layer.output_dim == 64 * 512
    assert 'K=64' in repr(layer) and 'D=512' in repr(layer) and 'v2' in repr(layer)
