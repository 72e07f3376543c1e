"""--mode=prune: structured or unstructured pruning of the encoder, triplet fine-tuning, and a before/after report.

Structured pruning removes a fraction A of the output channels of each chosen encoder convolution, for real: the
conv keeps fewer filters, the next conv loses the matching input channels and, when the last conv is pruned,
NetVLAD's assignment `conv` weight and its `centroids` lose the matching columns, so the local-descriptor size D and
the descriptor size K*D shrink by about the same fraction. The channel surgery is written here rather than taken from
Torch-Pruning (DepGraph): both encoders are plain chains Conv -> ReLU -> [MaxPool] -> Conv, so the only dependency
of a conv's output channels is the next conv (or NetVLAD after the last one), which a few lines handle; NetVLAD
needs a rule of its own in Torch-Pruning anyway, and the project gains no dependency.

Each layer keeps (1 - A) of its channels rounded to the nearest multiple of 8 (so A = 0.2 keeps 48 of 64, 208 of
256): CPU kernels are blocked by channels, and odd widths lose much of the speed-up. The report gives the widths.
Importance of a channel (--pruning_criterion): by default its activation, the mean square of the conv's output
channel (after the ReLU that follows it, if any) over CRITERION_IMAGES training-database images, computed once on
the unpruned model; the weakest channels are removed, since they contribute least to what the next layer (or
NetVLAD) receives. The alternative, `l2`, ranks filters by the L2 norm of their weights (Li et al., "Pruning Filters
for Efficient ConvNets", ICLR 2017), each layer from its weights that remain after the previous layer's surgery.
On the demo's trained AlexNet (synthetic data, test Recall@1 0.767) the activation criterion kept Recall@1 at 0.753
after pruning 0.2 without any fine-tuning, where L2 fell to 0.593 (0.5: 0.533 against 0.387): a model trained
briefly from random weights keeps filter norms close to their random start, so the norm says little.
A model with a PCA-whitening layer is refused when the last conv is pruned: whitening was fitted to the full
descriptor and cannot follow a smaller one (exclude the last conv with --pruning_layers, or redo PCA afterwards).

Unstructured pruning zeroes the smallest-magnitude weights of the chosen convs with `torch.nn.utils.prune`, over all
of them at once (--pruning_scope=global) or the same fraction per layer (layer). The masks stay on during
fine-tuning, so sparsity is kept, and are then made permanent. Dense kernels still run, so there is no speed-up;
the checkpoint stores each pruned weight packed (a bit mask of its nonzero entries and their values), so the file
shrinks. `checkpoint.read_checkpoint` unpacks it.

Fine-tuning is the real triplet training (`training.fit`, --finetune_epochs), from the run's first trainable layer
(or --backPropToLayer), on the train split, validating on val, at --lr: give the rate the model was trained at.
On the demo's model (trained at Adam 1e-5), one epoch at 1e-5 recovered structured 0.5 from Recall@1 0.533 to 0.773
(trained: 0.767), one at a tenth of it only to 0.587, and distilling the unpruned model's descriptors at that tenth
(loss + ||f_pruned - f_unpruned||^2 on the kept channels) to 0.560 (benchmarks/README.md). The final
weights are kept (no choice of the best epoch), and the model before and after is evaluated on --split, which
nothing is calibrated or tuned on. The pruned run folder `<resume>_pruned_<type>_<percent>/` holds
`checkpoints/checkpoint.pth.tar` (test mode reads the pruned architecture from its weight shapes) and
`prune_report.json`: parameters, MACs, file size (of the model alone: the input run's file may also hold optimizer
state), CPU latency per image (both models timed in alternating rounds, median) and Recall@N, before and after.
"""
import copy
import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
from tqdm import tqdm

from netvlad_toolkit.datasets.datasets import load_dataset, training_database_sample
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import conv_indices
from netvlad_toolkit.runs.measure import (
    LATENCY_TEXT,
    compare,
    count_macs,
    count_parameters,
    directory_size,
    interleaved_latency,
    model_bytes,
)
from netvlad_toolkit.runs.results import append_result
from netvlad_toolkit.runs.runs import (
    apply_backprop_flag,
    check_derived_target,
    check_float_run,
    copy_flags,
    derived_run_folder,
    open_run,
)
from netvlad_toolkit.search.retrieval import evaluate, log_recalls
from netvlad_toolkit.training.training import add_compressing_flags, apply_recipe, fit, training_splits
from netvlad_toolkit.utils.commons import (
    UserError,
    building_folder,
    make_deterministic,
    plural,
    select_device,
    setup_logging,
)
from netvlad_toolkit.utils.options import (
    AT_LEAST_0,
    FRACTION_OPEN,
)

# Layers between two convs of the encoders: they act on each channel alone, so channels can be removed across them.
CHANNELWISE = (nn.ReLU, nn.MaxPool2d)
PRUNING_TYPES = ('structured', 'unstructured')
# Kept widths are multiples of this: odd widths (51, 205, ...) ran about 10% slower here than the nearest multiple of 8.
CHANNEL_MULTIPLE = 8
PRUNING_CRITERIA = ('activation', 'l2')
# Training-database images whose activations rank the channels (seeded choice).
CRITERION_IMAGES = 64
REPORT_NAME = 'prune_report.json'


# ---------------------------------------------------------------------------------------------- flags

def add_flags(p):
    add_compressing_flags(p)
    group = p.add_argument_group('pruning')
    group.add_argument('--pruning_type', default='structured', choices=PRUNING_TYPES,
                       help='structured: remove whole conv channels (smaller, faster); unstructured: zero individual '
                            'weights by magnitude (stored packed).')
    group.add_argument('--pruning_amount', type=FRACTION_OPEN, default=0.2,
                       help='Fraction of channels (structured) or weights (unstructured) to remove, in (0, 1).')
    group.add_argument('--pruning_layers', default='all',
                       help='Encoder convs to prune: "all", or comma-separated indices into the encoder '
                            '(torchvision features indices, e.g. "3,6,8").')
    group.add_argument('--pruning_criterion', default='activation', choices=PRUNING_CRITERIA,
                       help=f'Structured: rank channels by their mean squared activation on {CRITERION_IMAGES} '
                            'training-database images (activation), or by the L2 norm of their filter weights (l2); '
                            'the lowest go.')
    group.add_argument('--pruning_scope', default='global', choices=['global', 'layer'],
                       help='Unstructured: one magnitude threshold over all layers, or the same fraction per layer.')
    group.add_argument('--finetune_epochs', type=AT_LEAST_0, default=2,
                       help='Epochs of triplet fine-tuning after pruning (0: none).')


def selected_layers(encoder, text):
    """Encoder indices of the convs named by --pruning_layers ("all" or comma-separated indices)."""
    convs = conv_indices(encoder)
    if text.strip().lower() == 'all':
        return convs
    try:
        layers = sorted({int(item) for item in text.split(',')})
    except ValueError:
        layers = None
    if not layers or any(index not in convs for index in layers):
        raise UserError(f'--pruning_layers={text} must be "all" or comma-separated encoder indices of convs; '
                        f'this encoder has convs at {",".join(map(str, convs))}.')
    return layers


def output_folder(opt):
    return derived_run_folder(opt.resume, f'pruned_{opt.pruning_type}_{round(100 * opt.pruning_amount)}')


# ---------------------------------------------------------------------------------------------- structured

def filter_importance(conv):
    """L2 norm of each output filter's weights: [out_channels]."""
    return conv.weight.detach().flatten(1).norm(p=2, dim=1)


def kept_width(channels, amount):
    """(1 - amount) * channels, rounded to the nearest multiple of CHANNEL_MULTIPLE (at least one multiple)."""
    multiple = min(CHANNEL_MULTIPLE, channels)
    return max(multiple, round((1 - amount) * channels / multiple) * multiple)


def criterion_images(opt):
    """CRITERION_IMAGES training-database images (a seeded choice), whose activations rank the channels."""
    return training_database_sample(opt, CRITERION_IMAGES, '--pruning_criterion=activation ranks the channels by '
                                    'their activations')


@torch.no_grad()
def activation_importance(encoder, images):
    """Mean square of each conv's output channels over `images` ([3, H, W] each, sizes may differ), after the ReLU
    that follows the conv if any: {encoder index of the conv: [out_channels]}."""
    convs = conv_indices(encoder)
    # where each conv's output is read: after its ReLU, or the conv itself when nothing follows it (the last conv)
    read_at = {i + 1 if i + 1 < len(encoder) and isinstance(encoder[i + 1], nn.ReLU) else i: i for i in convs}
    totals, count = {}, 0
    device = next(encoder.parameters()).device
    for image in tqdm(images, desc='channel activations', unit='image'):
        x = image.unsqueeze(0).to(device).contiguous(memory_format=torch.channels_last)
        for position, layer in enumerate(encoder):
            x = layer(x)
            if position in read_at:
                totals[read_at[position]] = totals.get(read_at[position], 0) + x.float().pow(2).mean(dim=(0, 2, 3))
        count += 1
    return {index: (total / count).cpu() for index, total in totals.items()}


def channels_to_keep(conv, amount, importance=None):
    """Indices, in order, of the channels kept when about the fraction `amount` of lowest importance is removed
    (importance [out_channels]; the filters' L2 norms when None)."""
    scores = filter_importance(conv) if importance is None else importance
    return scores.topk(kept_width(conv.out_channels, amount)).indices.sort().values


def select_channels(conv, keep, dim):
    """A new conv holding only the output (dim 0) or input (dim 1) channels `keep` of `conv`."""
    weight = conv.weight.detach().index_select(dim, keep)
    bias = conv.bias
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=bias is not None).to(weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.index_select(0, keep) if dim == 0 else bias)
    return new


def shrink_pool_input(model, keep):
    """Keep only the local-descriptor channels `keep` in the pooling layer (NetVLAD: assignment and centroids)."""
    pool = model.pool
    if hasattr(pool, 'centroids'):
        pool.conv = select_channels(pool.conv, keep, dim=1)
        pool.centroids = nn.Parameter(pool.centroids.detach()[:, keep].clone())
    pool.dim = len(keep)


def check_prunable(model, layers, pruning_type):
    """Structured pruning of the last conv would shrink the descriptor a PCA-whitening layer was fitted to."""
    last_conv = conv_indices(model.encoder)[-1]
    if pruning_type == 'structured' and last_conv in layers and hasattr(model, 'whiten'):
        raise UserError('This model has a PCA-whitening layer fitted to the full descriptor, which pruning the last '
                        f'conv ({last_conv}) would shrink. Leave it out of --pruning_layers, or prune the model '
                        'before PCA and fit the whitening afterwards.')


def prune_structured(model, amount, layers, importance=None):
    """Remove about the fraction `amount` of output channels of the encoder convs `layers`, in place, consistently.
    importance: {encoder index: [out_channels]} (activation_importance); None ranks by filter L2 norm."""
    check_prunable(model, layers, 'structured')
    encoder = model.encoder
    convs = conv_indices(encoder)
    original_dim = model.output_dim
    for position, index in enumerate(convs):
        if index not in layers:
            continue
        keep = channels_to_keep(encoder[index], amount, None if importance is None else importance[index])
        encoder[index] = select_channels(encoder[index], keep, dim=0)
        if position + 1 == len(convs):
            shrink_pool_input(model, keep)
            continue
        following = convs[position + 1]
        if not all(isinstance(layer, CHANNELWISE) for layer in encoder[index + 1:following]):
            raise ValueError(f'Encoder layers between convs {index} and {following} mix channels.')
        encoder[following] = select_channels(encoder[following], keep, dim=1)
    model.set_first_trainable(model.frozen_layers)  # the new convs of frozen layers stay frozen
    logging.info('Structured pruning of %.0f%% of the channels (lowest %s) of convs %s: widths %s; '
                 'descriptor size %d -> %d (local descriptor D = %d)', 100 * amount,
                 'filter L2 norm' if importance is None else 'mean squared activation', layers,
                 [encoder[i].out_channels for i in convs], original_dim, model.output_dim, model.pool.dim)
    return model


# ---------------------------------------------------------------------------------------------- unstructured

def add_magnitude_masks(model, amount, layers, scope):
    """Mask the smallest-magnitude weights of the encoder convs `layers` (global or per-layer threshold)."""
    model.to(memory_format=torch.contiguous_format)  # the global threshold flattens weights with .view(-1)
    convs = [model.encoder[index] for index in layers]
    if scope == 'global':
        torch_prune.global_unstructured([(conv, 'weight') for conv in convs], torch_prune.L1Unstructured,
                                        amount=amount)
    else:
        for conv in convs:
            torch_prune.l1_unstructured(conv, 'weight', amount=amount)


def sparsity(model, layers):
    """Share of zero weights of each pruned conv and over all of them: ({key: share}, total share)."""
    weights = {f'encoder.{index}.weight': model.encoder[index].weight.detach() for index in layers}
    per_layer = {key: float((w == 0).sum()) / w.numel() for key, w in weights.items()}
    total = sum(float((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    return per_layer, total


def pack_weight(tensor, position):
    """A sparse weight as a bit mask of its nonzero entries (np.packbits) and their values, row-major."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    nonzero = flat != 0
    return dict(shape=list(tensor.shape), mask=torch.from_numpy(np.packbits(nonzero.numpy())),
                values=flat[nonzero].clone(), position=position)


def packed_state(state, keys):
    """A checkpoint dict whose weights `keys` move, packed, from 'state_dict' to 'packed_state_dict'."""
    dense, packed = {}, {}
    for position, (key, value) in enumerate(state['state_dict'].items()):
        if key in keys:
            packed[key] = pack_weight(value, position)
        else:
            dense[key] = value
    return dict(state, state_dict=dense, packed_state_dict=packed)


# ---------------------------------------------------------------------------------------------- the mode

def fine_tune(model, splits, opt, device, run_dir):
    """Triplet fine-tuning on the train split (validated on val) at --lr; returns the final state."""
    if splits is None:
        logging.info('No fine-tuning (--finetune_epochs=%d).', opt.finetune_epochs)
        return {}
    logging.info('Fine-tuning for %s with the triplet loss on the train split, %s at lr %g',
                 plural(opt.finetune_epochs, 'epoch'), opt.optim, opt.lr)
    return fit(model, splits, opt, device, run_dir=run_dir, num_epochs=opt.finetune_epochs, save=False)


def measure_model(model, dataset, opt, device):
    """Recall@N on --split (on `device`), then parameters and MACs at --latency_size (on the CPU)."""
    model.to(device).to(memory_format=torch.channels_last)
    result = evaluate(model, dataset, opt, device)
    log_recalls(result['recalls'])
    model.cpu().eval()
    nonzero, total = count_parameters(model)
    record = dict(parameters_nonzero=nonzero, parameters_total=total, macs=count_macs(model, opt.latency_size),
                  descriptor_dim=result['descriptor_dim'],
                  encoder_channels=[model.encoder[i].out_channels for i in conv_indices(model.encoder)])
    record.update({f'recall@{n}': recall for n, recall in result['recalls'].items()})
    return record, result


def apply_pruning(model, opt, layers, device, criterion_set):
    """Remove channels (structured; ranked on criterion_set's images, or by filter norm when it is None) or mask
    weights (unstructured, masks kept on for fine-tuning), in place."""
    if opt.pruning_type == 'structured':
        importance = None
        if criterion_set is not None:
            importance = activation_importance(model.encoder.to(device).eval(), (image for image, _ in criterion_set))
        prune_structured(model, opt.pruning_amount, layers, importance)
    else:
        add_magnitude_masks(model, opt.pruning_amount, layers, opt.pruning_scope)


def make_masks_permanent(model, layers, scope):
    """Fold the masks into the weights; returns the sparsity reached, per layer and in total, for the report."""
    for index in layers:
        torch_prune.remove(model.encoder[index], 'weight')
    per_layer, total = sparsity(model, layers)
    logging.info('Unstructured pruning (%s threshold), sparsity per layer:\n%s\ntotal %.4f over the pruned '
                 'layers; dense kernels still run, so expect no speed-up', scope,
                 '\n'.join(f'  {key:<20} {share:.4f}' for key, share in per_layer.items()), total)
    return dict(sparsity=per_layer, sparsity_total=total)


def variant_name(opt):
    return f'pruned {opt.pruning_type} {round(100 * opt.pruning_amount)}%'


def save_pruned(model, opt, run_dir, layers, tuned):
    state = dict(model_state(model), variant=variant_name(opt), epoch=tuned.get('epoch', 0),
                 recalls=tuned.get('recalls', {}),
                 best_score=tuned.get('best_score', 0.0), parallel=False,
                 pruning=dict(type=opt.pruning_type, amount=opt.pruning_amount, layers=layers,
                              scope=opt.pruning_scope, finetune_epochs=opt.finetune_epochs, source=opt.resume))
    if opt.pruning_type == 'unstructured':
        state = packed_state(state, {f'encoder.{index}.weight' for index in layers})
    save_checkpoint(state, run_dir, is_best=False)


def prune(opt):
    make_deterministic(opt.seed)
    device = select_device(opt)
    model, checkpoint = open_run(opt)
    check_float_run(checkpoint, opt.resume, 'prune')
    apply_backprop_flag(model, opt)
    layers = selected_layers(model.encoder, opt.pruning_layers)
    check_prunable(model, layers, opt.pruning_type)
    dataset = load_dataset(opt, opt.split)
    apply_recipe(opt)
    splits = training_splits(opt) if opt.finetune_epochs > 0 else None
    ranks_by_activation = opt.pruning_type == 'structured' and opt.pruning_criterion == 'activation'
    criterion_set = criterion_images(opt) if ranks_by_activation else None
    run_dir = output_folder(opt)
    check_derived_target(run_dir, opt)
    with building_folder(run_dir) as folder:
        setup_logging(folder)  # only now: bad flags or data write nothing
        copy_flags(opt.resume, folder)
        logging.info('Pruning %s (%s, %.0f%%) into %s; evaluating on split %s', opt.resume, opt.pruning_type,
                     100 * opt.pruning_amount, run_dir, opt.split)
        pruned = copy.deepcopy(model)
        apply_pruning(pruned, opt, layers, device, criterion_set)
        before, _ = measure_model(model, dataset, opt, device)
        before['file_bytes'] = model_bytes(model, checkpoint, opt.resume)  # without optimizer state, as saved here
        tuned = fine_tune(pruned, splits, opt, device, folder)
        extra = make_masks_permanent(pruned, layers, opt.pruning_scope) if opt.pruning_type == 'unstructured' else {}
        after, result = measure_model(pruned, dataset, opt, device)
        after.update(extra)
        save_pruned(pruned, opt, folder, layers, tuned)
        after['file_bytes'] = directory_size(folder)
        before['latency_ms'], after['latency_ms'] = interleaved_latency([model, pruned], opt.latency_size)
        report = compare(before, after, os.path.join(folder, REPORT_NAME),
                         f'{opt.pruning_type} pruning of {opt.pruning_amount:g} ({opt.split} split, latency at '
                         f'{opt.latency_size[0]}x{opt.latency_size[1]}, {LATENCY_TEXT})')
    append_result(opt, variant_name(opt), result, after['file_bytes'], after['latency_ms'], run_dir)
    log_summary(report, run_dir)
    return report


def log_summary(report, run_dir):
    before, after, ratio = report['before'], report['after'], report['ratio_after_over_before']
    logging.info('====> Pruned model in %s (report: %s): parameters %.2fx, MACs %.2fx, file %.2fx, %.2fx faster, '
                 'Recall@1 %.4f -> %.4f', run_dir, os.path.join(run_dir, REPORT_NAME), ratio['parameters_nonzero'],
                 ratio['macs'], ratio['file_bytes'], before['latency_ms'] / after['latency_ms'], before['recall@1'],
                 after['recall@1'])

