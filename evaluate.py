"""--mode=test: Recall@N of a run (or of the untrained, cluster-initialised network) on a split (SPEC section 5).

The extraction, search and recall are retrieval.py's. Under torchrun each process writes its share of the
descriptors (extract_part), and `--descriptors PART...` merges the parts and searches them in one process.
"""
import logging
import os
import time

import torch
from torch.utils.data import Subset

from commons import UserError, atomic_write_json, make_deterministic, select_device
from descriptors import open_parts, part_name, part_rows
from pittsburgh import WholeDataset
from results import record_result
from retrieval import evaluate, extract_descriptors, log_recalls, search_and_recall
from runs import load_model


def evaluate_parts(paths, dataset, dim, opt):
    """Recall@N from the descriptor files that a sharded extraction (torchrun, see extract_part) wrote, searched
    where they lie."""
    started = time.time()
    whole = open_parts(paths, opt.split, len(dataset), dim)
    logging.info('Checked %d descriptor parts (%d x %d %s) in %.1f s', len(whole.files), len(dataset), dim,
                 whole.dtype.name, time.time() - started)
    result = search_and_recall(whole, dataset.db_struct.numDb, dataset.positives(), opt)
    return dict(result, extraction_s=None, images_per_s=None)


def torchrun_process():
    """(rank, world size) of this process under torchrun (its RANK and WORLD_SIZE), else (0, 1)."""
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def extract_part(model, dataset, opt, device, rank, world):
    """This process's contiguous share of the split's images, as a descriptor file in --cachePath."""
    if not opt.cachePath:
        raise UserError(f'Under torchrun (WORLD_SIZE={world}) --mode=test writes each process\'s share of the '
                        f'descriptors to --cachePath and leaves the search to one later command: give --cachePath, '
                        f'a folder on a filesystem all machines share (or copy the parts to one machine).')
    start, stop = part_rows(len(dataset), rank, world)
    path = os.path.join(opt.cachePath, part_name(opt.split, model.output_dim, rank, world))
    partial = path[:-len('.npy')] + '.partial'
    started = time.time()
    extract_descriptors(model, Subset(dataset, range(start, stop)), opt, device,
                        f'{opt.split} part {rank}/{world}', path=partial)
    os.replace(partial, path)  # a killed process leaves no file that looks complete
    logging.info('====> Part %d of %d: descriptors of images %d..%d of %d written to %s in %.1f s. When all %d '
                 'parts are written, search them with: python main.py --mode=test --split=%s --resume=%s '
                 '--descriptors %s', rank, world, start, stop, len(dataset), path, time.time() - started, world,
                 opt.split, opt.resume or '(none)',
                 os.path.join(opt.cachePath, part_name(opt.split, model.output_dim, 0, world).replace(
                     'part000', 'part*')))
    return dict(part=path, rows=[start, stop], world=world)


def test(opt):
    make_deterministic(opt.seed)
    device = select_device(opt)
    rank, world = torchrun_process()
    if world > 1 and device.type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    dataset = WholeDataset(opt.dataPath, opt.split, opt.resize, images=not opt.descriptors)
    model, checkpoint, run_dir = load_model(opt)
    if getattr(model, 'cpu_only', False) and device.type != 'cpu':  # the int8 model of --mode=quantize
        logging.info('This model runs on the CPU (int8 x86 kernels): evaluating on the CPU instead of %s.', device)
        device = torch.device('cpu')
    model = model.to(device).to(memory_format=torch.channels_last)
    if world > 1:
        return extract_part(model, dataset, opt, device, rank, world)
    logging.info('Testing %s on %s split %s: %d database images, %d queries', run_dir, opt.dataset, opt.split,
                 dataset.db_struct.numDb, dataset.db_struct.numQ)
    if opt.descriptors:
        result = evaluate_parts(opt.descriptors, dataset, model.output_dim, opt)
    else:
        result = evaluate(model, dataset, opt, device)
    predictions = result.pop('predictions')
    log_recalls(result['recalls'])
    result.update(split=opt.split, dataset=opt.dataset, run=run_dir, precision=opt.precision,
                  device=str(device))
    path = os.path.join(run_dir, f'test_{opt.split}.json')
    atomic_write_json(result, path)
    record_result(opt, model, checkpoint, run_dir, result)
    logging.info('Tested %d images%s; results in %s', len(dataset),
                 f' at {result["images_per_s"]:.1f} images/s' if result['images_per_s'] else '', path)
    return dict(result, predictions=predictions)
