"""--mode=import: the NetVLAD authors' trained MATLAB networks (VGG16 + NetVLAD + PCA whitening) as a run folder.

The authors released their networks (Pitts30k, Tokyo Time Machine) as MatConvNet objects; netvlad_tf_open's
net_class2struct.m turned them into plain structs, which is how hloc distributes them (Pitts30K_struct.mat,
TokyoTM_struct.mat). Read with scipy.io.loadmat(..., struct_as_record=False, squeeze_me=True), `net` holds:
    layers[i], i = 0..28     VGG16 up to conv5_3 (before its ReLU), at torchvision's `features` indices; each conv's
                             weights = {kernel S x S x IN x OUT, bias OUT}
    layers[29]               preL2: L2 normalisation of each local descriptor (our NetVLAD's normalize_input)
    layers[30]               vlad_core: weights = {assignment D x K (no bias), centroids D x K stored negated, as the
                             layer computes x + C}; the VLAD vector is flattened dimension-major (index d*K + k)
    layers[31], [32]         intra-normalisation, then L2 normalisation
    layers[33]               WPCA: weights = {1 x 1 x K*D x P (squeezed to K*D x P), bias P}, on that flattening
    layers[34]               final L2 normalisation
    meta.normalization.averageImage: the RGB mean subtracted from 0-255 pixels (a 3-vector or an H x W x 3 image
                             after squeeze_me; as hloc, its pixel [0, 0])
The run folder holds a normal checkpoint in the port's layout: `encoder.*`, `pool.conv.weight`, `pool.centroids`
(negated back), `whiten.weight/bias` with the columns permuted to this project's cluster-major order (k*D + d), and
`input_norm.mean/std`: the model re-normalises its usual ImageNet-normalised input to the authors' 0-255 minus
averageImage (models.InputNormalization), so test, pca, prune, quantize, extract and export apply it unasked.

    python main.py --mode=import --matlab Pitts30K_struct.mat --savePath vgg16_netvlad_pitts30k_matlab
"""
import logging
import os

import numpy as np
import scipy.io
import torch

from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import ARCHS, build_model, config_from_state_dict, layer_index
from netvlad_toolkit.runs.runs import check_derived_target
from netvlad_toolkit.utils.commons import UserError, building_folder, setup_logging
from netvlad_toolkit.utils.options import add_common_flags, add_overwrite_flag

VLAD_LAYER = 30
WHITENING_LAYER = 33
# torchvision vgg16().features indices of conv1_1 .. conv5_3: the MATLAB layers at the same indices are those convs
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
LAYOUT = ("the authors' struct export (netvlad_tf_open's net_class2struct.m, as hloc's Pitts30K_struct.mat and "
          "TokyoTM_struct.mat): a struct `net` with `layers` (VGG16 convs at 0..28, NetVLAD at 30, whitening at 33) "
          "and `meta.normalization.averageImage`")


class LayoutError(Exception):
    """What the file lacks; import_network turns it into a UserError naming the file."""


def read_network(path):
    """State dict (this project's names and orders) of the network in a struct .mat file; UserError if malformed."""
    if not os.path.isfile(path):
        raise UserError(f'--matlab {path}: the file does not exist. It should be a NetVLAD network in {LAYOUT}.')
    try:
        mat = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)
    except Exception as error:
        raise UserError(f'--matlab {path} is not a MATLAB .mat file scipy can read ({type(error).__name__}: '
                        f'{error}).') from None
    try:
        return network_state(mat)
    except LayoutError as error:
        raise UserError(f'--matlab {path} is not a NetVLAD network in {LAYOUT}: {error}.') from None


def network_state(mat):
    if 'net' not in mat:
        raise LayoutError('it has no variable `net`')
    net = mat['net']
    layers = np.atleast_1d(attribute(net, 'layers'))
    if len(layers) <= WHITENING_LAYER:
        raise LayoutError(f'net.layers has {len(layers)} layers, but the whitening is layer {WHITENING_LAYER}')
    state = encoder_state(layers)
    dim = state[f'encoder.{VGG16_CONVS[-1]}.bias'].shape[0]
    assignment, negated_centroids = layer_weights(layers, VLAD_LAYER, 'NetVLAD', [(dim, None), (dim, None)])
    if assignment.shape != negated_centroids.shape:
        raise LayoutError(f'net.layers[{VLAD_LAYER}] (NetVLAD): assignment weights {assignment.shape} and centroids '
                          f'{negated_centroids.shape} should both be D x K')
    clusters = assignment.shape[1]
    projection, bias = layer_weights(layers, WHITENING_LAYER, 'whitening', [(dim * clusters, None), (None,)])
    out_dim = projection.shape[1]
    if bias.shape != (out_dim,):
        raise LayoutError(f'net.layers[{WHITENING_LAYER}] (whitening): {out_dim} outputs but a bias of shape '
                          f'{bias.shape}')
    state.update({
        'pool.conv.weight': as_tensor(assignment.T)[:, :, None, None],  # [K, D, 1, 1]
        'pool.centroids': as_tensor(-negated_centroids.T),  # [K, D]
        # rows of `projection` follow the dimension-major flattening d*K + k; ours is cluster-major k*D + d
        'whiten.weight': as_tensor(projection.T.reshape(out_dim, dim, clusters).transpose(0, 2, 1)
                                   .reshape(out_dim, clusters * dim)),
        'whiten.bias': as_tensor(bias),
        'input_norm.mean': as_tensor(average_rgb(net)),
        'input_norm.std': torch.ones(3),
    })
    return state


def attribute(struct, path):
    """struct.<path> for a dotted path below `net`; LayoutError naming the first field that is missing."""
    value, where = struct, 'net'
    for name in path.split('.'):
        if not hasattr(value, name):
            raise LayoutError(f'{where} has no field `{name}`')
        value, where = getattr(value, name), f'{where}.{name}'
    return value


def encoder_state(layers):
    """encoder.<i>.weight [OUT, IN, S, S] and .bias of the VGG16 convs, each checked against the previous one."""
    state, in_channels = {}, 3
    for index in VGG16_CONVS:
        kernel, bias = layer_weights(layers, index, 'VGG16 conv', [(3, 3, in_channels, None), (None,)])
        if bias.shape != (kernel.shape[3],):
            raise LayoutError(f'net.layers[{index}] (VGG16 conv): {kernel.shape[3]} output channels but a bias of '
                              f'shape {bias.shape}')
        state[f'encoder.{index}.weight'] = as_tensor(kernel.transpose(3, 2, 0, 1))  # S x S x IN x OUT -> OUT x IN x S x S
        state[f'encoder.{index}.bias'] = as_tensor(bias)
        in_channels = kernel.shape[3]
    return state


def layer_weights(layers, index, role, shapes):
    """The numeric arrays in the cell net.layers[index].weights, each checked against a shape (None: any size)."""
    layer = layers[index]
    name = f'net.layers[{index}] ({role}{", " + str(layer.name) if hasattr(layer, "name") else ""})'
    if not hasattr(layer, 'weights'):
        raise LayoutError(f'{name} has no field `weights`')
    cell = layer.weights
    weights = list(cell) if isinstance(cell, np.ndarray) and cell.dtype == object else [cell]
    if len(weights) < len(shapes):
        raise LayoutError(f'{name} has {len(weights)} weight arrays; expected {len(shapes)}')
    for position, (array, shape) in enumerate(zip(weights, shapes)):
        array = np.asarray(array)
        if (not np.issubdtype(array.dtype, np.number) or array.ndim != len(shape)
                or any(s is not None and s != a for s, a in zip(shape, array.shape))):
            expected = ' x '.join('any' if s is None else str(s) for s in shape)
            raise LayoutError(f'{name}: weights[{position}] has shape {array.shape} ({array.dtype}); expected a '
                              f'numeric {expected} array')
    return [np.asarray(array) for array in weights[:len(shapes)]]


def average_rgb(net):
    """meta.normalization.averageImage as 3 numbers: a 3-vector, or pixel [0, 0] of an H x W x 3 image."""
    average = np.asarray(attribute(net, 'meta.normalization.averageImage'))
    if not np.issubdtype(average.dtype, np.number):
        raise LayoutError(f'net.meta.normalization.averageImage is not numeric ({average.dtype})')
    if average.ndim == 3 and average.shape[2] == 3:
        return average[0, 0]
    if average.shape == (3,):
        return average
    raise LayoutError(f'net.meta.normalization.averageImage has shape {average.shape}; expected 3 values or an '
                      f'H x W x 3 image')


def as_tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def import_folder(opt):
    """--savePath, or by default <runsPath>/vgg16_netvlad_<file name>."""
    if 'savePath' in opt.explicit:
        return opt.savePath
    name = os.path.splitext(os.path.basename(opt.matlab))[0]
    return os.path.join(opt.runsPath, f'vgg16_netvlad_{name}')


def add_flags(p):
    add_common_flags(p)
    add_overwrite_flag(p)
    p.add_argument('--matlab', required=True, metavar='FILE',
                   help='The NetVLAD authors\' trained network in the struct .mat layout hloc downloads '
                        '(Pitts30K_struct.mat, TokyoTM_struct.mat).')
    p.add_argument('--savePath', default=None,
                   help='The run folder to write (default: vgg16_netvlad_<file name> under --runsPath).')


def import_network(opt):
    run_dir = import_folder(opt)
    check_derived_target(run_dir, opt)
    state_dict = read_network(opt.matlab)
    config = config_from_state_dict(state_dict, 'netvlad')
    # fine-tuning it (prune, QAT) follows the reference's rule for ImageNet-initialised VGG16: conv5_1 onwards
    config['first_trainable'] = layer_index('vgg16', ARCHS['vgg16']['imagenet_first_trainable'])
    model = build_model(config)
    model.load_state_dict(state_dict)
    state = dict(model_state(model), epoch=0, recalls={}, best_score=0.0, parallel=False,
                 variant=f'MATLAB {os.path.basename(opt.matlab)}',
                 imported=dict(source=os.path.abspath(opt.matlab), preprocessing=model.input_norm.record()))
    with building_folder(run_dir) as folder:
        setup_logging(folder)
        save_checkpoint(state, folder, is_best=False)  # one copy: the whitening alone is 512 MB
    logging.info('Imported %s: VGG16%s, NetVLAD K=%d D=%d, whitening %d -> %d, input 0-255 RGB minus %s',
                 opt.matlab, '' if config['encoder_channels'] is None else f' widths {config["encoder_channels"]}',
                 config['num_clusters'], model.pool.dim, model.pool.output_dim, config['pca_dim'],
                 [round(v, 3) for v in model.input_norm.mean.tolist()])
    logging.info('Run folder %s: test it with --mode=test --resume=%s', run_dir, run_dir)
    return dict(run=run_dir, config=config)
