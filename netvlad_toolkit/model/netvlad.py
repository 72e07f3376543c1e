"""The NetVLAD layer (Arandjelovic et al., CVPR 2016) and the simpler global poolings.

The layer follows the paper's equations:
    a_k(x_i)  = softmax_k(w_k . x_i + b_k)                      (soft-assignment)
    V(k, d)   = sum_i a_k(x_i) (x_i(d) - c_k(d))                (weighted residuals)
    V         = L2-normalise each row k (intra-normalisation), flatten cluster-major, L2-normalise.
The residual sums of all clusters come from one batched product, A X^T - (sum_i A) c,
instead of the reference port's loop over clusters.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# F.normalize's floor on a norm
EPS = 1e-12


class NetVLAD(nn.Module):
    """NetVLAD pooling of a [B, D, H, W] feature map into a [B, K*D] descriptor."""

    def __init__(self, num_clusters=64, dim=128, vladv2=False, normalize_input=True):
        super().__init__()
        self.num_clusters = num_clusters
        self.dim = dim
        self.vladv2 = vladv2
        self.normalize_input = normalize_input
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=vladv2)
        self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

    def extra_repr(self):
        return f'K={self.num_clusters}, D={self.dim}, version={"v2" if self.vladv2 else "v1"}'

    @property
    def output_dim(self):
        return self.num_clusters * self.dim

    @torch.no_grad()
    def init_from_clusters(self, centroids, descriptors):
        """Initialise assignment weights from k-means centroids [K, D] and the descriptors [N, D] they came from."""
        centroids = np.asarray(centroids, dtype=np.float32)
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if self.vladv2:
            # as the authors' addLayers.m (yael_nn(clsts, trainDescs, 2)): alpha from the squared distances of
            # each descriptor to its two nearest centroids
            sq_dist = _squared_distances(torch.from_numpy(descriptors), torch.from_numpy(centroids))
            two_nearest = sq_dist.topk(2, dim=1, largest=False).values  # [N, 2]
            alpha = -math.log(0.01) / (two_nearest[:, 1] - two_nearest[:, 0]).mean().item()
            c = torch.from_numpy(centroids)
            self.conv.weight.copy_((2.0 * alpha * c)[:, :, None, None])
            self.conv.bias.copy_(-alpha * c.pow(2).sum(dim=1))
        else:
            unit_centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
            dots = torch.from_numpy(unit_centroids) @ torch.from_numpy(descriptors).T  # [K, N]
            top2 = dots.topk(2, dim=0).values  # [2, N]
            alpha = -math.log(0.01) / (top2[0] - top2[1]).mean().item()
            self.conv.weight.copy_(alpha * torch.from_numpy(unit_centroids)[:, :, None, None])
        self.centroids.copy_(torch.from_numpy(centroids))

    def forward(self, x):
        weight = self.conv.weight.reshape(self.num_clusters, self.dim)
        if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            return _NetVLADFunction.apply(x, weight, self.conv.bias, self.centroids, self.normalize_input)
        return _vlad(x, weight, self.conv.bias, self.centroids, self.normalize_input)[0]


class GlobalPool(nn.Module):
    """Global max or average pooling followed by L2 normalisation: a [B, D] descriptor."""

    def __init__(self, dim, mode):
        super().__init__()
        self.dim = dim
        self.mode = mode

    def extra_repr(self):
        return f'{self.mode}, D={self.dim}'

    @property
    def output_dim(self):
        return self.dim

    def forward(self, x):
        pooled = x.amax(dim=(2, 3)) if self.mode == 'max' else x.mean(dim=(2, 3))
        return F.normalize(pooled, p=2, dim=1)


def _squared_distances(a, b):
    """Squared Euclidean distances between the rows of a [M, D] and b [N, D]: [M, N]."""
    return (a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)).clamp_min(0)


def _vlad(x, weight, bias, centroids, normalize_input):
    """The layer's forward: (descriptor [B, K*D], and what the backward needs: input norms, normalised features,
    their projections W X, soft-assignment, residual sums V and their row norms, descriptor norm)."""
    batch, dim = x.shape[:2]
    features = x.flatten(2)  # [B, D, HW]
    input_norms = None
    if normalize_input:
        input_norms = torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(EPS)  # [B, 1, HW]
        features = features / input_norms
    # the 1x1 conv as one batched product (matmul would copy the features into [B*HW, D] for one big product)
    projections = torch.bmm(weight.expand(batch, -1, -1), features)  # [B, K, HW]
    logits = projections if bias is None else projections + bias.unsqueeze(1)
    soft_assign = F.softmax(logits, dim=1)
    # sum_i a_k(x_i) x_i  -  c_k sum_i a_k(x_i)
    # products with the small operand transposed: bmm copies a transposed [B, HW, D] operand first
    vlad = torch.bmm(features, soft_assign.transpose(1, 2)).transpose(1, 2)  # [B, K, D]
    vlad = vlad - centroids.unsqueeze(0) * soft_assign.sum(dim=2, keepdim=True)
    row_norms = torch.linalg.vector_norm(vlad, dim=2, keepdim=True).clamp_min(EPS)  # [B, K, 1]
    intra = (vlad / row_norms).reshape(batch, -1)  # intra-normalisation, flattened cluster-major
    norm = torch.linalg.vector_norm(intra, dim=1, keepdim=True).clamp_min(EPS)  # [B, 1]
    return intra / norm, (input_norms, features, projections, soft_assign, vlad, row_norms, norm)


def _normalize_backward(grad, unit, norm, dim):
    """Gradient through y = v / ||v|| along `dim`, given dL/dy, y and ||v||: (dL/dy - y <dL/dy, y>) / ||v||."""
    dots = (grad * unit).sum(dim=dim, keepdim=True)
    return torch.addcmul(grad, unit, dots, value=-1).div_(norm)


class _NetVLADFunction(torch.autograd.Function):
    """NetVLAD with a hand-written backward. Autograd's backward of the three L2 normalisations makes about a dozen
    elementwise passes over the [B, D, HW] input; this one makes one, in the input's memory layout, and takes the
    gradients of both products that touch the input from one batched product."""

    @staticmethod
    def forward(ctx, x, weight, bias, centroids, normalize_input):
        out, saved = _vlad(x, weight, bias, centroids, normalize_input)
        input_norms, *kept = saved
        ctx.normalize_input, ctx.has_bias, ctx.input_shape = normalize_input, bias is not None, x.shape
        ctx.save_for_backward(weight, centroids, *kept, out, *(() if input_norms is None else (input_norms,)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weight, centroids, features, projections, soft_assign, vlad, row_norms, norm, out, *input_norms = \
            ctx.saved_tensors
        batch, num_clusters, dim = vlad.shape
        grad_intra = _normalize_backward(grad_out, out, norm, dim=1).reshape(batch, num_clusters, dim)
        grad_vlad = _normalize_backward(grad_intra, vlad / row_norms, row_norms, dim=2)  # [B, K, D]
        # V = A X^T - c (A 1): gradients of the soft-assignment A [B, K, HW] and of the centroids
        grad_vlad_x = torch.bmm(grad_vlad, features)  # [B, K, HW]
        grad_assign = grad_vlad_x - (grad_vlad * centroids).sum(dim=2, keepdim=True)
        grad_centroids = -(grad_vlad * soft_assign.sum(dim=2, keepdim=True)).sum(dim=0)
        # softmax over clusters, then the logits W X (+ b)
        grad_logits = soft_assign * (grad_assign - (soft_assign * grad_assign).sum(dim=1, keepdim=True))
        grad_weight = torch.bmm(features, grad_logits.transpose(1, 2)).sum(dim=0).t()  # [K, D]
        grad_bias = grad_logits.sum(dim=(0, 2)) if ctx.has_bias else None
        # dL/dX = G = grad_V^T A + W^T grad_logits, as one product: [grad_V^T | W^T] [A ; grad_logits]
        left_t = torch.cat([grad_vlad, weight.expand(batch, -1, -1)], dim=1)  # [B, 2K, D]
        right = torch.cat([soft_assign, grad_logits], dim=1)  # [B, 2K, HW]
        if not ctx.normalize_input:
            return _product_like(features, left_t, right).reshape(ctx.input_shape), grad_weight, grad_bias, \
                grad_centroids, None
        # through X = x / ||x||: (G - X <G, X>) / ||x||, where <G, X> = sum_k A (grad_V X) + grad_logits (W X) comes
        # from [B, K, HW] products and 1/||x|| scales the small operand: one pass over [B, D, HW] after the product
        inverse_norms = input_norms[0].reciprocal()  # [B, 1, HW]
        dots = (soft_assign * grad_vlad_x + grad_logits * projections).sum(dim=1, keepdim=True)
        grad_features = _product_like(features, left_t, right * inverse_norms)
        grad_features.addcmul_(features, dots * inverse_norms, value=-1)
        return grad_features.reshape(ctx.input_shape), grad_weight, grad_bias, grad_centroids, None


def _product_like(like, left_t, right):
    """left_t^T right [B, D, HW] laid out in memory as `like` [B, D, HW] (channels last: D varies fastest), so that
    the elementwise passes that combine the two do not stride across each other."""
    if like.stride(1) == 1 and like.shape[1] > 1:
        return torch.bmm(right.transpose(1, 2), left_t).transpose(1, 2)
    return torch.bmm(left_t.transpose(1, 2), right)
