"""Checks an int8 encoder program (a torch.export .pt2 archive) before torch.export.load reads it.

torch.export.load runs code that an archive can carry: entries marked `use_pickle` (and legacy `.pt` entries,
sample inputs, custom and opaque objects) are unpickled, symbolic shape expressions are parsed by sympy (which
evaluates them), guard strings become Python code, and node targets name any attribute of `torch`. A program written
by --mode=quantize holds none of that beyond plain tensors, aten / quantized_decomposed operators, shape arithmetic
and size guards. So an archive is read only when every entry, every payload and every string of those kinds has that
plain form; anything else is refused before torch sees the file, and --unsafe_load loads it as it is.
"""
import json
import re
import zipfile

from commons import UserError

# entries below the archive's root folder
PLAIN_ENTRIES = re.compile(r'(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id'
                           r'|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+'
                           r'|data/constants/\w+_constants_config\.json|data/constants/tensor_\w+'
                           r'|data/sample_inputs/\w+\.pt)')
PLAIN_TARGET = re.compile(r'torch\.ops\.(aten|quantized_decomposed)\.\w+\.\w+|_operator\.getitem')
# sympy expressions of input sizes: Add(FloorDiv(Symbol('s16', positive=True, integer=True), Integer(8)), ...)
SYMPY_NAMES = {'Add', 'Mul', 'Max', 'Min', 'FloorDiv', 'Mod', 'PythonMod', 'CleanDiv', 'Pow', 'Integer', 'Symbol',
               'Eq', 'Ne', 'Ge', 'Gt', 'Le', 'Lt', 'And', 'Or', 'Not', 'positive', 'integer', 'True', 'False'}
SYMPY_TOKENS = re.compile(r"\s+|[A-Za-z]\w*|'[a-z]+\d+'|-?\d+|[(),=]")
# guards on the input's sizes: L['input'].size()[2] >= 31, torch.sym_max(1, ...) ...
GUARD_TOKENS = re.compile(r"\s+|L\['[A-Za-z_]\w*'\]\.size\(\)\[\d+\]|torch\.sym_(max|min)|and|or|not|\d+"
                          r"|//|==|!=|>=|<=|[-+*%<>(),]")


def check_program_archive(path):
    """Raise a UserError naming the first entry of the archive at `path` that torch.export.load would run as code."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            root = names[0].split('/', 1)[0] + '/' if names else ''
            for name in names:
                check_entry(path, archive, name, root)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f'int8 encoder program {path} is not a readable torch.export archive '
                        f'({type(error).__name__}: {error}). Run --mode=quantize again.') from None


def refuse(path, what):
    raise UserError(f'int8 encoder program {path} holds {what}, which loading would run as code; --mode=quantize '
                    f'never writes that. It is not loaded. Load it only if you trust its source, with --unsafe_load.')


def check_entry(path, archive, name, root):
    inner = name[len(root):] if name.startswith(root) else None
    if inner is None or not PLAIN_ENTRIES.fullmatch(inner):
        refuse(path, f'the entry {name!r}')
    if inner.startswith('data/sample_inputs/') and archive.getinfo(name).file_size:
        refuse(path, f'pickled sample inputs ({name!r})')
    if inner.endswith('_config.json'):
        check_payload_config(path, name, json.loads(archive.read(name)))
    elif inner.startswith('models/'):
        check_program(path, name, json.loads(archive.read(name)))


def check_payload_config(path, name, config):
    for key, payload in dict(config.get('config') or {}).items():
        if not isinstance(payload, dict) or payload.get('use_pickle', True) or \
                not re.fullmatch(r'(weight|tensor)_\w+', str(payload.get('path_name'))):
            refuse(path, f'a pickled or unknown payload {key!r} in {name!r}')


def check_program(path, name, program):
    graph = program.get('graph_module', {}).get('graph', {})
    if graph.get('custom_obj_values'):
        refuse(path, f'custom objects in {name!r}')
    for target in strings_under(program, 'target'):
        if not PLAIN_TARGET.fullmatch(target):
            refuse(path, f'the operator {target!r} in {name!r}')
    for symbol in program.get('range_constraints') or {}:
        if not re.fullmatch(r'[a-z]+\d+', symbol):
            refuse(path, f'the shape symbol {symbol[:80]!r} in {name!r}')
    for expression in strings_under(program, 'expr_str'):
        if not plain(expression, SYMPY_TOKENS, SYMPY_NAMES):
            refuse(path, f'the shape expression {expression[:80]!r} in {name!r}')
    for guard in program.get('guards_code') or []:
        if not plain(guard, GUARD_TOKENS):
            refuse(path, f'the guard {str(guard)[:80]!r} in {name!r}')


def plain(text, tokens, names=None):
    """Whether `text` is a string made only of `tokens`, its identifiers (if any) among `names`."""
    if not isinstance(text, str):
        return False
    position = 0
    while position < len(text):
        match = tokens.match(text, position)
        if match is None:
            return False
        token = match.group()
        if names is not None and token[0].isalpha() and token not in names:
            return False
        position = match.end()
    return True


def strings_under(tree, key):
    """Every value stored under `key` anywhere in a JSON tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, value in node.items():
                if k == key:
                    yield value
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
