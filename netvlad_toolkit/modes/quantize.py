"""--mode=quantize: an int8 encoder for x86 CPUs with a float32 NetVLAD head, by static PTQ or QAT.

The flow is the one PyTorch supports today for int8 convnets on x86 (torchao PT2E):
    torch.export of the encoder (dynamic batch and image size)
    -> prepare_pt2e / prepare_qat_pt2e with X86InductorQuantizer (uint8 per-tensor activations, int8 per-channel
       symmetric weights)
    -> calibration on --calib_images random training-database images (never the evaluated split, which may not be
       train); QAT then fine-tunes the fake-quantised network for --qat_epochs with the triplet loss and mining of
       training.fit and its optimiser flags (--optim, ...), at a tenth of --lr, training the layers the source run
       trained (from its first trainable layer, or --backPropToLayer)
    -> the prepared encoder saved as tensors (int8 weights, observer statistics); loading rebuilds the program from
       them with convert_pt2e (int8.py), as every later mode does.
Only the encoder is quantised (with the input re-normalisation of an imported network in front, models.trunk):
NetVLAD's soft-assignment, residual sums and normalisations (and PCA whitening) stay float32, stored as a state dict
beside the encoder. At load time the program is compiled by Inductor with freezing,
which lowers its quantize/dequantize pattern to oneDNN int8 convolutions (VNNI/AMX), once per input shape (seconds).
NETVLAD_INT8_COMPILE=0 runs the program uncompiled instead: a slow float simulation of the same int8 arithmetic.
On a CUDA machine int8 inference runs on the CPU (QAT fine-tuning itself uses the GPU).

Output, beside the input run: <resume>_quantized_<type>/checkpoints/ with encoder_int8.pth (the encoder's tensors and
quantizer settings) and checkpoint.pth.tar (a plain dict: quantized, state_dict of the float head, config, ...), the
folder built whole beside it and swapped in (runs.building_folder: a killed quantize never leaves the encoder of one
quantization beside the head of another), which
--mode=test --resume=<that folder> runs without recalibration and without the training code; and
quantize_report.json: file size, median CPU latency per image at --latency_size and Recall@N on --split, fp32 before
and int8 after, with ratios (also printed, and appended to the results file).
"""
import copy
import logging
import os
import time

import torch
from tqdm import tqdm

from netvlad_toolkit.datasets.datasets import load_dataset, training_database_sample
from netvlad_toolkit.datasets.images import image_loader
from netvlad_toolkit.model.checkpoint import save_checkpoint, trainable_state, write_checkpoint_files
from netvlad_toolkit.model.int8 import (
    FakeQuantEmbedNet,
    head_state,
    int8_reduce_range,
    prepared_encoder,
    quantization_record,
    save_encoder,
)
from netvlad_toolkit.model.models import config_from_checkpoint, trunk
from netvlad_toolkit.runs.measure import LATENCY_TEXT, compare, directory_size, interleaved_latency, model_bytes
from netvlad_toolkit.runs.results import append_result, variant_of
from netvlad_toolkit.runs.runs import (
    apply_backprop_flag,
    check_derived_target,
    copy_flags,
    derived_run_folder,
    open_run,
)
from netvlad_toolkit.search.retrieval import evaluate, log_recalls
from netvlad_toolkit.training.training import add_compressing_flags, apply_recipe, fit, training_splits
from netvlad_toolkit.utils.commons import UserError, building_folder, make_deterministic, select_device, setup_logging
from netvlad_toolkit.utils.options import (
    AT_LEAST_1,
    add_calibration_flag,
)

QUANTIZATION_TYPES = ('static', 'qat')
TRAIN_SPLITS = ('train', 'train250k')
# QAT fine-tunes at a tenth of --lr: a fresh optimizer at the training rate first undoes the trained model
# (docs/compression.md has the measurement).
QAT_LR_FACTOR = 0.1
REPORT_NAME = 'quantize_report.json'


# ---------------------------------------------------------------------------------------------- calibration

def calibration_set(opt):
    """--calib_images random training-database images (seeded): the only images that set activation ranges."""
    return training_database_sample(opt, opt.calib_images, '--mode=quantize calibrates the int8 activations')


def calibrate(prepared, loader):
    """Run the calibration images through the observed (or fake-quantised) encoder."""
    with torch.no_grad():  # observers update buffers: not inference mode
        for images, _ in tqdm(loader, desc='calibration', unit='batch'):
            prepared(images.contiguous(memory_format=torch.channels_last))


def example_batch(loader):
    """Two copies of the first calibration image: with batch 2, export keeps the batch size dynamic."""
    return loader.dataset[0][0].unsqueeze(0).repeat(2, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- the two flows

def quantize_static(model, loader):
    """Post-training quantisation: observe activation ranges on the calibration images. Returns the calibrated
    prepared encoder, the float head's model and the quantization record."""
    example = example_batch(loader)
    record = quantization_record('static', int8_reduce_range(), example)
    prepared = prepared_encoder(trunk(model).eval(), example, 'static', record['reduce_range'])
    calibrate(prepared, loader)
    return prepared, model, record


def quantize_qat(model, loader, splits, opt, device, run_dir):
    """Quantisation-aware training: calibrate the fake-quantisers, fine-tune with the triplet loss (the layers the
    float model trains). Returns the trained prepared encoder, the model with its head and the quantization record."""
    example = example_batch(loader)
    record = quantization_record('qat', int8_reduce_range(), example)
    prepared = prepared_encoder(trunk(model), example, 'qat', record['reduce_range'])
    calibrate(prepared, loader)
    qat_model = FakeQuantEmbedNet(prepared, model.pool, model.frozen_layers, getattr(model, 'whiten', None),
                                  model.arch)
    qat_opt = copy.copy(opt)
    qat_opt.lr = opt.lr * QAT_LR_FACTOR
    logging.info('QAT: %d epoch(s) of fake-quantised triplet fine-tuning on %s, %s at lr %g (%g x --lr)',
                 opt.qat_epochs, device, opt.optim, qat_opt.lr, QAT_LR_FACTOR)
    state = fit(qat_model, splits, qat_opt, device, run_dir, opt.qat_epochs, state=None, save=False)
    logging.info('QAT done: epoch %d, val Recall@5 of the fake-quantised model %.4f', state.get('epoch', 0),
                 state.get('best_score', 0.0))
    qat_model = qat_model.eval().to('cpu').to(memory_format=torch.contiguous_format)
    return qat_model.encoder, qat_model, record


# ---------------------------------------------------------------------------------------------- the mode

def add_flags(p):
    add_compressing_flags(p)
    group = p.add_argument_group('quantization')
    group.add_argument('--quantization_type', default='static', choices=QUANTIZATION_TYPES,
                       help='static: int8 post-training quantization calibrated on training images; qat: '
                            'quantization-aware fine-tuning with the triplet loss, then int8.')
    add_calibration_flag(group)
    group.add_argument('--qat_epochs', type=AT_LEAST_1, default=1, help='Epochs of quantization-aware training.')


def check_split(opt):
    if opt.split in TRAIN_SPLITS:
        raise UserError(f'--split={opt.split}: the calibration images come from the training database; evaluate '
                        f'the quantized model on val or test instead.')


def qat_splits(opt):
    apply_recipe(opt)
    return training_splits(opt)


def output_dir(opt):
    return derived_run_folder(opt.resume, f'quantized_{opt.quantization_type}')


def measure_model(model, dataset, opt, device):
    """Recall@N on --split; returns the report record and the evaluation (for the results file)."""
    result = evaluate(model, dataset, opt, device)
    log_recalls(result['recalls'])
    record = dict(descriptor_dim=result['descriptor_dim'])
    record.update({f'recall@{n}': recall for n, recall in result['recalls'].items()})
    return record, result


def quantized_variant(source, opt):
    """The results table's name of the int8 model: 'int8 static', after the source's name when the source is itself
    compressed or whitened (e.g. 'pruned structured 50% + int8 static')."""
    name = f'int8 {opt.quantization_type}'
    return name if variant_of(source) == 'trained' else f'{variant_of(source)} + {name}'


def save_quantized(prepared, record, head_model, config, source, opt, out_dir, calib_count):
    """checkpoints/ with encoder_int8.pth (the encoder's tensors) and checkpoint.pth.tar (plain data: float head,
    config, provenance)."""
    folder = os.path.join(out_dir, 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    save_encoder(prepared, record, folder)
    checkpoint = dict(quantized=opt.quantization_type, variant=quantized_variant(source, opt),
                      state_dict=head_state(head_model), config=config, pooling=config['pooling'],
                      source_run=opt.resume, epoch=int(source.get('epoch', 0)),
                      recalls={}, best_score=0.0, calib_images=calib_count,
                      qat_epochs=opt.qat_epochs if opt.quantization_type == 'qat' else 0,
                      weights='int8 per-channel symmetric', activations='uint8 per-tensor affine',
                      versions=dict(torch=str(torch.__version__), torchao=_torchao_version()),
                      **{key: source[key] for key in ('teacher',) if key in source},  # a distilled student's
                      **trainable_state(head_model))
    write_checkpoint_files(checkpoint, folder, is_best=True)  # model_best too: --ckpt=best finds the same model
    return checkpoint


def quantize(opt):
    check_split(opt)
    make_deterministic(opt.seed)
    device = select_device(opt)
    model, source = open_run(opt)
    if 'quantized' in source:
        raise UserError(f'--resume={opt.resume} holds an already quantized model; quantize its float run instead.')
    apply_backprop_flag(model, opt)
    config = config_from_checkpoint(source, opt.pooling, opt.resume)
    calib_set = calibration_set(opt)
    eval_set = load_dataset(opt, opt.split)
    splits = qat_splits(opt) if opt.quantization_type == 'qat' else None
    out_dir = output_dir(opt)
    check_derived_target(out_dir, opt)
    with building_folder(out_dir) as folder:
        report, before, after, result, checkpoint = quantize_into(folder, model, source, config, calib_set, eval_set,
                                                                  splits, opt, device)
    result.update({key: checkpoint[key] for key in ('teacher',) if key in checkpoint})
    append_result(_options(opt, arch=config['arch']), checkpoint['variant'], result, after['file_bytes'],
                  after['latency_ms'], out_dir)
    logging.info('====> int8 model (%s) in %s (report: %s): file %.2fx smaller, %.2fx faster on the CPU, Recall@1 '
                 '%.4f -> %.4f', opt.quantization_type, out_dir, os.path.join(out_dir, REPORT_NAME),
                 before['file_bytes'] / after['file_bytes'],
                 before['latency_ms'] / after['latency_ms'], before.get('recall@1', float('nan')),
                 after.get('recall@1', float('nan')))
    return report


def quantize_into(out_dir, model, source, config, calib_set, eval_set, splits, opt, device):
    """Quantize, save into out_dir, evaluate and time: (report, before, after, evaluation, checkpoint)."""
    setup_logging(out_dir)  # only now: bad flags or data write nothing
    copy_flags(opt.resume, out_dir)
    if device.type != 'cpu':
        logging.info('int8 models run on the CPU (x86 oneDNN int8 kernels): calibration, conversion and int8 '
                     'evaluation run on the CPU%s.',
                     f'; QAT fine-tunes on {device}' if opt.quantization_type == 'qat' else '')
    logging.info('Quantizing %s (%s) to int8 (%s) into %s: calibration on %d training-database images, '
                 'evaluation on %s %s', opt.resume, config['arch'], opt.quantization_type, output_dir(opt),
                 len(calib_set), opt.dataset, opt.split)

    before, _ = measure_model(model.to(device).to(memory_format=torch.channels_last), eval_set, opt, device)
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    before['file_bytes'] = model_bytes(model, None, opt.resume)  # the weights alone, without optimizer state
    # QAT fine-tunes the float head in place. The copy is timed as --mode=test runs it: channels-last weights, as
    # its input is and as the int8 convs run (contiguous weights against a channels-last input are slower)
    original = copy.deepcopy(model).to(memory_format=torch.channels_last)
    started = time.time()
    calib_loader = image_loader(calib_set, opt, opt.cacheBatchSize)
    if opt.quantization_type == 'static':
        prepared, head_model, record = quantize_static(model, calib_loader)
    else:
        prepared, head_model, record = quantize_qat(model, calib_loader, splits, opt, device, out_dir)
    checkpoint = save_quantized(prepared, record, head_model, config, source, opt, out_dir, len(calib_set))
    logging.info('int8 model made in %.1f s', time.time() - started)

    quantized = open_run(_options(opt, resume=out_dir, ckpt='latest'))[0]  # what --mode=test runs
    after, result = measure_model(quantized, eval_set, opt, torch.device('cpu'))
    checkpoint.update(recalls=result['recalls'], best_score=result['recalls'].get(5, 0.0))
    save_checkpoint(checkpoint, out_dir, is_best=True)
    after['file_bytes'] = directory_size(out_dir)
    before['latency_ms'], after['latency_ms'] = interleaved_latency([original, quantized], opt.latency_size)
    report = compare(before, after, os.path.join(out_dir, REPORT_NAME),
                     f'int8 quantization ({opt.quantization_type}) of {opt.resume} ({opt.split} split, CPU latency '
                     f'at {opt.latency_size[0]}x{opt.latency_size[1]}, {LATENCY_TEXT})')
    return report, before, after, result, checkpoint


def _options(opt, **changes):
    """A copy of the options with some values changed."""
    from argparse import Namespace
    return Namespace(**dict(vars(opt), **changes))


def _torchao_version():
    import torchao
    return str(torchao.__version__)
