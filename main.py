"""NetVLAD toolkit entry point: reads the flags and runs one mode. Everything else lives in the module of its concern."""
import argparse
import logging
import os
import sys

from commons import UserError, setup_logging, user_error_text

MODES = ['cluster', 'train', 'test', 'prune', 'quantize', 'pca', 'synth', 'demo', 'report']
SPLITS = ['test', 'val', 'train', 'test250k', 'val250k', 'train250k']
# Model-shape flags: when a checkpoint is loaded its own values are used, unless the user gave the flag.
MODEL_DEFAULTS = dict(arch='vgg16', pooling='netvlad', num_clusters=64)


def build_parser():
    p = argparse.ArgumentParser(description='NetVLAD for visual place recognition (Pittsburgh 30k/250k).')
    p.add_argument('--mode', required=True, choices=MODES, help='What to run.')
    data = p.add_argument_group('data')
    data.add_argument('--dataset', default='pittsburgh', choices=['pittsburgh', 'synthetic'],
                      help='pittsburgh: the real data in --dataPath; synthetic: the built-in generated dataset, '
                           'written into --dataPath (default ./synthetic_data) when not there yet.')
    data.add_argument('--dataPath', default=None,
                      help='Folder holding datasets/pitts30k_*.mat and the images (default: the current folder; '
                           './synthetic_data for --dataset synthetic).')
    data.add_argument('--runsPath', default='.', help='Folder for run folders and the results file.')
    data.add_argument('--savePath', default=None,
                      help='Run folder of a new training run (default: <arch>_netvlad_checkpoint/'
                           '<arch>_netvlad_checkpoint under --runsPath).')
    data.add_argument('--split', default='val', choices=SPLITS, help='Split to evaluate in test mode.')
    data.add_argument('--resize', default=None, type=_size,
                      help='Resize every image to HEIGHTxWIDTH (default: full size).')
    data.add_argument('--synth_db', type=int, default=300,
                      help='Synthetic: database images of the val and test splits (train gets twice as many).')
    data.add_argument('--synth_queries', type=int, default=150,
                      help='Synthetic: queries of the val and test splits (train gets twice as many).')
    data.add_argument('--synth_imsize', default='120x160', help='Synthetic: image size HEIGHTxWIDTH.')

    model = p.add_argument_group('model')
    model.add_argument('--arch', default=None, choices=['vgg16', 'alexnet'], help='Encoder (default vgg16).')
    model.add_argument('--pooling', default=None, choices=['netvlad', 'max', 'avg'],
                       help='Global pooling (default netvlad).')
    model.add_argument('--num_clusters', type=int, default=None, help='NetVLAD clusters K (default 64).')
    model.add_argument('--vladv2', action='store_true', help='NetVLAD v2: assignment with bias, v2 init.')
    model.add_argument('--fromscratch', action='store_true',
                       help='Random encoder weights, all layers train (no ImageNet weights needed).')
    model.add_argument('--resume', default='', help='Run folder to load: DIR/checkpoints/checkpoint.pth.tar.')
    model.add_argument('--ckpt', default='latest', choices=['latest', 'best'],
                       help='Which checkpoint of --resume to load.')
    model.add_argument('--unsafe_load', action='store_true',
                       help='Load checkpoints with pickle (weights_only=False); only for files you trust.')

    run = p.add_argument_group('execution')
    run.add_argument('--nGPU', type=int, default=1, help='GPUs to use; 0 or no CUDA runs on the CPU.')
    run.add_argument('--nocuda', action='store_true', help='Run on the CPU even when CUDA is present.')
    run.add_argument('--threads', type=int, default=8, help='DataLoader workers (capped at the CPU count).')
    run.add_argument('--seed', type=int, default=123, help='Random seed: the same seed gives the same run.')
    run.add_argument('--cacheBatchSize', type=int, default=24, help='Batch size for descriptor extraction.')
    run.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                     help='Autocast precision of the encoder (bf16 uses AMX on recent x86 CPUs).')

    train = p.add_argument_group('training')
    train.add_argument('--batchSize', type=int, default=4, help='Queries per batch (each with 1+1+nNeg images).')
    train.add_argument('--cacheRefreshRate', type=int, default=1000,
                       help='Recompute the training descriptor cache every this many queries (0: once per epoch).')
    train.add_argument('--nEpochs', type=int, default=30, help='Epochs to train.')
    train.add_argument('--optim', default='SGD', choices=['SGD', 'ADAM'], help='Optimiser.')
    train.add_argument('--lr', type=float, default=0.0001, help='Learning rate.')
    train.add_argument('--lrStep', type=int, default=5, help='Epochs between learning-rate decays (SGD).')
    train.add_argument('--lrGamma', type=float, default=0.5, help='Learning-rate decay factor (SGD).')
    train.add_argument('--weightDecay', type=float, default=0.001, help='Weight decay.')
    train.add_argument('--momentum', type=float, default=0.9, help='SGD momentum.')
    train.add_argument('--margin', type=float, default=0.1,
                       help='Triplet margin m; the loss uses sqrt(m) on plain L2 distances, as the reference.')
    train.add_argument('--nNeg', type=int, default=10, help='Hard negatives per query.')
    train.add_argument('--nNegSample', type=int, default=1000, help='Random negatives to mine from per query.')
    train.add_argument('--evalEvery', type=int, default=1, help='Validate every this many epochs.')
    train.add_argument('--patience', type=int, default=10,
                       help='Stop after this many validations without a better Recall@5 (0: never).')
    return p


def _size(text):
    from synthetic import parse_size
    return parse_size(text)


def parse_options(argv=None):
    parser = build_parser()
    opt = parser.parse_args(argv)
    opt.explicit = explicit_flags(parser, argv)
    for flag, default in MODEL_DEFAULTS.items():
        if getattr(opt, flag) is None:
            setattr(opt, flag, default)
    if opt.dataPath is None:
        opt.dataPath = 'synthetic_data' if opt.dataset == 'synthetic' else '.'
    if opt.savePath is None:
        opt.savePath = os.path.join(opt.runsPath, f'{opt.arch}_netvlad_checkpoint', f'{opt.arch}_netvlad_checkpoint')
    opt.cuda = not opt.nocuda and opt.nGPU > 0
    return opt


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (so that they can win over stored or checkpoint values)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != 'help':
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                kwargs['action'] = 'store_true'
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_known_args(argv)[0]))


def run(opt):
    if opt.dataset == 'synthetic' and opt.mode not in ('report',):
        from synthetic import ensure_synthetic
        ensure_synthetic(opt)
    if opt.mode == 'synth':
        return None
    if opt.mode == 'cluster':
        from cluster import cluster
        return cluster(opt)
    if opt.mode == 'test':
        from evaluate import test
        return test(opt)
    if opt.mode == 'train':
        from train import train
        return train(opt)
    if opt.mode == 'prune':
        from prune import prune
        return prune(opt)
    if opt.mode == 'quantize':
        from quantize import quantize
        return quantize(opt)
    if opt.mode == 'pca':
        from pca import pca
        return pca(opt)
    if opt.mode == 'demo':
        from demo import demo
        return demo(opt)
    from results import report
    return report(opt)


def main(argv=None):
    try:
        opt = parse_options(argv)
        setup_logging(rank=int(os.environ.get('RANK', 0)))
        run(opt)
    except UserError as error:
        print(f'Error: {user_error_text(error)}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
