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
        batch, dim = x.shape[:2]
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)
        features = x.flatten(2)  # [B, D, HW]
        # the 1x1 conv as one matrix product: its backward is cheaper than the conv's on CPUs
        logits = torch.matmul(self.conv.weight.reshape(self.num_clusters, dim), features)  # [B, K, HW]
        if self.conv.bias is not None:
            logits = logits + self.conv.bias.unsqueeze(1)
        soft_assign = F.softmax(logits, dim=1)
        # sum_i a_k(x_i) x_i  -  c_k sum_i a_k(x_i)
        vlad = torch.bmm(soft_assign, features.transpose(1, 2))  # [B, K, D]
        vlad = vlad - self.centroids.unsqueeze(0) * soft_assign.sum(dim=2, keepdim=True)
        vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation
        return F.normalize(vlad.reshape(batch, -1), p=2, dim=1)


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
