"""Encoders (VGG16, AlexNet cut as in the NetVLAD paper) and the full image-to-descriptor network."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from netvlad_toolkit.model.netvlad import GlobalPool, NetVLAD
from netvlad_toolkit.utils.commons import UserError

# The input every model takes: RGB in [0, 1], normalised with the ImageNet mean and standard deviation.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Per architecture: the torchvision builder, its ImageNet weights, the output widths of its convs, the names of its
# convs by their index in `features` (as the authors name them), and the first one that trains with ImageNet weights
# (the reference's rule: layers before conv5 stay frozen).
ARCHS = {
    'vgg16': dict(builder=torchvision.models.vgg16, weights='VGG16_Weights', imagenet_first_trainable='conv5_1',
                  channels=[64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
                  conv_names={'conv1_1': 0, 'conv1_2': 2, 'conv2_1': 5, 'conv2_2': 7, 'conv3_1': 10, 'conv3_2': 12,
                              'conv3_3': 14, 'conv4_1': 17, 'conv4_2': 19, 'conv4_3': 21, 'conv5_1': 24,
                              'conv5_2': 26, 'conv5_3': 28}),
    'alexnet': dict(builder=torchvision.models.alexnet, weights='AlexNet_Weights', imagenet_first_trainable='conv5',
                    channels=[64, 192, 384, 256, 256],
                    conv_names={'conv1': 0, 'conv2': 3, 'conv3': 6, 'conv4': 8, 'conv5': 10}),
}
# Students of --mode=distill: a torchvision network cut before its classifier (its layers in order, as `layers`
# lists them) and the width of its last feature map (which, with the first conv, tells them apart in a state dict:
# see student_arch).
STUDENTS = {
    'mobilenet_v3_large': dict(builder=torchvision.models.mobilenet_v3_large, weights='MobileNet_V3_Large_Weights',
                               channels=960, layers=lambda net: list(net.features)),
    'mobilenet_v3_small': dict(builder=torchvision.models.mobilenet_v3_small, weights='MobileNet_V3_Small_Weights',
                               channels=576, layers=lambda net: list(net.features)),
    'resnet18': dict(builder=torchvision.models.resnet18, weights='ResNet18_Weights', channels=512,
                     layers=lambda net: [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                         net.layer3, net.layer4]),
}

# A student's output stride: 32 is its torchvision network as built; 16 is the stride of the conv5 maps of VGG16 and
# AlexNet, the grid a teacher's pooling sees (see halve_output_stride).
STUDENT_STRIDES = (16, 32)
NATIVE_STUDENT_STRIDE = 32

POOLINGS = ('netvlad', 'max', 'avg')


def layer_index(arch, name, flag='--backPropToLayer'):
    """Encoder index of the conv called `name` (conv5, conv5_1, ...); a UserError naming the flag otherwise."""
    names = ARCHS[arch]['conv_names']
    if name not in names:
        raise UserError(f'{flag}={name} is not a conv layer of {arch}: use one of {", ".join(names)} (training '
                        f'starts at that layer; the layers before it stay frozen).')
    return names[name]


def layer_name(arch, index):
    """The name of the encoder layer at `index` (conv5, conv5_1, ...; encoder.<index> for a layer that is no conv)."""
    names = {i: name for name, i in ARCHS[arch]['conv_names'].items()} if arch in ARCHS else {}
    return names.get(index, f'encoder.{index}')


def first_trainable_index(opt):
    """Encoder index of the first layer a new run trains: --backPropToLayer, else the reference's rule (from conv5
    with ImageNet weights, every layer with --fromscratch)."""
    if getattr(opt, 'backPropToLayer', None):
        return layer_index(opt.arch, opt.backPropToLayer)
    return 0 if opt.fromscratch else layer_index(opt.arch, ARCHS[opt.arch]['imagenet_first_trainable'])


def trainable_layers_text(model):
    """One line naming the first layer of `model` that trains (a model with `arch` and `frozen_layers`)."""
    if model.frozen_layers == 0:
        return f'Every encoder layer trains (from {layer_name(model.arch, 0)})'
    return (f'First trainable layer: {layer_name(model.arch, model.frozen_layers)} (encoder index '
            f'{model.frozen_layers}); the layers before it are frozen')


def torchvision_network(arch, spec, pretrained):
    """torchvision's network `arch` (spec: its ARCHS or STUDENTS entry), with its ImageNet weights when
    `pretrained` (read from torch.hub's cache of checkpoints, as torchvision does)."""
    weights = getattr(torchvision.models, spec['weights']).IMAGENET1K_V1 if pretrained else None
    try:
        return spec['builder'](weights=weights)
    except Exception as error:  # download or file error: no network here, or a damaged cache
        raise UserError(
            f'Could not load the ImageNet weights of {arch} ({type(error).__name__}: {error}). Without network '
            f'access, either train from random weights with --fromscratch, or copy the file '
            f'{weights.url.rsplit("/", 1)[-1]} into {torch.hub.get_dir()}/checkpoints/ and run again.') from None


def build_encoder(arch, pretrained, channels=None):
    """torchvision `features` without its last ReLU and max-pool; `channels` rebuilds convs with pruned widths."""
    features = torchvision_network(arch, ARCHS[arch], pretrained).features
    encoder = nn.Sequential(*list(features.children())[:-2])
    if channels is not None:
        set_conv_widths(encoder, channels)
    return encoder


def build_student_encoder(student, pretrained, dim, output_stride=NATIVE_STUDENT_STRIDE):
    """The student network's layers up to its last feature map (at `output_stride`: 32 or 16), then a 1x1 conv
    projecting that map to the teacher's local width `dim`, so that the teacher's pooling (and whitening) can follow
    it."""
    spec = STUDENTS[student]
    layers = nn.Sequential(*spec['layers'](torchvision_network(student, spec, pretrained)))
    if output_stride != NATIVE_STUDENT_STRIDE:
        halve_output_stride(layers)
    return nn.Sequential(*layers, nn.Conv2d(spec['channels'], dim, kernel_size=1))


def halve_output_stride(network):
    """Output stride 32 -> 16 as DeepLab does, in place and with the same weights: every conv whose output is at
    stride 32 runs at stride 1, and those wider than 1x1 are dilated by 2, so that each still sees the image region
    it was trained on (for MobileNetV3 this is torchvision's own `dilated=True` network)."""
    side = 2 * NATIVE_STUDENT_STRIDE
    strides, hooks = {}, []
    for conv in (module for module in network.modules() if isinstance(module, nn.Conv2d)):
        hooks.append(conv.register_forward_hook(
            lambda conv, inputs, output: strides.__setitem__(conv, side // output.shape[-1])))
    meta_output(network, (2, 3, side, side))
    for hook in hooks:
        hook.remove()
    for conv in (conv for conv, stride in strides.items() if stride == NATIVE_STUDENT_STRIDE):
        conv.stride = (1, 1)
        if conv.kernel_size != (1, 1):
            conv.dilation = (2, 2)
            conv.padding = tuple(2 * (size - 1) // 2 for size in conv.kernel_size)


def meta_output(module, shape):
    """The output of `module` for an input of `shape`, on the meta device: shapes only, no weights read and no
    arithmetic (batch norm in training mode needs two images or more)."""
    meta = {name: torch.empty_like(value, device='meta') for name, value in module.state_dict(keep_vars=True).items()}
    return torch.func.functional_call(module, meta, (torch.empty(*shape, device='meta'),))


def conv_indices(encoder):
    return [i for i, layer in enumerate(encoder) if isinstance(layer, nn.Conv2d)]


def set_conv_widths(encoder, channels):
    """Replace each conv by one with the given output widths (and matching input widths), same geometry."""
    in_channels = 3
    for index, out_channels in zip(conv_indices(encoder), channels):
        old = encoder[index]
        encoder[index] = nn.Conv2d(in_channels, out_channels, old.kernel_size, old.stride, old.padding)
        in_channels = out_channels


class InputNormalization(nn.Module):
    """The project's input (ImageNet-normalised RGB) re-normalised as a network trained elsewhere expects it:
    (RGB * scale - mean) / std, e.g. the NetVLAD authors' 0-255 pixels minus their average image.

    Inside the model, so that every mode and the ONNX graph apply it without asking how the run was made; before the
    first conv, so that its zero padding is the source network's. `mean` and `std` are persistent buffers: the state
    dict names them (`input_norm.mean`, `input_norm.std`, in units of `scale`) and the architecture reads them back."""

    scale = 255.0

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.register_buffer('mean', torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer('std', torch.as_tensor(std, dtype=torch.float32).clone())
        self.register_buffer('imagenet_mean', torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer('imagenet_std', torch.tensor(IMAGENET_STD), persistent=False)

    def extra_repr(self):
        return f'mean={self.mean.tolist()}, std={self.std.tolist()}, scale={self.scale:g}'

    def record(self):
        """The preprocessing as plain numbers: {'mean', 'std', 'scale'}."""
        return dict(mean=self.mean.tolist(), std=self.std.tolist(), scale=self.scale)

    def forward(self, images):
        channel = lambda values: values.view(1, -1, 1, 1)
        rgb = images * channel(self.imagenet_std) + channel(self.imagenet_mean)  # [B, 3, H, W] in [0, 1]
        return (rgb * self.scale - channel(self.mean)) / channel(self.std)


class EmbedNet(nn.Module):
    """Image [B, 3, H, W] -> [input re-normalisation] -> encoder -> pooling -> optional PCA whitening ->
    L2-normalised descriptor.

    `frozen_layers`: the encoder index of the first layer that trains; the layers before it do not."""

    def __init__(self, encoder, pool, frozen_layers=0, whiten=None, arch=None, input_norm=None):
        super().__init__()
        if input_norm is not None:
            self.input_norm = input_norm
        self.encoder = encoder
        self.pool = pool
        self.arch = arch
        if whiten is not None:
            self.whiten = whiten
        self.set_first_trainable(frozen_layers)

    def set_first_trainable(self, index):
        """Freeze the encoder layers before `index`, let every other layer train (parameters are named by their
        layer's index, '<index>.weight', in the encoder and in its exported programs)."""
        self.frozen_layers = index
        for name, parameter in self.encoder.named_parameters():
            position = name.split('.')[0]
            if position.isdigit():
                parameter.requires_grad_(int(position) >= index)
        return self

    @property
    def output_dim(self):
        return self.whiten.out_features if hasattr(self, 'whiten') else self.pool.output_dim

    def frozen_trunk(self, images):
        """Output [B, C, h', w'] of the input re-normalisation, if any, and the frozen leading encoder layers."""
        if hasattr(self, 'input_norm'):
            images = self.input_norm(images)
        return self.encoder[:self.frozen_layers](images)

    def features(self, images):
        """Local features [B, D, h, w]; frozen leading layers run without autograd."""
        if self.frozen_layers and torch.is_grad_enabled():
            with torch.no_grad():
                images = self.frozen_trunk(images)
            return self.encoder[self.frozen_layers:](images)
        if hasattr(self, 'input_norm'):
            images = self.input_norm(images)
        return self.encoder(images)

    def feature_grid(self, height, width):
        """(h, w) of the local features of images of height x width, from shapes alone: the encoder run on the meta
        device (no weights read, no arithmetic; two images, so that BatchNorm in training mode accepts a 1x1 map);
        an encoder that cannot run there (an int8 program) runs on one blank image."""
        try:
            return tuple(meta_output(self.encoder, (2, 3, height, width)).shape[2:])
        except (NotImplementedError, RuntimeError, TypeError):
            parameter = next(self.parameters(), None)
            device = parameter.device if parameter is not None else torch.device('cpu')
            with torch.inference_mode():
                return tuple(self.features(torch.zeros(1, 3, height, width, device=device)).shape[2:])

    def forward_from_trunk(self, trunk_output):
        """The descriptor from the output of `frozen_trunk`: the trainable layers only."""
        return self.describe(self.encoder[self.frozen_layers:](trunk_output))

    def aggregate(self, features):
        descriptor = self.pool(features)
        if hasattr(self, 'whiten'):
            descriptor = F.normalize(self.whiten(descriptor), p=2, dim=1)
        return descriptor

    def describe(self, features):
        with torch.autocast(features.device.type, enabled=False):  # aggregation stays in float32
            return self.aggregate(features.float())

    def forward(self, images):
        return self.describe(self.features(images))


def build_model(config, pretrained=False):
    """The network described by a config dict (see `model_config`); the encoder layers before
    config['first_trainable'] (default 0) are frozen."""
    if config['arch'] in STUDENTS:
        encoder = build_student_encoder(config['arch'], pretrained, config['local_dim'],
                                        config.get('output_stride', NATIVE_STUDENT_STRIDE))
    else:
        encoder = build_encoder(config['arch'], pretrained, config.get('encoder_channels'))
    pool, whiten = build_head(config)
    input_norm = InputNormalization() if config.get('input_norm') else None
    model = EmbedNet(encoder, pool, config.get('first_trainable', 0), whiten, config['arch'], input_norm)
    if config['arch'] in STUDENTS:  # what its weights cannot show, for model_state to record
        model.output_stride = config.get('output_stride', NATIVE_STUDENT_STRIDE)
    return model


def build_head(config):
    """The pooling layer and the optional PCA-whitening layer that a config describes (untrained)."""
    dim = config.get('local_dim') or (config.get('encoder_channels') or ARCHS[config['arch']]['channels'])[-1]
    if config['pooling'] == 'netvlad':
        pool = NetVLAD(config['num_clusters'], dim, vladv2=config['vladv2'])
    else:
        pool = GlobalPool(dim, config['pooling'])
    whiten = nn.Linear(pool.output_dim, config['pca_dim']) if config.get('pca_dim') else None
    return pool, whiten


def trunk(model):
    """Image -> local features as one module (input re-normalisation and encoder), e.g. to export or quantise."""
    return nn.Sequential(model.input_norm, model.encoder) if hasattr(model, 'input_norm') else model.encoder


def model_config(opt):
    """The architecture the flags ask for."""
    return dict(arch=opt.arch, pooling=opt.pooling, num_clusters=opt.num_clusters, vladv2=opt.vladv2,
                encoder_channels=None, pca_dim=None, first_trainable=first_trainable_index(opt), input_norm=False)


def config_from_checkpoint(checkpoint, pooling, path):
    """The architecture a checkpoint dict (`path`) holds: its state dict's, with the pooling it names (else
    `pooling`) and a distilled student's output stride (32 in runs written before students had a choice)."""
    config = config_from_state_dict(checkpoint['state_dict'], checkpoint.get('pooling', pooling))
    if config['arch'] in STUDENTS:
        config['output_stride'] = checkpoint.get('output_stride', NATIVE_STUDENT_STRIDE)
        if config['output_stride'] not in STUDENT_STRIDES:
            raise UserError(f'Checkpoint {path} holds a {config["arch"]} student with output_stride='
                            f'{config["output_stride"]!r}; a student of --mode=distill has one of '
                            f'{", ".join(map(str, STUDENT_STRIDES))}.')
    return config


def config_from_state_dict(state_dict, pooling):
    """The architecture a state dict holds, read from its key names and weight shapes (the reference stores none)."""
    student = student_arch(state_dict)
    if student is not None:  # a distilled student: its own layers, a projection to the teacher's width, its head
        return dict(arch=student, encoder_channels=None, local_dim=state_dict[projection_key(state_dict)].shape[0],
                    input_norm=False, **head_config(state_dict, pooling))
    first_conv = state_dict['encoder.0.weight']
    arch = 'alexnet' if first_conv.shape[-1] == 11 else 'vgg16'
    conv_weights = [v for k, v in state_dict.items() if k.startswith('encoder.') and v.dim() == 4]
    encoder_channels = [w.shape[0] for w in conv_weights]
    return dict(arch=arch, encoder_channels=None if encoder_channels == ARCHS[arch]['channels'] else encoder_channels,
                input_norm='input_norm.mean' in state_dict, **head_config(state_dict, pooling))


def head_config(state_dict, pooling):
    """The pooling and whitening a state dict holds."""
    centroids = state_dict.get('pool.centroids')
    whiten = state_dict.get('whiten.weight')
    return dict(pooling='netvlad' if centroids is not None else pooling,
                num_clusters=centroids.shape[0] if centroids is not None else None,
                vladv2='pool.conv.bias' in state_dict, pca_dim=whiten.shape[0] if whiten is not None else None)


def projection_key(state_dict):
    """The state-dict key of a student's projection (its last encoder layer, a 1x1 conv)."""
    last = max(int(key.split('.')[1]) for key in state_dict if key.startswith('encoder.'))
    return f'encoder.{last}.weight'


def student_arch(state_dict):
    """The student a state dict holds (by its first conv and its projection's input width), or None."""
    if 'encoder.0.weight' in state_dict and state_dict['encoder.0.weight'].shape[-1] != 7:
        return None  # VGG16 (3x3) and AlexNet (11x11) start with a plain conv, ResNet18 with a 7x7 one
    projection = state_dict.get(projection_key(state_dict))
    if projection is None or projection.dim() != 4 or projection.shape[-1] != 1:
        return None
    if 'encoder.0.weight' in state_dict:
        return 'resnet18'
    return {spec['channels']: name for name, spec in STUDENTS.items()}.get(projection.shape[1])
