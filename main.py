"""NetVLAD toolkit entry point: reads the flags and runs one mode; everything else lives in the module of its concern."""
import argparse
import importlib
import math
import os
import shlex
import sys

from commons import (UserError, check_output_path, log_exception_to_file, parse_size, setup_logging, torchrun_process,
                     user_error_text)

# Every mode: the module and function that run it, and one line for --help. The list of modes is this table's keys.
MODE_TABLE = {
    'cluster': ('cluster', 'cluster', 'k-means centroids of local descriptors, which NetVLAD is initialised from'),
    'train': ('train', 'train', 'weakly supervised triplet training (or --resume a run)'),
    'test': ('evaluate', 'test', 'Recall@N of a run (or of the untrained network) on a split'),
    'prune': ('prune', 'prune', 'structured or unstructured pruning, fine-tuned and compared'),
    'quantize': ('quantize', 'quantize', 'int8 quantization (static or QAT), compared'),
    'pca': ('pca', 'pca', 'PCA whitening of the descriptor fitted on training images, compared'),
    'extract': ('extract', 'extract', "descriptors of an image folder in hloc's global-feats HDF5 layout"),
    'pairs': ('pairs', 'pairs', "hloc's retrieval pairs from global-feats files"),
    'query': ('query', 'query', 'where were these photos taken: answers from a database of geotagged images'),
    'synth': ('synthetic', 'synth', 'write the built-in synthetic dataset (Pittsburgh layout) into --dataPath'),
    'demo': ('demo', 'demo', "the user's whole pipeline on the synthetic dataset, with the results table"),
    'report': ('results', 'report', 'the results table of --runsPath/results.jsonl'),
    'import': ('matlab_import', 'import_network', "a network of the NetVLAD authors' MATLAB release as a run folder"),
    'export': ('export_onnx', 'export', 'a run folder as an ONNX model'),
}
MODES = list(MODE_TABLE)
SPLITS = ['test', 'val', 'train', 'test250k', 'val250k', 'train250k', 'tokyo247', 'tokyoTM_train', 'tokyoTM_val',
          'msls_val']
# Model-shape flags: when a checkpoint is loaded its own values are used, unless the user gave the flag.
MODEL_DEFAULTS = dict(arch='vgg16', pooling='netvlad', num_clusters=64)
NOT_GIVEN = object()


def _within(low, high, low_open=False, high_open=False):
    """A check that a number lies in [low, high] (an end left open when asked; None: unbounded) and is finite."""
    def check(value):
        return math.isfinite(value) and (low is None or value > low or (value == low and not low_open)) and \
            (high is None or value < high or (value == high and not high_open))
    ends = ('(' if low_open else '[') + ('-inf' if low is None else str(low)) + ', ' + \
        ('inf' if high is None else str(high)) + (')' if high_open or high is None else ']')
    return check, ends


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = _within(0, None), _within(1, None), _within(0, None, low_open=True)
# Every numeric flag's valid values, checked before any mode runs (None: the flag is unset).
FLAG_RANGES = dict(
    positive_dist_threshold=ABOVE_0, train_positives_dist_threshold=ABOVE_0, synth_db=_within(2, None),
    synth_queries=AT_LEAST_1, num_clusters=_within(2, 16384), nGPU=AT_LEAST_0, threads=AT_LEAST_0,
    seed=_within(0, 2 ** 32 - 1), cacheBatchSize=AT_LEAST_1, batchSize=AT_LEAST_1, cacheRefreshRate=AT_LEAST_0,
    nEpochs=AT_LEAST_1, lr=ABOVE_0, lrStep=AT_LEAST_1, lrGamma=_within(0, 1, low_open=True), weightDecay=AT_LEAST_0,
    momentum=_within(0, 1, high_open=True), margin=ABOVE_0, nNeg=AT_LEAST_1, nNegSample=AT_LEAST_1,
    evalEvery=AT_LEAST_1, patience=AT_LEAST_0, finetune_epochs=AT_LEAST_0,
    pruning_amount=_within(0, 1, low_open=True, high_open=True), calib_images=AT_LEAST_1, qat_epochs=AT_LEAST_1,
    pca_dim=AT_LEAST_1, pca_images=_within(2, None), save_predictions=AT_LEAST_0, resize_max=_within(32, None),
    num_matched=AT_LEAST_1)


# Flags that name what a mode writes: checked before any work, so that a bad path never wastes a computation.
OUTPUT_FILES = ('output', 'export_path')
OUTPUT_FOLDERS = ('export_dir', 'runsPath', 'cachePath', 'savePath')


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one paragraph (usage aside), as every other bad input of the toolkit."""

    def error(self, message):
        raise UserError(f'{message[0].upper()}{message[1:]}. See python main.py --help.')


def check_output_paths(opt):
    for flag in OUTPUT_FILES + OUTPUT_FOLDERS:
        if getattr(opt, flag, None):
            check_output_path(getattr(opt, flag), folder=flag in OUTPUT_FOLDERS, flag=f'--{flag}')


def check_flag_ranges(opt):
    for flag, (valid, expected) in FLAG_RANGES.items():
        value = getattr(opt, flag, None)
        if value is not None and not valid(value):
            raise UserError(f'--{flag}={value} is outside {expected}: give a finite number in that range. Nothing '
                            f'was run.')


def build_parser():
    p = Parser(description='NetVLAD for visual place recognition (Pittsburgh, Tokyo 24/7, Tokyo '
                                            'Time Machine, MSLS and VPR-datasets-downloader folders).')
    p.add_argument('--mode', required=True, choices=MODES, help='What to run.')
    data = p.add_argument_group('data')
    data.add_argument('--dataset', default='pittsburgh',
                      choices=['pittsburgh', 'synthetic', 'tokyoTM', 'folder', 'msls'],
                      help='pittsburgh: dbStruct files in --dataPath/datasets (Pittsburgh 30k/250k; --split tokyo247 '
                           'reads tokyo247.mat); tokyoTM: Tokyo Time Machine dbStructs (train and val are '
                           'tokyoTM_train/val.mat); synthetic: the built-in generated dataset, written into --dataPath '
                           '(default ./synthetic_data) when not there yet; folder: the VPR-datasets-downloader layout '
                           '<dataPath>/images/<split>/{database,queries}/ with @UTM_east@UTM_north@...@.jpg names; '
                           'msls: Mapillary SLS (<dataPath>/train_val/<city>/...).')
    data.add_argument('--dataPath', default=None,
                      help='Folder holding the dataset: datasets/*.mat and the images for dbStruct datasets, '
                           'images/<split>/ for --dataset folder, train_val/ for msls (default: the current folder; '
                           './synthetic_data for --dataset synthetic).')
    data.add_argument('--imagesPath', default=None,
                      help='dbStruct datasets: the folder holding the images, when it is not --dataPath (e.g. the '
                           'Tokyo 24/7 root with images/ and query/, or the Tokyo Time Machine root with images/).')
    data.add_argument('--database_folder', default=None,
                      help='Test mode: a folder of database images named @UTM_east@UTM_north@...@.jpg, evaluated '
                           'against --queries_folder instead of a split of --dataPath.')
    data.add_argument('--queries_folder', default=None, help='Test mode: the query images for --database_folder.')
    data.add_argument('--positive_dist_threshold', type=float, default=25,
                      help='Folder and MSLS datasets: metres within which a database image is a correct match '
                           '(and never a training negative). dbStruct files carry their own (posDistThr).')
    data.add_argument('--train_positives_dist_threshold', type=float, default=10,
                      help='Folder and MSLS datasets: metres within which a database image is a training positive.')
    data.add_argument('--panorama_suppression', default='auto', choices=['auto', 'on', 'off'],
                      help='Rank panoramas, not images: keep the best-ranked database image of each panorama before '
                           'counting Recall@N (Tokyo 24/7 protocol: 12 consecutive cutouts per panorama in '
                           'tokyo247.mat, the pano_id field of folder-format names). auto: on for Tokyo 24/7 only.')
    data.add_argument('--runsPath', default='.', help='Folder for run folders and the results file.')
    data.add_argument('--savePath', default=None,
                      help='Run folder of a new training run (default: <arch>_netvlad_checkpoint/'
                           '<arch>_netvlad_checkpoint under --runsPath).')
    data.add_argument('--overwrite', action='store_true',
                      help='prune, pca, quantize, import: replace an existing output run folder as a whole (without '
                           'it, an existing one is refused).')
    data.add_argument('--split', default='val', choices=SPLITS,
                      help='Split to evaluate in test mode (train and val are the training splits of every mode). '
                           'dbStruct datasets: test/val/train (pitts30k), test250k/..., tokyo247 (Tokyo 24/7 '
                           'protocol), tokyoTM_train/tokyoTM_val; folder: train/val/test; msls: msls_val (cph and sf, '
                           'the dataset\'s validation protocol), val (the same), train.')
    data.add_argument('--resize', default=None, type=parse_size,
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
    model.add_argument('--backPropToLayer', default=None, metavar='LAYER',
                       help='First encoder layer that trains, by name as the authors\' trainWeakly.m: conv1..conv5 '
                            '(AlexNet) or conv1_1..conv5_3 (VGG16); the layers before it stay frozen. Default: conv5 '
                            '(AlexNet) / conv5_1 (VGG16) with ImageNet weights, every layer with --fromscratch. Stored '
                            'in the run: resume, prune fine-tuning and QAT keep the run\'s layer unless this flag is '
                            'given (on --resume it cannot change).')
    model.add_argument('--resume', default='', help='Run folder to load: DIR/checkpoints/checkpoint.pth.tar.')
    model.add_argument('--ckpt', default='latest', choices=['latest', 'best'],
                       help='Which checkpoint of --resume to load.')
    model.add_argument('--unsafe_load', action='store_true',
                       help='Load checkpoints with pickle (weights_only=False) and int8 programs without checking '
                            'them; only for files you trust.')

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
    train.add_argument('--trunk_cache', default='auto', choices=['auto', 'off'],
                       help='auto: when layers are frozen (ImageNet weights, the default), compute the frozen layers\' '
                            'output for every training image once per run (train, prune fine-tuning) and train and '
                            'refresh the cache through the trainable layers only; kept in RAM when it fits half the '
                            'available memory, else in RUN_FOLDER/trunk_cache_rank<r>.npy (deleted at the end; VGG16 '
                            '480x640: 1.2 MB per image in float16). off: decode and run every image each time.')
    train.add_argument('--trunk_cache_dtype', default='auto', choices=['auto', 'float32', 'float16'],
                       help='Storage of the trunk cache. auto: float32 when it fits in RAM (results equal those '
                            'without the cache), else float16 (half the size; can change close mining decisions).')
    train.add_argument('--nEpochs', type=int, default=30, help='Epochs to train.')
    train.add_argument('--optim', default='SGD', choices=['SGD', 'ADAM'], help='Optimiser.')
    train.add_argument('--lr', type=float, default=0.0001, help='Learning rate.')
    train.add_argument('--lrStep', type=int, default=5, help='Epochs between learning-rate decays (SGD).')
    train.add_argument('--lrGamma', type=float, default=0.5, help='Learning-rate decay factor (SGD).')
    train.add_argument('--weightDecay', type=float, default=0.001,
                       help='Weight decay (L2). SGD: 1e-3 by default. Adam: none unless this flag is given, as the '
                            'reference port.')
    train.add_argument('--momentum', type=float, default=0.9, help='SGD momentum.')
    train.add_argument('--margin', type=float, default=0.1,
                       help='Triplet margin m: sqrt(m) on plain L2 distances with --loss reference, m on squared '
                            'distances with --loss paper.')
    train.add_argument('--loss', default='reference', choices=['reference', 'paper'],
                       help='reference: the PyTorch port\'s triplet loss (margin sqrt(m) on L2 distances, summed over '
                            'the batch\'s triplets, divided by the number of negatives); paper: the authors\' '
                            'trainWeakly.m (margin m on squared L2 distances, summed over the violating negatives, '
                            'divided by their number). Mining uses the same distances and margin.')
    train.add_argument('--nNeg', type=int, default=10, help='Hard negatives per query.')
    train.add_argument('--nNegSample', type=int, default=1000, help='Random negatives to mine from per query.')
    train.add_argument('--evalEvery', type=int, default=1, help='Validate every this many epochs.')
    train.add_argument('--patience', type=int, default=10,
                       help='Stop after this many validations without a better Recall@5 (0: never).')
    train.add_argument('--finetune_epochs', type=int, default=2,
                       help='Prune mode: epochs of triplet fine-tuning after pruning (0: none).')

    compress = p.add_argument_group('pruning and quantization')
    compress.add_argument('--pruning_type', default='structured', choices=['structured', 'unstructured'],
                          help='structured: remove whole conv channels (smaller, faster); unstructured: zero '
                               'individual weights by magnitude (stored packed).')
    compress.add_argument('--pruning_amount', type=float, default=0.2,
                          help='Fraction of channels (structured) or weights (unstructured) to remove, in (0, 1).')
    compress.add_argument('--pruning_layers', default='all',
                          help='Encoder convs to prune: "all", or comma-separated indices into the encoder '
                               '(torchvision features indices, e.g. "3,6,8").')
    compress.add_argument('--pruning_criterion', default='activation', choices=['activation', 'l2'],
                          help='Structured: rank channels by their mean squared activation on 64 training-database '
                               'images (activation), or by the L2 norm of their filter weights (l2); the lowest go.')
    compress.add_argument('--pruning_scope', default='global', choices=['global', 'layer'],
                          help='Unstructured: one magnitude threshold over all layers, or the same fraction per layer.')
    compress.add_argument('--quantization_type', default='static', choices=['static', 'qat'],
                          help='static: int8 post-training quantization calibrated on training images; '
                               'qat: quantization-aware fine-tuning with the triplet loss, then int8.')
    compress.add_argument('--calib_images', type=int, default=256,
                          help='Training-database images used to calibrate int8 activations.')
    compress.add_argument('--qat_epochs', type=int, default=1, help='Epochs of quantization-aware training.')
    compress.add_argument('--latency', action='store_true',
                          help='Test and pca modes: also time the CPU latency per image at --latency_size and record '
                               'it in the results file (prune, quantize and demo always time their models).')
    compress.add_argument('--latency_size', default='480x640', type=parse_size,
                          help='Image size HEIGHTxWIDTH at which compression reports time CPU latency.')

    scale = p.add_argument_group('large-scale evaluation')
    scale.add_argument('--pca_dim', type=int, default=4096,
                       help='PCA mode: output dimension of the PCA-whitening layer (the paper uses 4096). It cannot '
                            'exceed the rank of the training sample (--pca_images - 1); the default is lowered to '
                            'it with a message, a value given explicitly is an error.')
    scale.add_argument('--pca_images', type=int, default=10000,
                       help='PCA mode: random training-database images whose descriptors the whitening is fitted '
                            'on (all of them when the database is smaller).')
    scale.add_argument('--index', default='flat', choices=['flat', 'ivfpq', 'hnsw'],
                       help='Test search: exact (flat) or approximate faiss index (IVF-PQ or HNSW, built on the '
                            'database descriptors).')
    scale.add_argument('--compare_exact', action='store_true',
                       help='With --index ivfpq|hnsw: also run the exact search and log the recall the approximate '
                            'index loses.')
    scale.add_argument('--cachePath', default=None,
                       help='Folder for descriptor files during evaluation (default: a new temporary folder); they '
                            'are deleted afterwards, except the parts written under torchrun.')
    scale.add_argument('--desc_dtype', default='float32', choices=['float32', 'float16'],
                       help='Storage of the descriptor files: float16 halves disk and I/O; the search is float32.')
    scale.add_argument('--save_predictions', type=int, default=0, metavar='N',
                       help='Test mode: write each query\'s top N database images with their descriptor distance and '
                            'distance in metres (<run>/predictions_<split>.csv), and a picture of the first queries '
                            'with their retrievals (green within the positive threshold, red beyond).')
    scale.add_argument('--descriptors', nargs='+', default=None, metavar='PART',
                       help='Test mode: search the descriptor parts that test mode under torchrun wrote '
                            '(<split>_<dim>d_partRRRofWWW.npy, all of them) instead of extracting. Pairs mode: '
                            'the global-feats .h5 of the query images (hloc\'s --descriptors), one file.')

    hloc = p.add_argument_group('images in, answers out (extract, pairs, query; hloc\'s flag names)')
    hloc.add_argument('--image_dir', default=None,
                      help='Extract mode: folder of the images (.jpg/.jpeg/.png, any case, searched recursively).')
    hloc.add_argument('--export_dir', default=None,
                      help='Extract mode: folder that receives global-feats-netvlad.h5. Query mode: folder of the '
                           'results (default: query_results under --runsPath).')
    hloc.add_argument('--as_half', action='store_true',
                      help='Extract mode: store descriptors as float16 (half the file; the search is float32).')
    hloc.add_argument('--resize_max', type=int, default=None,
                      help='Extract and query: shrink images whose longest side exceeds this many pixels to it '
                           '(aspect kept); smaller images stay as they are.')
    hloc.add_argument('--skip_unreadable', action='store_true',
                      help='Extract and query: leave out images that cannot be decoded, with a warning naming each '
                           '(default: stop at the first one with an error naming it).')
    hloc.add_argument('--db_descriptors', default=None,
                      help='Pairs mode: global-feats .h5 of the database images (default: --descriptors).')
    hloc.add_argument('--num_matched', type=int, default=None,
                      help='Pairs mode: database images paired with each query (required). Query mode: retrievals '
                           'listed per query (default 5).')
    hloc.add_argument('--query_prefix', nargs='+', default=None,
                      help='Pairs mode: queries are the images of --descriptors whose name starts with one of these.')
    hloc.add_argument('--db_prefix', nargs='+', default=None,
                      help='Pairs mode: database images are those of --db_descriptors whose name starts with one of '
                           'these.')
    hloc.add_argument('--query_list', default=None,
                      help='Pairs mode: text file of query names, one per line (first word; # comments); a glob '
                           'pattern reads every matching file. Default: all images of --descriptors.')
    hloc.add_argument('--db_list', default=None,
                      help='Pairs mode: text file of database names, as --query_list. Default: all images of '
                           '--db_descriptors.')
    hloc.add_argument('--output', default=None,
                      help='Pairs mode: the pairs file to write, one "query_name db_name" per line.')
    hloc.add_argument('--query', nargs='+', default=None, metavar='PHOTO',
                      help='Query mode: your photos: image files and/or folders (searched recursively).')
    hloc.add_argument('--database', default=None,
                      help='Query mode: the database: a global-feats .h5 written by --mode=extract, or a folder of '
                           'images (extracted once, then cached in the run folder for later queries).')
    hloc.add_argument('--positions', default=None,
                      help='Query mode: CSV of database positions with a header, columns name,east,north (metres) '
                           'or name,lat,lon. Default: positions read from folder-format names '
                           '(@east@north@... as in VPR-datasets-downloader), where the names have them.')

    interchange = p.add_argument_group('models from and to other tools')
    interchange.add_argument('--matlab', default=None, metavar='FILE',
                             help='Import mode: the NetVLAD authors\' trained network in the struct .mat layout hloc '
                                  'downloads (Pitts30K_struct.mat, TokyoTM_struct.mat); written as a run folder to '
                                  '--savePath (default: vgg16_netvlad_<file name> under --runsPath).')
    interchange.add_argument('--format', default='onnx', choices=['onnx'],
                             help='Export mode: the file format of the exported model.')
    interchange.add_argument('--export_path', default=None, metavar='FILE',
                             help='Export mode: the file to write (default: <resume>/model.onnx). Input: images '
                                  'normalised as the project loads them (mean and std in its metadata); output: the '
                                  'L2-normalised descriptor.')
    interchange.add_argument('--onnx_int8', action='store_true',
                             help='Export mode: also write FILE_int8.onnx beside FILE.onnx, onnxruntime\'s static int8 '
                                  'quantization of the convs calibrated on --calib_images training-database images, '
                                  'and evaluate it on --split (Recall@N, size, latency; appended to the results file).')

    report = p.add_argument_group('demo and report')
    report.add_argument('--demo_size', default='default', choices=['tiny', 'default'],
                        help='Demo: "tiny" runs every stage on a very small dataset in about a minute.')
    return p


def parse_options(argv=None):
    parser = build_parser()
    opt = parser.parse_args(argv)
    opt.explicit = explicit_flags(parser, argv)
    opt.command = 'python main.py ' + ' '.join(shlex.quote(str(a)) for a in (sys.argv[1:] if argv is None else argv))
    check_flag_ranges(opt)
    for flag, default in MODEL_DEFAULTS.items():
        if getattr(opt, flag) is None:
            setattr(opt, flag, default)
    if opt.dataPath is None:
        opt.dataPath = 'synthetic_data' if opt.dataset == 'synthetic' or opt.mode == 'synth' else '.'
    if opt.savePath is None:
        opt.savePath = os.path.join(opt.runsPath, f'{opt.arch}_netvlad_checkpoint', f'{opt.arch}_netvlad_checkpoint')
    opt.cuda = not opt.nocuda and opt.nGPU > 0
    check_output_paths(opt)
    return opt


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (so that they can win over stored or checkpoint values):
    parsed again with every default replaced by a marker, the flags still holding the marker were not given."""
    parsed = vars(parser.parse_args(argv))
    parser.set_defaults(**{dest: NOT_GIVEN for dest in parsed})
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not NOT_GIVEN}


def run(opt):
    if opt.dataset == 'synthetic' and opt.mode not in ('report', 'import', 'export', 'synth'):
        from synthetic import ensure_synthetic
        ensure_synthetic(opt)
    module_name, function_name, _ = MODE_TABLE[opt.mode]
    mode = getattr(importlib.import_module(module_name), function_name)
    return mode(opt, parse_options, run) if opt.mode == 'demo' else mode(opt)


def main(argv=None):
    try:
        opt = parse_options(argv)
        setup_logging(rank=torchrun_process()[0])
        run(opt)
    except UserError as error:
        print(f'Error: {user_error_text(error)}', file=sys.stderr)
        return 2
    except Exception as error:
        log_exception_to_file(error)  # the run's log.txt keeps it; the terminal gets it from the raise
        raise
    return 0


if __name__ == '__main__':
    sys.exit(main())
