"""Run folders: the one place that opens a run folder (float, pruned, whitened, int8) into a model, and that names
the run folders other modes derive from one (`<run>_pruned_structured_20`, `<run>_quantized_static`,
`<run>_pca4096`).

A run's frozen layers belong to it: its checkpoint stores the first encoder layer that trains, and the model opened
here freezes the layers before it. A checkpoint of the reference port stores nothing; it gets the reference's rule,
layers before conv5 frozen unless the run was trained --fromscratch (its flags.json, else the command line).
"""
import argparse
import contextlib
import json
import logging
import os
import re

import torch

from netvlad_toolkit.model.centroids import initialised_model
from netvlad_toolkit.model.checkpoint import check_entries, checkpoint_path, is_best_state, read_checkpoint
from netvlad_toolkit.model.int8 import load_quantized_model
from netvlad_toolkit.model.models import ARCHS, build_model, config_from_checkpoint, layer_index
from netvlad_toolkit.utils.commons import UserError, atomic_copy, empty_folder, locked_folder


def derived_run_folder(run_dir, suffix):
    """The folder, beside run_dir, of a model derived from it: <run_dir>_<suffix>."""
    return f'{run_dir.rstrip("/" + os.sep)}_{suffix}'


def holds_something(path):
    """Whether `path` is a folder that already holds files (a run a new training would overwrite)."""
    return os.path.isdir(path) and bool(os.listdir(path))


# What a training start writes before its first checkpoint: the log, tensorboard, the trunk cache and checkpoints/.
START_FILES = re.compile(r'log\.txt|tensorboard|trunk_cache_rank\d+\.npy|checkpoints|.*\.tmp')


def is_dead_start(path):
    """A run folder that a start killed or failed before its first checkpoint left: only the files of START_FILES,
    and no checkpoint.pth.tar (a model_best.pth.tar alone is the first save, killed before its second file)."""
    return os.path.isdir(path) and all(START_FILES.fullmatch(name) for name in os.listdir(path)) and \
        not os.path.exists(checkpoint_path(path))


@contextlib.contextmanager
def run_folder(path, rank=0, create=True):
    """Hold the lock of the run folder `path` (created first when `create` and missing) while the block runs; the
    folders created here are removed again if the block leaves them empty (a run that stopped on its input)."""
    created = missing_folders(path) if create and rank == 0 else []
    if created:
        os.makedirs(path)
    try:
        with locked_folder(path, rank):
            yield
    finally:
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def missing_folders(path):
    """The folders of `path` that do not exist yet, innermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def check_new_run_folder(path):
    """A new training run never writes into a folder that already holds a run; the files of a start that ended
    before its first checkpoint are removed (the same command then starts clean). Call it holding the lock; that
    --savePath is not a file was checked with the other output paths (main.check_output_paths)."""
    if holds_something(path) and is_dead_start(path):
        logging.info('%s holds only the start of a run that ended before its first checkpoint (%s): removing it '
                     'and starting again.', path, ', '.join(sorted(os.listdir(path))))
        empty_folder(path)
    if holds_something(path):
        raise UserError(f'The run folder {path} already exists and holds {", ".join(sorted(os.listdir(path)))}; '
                        f'a new training run would replace its checkpoints. To continue that run, add '
                        f'--resume={path}; to start a new run, give another folder with --savePath. Nothing was '
                        f'written.')


def check_derived_target(target, opt):
    """The output run folder of prune, pca, quantize or import: an existing one is replaced only with --overwrite
    (checked before any work)."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f'The output run folder {target} is a file: move it away. Nothing was written.')
    if holds_something(target) and not opt.overwrite:
        raise UserError(f'The output run folder {target} already exists (from an earlier --mode={opt.mode}). Add '
                        f'--overwrite to replace it as a whole, or move it away. Nothing was written.')


def stored_flags(run_dir):
    """The flags.json a training run stored (an empty dict when there is none, as in reference-port runs)."""
    path = os.path.join(run_dir, 'checkpoints', 'flags.json')
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f'{path} cannot be read as JSON ({error}); it holds the flags of run {run_dir}. Restore it '
                        f'from a copy or delete it (stored flags are then not restored).') from None


# The data a run was trained on (restored only when the dataset is the run's), its optimiser's settings (only when
# the optimiser is the run's) and the other training settings that prune's fine-tuning and QAT reuse: without them on
# the command line, a mode that loads a run takes the run's.
DATA_FLAGS = ('dataPath', 'imagesPath', 'resize', 'positive_dist_threshold', 'train_positives_dist_threshold',
              'synth_db', 'synth_queries', 'synth_imsize')
OPTIMISER_FLAGS = ('lr', 'lrStep', 'lrGamma', 'weightDecay', 'momentum')
TRAINING_FLAGS = ('margin', 'loss', 'batchSize', 'nNeg', 'nNegSample', 'cacheRefreshRate', 'recipe', 'batch_queries',
                  'min_positive_dist', 'neg_memory', 'nNegCache')


def restore_run_flags(opt, reuses_training=True):
    """Take the dataset, its paths and the training settings that --resume's flags.json stored and the command line
    leaves out (flags given win), logged in one line; opt.restored names them. reuses_training=False: only the
    dataset and its paths (a mode whose --resume is not the run it continues)."""
    stored = stored_flags(opt.resume) if getattr(opt, 'resume', '') and hasattr(opt, 'imagesPath') else {}
    restored = {key: stored[key] for key in ('dataset', 'optim') if key in stored and hasattr(opt, key)
                and key not in opt.explicit and (reuses_training or key == 'dataset')}
    same = {key: key in stored and stored[key] == restored.get(key, getattr(opt, key, None))
            for key in ('dataset', 'optim')}
    training = ((OPTIMISER_FLAGS if same['optim'] else ()) + TRAINING_FLAGS) if reuses_training else ()
    for key in (DATA_FLAGS if same['dataset'] else ()) + training:
        if key in stored and hasattr(opt, key) and key not in opt.explicit:
            restored[key] = tuple(stored[key]) if isinstance(stored[key], list) else stored[key]
    restored = {key: value for key, value in restored.items() if getattr(opt, key) != value}
    for key, value in restored.items():
        setattr(opt, key, value)
    opt.restored = set(restored)
    if restored:
        logging.info('From %s (flags given on the command line win): %s',
                     os.path.join(opt.resume, 'checkpoints', 'flags.json'),
                     ' '.join(f'--{key} {"x".join(map(str, value)) if isinstance(value, tuple) else value}'
                              for key, value in restored.items()))


def flags_to_store(opt, *dropped):
    """A run's flags for its flags.json: every flag but those of this one command line (and `dropped`)."""
    return {key: value for key, value in vars(opt).items()
            if key not in ('explicit', 'restored', 'resume', 'ckpt', *dropped)}


def copy_flags(source_run, folder):
    """A derived run (pruned, whitened, int8) keeps the flags.json of the run it was made from: its data and
    training settings are the source's."""
    path = os.path.join(source_run, 'checkpoints', 'flags.json')
    if os.path.isfile(path):
        atomic_copy(path, os.path.join(folder, 'checkpoints', 'flags.json'))


def first_trainable(checkpoint, arch, opt, run_dir):
    """Encoder index of the first layer the run trains: stored in its checkpoint by this project; for a reference
    checkpoint, the reference's rule (from conv5 / conv5_1 with ImageNet weights, every layer --fromscratch)."""
    if 'first_trainable' in checkpoint:
        return int(checkpoint['first_trainable'])
    fromscratch = stored_flags(run_dir).get('fromscratch', opt.fromscratch)
    return 0 if fromscratch else layer_index(arch, ARCHS[arch]['imagenet_first_trainable'])


def check_config_against_flags(config, opt, path):
    """A checkpoint whose architecture contradicts a flag the user gave explicitly is an error naming the flag;
    flags the user did not give take the checkpoint's values (so results are recorded under the right arch)."""
    for flag in ('arch', 'num_clusters', 'pooling', 'vladv2'):
        given = getattr(opt, flag)
        if config[flag] is None or given == config[flag]:
            continue
        if flag in opt.explicit:
            raise UserError(f'Checkpoint {path} holds a model with {flag}={config[flag]}, but the command line '
                            f'asks for --{flag}={given}. Drop the flag or pass the matching checkpoint.')
        setattr(opt, flag, config[flag])


def open_run(opt, which=None):
    """The model and checkpoint dict stored in run folder opt.resume (--ckpt, or `which`: latest / best)."""
    path = checkpoint_path(opt.resume, which or opt.ckpt)
    if (which or opt.ckpt) == 'best' and not os.path.isfile(path) and latest_is_best(opt.resume, opt.unsafe_load):
        logging.info('%s is missing and the latest checkpoint is the best one: reading that.', path)
        path = checkpoint_path(opt.resume, 'latest')
    checkpoint = read_checkpoint(path, opt.unsafe_load)
    state_dict = checkpoint['state_dict']
    if 'quantized' in checkpoint:
        return load_quantized_model(checkpoint, opt.resume, opt.unsafe_load, path), checkpoint
    if not any(key.startswith('encoder.0.') for key in state_dict):
        raise UserError(f'Checkpoint {path} has no encoder weights (encoder.0.*): not a NetVLAD model.')
    config = config_from_checkpoint(checkpoint, opt.pooling, path)
    check_config_against_flags(config, opt, path)
    config['first_trainable'] = first_trainable(checkpoint, config['arch'], opt, opt.resume)
    with torch.device('meta'):  # the shapes the architecture needs, before memory is taken for them
        check_entries(state_dict, build_model(config).state_dict(), path)
    model = build_model(config)
    model.load_state_dict(state_dict)
    return model, checkpoint


def open_other_run(opt, run_dir):
    """open_run of the latest checkpoint of another run folder than --resume, with the model flags taken from it."""
    return open_run(argparse.Namespace(**dict(vars(opt), resume=run_dir, ckpt='latest', explicit=set())))


def open_database_run(opt, model):
    """(model, checkpoint) of --database_run, which describes the database images of an asymmetric search whose
    queries `model` (--resume's) describes: a --mode=distill student's teacher, in the same descriptor space."""
    db_model, db_checkpoint = open_other_run(opt, opt.database_run)
    if db_model.output_dim != model.output_dim:
        raise UserError(f'--database_run={opt.database_run} gives {db_model.output_dim}-D descriptors and '
                        f'--resume={opt.resume} {model.output_dim}-D ones: an asymmetric search needs one descriptor '
                        f'space (a --mode=distill student and its teacher).')
    return db_model.eval(), db_checkpoint


def latest_is_best(run_dir, unsafe=False):
    latest = checkpoint_path(run_dir, 'latest')
    return os.path.isfile(latest) and is_best_state(read_checkpoint(latest, unsafe))


def restore_missing_best(run_dir, checkpoint):
    """model_best.pth.tar from the latest checkpoint when that one is the best and the file is missing (a kill
    between the two writes of an older version left it so)."""
    best = checkpoint_path(run_dir, 'best')
    if not os.path.isfile(best) and is_best_state(checkpoint):
        logging.info('%s is missing and the latest checkpoint is the best one: writing it from that.', best)
        atomic_copy(checkpoint_path(run_dir, 'latest'), best)


def check_float_run(checkpoint, run_dir, action):
    """`action` (prune, train) changes float weights; an int8 run has none to change."""
    if 'quantized' in checkpoint:
        raise UserError(f'{run_dir} holds an int8 model (--mode=quantize), whose encoder is a fixed int8 program: '
                        f'{action} the float run it was made from ({checkpoint.get("source_run", "its source run")}) '
                        f'instead.')


def load_model(opt):
    """Model, checkpoint and run folder of --resume or, without it, of the cluster-initialised untrained network."""
    if opt.resume:
        return (*open_run(opt), opt.resume)
    return initialised_model(opt), None, os.path.join(opt.runsPath, f'{opt.arch}_offtheshelf')


def place_model(model, device):
    """The model on `device` in channels-last layout, and that device; the CPU for the int8 model of
    --mode=quantize, whatever `device` is."""
    if getattr(model, 'cpu_only', False) and device.type != 'cpu':
        logging.info('This model runs on the CPU (int8 x86 kernels): evaluating on the CPU instead of %s.', device)
        device = torch.device('cpu')
    return model.to(device).to(memory_format=torch.channels_last), device


def apply_backprop_flag(model, opt):
    """Fine-tuning (prune, QAT) trains from the run's own first trainable layer, or from --backPropToLayer when
    given on the command line."""
    if 'backPropToLayer' in opt.explicit:
        model.set_first_trainable(layer_index(model.arch, opt.backPropToLayer))
    return model
