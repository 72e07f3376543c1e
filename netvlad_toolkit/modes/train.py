"""--mode=train: the run folder of a weakly supervised triplet training: a new run, or --resume.

The training itself (mining, losses, optimiser, fit) lives in training.py, shared with prune fine-tuning and QAT.
A new run never writes into an existing run folder; a resumed run takes its stored flags and its frozen layers.
"""
import logging
import os
import time

import torch.distributed as dist

from netvlad_toolkit.model.centroids import initialised_model
from netvlad_toolkit.model.models import layer_index, layer_name
from netvlad_toolkit.runs.runs import (
    check_float_run,
    check_new_run_folder,
    flags_to_store,
    is_dead_start,
    open_run,
    restore_missing_best,
    run_folder,
    stored_flags,
)
from netvlad_toolkit.training.training import add_training_flags, apply_recipe, fit, init_distributed, training_splits
from netvlad_toolkit.utils.commons import (
    UserError,
    atomic_write_json,
    make_deterministic,
    plural,
    select_device,
    setup_logging,
)
from netvlad_toolkit.utils.options import (
    AT_LEAST_1,
    add_common_flags,
    add_dataset_flags,
    add_extraction_flags,
    add_network_flags,
    add_run_flags,
    add_search_flags,
)

# Flags that describe where and how a process runs, never restored from a stored flags.json.
NOT_RESTORED = {'mode', 'resume', 'ckpt', 'explicit', 'restored', 'command', 'cuda', 'nocuda', 'nGPU', 'threads',
                'dataPath', 'runsPath', 'savePath', 'unsafe_load', 'split', 'trunk_cache', 'trunk_cache_dtype'}


def add_flags(p):
    add_common_flags(p)
    add_dataset_flags(p)
    add_network_flags(p, trains=True)
    add_run_flags(p)
    add_extraction_flags(p)
    add_search_flags(p)
    add_training_flags(p)
    p.add_argument('--nEpochs', type=AT_LEAST_1, default=30, help='Epochs to train.')
    p.add_argument('--savePath', default=None,
                   help='Run folder of a new training run (default: <arch>_netvlad_checkpoint/'
                        '<arch>_netvlad_checkpoint under --runsPath).')


def restore_flags(opt, run_dir):
    """Take the stored flags of a resumed run, except those given on the command line, which win.

    Returns one line for each flag whose command-line value replaces a different stored one.
    """
    changes = []
    for key, value in stored_flags(run_dir).items():
        if key in NOT_RESTORED or not hasattr(opt, key) or getattr(opt, key) == value:
            continue
        if key in opt.explicit:
            changes.append(f'--{key}: the command line value {getattr(opt, key)!r} replaces the stored {value!r}')
        else:
            setattr(opt, key, value)
    return changes


def write_flags(opt, run_dir, model):
    """flags.json: the flags of the run, with the first trainable layer resolved (name and encoder index)."""
    flags = flags_to_store(opt, 'mode')
    flags.update(backPropToLayer=layer_name(model.arch, model.frozen_layers), first_trainable=model.frozen_layers)
    atomic_write_json(flags, os.path.join(run_dir, 'checkpoints', 'flags.json'))


def check_same_trainable_layers(model, opt, run_dir):
    """Resuming keeps the run's frozen layers: its optimizer state holds exactly the parameters that train."""
    if 'backPropToLayer' in opt.explicit and layer_index(model.arch, opt.backPropToLayer) != model.frozen_layers:
        raise UserError(f'Run {run_dir} trains from {layer_name(model.arch, model.frozen_layers)}; '
                        f'--backPropToLayer={opt.backPropToLayer} cannot change that on --resume (the optimizer '
                        f'state holds the parameters that train). Drop the flag, or start a new run with --savePath.')


def check_same_optimizer(state, opt, run_dir):
    """Resuming keeps the run's optimizer: its stored state holds SGD's momentum buffers or Adam's moments."""
    groups = state.get('optimizer', {}).get('param_groups') or [{}]
    stored = 'ADAM' if 'betas' in groups[0] else 'SGD' if 'momentum' in groups[0] else None
    if stored is not None and stored != opt.optim:
        raise UserError(f'Run {run_dir} was trained with --optim {stored}; --optim {opt.optim} cannot change that on '
                        f'--resume (the stored optimizer state is {stored}\'s). Drop the flag, or start a new run '
                        f'with --savePath.')


def resumed_run(opt, run_dir):
    """Model and training state of the run to resume, checked before anything is written."""
    if is_dead_start(run_dir):
        raise UserError(f'{run_dir} holds only the start of a run that ended before its first checkpoint: there is '
                        f'nothing to resume. Run the same command without --resume: it removes those files and '
                        f'starts again.')
    model, state = open_run(opt, 'latest')
    check_float_run(state, run_dir, 'train')
    check_same_trainable_layers(model, opt, run_dir)
    check_same_optimizer(state, opt, run_dir)
    restore_missing_best(run_dir, state)
    return model, state


def train(opt):
    rank, _ = init_distributed(opt)
    run_dir = opt.resume or opt.savePath
    flag_changes = restore_flags(opt, run_dir) if opt.resume else []
    apply_recipe(opt, fixed=stored_flags(run_dir) if opt.resume else ())
    splits = training_splits(opt, rank)  # the dataset is checked first: before weights, centroids or any write
    with run_folder(run_dir, rank, create=not opt.resume):
        return train_in_folder(opt, rank, run_dir, splits, flag_changes)


def train_in_folder(opt, rank, run_dir, splits, flag_changes):
    """The training run on its checked dataset (training_splits), in its locked folder: every check first, then the
    first write. flag_changes: the lines of restore_flags, logged into the run's log."""
    if not opt.resume:
        check_new_run_folder(run_dir)
    model, state = resumed_run(opt, run_dir) if opt.resume else (initialised_model(opt), None)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the run folder before rank 0 writes into it
    setup_logging(run_dir, rank)  # only now: a run that fails on its input writes nothing
    for change in flag_changes:
        logging.info(change)
    make_deterministic(opt.seed)
    device = select_device(opt)
    logging.info('Training %s into %s: %s, lr %g, batch %d, %s', opt.arch, run_dir, opt.optim, opt.lr,
                 opt.batchSize, plural(opt.nEpochs, 'epoch'))
    started = time.time()
    # flags.json is written beside each checkpoint: a resumed run's flags change only once its state has loaded
    state = fit(model, splits, opt, device, run_dir, opt.nEpochs, state,
                on_checkpoint=(lambda: write_flags(opt, run_dir, model)) if rank == 0 else None)
    logging.info('====> Training done in %.1f min: epoch %d, best val Recall@5 %.4f; checkpoints in %s',
                 (time.time() - started) / 60, state.get('epoch', 0), state.get('best_score', 0.0),
                 os.path.join(run_dir, 'checkpoints'))
    if dist.is_initialized():
        dist.destroy_process_group()
    return state
