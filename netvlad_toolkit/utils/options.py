"""The flag groups several modes share, and the parser they are declared in. Each mode module's add_flags(parser)
calls the groups it reads and adds its own flags; main.py builds one mode's parser from them."""
import argparse
import math
import re

from netvlad_toolkit.utils.commons import UserError, parse_size

SPLITS = ['test', 'val', 'train', 'test250k', 'val250k', 'train250k', 'tokyo247', 'tokyoTM_train', 'tokyoTM_val',
          'msls_val']


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one paragraph (usage aside), as every other bad input of the toolkit."""

    def __init__(self, mode, **kwargs):
        self.flags = set()  # every option string declared, in this parser or its groups (-h, --help included)
        super().__init__(allow_abbrev=False, **kwargs)  # a flag of another mode must not pass for one of this mode
        self.mode = mode

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags.update(action.option_strings)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        declare = group.add_argument

        def add_argument(*names, **options):
            action = declare(*names, **options)
            self.flags.update(action.option_strings)
            return action
        group.add_argument = add_argument
        return group

    def error(self, message):
        message = re.sub(r'^argument (--\w+)(?:/[^:]*)?: (\S+ is outside)', r'\1=\2', message)  # --lr=0 is outside...
        message = re.sub(r'^argument (--\w+)(?:/[^:]*)?: ', r'\1: ', message)
        raise UserError(f'{message[0].upper()}{message[1:]}. See python main.py --mode={self.mode} --help.')


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help with its default, where it has one, or marked required."""

    def _get_help_string(self, action):
        if action.required:
            return f'Required. {action.help}'
        shown = action.default not in (None, False, '', argparse.SUPPRESS) and action.option_strings
        return f'{action.help} (default: {default_text(action.default)})' if shown else action.help


def default_text(value):
    return 'x'.join(map(str, value)) if isinstance(value, tuple) else str(value)


def number_in(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite number of `kind` (int or float) in [low, high] (an end open when asked; None:
    unbounded). Its `bounds` and `ends` attributes say the range."""
    ends = ('(' if low_open else '[') + ('-inf' if low is None else str(low)) + ', ' + \
        ('inf' if high is None else str(high)) + (')' if high_open or high is None else ']')

    def inside(value):
        return math.isfinite(value) and (low is None or value > low or (value == low and not low_open)) and \
            (high is None or value < high or (value == high and not high_open))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}')
        if not inside(value):
            raise argparse.ArgumentTypeError(f'{text} is outside {ends}: give a finite number in that range')
        return value
    parse.__name__ = kind.__name__
    parse.kind, parse.bounds, parse.ends = kind, (low, high, low_open, high_open), ends
    return parse


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = number_in(int, 0), number_in(int, 1), number_in(float, 0, low_open=True)
FRACTION_OPEN = number_in(float, 0, 1, low_open=True, high_open=True)


def image_size(text):
    try:
        return parse_size(text)
    except UserError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip('.'))


def add_common_flags(p):
    """Flags every mode reads."""
    group = p.add_argument_group('common')
    group.add_argument('--runsPath', default='.', help='Folder for run folders and the results file.')
    group.add_argument('--nGPU', type=AT_LEAST_0, default=1, help='GPUs to use; 0 or no CUDA runs on the CPU.')
    group.add_argument('--nocuda', action='store_true', help='Run on the CPU even when CUDA is present.')
    group.add_argument('--seed', type=number_in(int, 0, 2 ** 32 - 1), default=123,
                       help='Random seed: the same seed gives the same run.')


def add_data_path_flags(p, purpose):
    group = p.add_argument_group('data')
    group.add_argument('--dataset', default='pittsburgh', choices=['pittsburgh', 'synthetic', 'tokyoTM', 'folder', 'msls'],
                       help=purpose)
    group.add_argument('--dataPath', default=None,
                       help='Folder holding the dataset: datasets/*.mat and the images for dbStruct datasets, '
                            'images/<split>/ for --dataset folder, train_val/ for msls (default: the current folder; '
                            './synthetic_data for --dataset synthetic).')
    return group


def add_synthetic_flags(group):
    group.add_argument('--synth_db', type=number_in(int, 2), default=300,
                       help='Synthetic: database images of the val and test splits (train gets twice as many).')
    group.add_argument('--synth_queries', type=AT_LEAST_1, default=150,
                       help='Synthetic: queries of the val and test splits (train gets twice as many).')
    group.add_argument('--synth_imsize', default='120x160', help='Synthetic: image size HEIGHTxWIDTH.')


def add_dataset_flags(p, split=False):
    """The dataset a mode reads images and ground truth from; `split`: the mode evaluates on --split."""
    group = add_data_path_flags(
        p, 'pittsburgh: dbStruct files in --dataPath/datasets (Pittsburgh 30k/250k; --split tokyo247 reads '
           'tokyo247.mat); tokyoTM: Tokyo Time Machine dbStructs (train and val are tokyoTM_train/val.mat); synthetic: '
           'the built-in generated dataset, written into --dataPath (default ./synthetic_data) when not there yet; '
           'folder: the VPR-datasets-downloader layout <dataPath>/images/<split>/{database,queries}/ with '
           '@UTM_east@UTM_north@...@.jpg names; msls: Mapillary SLS (<dataPath>/train_val/<city>/...).')
    group.add_argument('--imagesPath', default=None,
                       help='dbStruct datasets: the folder holding the images, when it is not --dataPath (e.g. the '
                            'Tokyo 24/7 root with images/ and query/, or the Tokyo Time Machine root with images/).')
    if split:
        group.add_argument('--split', default='val', choices=SPLITS,
                           help='Split to evaluate (training always reads train and val). dbStruct datasets: '
                                'test/val/train (pitts30k), test250k/..., tokyo247 (Tokyo 24/7 protocol), '
                                'tokyoTM_train/tokyoTM_val; folder: train/val/test; msls: msls_val (cph and sf, the '
                                'dataset\'s validation protocol), val (the same), train.')
    group.add_argument('--positive_dist_threshold', type=ABOVE_0, default=25,
                       help='Folder and MSLS datasets: metres within which a database image is a correct match '
                            '(and never a training negative). dbStruct files carry their own (posDistThr).')
    group.add_argument('--train_positives_dist_threshold', type=ABOVE_0, default=10,
                       help='Folder and MSLS datasets: metres within which a database image is a training positive.')
    group.add_argument('--panorama_suppression', default='auto', choices=['auto', 'on', 'off'],
                       help='Rank panoramas, not images: keep the best-ranked database image of each panorama before '
                            'counting Recall@N (Tokyo 24/7 protocol: 12 consecutive cutouts per panorama in '
                            'tokyo247.mat, the pano_id field of folder-format names). auto: on for Tokyo 24/7 only.')
    group.add_argument('--resize', default=None, type=image_size,
                       help='Resize every image to HEIGHTxWIDTH (default: full size).')
    add_synthetic_flags(group)


def add_centroids_source_flags(p):
    """Modes that take any run and, without --resume, the off-the-shelf network initialised from a dataset's
    centroids."""
    add_data_path_flags(p, 'Without --resume: the dataset whose centroids (written by --mode=cluster under --dataPath) '
                           'initialise the off-the-shelf network.')


def add_network_flags(p, trains=False):
    """The network's shape; `trains`: the mode trains it (--backPropToLayer)."""
    group = p.add_argument_group('model')
    group.add_argument('--arch', default=None, choices=['vgg16', 'alexnet'], help='Encoder (default vgg16).')
    group.add_argument('--pooling', default=None, choices=['netvlad', 'max', 'avg'],
                       help='Global pooling (default netvlad).')
    group.add_argument('--num_clusters', type=number_in(int, 2, 16384), default=None,
                       help='NetVLAD clusters K (default 64).')
    group.add_argument('--vladv2', action='store_true', help='NetVLAD v2: assignment with bias, v2 init.')
    group.add_argument('--fromscratch', action='store_true',
                       help='Random encoder weights, all layers train (no ImageNet weights needed).')
    if trains:
        group.add_argument('--backPropToLayer', default=None, metavar='LAYER',
                           help='First encoder layer that trains, by name as the authors\' trainWeakly.m: '
                                'conv1..conv5 (AlexNet) or conv1_1..conv5_3 (VGG16); the layers before it stay frozen. '
                                'Default: conv5 (AlexNet) / conv5_1 (VGG16) with ImageNet weights, every layer with '
                                '--fromscratch. Stored in the run: resume, prune fine-tuning and QAT keep the run\'s '
                                'layer unless this flag is given (on --resume it cannot change).')
    return group


def add_run_flags(p, required=False):
    """The run folder a mode loads."""
    group = p.add_argument_group('run folder')
    group.add_argument('--resume', default='', required=required,
                       help='Run folder to load: DIR/checkpoints/checkpoint.pth.tar.')
    group.add_argument('--ckpt', default='latest', choices=['latest', 'best'], help='Which checkpoint of --resume to load.')
    group.add_argument('--unsafe_load', action='store_true',
                       help='Load checkpoints with full pickle (weights_only=False, which can run code) without '
                            'checking their zip, and int8 runs of the former torch.export layout (encoder_int8.pt2); '
                            'only for files you trust.')


def add_overwrite_flag(p):
    p.add_argument('--overwrite', action='store_true',
                   help='Replace an existing output run folder as a whole (without it, an existing one is refused).')


def add_extraction_flags(p):
    """Flags of every mode that runs the network over images."""
    group = p.add_argument_group('extraction')
    group.add_argument('--threads', type=AT_LEAST_0, default=8, help='DataLoader workers (capped at the CPU count).')
    group.add_argument('--cacheBatchSize', type=AT_LEAST_1, default=24, help='Batch size for descriptor extraction.')
    group.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                       help='Autocast precision of the encoder (bf16 uses AMX on recent x86 CPUs).')


def add_search_flags(p):
    """Flags of every mode that searches a split's database and counts Recall@N."""
    group = p.add_argument_group('search')
    group.add_argument('--index', default='flat', choices=['flat', 'ivfpq', 'hnsw'],
                       help='Exact (flat) or approximate faiss index (IVF-PQ or HNSW, built on the database '
                            'descriptors).')
    group.add_argument('--compare_exact', action='store_true',
                       help='With --index ivfpq|hnsw: also run the exact search and log the recall the approximate '
                            'index loses.')
    add_cache_path_flag(group)
    group.add_argument('--desc_dtype', default='float32', choices=['float32', 'float16'],
                       help='Storage of the descriptor files: float16 halves disk and I/O; the search is float32.')


def add_cache_path_flag(group):
    group.add_argument('--cachePath', default=None,
                       help='Folder for descriptor files during the run (default: a new temporary folder); they are '
                            'deleted afterwards, except the parts written under torchrun.')


def add_latency_flags(p, optional):
    """`optional`: the mode times its models only when --latency is given (else it always does)."""
    group = p.add_argument_group('latency')
    if optional:
        group.add_argument('--latency', action='store_true',
                           help='Also time the CPU latency per image at --latency_size (one thread, process CPU time) '
                                'and record it in the results file.')
    group.add_argument('--latency_size', default='480x640', type=image_size,
                       help='Image size HEIGHTxWIDTH at which models are timed.')


def add_calibration_flag(group):
    group.add_argument('--calib_images', type=AT_LEAST_1, default=256,
                       help='Training-database images used to calibrate int8 activations.')


def add_image_folder_flags(group):
    """Flags of the modes that describe folders of arbitrary photos (extract, query), named as hloc's."""
    group.add_argument('--resize_max', type=number_in(int, 32), default=None,
                       help='Shrink images whose longest side exceeds this many pixels to it (aspect kept); smaller '
                            'images stay as they are.')
    group.add_argument('--skip_unreadable', action='store_true',
                       help='Leave out images that cannot be decoded, with a warning naming each (default: stop at the '
                            'first one with an error naming it).')
    group.add_argument('--as_half', action='store_true',
                       help='Store descriptors as float16 (half the file; the search is float32).')


def int_list(text):
    """An argparse type: comma-separated integers of at least 1, as Patch-NetVLAD's configs write them (2,5,8)."""
    try:
        values = tuple(int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of integers (e.g. 2,5,8)')
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f'{text} holds a value below 1: patch sizes and strides are in feature-map '
                                         f'cells, at least 1')
    return values


def float_list(text):
    """An argparse type: comma-separated finite numbers (0.45,0.15,0.4)."""
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of numbers (e.g. 0.45,0.15,0.4)')
    if not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f'{text} holds a value that is not finite')
    return values


def add_rerank_flags(p):
    """Patch-NetVLAD re-ranking of the global search's candidates (test, query). The per-setting flags carry the
    names of Patch-NetVLAD's config keys and override the chosen config's value."""
    group = p.add_argument_group('Patch-NetVLAD re-ranking')
    group.add_argument('--rerank', default='none', choices=['none', 'patch'],
                       help='patch: re-order the global search\'s top --rerank_top candidates of each query by '
                            'Patch-NetVLAD\'s patch matching score (needs a PCA-whitened run: --mode=pca).')
    group.add_argument('--rerank_top', type=AT_LEAST_1, default=100, help='Candidates re-ranked per query.')
    group.add_argument('--rerank_config', default='performance', choices=['performance', 'speed', 'storage'],
                       help='Patch-NetVLAD\'s configs: performance (patches 2,5,8, 4096-D, RANSAC), speed (5, '
                            '512-D, rapid spatial scoring), storage (5, 128-D, rapid spatial scoring).')
    group.add_argument('--patch_sizes', type=int_list, default=None, metavar='S1,S2,...',
                       help='Side of the square patches, in feature-map cells (default: the config\'s).')
    group.add_argument('--strides', type=int_list, default=None, metavar='T1,T2,...',
                       help='Step between patches of each size, in cells (default: the config\'s).')
    group.add_argument('--patchWeights2Use', type=float_list, default=None, metavar='W1,W2,...',
                       help='Fusion weight of each patch size\'s score (default: the config\'s).')
    group.add_argument('--num_pcs', type=AT_LEAST_1, default=None,
                       help='Dimension of the whitened patch descriptors, at most the run\'s PCA dimension (default: '
                            'the config\'s).')
    group.add_argument('--matcher', default=None, choices=['RANSAC', 'spatialApproximator'],
                       help='Spatial scoring of the matched patches (default: the config\'s).')
    group.add_argument('--output_features_dir', default=None,
                       help='Folder of the database\'s patch-feature store (default: beside the global descriptors: '
                            'RUN/patch_features/<split> in test mode; in query mode beside a --database .h5, or '
                            'RUN/query_database for a database folder).')


def add_evaluating_flags(p, trains=False, run_required=False):
    """Flags of the modes that load a run and evaluate it on --split (test, pca, prune, quantize, export): the
    common ones, the dataset with --split, the model, the run folder, extraction and search."""
    add_common_flags(p)
    add_dataset_flags(p, split=True)
    add_network_flags(p, trains=trains)
    add_run_flags(p, required=run_required)
    add_extraction_flags(p)
    add_search_flags(p)


def add_describing_flags(p):
    """Flags of the modes that describe arbitrary photos with any run (extract, query)."""
    add_common_flags(p)
    add_centroids_source_flags(p)
    add_network_flags(p)
    add_run_flags(p)
    add_extraction_flags(p)
