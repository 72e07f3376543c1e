"""The command line: reads --mode, parses the flags that mode's module declares, and runs it; everything
else lives in the module of its concern."""
import argparse
import importlib
import os
import shlex
import sys

from netvlad_toolkit.utils.commons import (
    UserError,
    check_output_path,
    log_exception_to_file,
    setup_logging,
    torchrun_process,
    user_error_text,
)
from netvlad_toolkit.utils.options import HelpFormatter, Parser

# Every mode: the module (in the package) and function that run it, and one line for --help. The list of modes is this table's keys.
MODE_TABLE = {
    'cluster': ('modes.cluster', 'cluster', 'k-means centroids of local descriptors, which NetVLAD is initialised from'),
    'train': ('modes.train', 'train', 'weakly supervised triplet training (or --resume a run)'),
    'test': ('modes.evaluate', 'test', 'Recall@N of a run (or of the untrained network) on a split'),
    'distill': ('modes.distill', 'distill', "a run distilled into a MobileNetV3/ResNet18 student that searches its database"),
    'prune': ('modes.prune', 'prune', 'structured or unstructured pruning, fine-tuned and compared'),
    'quantize': ('modes.quantize', 'quantize', 'int8 quantization (static or QAT), compared'),
    'pca': ('modes.pca', 'pca', 'PCA whitening of the descriptor fitted on training images, compared'),
    'extract': ('modes.extract', 'extract', "descriptors of an image folder in hloc's global-feats HDF5 layout"),
    'pairs': ('modes.pairs', 'pairs', "hloc's retrieval pairs from global-feats files"),
    'query': ('modes.query', 'query', 'where were these photos taken: answers from a database of geotagged images'),
    'synth': ('datasets.synthetic', 'synth', 'write the built-in synthetic dataset (Pittsburgh layout) into --dataPath'),
    'demo': ('modes.demo', 'demo', "the user's whole pipeline on the synthetic dataset, with the results table"),
    'report': ('runs.results', 'report', 'the results table of --runsPath/results.jsonl'),
    'import': ('modes.matlab_import', 'import_network', "a network of the NetVLAD authors' MATLAB release as a run folder"),
    'export': ('modes.export_onnx', 'export', 'a run folder as an ONNX model'),
}
MODES = list(MODE_TABLE)
# Model-shape flags: when a checkpoint is loaded its own values are used, unless the user gave the flag.
MODEL_DEFAULTS = dict(arch='vgg16', pooling='netvlad', num_clusters=64)
NOT_GIVEN = object()
# Flags that name what a mode writes: checked before any work, so that a bad path never wastes a computation.
OUTPUT_FILES = ('output', 'export_path')
OUTPUT_FOLDERS = ('export_dir', 'runsPath', 'cachePath', 'savePath')
# The console command pyproject.toml installs.
CONSOLE_COMMAND = 'netvlad-toolkit'
DESCRIPTION = 'NetVLAD for visual place recognition (Pittsburgh, Tokyo 24/7, Tokyo Time Machine, MSLS and ' \
              'VPR-datasets-downloader folders).'


def command_name():
    """How this command line was started, so that help and the recorded command say what the user typed: the
    installed `netvlad-toolkit`, `python -m netvlad_toolkit`, or `python main.py` (also when called from Python)."""
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ''
    if program == os.path.join(os.path.dirname(os.path.abspath(__file__)), '__main__.py'):
        return f'python -m {__package__}'
    return CONSOLE_COMMAND if os.path.basename(program) == CONSOLE_COMMAND else 'python main.py'


def mode_module(mode):
    return importlib.import_module(f'{__package__}.{MODE_TABLE[mode][0]}')


def modes_help():
    width = max(map(len, MODES))
    lines = [f'  {mode:<{width}}  {text}' for mode, (_, _, text) in MODE_TABLE.items()]
    command = command_name()
    return '\n'.join([f'usage: {command} --mode=MODE [flags]', '', DESCRIPTION, '', 'modes:', *lines, '',
                      f'{command} --mode=MODE --help lists the flags of one mode, with their defaults.'])


def mode_parser(mode):
    """The parser of one mode: --mode and the flags its module declares (add_flags)."""
    command = command_name()
    parser = Parser(mode, prog=command, usage=f'{command} --mode={mode} [flags]',
                    description=f'--mode={mode}: {MODE_TABLE[mode][2]}.', formatter_class=HelpFormatter)
    parser.add_argument('--mode', required=True, choices=MODES, metavar='MODE',
                        help=f'What to run: {", ".join(MODES)} ({command} --help says what each does).')
    mode_module(mode).add_flags(parser)
    return parser


def requested_mode(argv):
    """The --mode of a command line; without one, the list of modes (--help) or an error."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('--mode')
    first.add_argument('-h', '--help', action='store_true')
    known, _ = first.parse_known_args(argv)
    if known.mode in MODE_TABLE:
        return known.mode
    if known.help and known.mode is None:
        print(modes_help())
        sys.exit(0)
    given = f'--mode={known.mode} does not exist' if known.mode else '--mode is required'
    raise UserError(f'{given}: give one of {", ".join(MODES)}. See {command_name()} --help.')


def warn_unread(mode, extras):
    """One warning line for flags of other modes; an error for anything no mode reads."""
    given = [token.split('=')[0] for token in extras if token.startswith('--')]
    elsewhere = {other: mode_parser(other).flags for other in MODES if other != mode}
    unknown = [flag for flag in given if not any(flag in flags for flags in elsewhere.values())]
    if unknown or not given:
        raise UserError(f'Unrecognised argument{"s" if len(unknown or extras) > 1 else ""} '
                        f'{" ".join(unknown or extras)}: no mode has such a flag. See {command_name()} --mode={mode} '
                        f'--help.')
    for flag in given:
        readers = [other for other, flags in elsewhere.items() if flag in flags]
        print(f'Warning: {flag} is not read by --mode={mode} (it is a flag of --mode={"/".join(readers)}): ignored.',
              file=sys.stderr)


def parse_options(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    mode = requested_mode(argv)
    parser = mode_parser(mode)
    opt, extras = parser.parse_known_args(argv)
    if extras:
        warn_unread(mode, extras)
    opt.explicit = explicit_flags(parser, argv)
    opt.command = ' '.join([command_name(), *map(shlex.quote, argv)])
    set_defaults(opt)
    check_output_paths(opt)
    return opt


def set_defaults(opt):
    """The defaults that depend on other flags."""
    for flag, default in MODEL_DEFAULTS.items():
        if getattr(opt, flag, NOT_GIVEN) is None:
            setattr(opt, flag, default)
    if getattr(opt, 'dataset', None) and opt.dataPath is None:
        opt.dataPath = 'synthetic_data' if opt.dataset == 'synthetic' else '.'
    if opt.mode == 'train' and opt.savePath is None:
        opt.savePath = os.path.join(opt.runsPath, f'{opt.arch}_netvlad_checkpoint', f'{opt.arch}_netvlad_checkpoint')
    opt.cuda = not opt.nocuda and opt.nGPU > 0


def check_output_paths(opt):
    for flag in OUTPUT_FILES + OUTPUT_FOLDERS:
        if getattr(opt, flag, None):
            check_output_path(getattr(opt, flag), folder=flag in OUTPUT_FOLDERS, flag=f'--{flag}')


def explicit_flags(parser, argv):
    """Names of the flags given on the command line (so that they can win over stored or checkpoint values):
    parsed again with every default replaced by a marker, the flags still holding the marker were not given."""
    parsed = vars(parser.parse_known_args(argv)[0])
    parser.set_defaults(**{dest: NOT_GIVEN for dest in parsed})
    return {dest for dest, value in vars(parser.parse_known_args(argv)[0]).items() if value is not NOT_GIVEN}


def run(opt):
    from netvlad_toolkit.runs.runs import restore_run_flags
    # the dataset a run was trained on, unless the command line names another
    restore_run_flags(opt, getattr(mode_module(opt.mode), 'REUSES_RUN_TRAINING', True))
    if getattr(opt, 'dataset', None) == 'synthetic' and hasattr(opt, 'synth_db'):
        from netvlad_toolkit.datasets.synthetic import ensure_synthetic
        ensure_synthetic(opt)
    _, function_name, _ = MODE_TABLE[opt.mode]
    mode = getattr(mode_module(opt.mode), function_name)
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

