"""A seeded corpus of hostile run files. Each case first shows that the unprotected loader runs its payload
(torch.export.load for the former int8 programs, torch.load(weights_only=False) for checkpoints): a marker file
appears, or the load does not end. Then the toolkit refuses the file with one paragraph (exit 2), the marker never
appears and nothing is appended to results.jsonl."""
import io
import json
import multiprocessing
import os
import shutil
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch

from helpers import error_paragraph
from netvlad_toolkit import cli
from netvlad_toolkit.model import checkpoint as checkpoint_module
from netvlad_toolkit.model import int8
from netvlad_toolkit.model.checkpoint import read_checkpoint
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.utils.commons import UserError

SEED = 7
FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--split', 'test']
# How long an unprotected load of a bomb is let run before the test calls it endless (a plain load takes ~2 s here).
BOMB_SECONDS = 8


class WritesMarker:
    """Unpickling this object creates the file `marker`: proof that code of the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def zip_entries(path_or_bytes):
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with zipfile.ZipFile(source) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(path, items):
    """A zip of (name, bytes) in order, the same name more than once if asked."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, 'w') as archive:
        warnings.simplefilter('ignore')  # 'Duplicate name'
        for name, data in items:
            archive.writestr(name, data)


def rename_local_header(path, name, new_name):
    """Give the local header of entry `name` another name of the same length; the central directory keeps `name`."""
    data = bytearray(open(path, 'rb').read())
    position = 0
    while (position := data.find(b'PK\x03\x04', position)) >= 0:
        length = struct.unpack('<H', data[position + 26:position + 28])[0]
        if data[position + 30:position + 30 + length] == name.encode():
            data[position + 30:position + 30 + length] = new_name.encode()
            break
        position += 4
    open(path, 'wb').write(bytes(data))


def options(run, data, *flags):
    return cli.parse_options(['--mode=test', f'--resume={run}', f'--dataPath={data}', *FAST, *flags])


def refused_by_cli(run, data, capsys):
    """The one paragraph of `--mode=test` on a hostile run folder; nothing written to the results file."""
    runs_path = run.parent / 'results_of_hostile_runs'
    assert cli.main(['--mode=test', f'--resume={run}', f'--dataPath={data}', f'--runsPath={runs_path}', *FAST]) == 2
    assert not (runs_path / 'results.jsonl').exists()
    return error_paragraph(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- former .pt2 programs

@pytest.fixture(scope='module')
def legacy_run(static_run, tmp_path_factory):
    """static_run in the former layout: its program as a torch.export archive (encoder_int8.pt2), named by the
    checkpoint, and no encoder_int8.pth."""
    run = tmp_path_factory.mktemp('legacy') / 'run_quantized_static'
    shutil.copytree(static_run, run)
    folder = run / 'checkpoints'
    checkpoint = torch.load(folder / 'checkpoint.pth.tar', weights_only=True)
    encoder = torch.load(folder / int8.ENCODER_NAME, weights_only=True)
    program = int8.rebuilt_program(checkpoint['config'], encoder['quantization'], encoder['state_dict'], 'encoder')
    torch.export.save(program, folder / int8.LEGACY_PROGRAM_NAME)
    os.remove(folder / int8.ENCODER_NAME)
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        torch.save(dict(checkpoint, encoder_program=int8.LEGACY_PROGRAM_NAME), folder / name)
    return run


def poisoned_payload(entries, marker, rng):
    """(config entry, weight entry): a weight chosen by `rng` marked `use_pickle`, its bytes a pickle that writes
    `marker`."""
    config_name = next(name for name, _ in entries if name.endswith('model_weights_config.json'))
    config = json.loads(dict(entries)[config_name])
    key = sorted(config['config'])[rng.integers(len(config['config']))]
    config['config'][key]['use_pickle'] = True
    weight_name = f'{config_name.rsplit("/", 1)[0]}/{config["config"][key]["path_name"]}'
    return (config_name, json.dumps(config).encode()), (weight_name, pickled(WritesMarker(marker)))


def replaced(entries, *changes):
    new = dict(changes)
    return [(name, new.get(name, data)) for name, data in entries]


def with_size_expression(entries, expression):
    """The archive with the first input-size expression of its program (a bare symbol) replaced by `expression`."""
    name = next(name for name, _ in entries if name.endswith('models/model.json'))
    program = json.loads(dict(entries)[name])
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and str(node.get('expr_str', '')).startswith('Symbol('):
            node['expr_str'] = expression
            break
        stack.extend(node.values() if isinstance(node, dict) else node if isinstance(node, list) else [])
    return replaced(entries, (name, json.dumps(program).encode()))


def hostile_program(case, entries, marker, rng):
    """The entries of a hostile .pt2 archive: the issue's duplicate trick, a local header that names another entry, a
    case variant of an entry name, a pickled payload under its own name, code in a size expression."""
    config, weight = poisoned_payload(entries, marker, rng)
    if case == 'duplicate entries':  # torch reads the weight's first copy and the config's last
        return [weight] + entries + [config]
    if case == 'local header names another entry':
        return replaced(entries, config, weight)
    if case == 'case variant of an entry name':
        variant = weight[0].replace('/data/', '/DATA/')
        return [(variant, weight[1]) if name == weight[0] else (name, data) for name, data in replaced(entries, config)]
    if case == 'pickled payload under its own name':
        return replaced(entries, config, weight)
    assert case == 'code in a size expression'
    return with_size_expression(entries, f"Add(Symbol('s1', positive=True, integer=True), "
                                         f"Integer(0 if open({str(marker)!r}, 'w') else 1))")


def write_hostile_program(case, entries, path, marker):
    rng = np.random.default_rng(SEED)
    write_zip(path, hostile_program(case, entries, marker, rng))
    if case == 'local header names another entry':
        weight_name = poisoned_payload(entries, marker, np.random.default_rng(SEED))[1][0]
        rename_local_header(path, weight_name, weight_name[:-1] + 'Z')


MARKER_CASES = ['duplicate entries', 'local header names another entry', 'case variant of an entry name',
                'pickled payload under its own name', 'code in a size expression']


@pytest.mark.parametrize('case', MARKER_CASES)
def test_hostile_programs_run_code_in_torch_and_are_refused(case, legacy_run, static_run, clustered_data, tmp_path,
                                                            capsys):
    marker = tmp_path / 'ran.txt'
    hostile = tmp_path / 'hostile.pt2'
    write_hostile_program(case, zip_entries(legacy_run / 'checkpoints' / int8.LEGACY_PROGRAM_NAME), hostile, marker)
    int8.register_x86_int8_lowering()
    try:
        torch.export.load(str(hostile))
    except Exception:
        pass
    assert marker.exists(), 'the unprotected loader did not run the payload'
    marker.unlink()

    run = shutil.copytree(legacy_run, tmp_path / 'hostile_quantized')
    shutil.copy(hostile, run / 'checkpoints' / int8.LEGACY_PROGRAM_NAME)
    if case in ('duplicate entries', 'pickled payload under its own name'):
        message = refused_by_cli(run, clustered_data, capsys)
    else:
        with pytest.raises(UserError) as refused:
            open_run(options(run, clustered_data))
        message = str(refused.value)
    assert 'former format' in message and '--unsafe_load' in message and '--mode=quantize' in message
    assert not marker.exists()

    # the same bytes where a run of this version keeps its int8 encoder are no torch.save checkpoint
    run = shutil.copytree(static_run, tmp_path / 'hostile_new_layout')
    shutil.copy(hostile, run / 'checkpoints' / int8.ENCODER_NAME)
    with pytest.raises(UserError, match='not in the format torch.save writes'):
        open_run(options(run, clustered_data))
    assert not marker.exists()


BOMBS = {  # size expressions sympy evaluates without end, and one nested deeper than Python's parser allows
    'exponent': "Pow(Integer(9), Pow(Integer(9), Integer(10)))",
    'factorial': "factorial(Integer(100000000))",
    'deeply nested': "Add(" * 100000 + "Integer(1)" + ", Integer(1))" * 100000,
    'oversized': "Add(" + ", ".join(["Pow(Integer(7), Integer(123456789))"] * 20000) + ")",
}


def load_without_protection(path):
    warnings.simplefilter('ignore')
    try:
        torch.export.load(path)
    except BaseException:
        pass


def test_expression_bombs_never_end_in_torch_and_are_refused_at_once(legacy_run, static_run, clustered_data,
                                                                      tmp_path):
    entries = zip_entries(legacy_run / 'checkpoints' / int8.LEGACY_PROGRAM_NAME)
    int8.register_x86_int8_lowering()
    loads = {}
    for name, bomb in BOMBS.items():
        path = tmp_path / f'{name.replace(" ", "_")}.pt2'
        write_zip(path, with_size_expression(entries, f"Add(Symbol('s1', positive=True, integer=True), {bomb})"))
        loads[name] = multiprocessing.get_context('fork').Process(target=load_without_protection, args=(str(path),))
        loads[name].start()
    for load in loads.values():
        load.join(BOMB_SECONDS)
    running = [name for name, load in loads.items() if load.is_alive()]
    for load in loads.values():
        load.kill()
        load.join()
    # the nested one stops torch's own parser (too many nested parentheses), after a while that depends on the
    # machine's load; the others run for as long as they are let
    assert set(running) >= set(BOMBS) - {'deeply nested'}, 'an unprotected load of a bomb ended'

    for name in BOMBS:
        path = tmp_path / f'{name.replace(" ", "_")}.pt2'
        run = shutil.copytree(legacy_run, tmp_path / f'legacy_{name}')
        shutil.copy(path, run / 'checkpoints' / int8.LEGACY_PROGRAM_NAME)
        with pytest.raises(UserError, match='former format'):
            open_run(options(run, clustered_data))
        run = shutil.copytree(static_run, tmp_path / f'new_{name}')
        shutil.copy(path, run / 'checkpoints' / int8.ENCODER_NAME)
        with pytest.raises(UserError, match='not in the format torch.save writes'):
            open_run(options(run, clustered_data))


def test_unsafe_load_still_reads_a_former_program(legacy_run, clustered_data, tmp_path, monkeypatch):
    monkeypatch.setenv(int8.COMPILE_ENV, '0')
    model, _ = open_run(options(legacy_run, clustered_data, '--unsafe_load'))
    assert isinstance(model, int8.QuantizedEmbedNet)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    shutil.copy(legacy_run / 'checkpoints' / int8.LEGACY_PROGRAM_NAME, elsewhere)
    for named in (str(elsewhere / int8.LEGACY_PROGRAM_NAME), f'../../elsewhere/{int8.LEGACY_PROGRAM_NAME}'):
        run = tmp_path / 'redirecting'
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(legacy_run, run)
        path = run / 'checkpoints' / 'checkpoint.pth.tar'
        torch.save(dict(torch.load(path, weights_only=True), encoder_program=named), path)
        with pytest.raises(UserError, match='not a file of that folder'):
            open_run(options(run, clustered_data, '--unsafe_load'))


# ---------------------------------------------------------------------------------------------- checkpoints

def hostile_checkpoint(case, genuine, marker):
    """The entries of a checkpoint whose pickle writes `marker`: under its own name, as a second data.pkl (after the
    genuine one, or before it: which copy torch reads depends on where its binary search over the sorted names
    lands), behind a local header naming another entry, or under a case variant of data.pkl."""
    entries = zip_entries(genuine)
    pickle_name = next(name for name, _ in entries if name.endswith('/data.pkl'))
    payload = dict(zip_entries(pickled({'state_dict': {}, 'epoch': WritesMarker(marker)})))
    payload = next(data for name, data in payload.items() if name.endswith('/data.pkl'))
    if case == 'duplicate entries, hostile last':
        return entries + [(pickle_name, payload)]
    if case == 'duplicate entries, hostile first':
        return [(pickle_name, payload)] + entries
    if case == 'case variant of an entry name':
        return [(name.replace('data.pkl', 'DATA.PKL'), payload) if name == pickle_name else (name, data)
                for name, data in entries]
    return replaced(entries, (pickle_name, payload))


CHECKPOINT_CASES = ['pickled payload under its own name', 'duplicate entries', 'local header names another entry',
                    'case variant of an entry name']


@pytest.mark.parametrize('case', CHECKPOINT_CASES)
def test_hostile_checkpoints_run_code_in_torch_and_are_refused(case, float_run, static_run, clustered_data, tmp_path,
                                                               capsys):
    marker = tmp_path / 'ran.txt'
    hostile = tmp_path / 'hostile.pth.tar'
    variants = [f'{case}, hostile last', f'{case}, hostile first'] if case == 'duplicate entries' else [case]
    for variant in variants:  # the first that runs its payload in torch
        write_zip(hostile, hostile_checkpoint(variant, float_run / 'checkpoints' / 'checkpoint.pth.tar', marker))
        if case == 'local header names another entry':
            name = next(name for name, _ in zip_entries(hostile) if name.endswith('/data.pkl'))
            rename_local_header(hostile, name, name[:-1] + 'X')
        try:
            torch.load(hostile, weights_only=False)
        except Exception:
            pass
        if marker.exists():
            break
    assert marker.exists(), 'the unprotected loader did not run the payload'
    marker.unlink()

    target = {'pickled payload under its own name': (static_run, int8.ENCODER_NAME),
              'duplicate entries': (float_run, 'checkpoint.pth.tar')}.get(case)
    if target:
        run = shutil.copytree(target[0], tmp_path / 'hostile_run')
        shutil.copy(hostile, run / 'checkpoints' / target[1])
        message = refused_by_cli(run, clustered_data, capsys)
        assert target[1] in message and '--unsafe_load' in message
    else:
        with pytest.raises(UserError, match='--unsafe_load'):
            read_checkpoint(str(hostile))
    assert not marker.exists()


def test_dot_entries_are_refused(float_run, tmp_path):
    """`archive/./data.pkl`: neither torch.load nor torch.export.load of this torch version resolves such a name, so
    there is no payload to prove; the toolkit refuses it all the same."""
    marker = tmp_path / 'ran.txt'
    entries = hostile_checkpoint('pickled payload under its own name', float_run / 'checkpoints' /
                                 'checkpoint.pth.tar', marker)
    path = tmp_path / 'dot.pth.tar'
    write_zip(path, [(name.replace('/', '/./', 1), data) if name.endswith('/data.pkl') else (name, data)
                     for name, data in entries])
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    with pytest.raises(UserError, match='not in the format torch.save writes'):
        read_checkpoint(str(path))
    assert not marker.exists()


def raw_checkpoint(path, pickle_bytes):
    """A checkpoint archive whose data.pkl is `pickle_bytes` (written opcode by opcode: nesting that Python's own
    pickler would refuse to write)."""
    buffer = io.BytesIO()
    torch.save({'state_dict': {}}, buffer)
    write_zip(path, [(name, pickle_bytes if name.endswith('/data.pkl') else data)
                     for name, data in zip_entries(buffer.getvalue())])


def nested_lists(depth):
    """{'state_dict': {}, 'recalls': [[[...]]]}: `depth` lists, one inside the next."""
    return (b'\x80\x02}(X\n\x00\x00\x00state_dict}X\x07\x00\x00\x00recalls' + b']' * depth + b'a' * (depth - 1)
            + b'u.')


def shared_lists(levels):
    """{'state_dict': {}, 'recalls': {0: L0, 1: L1, ...}} with L0 = [] and each next level [previous, previous]: a few
    bytes, and 2**levels paths through them."""
    body = b'}(K\x00]q\x00'
    for level in range(1, levels):
        body += b'K' + bytes([level]) + b'](h' + bytes([level - 1]) + b'h' + bytes([level - 1]) + b'eq' + bytes([level])
    return b'\x80\x02}(X\n\x00\x00\x00state_dict}X\x07\x00\x00\x00recalls' + body + b'uu.'


@pytest.mark.parametrize('pickle_bytes, message', [
    (nested_lists(100000), 'nested deeper'),
    (shared_lists(80), 'more than'),
], ids=['100000 nested lists', 'a list shared 2**80 ways'])
def test_checkpoint_bombs_are_refused_within_bounds(tmp_path, pickle_bytes, message):
    path = tmp_path / 'bomb.pth.tar'
    raw_checkpoint(path, pickle_bytes)
    assert torch.load(path, weights_only=True)['state_dict'] == {}  # torch reads it; a walk of it would not end
    with pytest.raises(UserError, match=message):
        read_checkpoint(str(path))


def test_compressed_or_oversized_pickles_are_refused(float_run, tmp_path, monkeypatch):
    genuine = float_run / 'checkpoints' / 'checkpoint.pth.tar'
    deflated = tmp_path / 'deflated.pth.tar'
    with zipfile.ZipFile(deflated, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, data in zip_entries(genuine):
            archive.writestr(name, data)
    with pytest.raises(UserError, match='stored uncompressed'):
        read_checkpoint(str(deflated))
    pickle_size = next(info.file_size for info in zipfile.ZipFile(genuine).infolist()
                       if info.filename.endswith('data.pkl'))
    monkeypatch.setattr(checkpoint_module, 'MAX_PICKLE_BYTES', pickle_size - 1)
    with pytest.raises(UserError, match='data.pkl'):
        read_checkpoint(str(genuine))


def test_a_packed_weight_larger_than_its_mask_is_refused(float_run, tmp_path):
    path = tmp_path / 'packed.pth.tar'
    checkpoint = torch.load(float_run / 'checkpoints' / 'checkpoint.pth.tar', weights_only=True)
    weight = checkpoint['state_dict'].pop('encoder.0.weight')
    mask = torch.from_numpy(np.packbits(np.ones(weight.numel(), dtype=bool)))
    checkpoint['packed_state_dict'] = {'encoder.0.weight': dict(shape=[10 ** 6] * 4, mask=mask, values=weight.flatten(),
                                                                position=0)}
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match='damaged packed_state_dict'):
        read_checkpoint(str(path))


# ---------------------------------------------------------------------------------------------- int8 encoder files

def changed_encoder(static_run, tmp_path, change):
    run = shutil.copytree(static_run, tmp_path / 'changed_quantized')
    path = run / 'checkpoints' / int8.ENCODER_NAME
    encoder = torch.load(path, weights_only=True)
    change(encoder)
    torch.save(encoder, path)
    return run


def first_conv_weight(encoder):
    return next(key for key, value in encoder['state_dict'].items() if value.dim() == 4)


def int32_conv(encoder):
    key = first_conv_weight(encoder)
    encoder['state_dict'][key] = encoder['state_dict'][key].to(torch.int32)


def narrower_conv(encoder):
    key = first_conv_weight(encoder)
    encoder['state_dict'][key] = encoder['state_dict'][key][:, :2]


def huge_example(encoder):
    encoder['quantization']['example_size'] = [10 ** 6, 10 ** 6]


@pytest.mark.parametrize('change, message', [
    (int32_conv, 'is torch.int32 of shape [64, 3, 11, 11]; the model it describes needs int8'),
    (narrower_conv, 'is torch.int8 of shape [64, 2, 11, 11]; the model it describes needs int8 of shape [64, 3'),
    (huge_example, 'no valid "quantization" record'),
], ids=['int32 conv weight', 'narrower conv weight', 'huge export example'])
def test_encoder_files_of_another_layout_name_the_entry(static_run, clustered_data, tmp_path, capsys, change,
                                                        message):
    run = changed_encoder(static_run, tmp_path, change)
    paragraph = refused_by_cli(run, clustered_data, capsys)
    assert message in paragraph and int8.ENCODER_NAME in paragraph


def test_an_architecture_larger_than_the_models_is_refused(static_run, clustered_data, tmp_path, capsys):
    run = shutil.copytree(static_run, tmp_path / 'wide_quantized')
    path = run / 'checkpoints' / 'checkpoint.pth.tar'
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['config'] = dict(checkpoint['config'], encoder_channels=[10 ** 6] * 5)
    torch.save(checkpoint, path)
    assert 'no valid "config" entry' in refused_by_cli(run, clustered_data, capsys)
    checkpoint['config'] = dict(checkpoint['config'], encoder_channels=None, pca_dim=10 ** 6)
    torch.save(checkpoint, path)  # the head is checked against its weights before memory is taken for it
    assert 'no entry whiten.weight' in refused_by_cli(run, clustered_data, capsys)
