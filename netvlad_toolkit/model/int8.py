"""The int8 variant of the image -> descriptor network (EmbedNet): an int8 encoder program for x86 CPUs (torchao
PT2E: X86InductorQuantizer, uint8 per-tensor activations, int8 per-channel symmetric weights) before the float32
pooling (and whitening) of EmbedNet. Preparing the encoder (export, prepare), its fake-quantised training form for QAT,
saving a quantised encoder as tensors and rebuilding its program; --mode=quantize (quantize.py) drives the flows.

A quantised run stores no program: encoder_int8.pth holds tensors only (the int8 weights and the observers' statistics:
activation histograms and ranges, weight ranges, QAT fake-quantiser state) and a plain record of the quantizer
settings, read with torch.load(weights_only=True). Loading rebuilds the program the way --mode=quantize built it: the
float encoder of the run's architecture is exported and prepared with the same quantizer, the saved statistics are put
into its observers and its weights are the saved int8 values, and convert_pt2e makes the same int8 program. Nothing of
the file is unpickled beyond tensors or evaluated as code. Runs written before this layout (encoder_int8.pt2, a
torch.export archive, which loading would unpickle and evaluate) are read only with --unsafe_load.

At load time the program is compiled by Inductor with freezing, which lowers its quantize/dequantize pattern to oneDNN
int8 convolutions (VNNI/AMX), once per input shape (seconds). NETVLAD_INT8_COMPILE=0 runs the program uncompiled
instead: a slow float simulation of the same int8 arithmetic.
"""
import collections
import logging
import os
import platform
import time

import torch

from netvlad_toolkit.model.checkpoint import check_entries, read_checkpoint
from netvlad_toolkit.model.models import (
    ARCHS,
    NATIVE_STUDENT_STRIDE,
    POOLINGS,
    STUDENT_STRIDES,
    STUDENTS,
    EmbedNet,
    build_head,
    build_model,
    trunk,
)
from netvlad_toolkit.utils.commons import UserError, atomic_torch_save, error_summary

ENCODER_NAME = 'encoder_int8.pth'
LEGACY_PROGRAM_NAME = 'encoder_int8.pt2'
COMPILE_ENV = 'NETVLAD_INT8_COMPILE'
X86_MACHINES = ('x86_64', 'amd64', 'x86', 'i386', 'i686')
SCHEMES = ('static', 'qat')
# The export example of a rebuilt encoder (a calibration image's size) is allocated, untouched, at load time.
MAX_EXAMPLE_SIDE = 8192
# Importing torchao registers its KernelPreference enum with torch's pytree, which recent torch warns about (a
# deprecation between the two libraries, nothing the user can act on): that one warning is left out of the output.
logging.getLogger('torch.utils._pytree').addFilter(lambda record: 'KernelPreference' not in record.getMessage())


# ---------------------------------------------------------------------------------------------- the program

def x86_quantizer(is_qat, reduce_range):
    """X86InductorQuantizer with its default config: uint8 per-tensor activations, int8 per-channel weights;
    `reduce_range` keeps 7-bit activations (see int8_reduce_range).

    Importing this module also registers torchao's Inductor passes that lower the int8 pattern to oneDNN."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    config = x86.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=reduce_range)
    return x86.X86InductorQuantizer().set_global(config)


def int8_reduce_range():
    """Whether activations keep 7 bits on this CPU: without int8 dot-product instructions (VNNI, AMX) oneDNN's AVX2
    int8 convolution adds pairs of uint8 x int8 products in saturating int16, which full-range activations overflow."""
    return not has_int8_dot_product()


def has_int8_dot_product():
    """Whether this CPU has VNNI or AMX int8 instructions (read from /proc/cpuinfo; assumed where it is absent)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return True
    return bool({'avx512_vnni', 'avx_vnni', 'amx_int8'} & set(flags))


def register_x86_int8_lowering():
    """The quantized_decomposed ops and the Inductor int8 fusion passes, needed to load and compile a program."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer  # noqa: F401  (registers on import)


def export_encoder(encoder, example):
    """torch.export of the encoder for any batch size and image size: [B, 3, H, W] -> [B, D, h, w]."""
    dynamic = ({0: torch.export.Dim('batch', min=1), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},)
    return torch.export.export(encoder, (example,), dynamic_shapes=dynamic)


def prepared_encoder(encoder, example, scheme, reduce_range):
    """The encoder exported and prepared for int8 (observers for static, fake-quantisers for QAT)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e
    is_qat = scheme == 'qat'
    exported = export_encoder(encoder.train(is_qat), example).module()
    return (prepare_qat_pt2e if is_qat else prepare_pt2e)(exported, x86_quantizer(is_qat, reduce_range))


def weight_observers(prepared):
    """(name of a conv weight, its per-channel observer or fake-quantiser) of a prepared encoder, in graph order."""
    modules = dict(prepared.named_modules(remove_duplicate=False))
    return [(node.args[0].target, modules[node.target]) for node in prepared.graph.nodes
            if node.op == 'call_module' and node.args and getattr(node.args[0], 'op', None) == 'get_attr']


def quantize_weight(weight, observer):
    """The int8 weight convert_pt2e folds from a float weight and its observer's (scale, zero point)."""
    scale, zero_point = observer.calculate_qparams()
    return torch.ops.quantized_decomposed.quantize_per_channel(weight.detach(), scale, zero_point, observer.ch_axis,
                                                               observer.quant_min, observer.quant_max, torch.int8)


def dequantize_weight(int8, observer):
    scale, zero_point = observer.calculate_qparams()
    return torch.ops.quantized_decomposed.dequantize_per_channel(int8, scale, zero_point, observer.ch_axis,
                                                                 observer.quant_min, observer.quant_max, torch.int8)


def encoder_state(prepared):
    """What a quantised encoder is, as tensors: the prepared encoder's state with each conv weight in int8 (its
    observer's quantisation, which convert_pt2e would fold), the observers' statistics and the float biases."""
    state = {key: value.detach().cpu().clone() for key, value in prepared.state_dict().items()}
    for name, observer in weight_observers(prepared):
        state[name] = quantize_weight(state[name], observer)
    return state


def drop_unused_weights(graph_module):
    """Remove the float weights convert_pt2e leaves behind (the graph reads their int8 copies instead)."""
    used = {node.target for node in graph_module.graph.nodes if node.op == 'get_attr'}
    for name in [name for name, _ in graph_module.named_parameters()] + [n for n, _ in graph_module.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition('.')
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    return graph_module


def converted_program(prepared, example):
    """The int8 ExportedProgram of a calibrated (or QAT-trained) prepared encoder, int8 weights only."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    converted = convert_pt2e(prepared, fold_quantize=True)
    converted.delete_all_unused_submodules()
    converted = drop_unused_weights(converted)
    program = export_encoder(converted, example)
    program.example_inputs = None  # otherwise torch.export.save stores the example batch in the file
    return program


def int8_weights(program_or_module):
    """(int8 weight, scale) of each quantised conv, in graph order, read from a program or its module."""
    module = program_or_module.module() if hasattr(program_or_module, 'graph_signature') else program_or_module
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    weights = []
    for node in module.graph.nodes:
        if node.op == 'call_function' and node.target == dequantize and node.args[0].op == 'get_attr':
            weight, scale = (_attribute(module, arg.target) for arg in node.args[:2])
            weights.append((weight, scale))
    return weights


def _attribute(module, target):
    owner, _, name = target.rpartition('.')
    return getattr(module.get_submodule(owner) if owner else module, name)


# ---------------------------------------------------------------------------------------------- the file

def quantization_record(scheme, reduce_range, example):
    """The quantizer settings a rebuild repeats, as plain data: scheme, 7-bit activations, the export example's size."""
    return dict(scheme=scheme, reduce_range=bool(reduce_range), example_size=[int(s) for s in example.shape[2:]])


def save_encoder(prepared, record, folder):
    """encoder_int8.pth in `folder`: the encoder's tensors (encoder_state) and the quantization record."""
    atomic_torch_save(dict(state_dict=encoder_state(prepared), quantization=record),
                      os.path.join(folder, ENCODER_NAME))


def checked_record(record, path):
    """The quantization record of encoder_int8.pth, each value of the type and range --mode=quantize writes."""
    size = record.get('example_size') if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get('scheme') not in SCHEMES or \
            not isinstance(record.get('reduce_range'), bool) or not isinstance(size, list) or len(size) != 2 or \
            not all(type(side) is int and 1 <= side <= MAX_EXAMPLE_SIDE for side in size):
        raise UserError(f'int8 encoder file {path} has no valid "quantization" record (scheme static or qat, '
                        f'reduce_range true or false, example_size two image sides from 1 to {MAX_EXAMPLE_SIDE}); '
                        f'it was not written by --mode=quantize. Run --mode=quantize again.')
    return record


def _load_entries(module, entries):
    """load_state_dict of some entries, with the module's own version metadata: observers read a state without it as
    one of an old version, and reset their eps."""
    state = collections.OrderedDict(entries)
    state._metadata = module.state_dict()._metadata
    module.load_state_dict(state, strict=False)


def rebuilt_program(config, record, state, path):
    """The int8 encoder program of a saved encoder state, rebuilt from the run's float architecture (see the module
    docstring): the same program --mode=quantize converted."""
    register_x86_int8_lowering()
    example = torch.empty(2, 3, *record['example_size'])  # export traces shapes only: its values are never read
    skeleton = build_model(dict(config, first_trainable=0))
    prepared = prepared_encoder(trunk(skeleton), example, record['scheme'], record['reduce_range'])
    observers = weight_observers(prepared)
    with torch.no_grad():
        for name, observer in observers:
            observer(_attribute(prepared, name))  # the per-channel statistics take their shapes
    check_entries(state, prepared.state_dict(), path, int8_names={name for name, _ in observers})
    _load_entries(prepared, {k: v for k, v in state.items() if k not in dict(observers)})
    _load_entries(prepared, {name: dequantize_weight(state[name], observer) for name, observer in observers})
    if record['scheme'] == 'qat':
        from torchao.quantization.pt2e import move_exported_model_to_eval
        move_exported_model_to_eval(prepared)
    return converted_program(prepared, example)


# ---------------------------------------------------------------------------------------------- models

class FakeQuantEmbedNet(EmbedNet):
    """EmbedNet around the QAT-prepared encoder program, shaped as training.fit expects a model.

    train()/eval() reach the program through torchao's move_exported_model_to_train/eval, and switch its observers
    on and off: activation ranges follow the training batches only, not descriptor caching or validation.
    The encoder layers before `frozen_layers` (the float run's) do not train."""

    def __init__(self, encoder, pool, frozen_layers=0, whiten=None, arch=None):
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        super().__init__(allow_exported_model_train_eval(encoder), pool, frozen_layers, whiten, arch)

    def features(self, images):
        return self.encoder(images)  # one program: its frozen parameters get no gradient (requires_grad off)

    def train(self, mode=True):
        from torchao.quantization.pt2e import disable_observer, enable_observer
        super().train(mode)
        self.encoder.apply(enable_observer if mode else disable_observer)
        return self


class Int8Encoder(torch.nn.Module):
    """The int8 encoder program on the CPU, compiled (Inductor, freezing) at the first batch of each new shape unless
    compile=False; inputs are brought to the CPU in float32, and int8 stays int8 under --precision autocast."""

    def __init__(self, program_module, compile=True):
        super().__init__()
        self.program = program_module
        # Kept out of the module tree: the compiled wrapper would duplicate the program's state and train() calls.
        object.__setattr__(self, 'compiled', torch.compile(program_module, dynamic=False) if compile else None)
        self.compiled_shapes = set()

    def train(self, mode=True):
        self.training = mode  # the int8 program has no training mode
        return self

    def forward(self, images):
        images = images.to('cpu', torch.float32)
        with torch.no_grad(), torch.autocast('cpu', enabled=False):
            return self.run_program(images)

    def run_program(self, images):
        if self.compiled is None:
            return self.program(images)
        shape = tuple(images.shape)
        started = time.time()
        try:
            with torch._inductor.config.patch(freezing=True):  # options={'freezing': True} fails to lower qconv
                features = self.compiled(images)
        except Exception as error:  # no C++ compiler, or a lowering the installed versions lack
            logging.warning('Compiling the int8 encoder failed (%s); running the program uncompiled (slow).',
                            error_summary(error))
            object.__setattr__(self, 'compiled', None)
            return self.program(images)
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            logging.info('int8 encoder compiled for input %s in %.1f s', 'x'.join(map(str, shape)),
                         time.time() - started)
        return features


class QuantizedEmbedNet(EmbedNet):
    """EmbedNet with an Int8Encoder: inference only, and CPU only (`cpu_only`): device and dtype moves are ignored."""

    cpu_only = True

    def __init__(self, program_module, pool, whiten=None, compile=True):
        super().__init__(Int8Encoder(program_module, compile), pool, whiten=whiten)

    def _apply(self, fn, recurse=True):
        return self  # int8 oneDNN kernels run on x86 CPUs: .to(device), .cuda(), .half() leave the model as it is


def head_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(('pool.', 'whiten.'))}


def compile_enabled():
    if os.environ.get(COMPILE_ENV, '1') == '0':
        return False
    if platform.machine().lower() not in X86_MACHINES:
        logging.warning('The int8 program targets x86 CPUs (oneDNN); on %s it runs uncompiled (slow).',
                        platform.machine())
        return False
    return True


def legacy_program_path(checkpoint, folder):
    """The torch.export program a quantised checkpoint of the former layout names: a file of its own checkpoints/
    folder, never a path elsewhere (a checkpoint must not point the loader at another file)."""
    name = checkpoint.get('encoder_program', LEGACY_PROGRAM_NAME)
    path = os.path.join(folder, str(name))
    inside = os.path.realpath(folder) == os.path.dirname(os.path.realpath(path))
    if not isinstance(name, str) or os.path.basename(name) != name or name in ('', '.', '..') or not inside:
        raise UserError(f'The quantized checkpoint in {folder} names its int8 encoder program {name!r}, which is not '
                        f'a file of that folder. Run --mode=quantize again on the float run it was made from.')
    if not os.path.isfile(path):
        raise UserError(f'The quantized checkpoint in {folder} names its int8 encoder program {path}, which does not '
                        f'exist. Copy the whole checkpoints/ folder, or run --mode=quantize again.')
    return path


def legacy_program(checkpoint, folder, unsafe):
    """The program of a run quantised before encoders were stored as tensors: torch.export.load, with --unsafe_load
    only (it unpickles entries and evaluates shape expressions and guards the archive carries)."""
    path = legacy_program_path(checkpoint, folder)
    if not unsafe:
        raise UserError(f'{path} is an int8 encoder in the former format, a torch.export program, which loading would '
                        f'unpickle and evaluate as code; this version stores int8 encoders as tensors only '
                        f'({ENCODER_NAME}) and loads nothing else without --unsafe_load. Run --mode=quantize again on '
                        f'the float run it was made from ({checkpoint.get("source_run", "its source run")}), or, if '
                        f'you trust the file, add --unsafe_load.')
    register_x86_int8_lowering()
    try:
        return torch.export.load(path)
    except Exception as error:
        raise UserError(f'int8 encoder program {path} cannot be read ({error_summary(error)}).') from None


def saved_program(config, folder, unsafe):
    """The int8 program of a quantised run's encoder_int8.pth (see the module docstring)."""
    path = os.path.join(folder, ENCODER_NAME)
    if not os.path.isfile(path):
        raise UserError(f'The quantized run in {os.path.dirname(folder)} has no int8 encoder file {path}. Copy the '
                        f'whole checkpoints/ folder, or run --mode=quantize again.')
    encoder = read_checkpoint(path, unsafe)
    return rebuilt_program(config, checked_record(encoder.get('quantization'), path),
                           encoder['state_dict'], path)


def checked_config(config, folder):
    """The architecture a quantised checkpoint describes, each value of the type and range the models take."""
    arch = config.get('arch') if isinstance(config, dict) else None
    channels = config.get('encoder_channels') if arch in ARCHS else None
    student = arch in STUDENTS and _positive_int(config.get('local_dim')) and \
        config.get('output_stride', NATIVE_STUDENT_STRIDE) in STUDENT_STRIDES  # a distilled student's own trunk
    valid = (arch in ARCHS or student) and config.get('pooling') in POOLINGS and \
        isinstance(config.get('vladv2'), bool) and isinstance(config.get('input_norm', False), bool) and \
        all(config.get(key) is None or _positive_int(config[key]) for key in ('num_clusters', 'pca_dim')) and \
        (config['pooling'] != 'netvlad' or config.get('num_clusters') is not None) and \
        (channels is None or isinstance(channels, list) and len(channels) == len(ARCHS[arch]['channels']) and
         all(_positive_int(width) and width <= full for width, full in zip(channels, ARCHS[arch]['channels'])))
    if not valid:
        raise UserError(f'The quantized checkpoint in {folder} has no valid "config" entry (arch, pooling, '
                        f'num_clusters, vladv2, encoder_channels or local_dim and output_stride, pca_dim, input_norm '
                        f'of a model this toolkit builds): it was not written by --mode=quantize.')
    return config


def _positive_int(value):
    return type(value) is int and value > 0


def float_head(config, state, path):
    """The float pooling (and whitening) of a quantised run, its weights checked against the architecture first."""
    def head():
        pool, whiten = build_head(config)
        return torch.nn.ModuleDict(dict(pool=pool) if whiten is None else dict(pool=pool, whiten=whiten))
    with torch.device('meta'):
        check_entries(state, head().state_dict(), path)
    module = head()
    module.load_state_dict(state)
    return module


def load_quantized_model(checkpoint, run_dir, unsafe=False, path=None):
    """The QuantizedEmbedNet of a quantised run folder (its checkpoint read from `path`): its int8 program and float
    head, nothing recalibrated."""
    folder = os.path.join(run_dir, 'checkpoints')
    config = checked_config(checkpoint.get('config'), folder)
    head = float_head(config, checkpoint['state_dict'], path or folder)
    legacy = 'encoder_program' in checkpoint
    program = legacy_program(checkpoint, folder, unsafe) if legacy else saved_program(config, folder, unsafe)
    return QuantizedEmbedNet(program.module(), head.pool, getattr(head, 'whiten', None),
                             compile=compile_enabled()).eval()
