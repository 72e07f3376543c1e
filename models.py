"""Encoders (VGG16, AlexNet cut as in the NetVLAD paper) and the full image-to-descriptor network."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from commons import UserError
from netvlad import GlobalPool, NetVLAD

# Per architecture: the torchvision builder, its ImageNet weights, the feature dimension D of the cut trunk,
# the output widths of its convs, and the index in `features` of the first layer that trains with ImageNet weights.
ARCHS = {
    'vgg16': dict(builder=torchvision.models.vgg16, weights='VGG16_Weights', first_trainable=24,
                  channels=[64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]),
    'alexnet': dict(builder=torchvision.models.alexnet, weights='AlexNet_Weights', first_trainable=10,
                    channels=[64, 192, 384, 256, 256]),
}


def build_encoder(arch, pretrained, channels=None):
    """torchvision `features` without its last ReLU and max-pool; `channels` rebuilds convs with pruned widths."""
    spec = ARCHS[arch]
    weights = getattr(torchvision.models, spec['weights']).IMAGENET1K_V1 if pretrained else None
    try:
        features = spec['builder'](weights=weights).features
    except Exception as error:  # download or file error: no network here, or a damaged cache
        raise UserError(
            f'Could not load the ImageNet weights of {arch} ({type(error).__name__}: {error}). Without network '
            f'access, either train from random weights with --fromscratch, or copy the file '
            f'{weights.url.rsplit("/", 1)[-1]} into {torch.hub.get_dir()}/checkpoints/ and run again.') from None
    encoder = nn.Sequential(*list(features.children())[:-2])
    if channels is not None:
        set_conv_widths(encoder, channels)
    return encoder


def conv_indices(encoder):
    return [i for i, layer in enumerate(encoder) if isinstance(layer, nn.Conv2d)]


def set_conv_widths(encoder, channels):
    """Replace each conv by one with the given output widths (and matching input widths), same geometry."""
    in_channels = 3
    for index, out_channels in zip(conv_indices(encoder), channels):
        old = encoder[index]
        encoder[index] = nn.Conv2d(in_channels, out_channels, old.kernel_size, old.stride, old.padding)
        in_channels = out_channels


class EmbedNet(nn.Module):
    """Image [B, 3, H, W] -> encoder -> pooling -> optional PCA whitening -> L2-normalised descriptor."""

    def __init__(self, encoder, pool, frozen_layers=0, whiten=None):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.frozen_layers = frozen_layers
        if whiten is not None:
            self.whiten = whiten
        if frozen_layers:
            for layer in list(encoder)[:frozen_layers]:
                layer.requires_grad_(False)

    @property
    def output_dim(self):
        return self.whiten.out_features if hasattr(self, 'whiten') else self.pool.output_dim

    def features(self, images):
        """Local features [B, D, h, w]; frozen leading layers run without autograd."""
        if self.frozen_layers and torch.is_grad_enabled():
            with torch.no_grad():
                images = self.encoder[:self.frozen_layers](images)
            return self.encoder[self.frozen_layers:](images)
        return self.encoder(images)

    def aggregate(self, features):
        descriptor = self.pool(features)
        if hasattr(self, 'whiten'):
            descriptor = F.normalize(self.whiten(descriptor), p=2, dim=1)
        return descriptor

    def forward(self, images):
        features = self.features(images)
        with torch.autocast(features.device.type, enabled=False):  # aggregation stays in float32
            return self.aggregate(features.float())


def build_model(config, pretrained=False):
    """The network described by a config dict (see `model_config`)."""
    encoder = build_encoder(config['arch'], pretrained, config.get('encoder_channels'))
    pool, whiten = build_head(config)
    frozen = ARCHS[config['arch']]['first_trainable'] if pretrained else 0
    return EmbedNet(encoder, pool, frozen, whiten)


def build_head(config):
    """The pooling layer and the optional PCA-whitening layer that a config describes (untrained)."""
    dim = (config.get('encoder_channels') or ARCHS[config['arch']]['channels'])[-1]
    if config['pooling'] == 'netvlad':
        pool = NetVLAD(config['num_clusters'], dim, vladv2=config['vladv2'])
    else:
        pool = GlobalPool(dim, config['pooling'])
    whiten = nn.Linear(pool.output_dim, config['pca_dim']) if config.get('pca_dim') else None
    return pool, whiten


def model_config(opt):
    """The architecture the flags ask for."""
    return dict(arch=opt.arch, pooling=opt.pooling, num_clusters=opt.num_clusters, vladv2=opt.vladv2,
                encoder_channels=None, pca_dim=None)


def config_from_state_dict(state_dict, pooling):
    """The architecture a state dict holds, read from its key names and weight shapes (the reference stores none)."""
    first_conv = state_dict['encoder.0.weight']
    arch = 'alexnet' if first_conv.shape[-1] == 11 else 'vgg16'
    conv_weights = [v for k, v in state_dict.items() if k.startswith('encoder.') and v.dim() == 4]
    encoder_channels = [w.shape[0] for w in conv_weights]
    centroids = state_dict.get('pool.centroids')
    whiten = state_dict.get('whiten.weight')
    return dict(arch=arch,
                pooling='netvlad' if centroids is not None else pooling,
                num_clusters=centroids.shape[0] if centroids is not None else None,
                vladv2='pool.conv.bias' in state_dict,
                encoder_channels=None if encoder_channels == ARCHS[arch]['channels'] else encoder_channels,
                pca_dim=whiten.shape[0] if whiten is not None else None)

