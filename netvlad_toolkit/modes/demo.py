"""--mode=demo: the whole chain on the synthetic dataset, as the user's own commands would run it.

Every stage is a command line parsed and run by main.py exactly as if typed, so each stage reads what the one
before wrote: cluster -> test (untrained) -> train -> test -> prune (structured 0.2 and 0.5, unstructured) -> quantize
(static, static of the 50% pruned run, QAT) -> distill into MobileNetV3-Large (its test, its queries against the
trained model's database, its int8 static variant) -> pca -> test with Patch-NetVLAD re-ranking -> report, then the
pictures.
"""
import logging
import os
import shlex
import time

import numpy as np
import torch

from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.runs.figures import plot_recall_curves, retrieval_strips
from netvlad_toolkit.runs.measure import interleaved_latency
from netvlad_toolkit.runs.results import latest_per_variant, read_results, record_key, results_path, set_latencies
from netvlad_toolkit.runs.runs import holds_something, load_model
from netvlad_toolkit.utils.commons import UserError
from netvlad_toolkit.utils.options import add_common_flags, add_extraction_flags

# Sized for about ten minutes on a 2-core CPU (default) or about a minute (tiny, for tests).
DEMO_SIZES = {
    'default': dict(synth_db=300, synth_queries=150, synth_imsize='120x160', nEpochs=3, finetune_epochs=1,
                    qat_epochs=1, calib_images=128, latency_size='480x640', pca_dim=256, rerank_size='240x320',
                    distill_epochs=10),
    'tiny': dict(synth_db=30, synth_queries=16, synth_imsize='64x80', nEpochs=1, finetune_epochs=1,
                 qat_epochs=1, calib_images=8, latency_size='64x80', pca_dim=32, rerank_size='128x160',
                 distill_epochs=1),
}
# Patch-NetVLAD's speed config re-ranks the whitened run on images loaded at rerank_size: its 5x5 patches need a
# feature map of about 14x19 cells or more (480x640 gives VGG16 30x40), and the demo's images give AlexNet 6x9, where
# a few coarse patches of its repeating facades match wrong places as often as the right one.
# The user's train command is Adam at 1e-4 and trains conv5 of an ImageNet-initialised encoder; the demo
# trains every layer of a random one (--fromscratch), where 1e-4 overshoots (docs/training.md, the demo's
# learning rate).
TRAIN_FLAGS = ['--optim', 'ADAM', '--lr', '0.00001']
STRIP_QUERIES = 4
STUDENT = 'mobilenet_v3_large'  # the trained model distilled into it: its own row, its queries, its int8 variant
STRUCTURED_AMOUNTS = (0.2, 0.5)  # the two amounts whose recall targets the demo shows: within 0.02 and 0.05 of trained


def add_flags(p):
    add_common_flags(p)
    add_extraction_flags(p)
    p.add_argument('--arch', default='alexnet', choices=['vgg16', 'alexnet'], help='Encoder of the demo.')
    p.add_argument('--dataPath', default=None,
                   help='Folder of the demo\'s synthetic dataset (default: synthetic_data_<demo_size>).')
    p.add_argument('--demo_size', default='default', choices=list(DEMO_SIZES),
                   help='"tiny" runs every stage on a very small dataset in about a minute.')


def time_together(records, untrained_argv, parse_options, path):
    """The CPU latency of every variant of the table, timed in one interleaved run in this process, each model in
    channels-last memory format: rows timed by separate processes (at separate loads) would not compare."""
    options = [parse_options(without_arch(untrained_argv) + ['--resume', r['run']] if r.get('run') else untrained_argv)
               for r in records]
    models = [load_model(o)[0].cpu().eval().to(memory_format=torch.channels_last) for o in options]
    size = options[0].latency_size
    latencies = interleaved_latency(models, size)
    set_latencies(path, {record_key(r): (ms, 'x'.join(map(str, size))) for r, ms in zip(records, latencies)})


def without_arch(argv):
    """A command line without its --arch: a run's own architecture (a distilled student's) is read from it."""
    at = argv.index('--arch')
    return argv[:at] + argv[at + 2:]


def demo_setting(opt):
    """The demo's encoder, data folder and training run folder."""
    data_path = opt.dataPath or f'synthetic_data_{opt.demo_size}'
    return opt.arch, data_path, os.path.join(opt.runsPath, f'{opt.arch}_netvlad_checkpoint',
                                             f'{opt.arch}_netvlad_checkpoint')


def stage_commands(opt, size):
    """The command lines of every stage, as a user would type them."""
    arch, data_path, run = demo_setting(opt)
    common = ['--dataset', 'synthetic', '--dataPath', data_path, '--runsPath', opt.runsPath, '--arch', arch,
              '--fromscratch', '--seed', str(opt.seed), '--threads', str(opt.threads), '--nGPU', str(opt.nGPU),
              '--cacheBatchSize', str(opt.cacheBatchSize)]
    common += ['--nocuda'] if opt.nocuda else []
    common += [f'--{k}={size[k]}' for k in ('synth_db', 'synth_queries', 'synth_imsize')]
    evaluate = ['--split', 'test', '--latency_size', size['latency_size']]
    resume = ['--resume', run]
    student = ['--resume', f'{run}_distilled_{STUDENT}']
    return [
        ['--mode=cluster'] + common,
        ['--mode=test'] + common + evaluate,
        ['--mode=train', '--nEpochs', str(size['nEpochs']), '--savePath', run] + TRAIN_FLAGS + common,
        ['--mode=test'] + common + evaluate + resume,
        *[['--mode=prune', '--pruning_type=structured', f'--pruning_amount={amount}',
           f'--finetune_epochs={size["finetune_epochs"]}'] + TRAIN_FLAGS + common + evaluate + resume
          for amount in STRUCTURED_AMOUNTS],
        ['--mode=prune', '--pruning_type=unstructured', '--pruning_amount=0.2',
         f'--finetune_epochs={size["finetune_epochs"]}'] + TRAIN_FLAGS + common + evaluate + resume,
        ['--mode=quantize', '--quantization_type=static', f'--calib_images={size["calib_images"]}']
        + common + evaluate + resume,
        ['--mode=quantize', '--quantization_type=static', f'--calib_images={size["calib_images"]}']
        + common + evaluate + ['--resume', f'{run}_pruned_structured_50'],
        ['--mode=quantize', '--quantization_type=qat', f'--calib_images={size["calib_images"]}',
         f'--qat_epochs={size["qat_epochs"]}'] + TRAIN_FLAGS + common + evaluate + resume,
        ['--mode=distill', f'--student={STUDENT}', f'--nEpochs={size["distill_epochs"]}'] + common + resume,
        ['--mode=test'] + without_arch(common) + evaluate + student,
        ['--mode=test'] + without_arch(common) + evaluate + student + ['--database_run', run],
        ['--mode=quantize', '--quantization_type=static', f'--calib_images={size["calib_images"]}']
        + without_arch(common) + evaluate + student,
        ['--mode=pca', f'--pca_dim={size["pca_dim"]}'] + common + evaluate + resume,
        ['--mode=test', '--rerank=patch', '--rerank_config=speed', f'--num_pcs={size["pca_dim"]}',
         f'--resize={size["rerank_size"]}'] + common + evaluate + ['--resume', f'{run}_pca{size["pca_dim"]}'],
    ], run


def demo(opt, parse_options, run_mode):
    """parse_options and run_mode are main.py's (passed in: demo never imports main), so every stage runs exactly
    as the typed command would."""
    size = DEMO_SIZES[opt.demo_size]
    commands, run_dir = stage_commands(opt, size)
    if holds_something(run_dir):  # checked before the first stage: its train stage never overwrites a run
        raise UserError(f'The demo trains into {run_dir}, which already holds a run. Give the demo another folder '
                        f'with --runsPath (or move that run away). Nothing was written.')
    started = time.time()
    trained_test = None
    for number, argv in enumerate(commands, 1):
        logging.info('\n===== Demo stage %d/%d: python main.py %s', number, len(commands), shlex.join(argv))
        result = run_mode(parse_options(argv))
        if argv[0] == '--mode=test' and argv[-2:] == ['--resume', run_dir]:  # the trained run's own test
            trained_test = result
    arch, data_path, _ = demo_setting(opt)
    records = [r for r in latest_per_variant(read_results(results_path(opt)))
               if r['arch'] in (arch, STUDENT) and r['dataset'] == 'synthetic' and r['split'] == 'test']
    plot_recall_curves(records, os.path.join(run_dir, 'recall_curves.png'))
    test_set = load_dataset(parse_options(['--mode=test', '--dataset=synthetic', '--dataPath', data_path]), 'test')
    queries = np.linspace(0, test_set.db_struct.numQ - 1, STRIP_QUERIES).round().astype(int)  # spread over streets
    retrieval_strips(test_set, trained_test['predictions'], queries,
                     os.path.join(run_dir, 'retrievals.png'))
    time_together(records, commands[1], parse_options, results_path(opt))
    table = run_mode(parse_options(['--mode=report', '--runsPath', opt.runsPath]))
    logging.info('====> Demo finished in %.1f min; pictures in %s', (time.time() - started) / 60, run_dir)
    return table
