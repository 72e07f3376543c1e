"""The int8 variant of the image -> descriptor network (EmbedNet): an int8 encoder program for x86 CPUs (torchao
PT2E: X86InductorQuantizer, uint8 per-tensor activations, int8 per-channel symmetric weights) before the float32
pooling (and whitening) of EmbedNet. Building the program (export, convert), its fake-quantised training form for QAT,
and loading a quantised run folder; --mode=quantize (quantize.py) drives the flows.

At load time the program is compiled by Inductor with freezing, which lowers its quantize/dequantize pattern to oneDNN
int8 convolutions (VNNI/AMX), once per input shape (seconds). NETVLAD_INT8_COMPILE=0 runs the program uncompiled
instead: a slow float simulation of the same int8 arithmetic.
"""
import logging
import os
import platform
import time

import torch

from commons import UserError, error_summary
from int8_archive import check_program_archive
from models import EmbedNet, build_head

PROGRAM_NAME = 'encoder_int8.pt2'
COMPILE_ENV = 'NETVLAD_INT8_COMPILE'
X86_MACHINES = ('x86_64', 'amd64', 'x86', 'i386', 'i686')
# Importing torchao registers its KernelPreference enum with torch's pytree, which recent torch warns about (a
# deprecation between the two libraries, nothing the user can act on): that one warning is left out of the output.
logging.getLogger('torch.utils._pytree').addFilter(lambda record: 'KernelPreference' not in record.getMessage())


# ---------------------------------------------------------------------------------------------- the program

def x86_quantizer(is_qat):
    """X86InductorQuantizer with its default config: uint8 per-tensor activations, int8 per-channel weights; on a CPU
    without int8 dot-product instructions (VNNI, AMX) the activations keep 7 bits (reduce_range), since oneDNN's
    AVX2 int8 convolution adds pairs of uint8 x int8 products in saturating int16, which full-range activations
    overflow.

    Importing this module also registers torchao's Inductor passes that lower the int8 pattern to oneDNN."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    config = x86.get_default_x86_inductor_quantization_config(is_qat=is_qat, reduce_range=not has_int8_dot_product())
    return x86.X86InductorQuantizer().set_global(config)


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


def program_path(checkpoint, folder):
    """The int8 program a quantised checkpoint names: a file of its own checkpoints/ folder, never a path elsewhere
    (a checkpoint that is safe to read must not point the loader at another file)."""
    name = checkpoint.get('encoder_program', PROGRAM_NAME)
    path = os.path.join(folder, str(name))
    inside = os.path.realpath(folder) == os.path.dirname(os.path.realpath(path))
    if not isinstance(name, str) or os.path.basename(name) != name or name in ('', '.', '..') or not inside:
        raise UserError(f'The quantized checkpoint in {folder} names its int8 encoder program {name!r}, which is not '
                        f'a file of that folder. A quantised run reads its program from its own checkpoints/ folder '
                        f'only ({PROGRAM_NAME}); run --mode=quantize again.')
    if not os.path.isfile(path):
        raise UserError(f'The quantized checkpoint in {folder} names its int8 encoder program {path}, which does not '
                        f'exist. Copy the whole checkpoints/ folder, or run --mode=quantize again.')
    return path


def load_quantized_model(checkpoint, run_dir, unsafe=False):
    """The QuantizedEmbedNet of a quantised run folder: its int8 program and float head, nothing recalibrated.

    The program is checked (int8_archive) before torch.export.load reads it, unless `unsafe` (--unsafe_load)."""
    folder = os.path.join(run_dir, 'checkpoints')
    path = program_path(checkpoint, folder)
    if 'config' not in checkpoint:
        raise UserError(f'The quantized checkpoint in {folder} has no "config" entry: it was not written by '
                        f'--mode=quantize.')
    if not unsafe:
        check_program_archive(path)
    register_x86_int8_lowering()
    try:
        program = torch.export.load(path)
    except Exception as error:
        raise UserError(f'int8 encoder program {path} cannot be read ({error_summary(error)}).') from None
    pool, whiten = build_head(checkpoint['config'])
    head = torch.nn.ModuleDict(dict(pool=pool) if whiten is None else dict(pool=pool, whiten=whiten))
    try:
        head.load_state_dict(checkpoint['state_dict'])
    except RuntimeError as error:
        raise UserError(f'Quantized checkpoint {path} does not match the pooling it describes: '
                        f'{" ".join(str(error).split())}') from None
    return QuantizedEmbedNet(program.module(), pool, whiten, compile=compile_enabled()).eval()


