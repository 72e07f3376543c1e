"""What a newcomer runs does what the docs say: a run remembers its data and training settings, result files never
replace one another, printed commands and paths are true, files are readable as the umask says, train checks its
dataset first, and the small things (--help, counts, labels, warnings)."""
import glob
import json
import logging
import os
import re
import shlex
import shutil
import stat

import pytest

from conftest import FAST
from helpers import error_paragraph
from netvlad_toolkit import cli
from netvlad_toolkit.runs import results, runs
from netvlad_toolkit.training import training
from netvlad_toolkit.utils.commons import atomic_write_json, plural


@pytest.fixture
def adam_run(float_run, clustered_data, tmp_path):
    """A copy of the session's float run whose flags.json says it was trained on clustered_data with Adam at 5e-5."""
    run = tmp_path / 'run'
    shutil.copytree(float_run, run)
    flags = dict(dataset='pittsburgh', dataPath=str(clustered_data), imagesPath=None, optim='ADAM', lr=5e-05,
                 weightDecay=0.0, nNeg=5)
    (run / 'checkpoints' / 'flags.json').write_text(json.dumps(flags))
    return run


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def restored_lines(out):
    return [line for line in out.splitlines() if line.startswith('From ') and 'flags.json' in line]


# ---------------------------------------------------------------------------------------------- a run's flags

def test_a_run_remembers_its_dataset_and_flags_given_win(adam_run, clustered_data, tmp_path, monkeypatch, capsys,
                                                         umask_022):
    """Tested without data flags, from a folder without datasets: the run's dataset, logged in one line; the
    results are readable by others (umask 022: 0644); a --dataPath given wins, and its error names --dataset."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(['--mode=test', f'--resume={adam_run}', *FAST]) == 0
    lines = restored_lines(capsys.readouterr().out)
    assert len(lines) == 1 and f'--dataPath {clustered_data}' in lines[0]
    for path in (adam_run / 'test_test.json', tmp_path / 'results.jsonl'):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert json.loads((adam_run / 'test_test.json').read_text())['dataPath'] == str(clustered_data)

    assert cli.main(['--mode=test', f'--resume={adam_run}', *FAST, f'--dataPath={tmp_path / "elsewhere"}']) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert str(tmp_path / 'elsewhere') in paragraph and '--dataset' in paragraph


def test_fine_tuning_takes_the_runs_optimiser_and_rate(adam_run, make_opt, caplog):
    """What prune and quantize fine-tune with: the run's --optim and --lr (not the defaults, SGD at 1e-4), its
    training settings, no Adam weight decay; a flag given wins."""
    caplog.set_level(logging.INFO)
    for flags, expected in [([], ('ADAM', 5e-05, 5)), (['--optim', 'SGD'], ('SGD', 0.0001, 5)),
                            (['--lr', '0.001'], ('ADAM', 0.001, 5))]:
        opt = make_opt(['--mode=prune', f'--resume={adam_run}', *flags])
        runs.restore_run_flags(opt)
        training.apply_recipe(opt)
        assert (opt.optim, opt.lr, opt.nNeg) == expected
        assert opt.weightDecay == (0.001 if opt.optim == 'SGD' else 0.0)  # another optimiser: its own settings
    assert len([m for m in caplog.messages if m.startswith('From ')]) == 3


@pytest.mark.parametrize('flags, decay', [(['--optim=ADAM'], 0.0), (['--optim=ADAM', '--weightDecay=0.01'], 0.01),
                                          (['--optim=SGD'], 0.001)])
def test_adam_shows_the_weight_decay_it_uses(make_opt, flags, decay):
    """The log and flags.json show opt.weightDecay: Adam uses none unless the flag is given."""
    opt = make_opt(['--mode=train', *flags])
    training.apply_recipe(opt)
    assert opt.weightDecay == decay


# ---------------------------------------------------------------------------------------------- result files

def test_no_result_file_replaces_another(adam_run, clustered_data, tiny_copy, run_cli):
    """The run's own dataset searched exactly: test_test.json; another index, another data folder: files of their
    own, and the first one is untouched."""
    assert run_cli(['--mode=test', f'--resume={adam_run}', *FAST, '--runsPath', adam_run]) == 0
    own = (adam_run / 'test_test.json').read_bytes()
    assert run_cli(['--mode=test', f'--resume={adam_run}', *FAST, '--index=ivfpq', '--runsPath', adam_run]) == 0
    assert run_cli(['--mode=test', f'--resume={adam_run}', *FAST, f'--dataPath={tiny_copy}',
                    '--runsPath', adam_run]) == 0
    names = sorted(p.name for p in adam_run.glob('test_*.json'))
    other = [n for n in names if n.startswith('test_test_pittsburgh-data_copy-')]
    assert 'test_test.json' in names and 'test_test_ivfpq.json' in names and len(other) == 1 and len(names) == 3
    assert (adam_run / 'test_test.json').read_bytes() == own
    assert json.loads((adam_run / 'test_test_ivfpq.json').read_text())['index'] == 'ivfpq'
    assert json.loads((adam_run / other[0]).read_text())['dataPath'] == str(tiny_copy)


# ---------------------------------------------------------------------------------------------- printed commands

def test_the_printed_merge_command_runs_as_printed(clustered_data, tmp_path, monkeypatch, capsys):
    """A sharded test's rank 0 prints the command that searches the parts; run as printed (its glob expanded as a
    shell would) it gives the one-process recalls."""
    runs_path, parts = tmp_path / 'runs', tmp_path / 'parts'
    data = ['--dataset=pittsburgh', f'--dataPath={clustered_data}', '--arch=alexnet', '--num_clusters=8',
            '--fromscratch', f'--runsPath={runs_path}', *FAST]
    assert cli.main(['--mode=test', *data]) == 0
    expected = json.loads((runs_path / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    capsys.readouterr()
    monkeypatch.setenv('WORLD_SIZE', '2')
    for rank in (1, 0):
        monkeypatch.setenv('RANK', str(rank))
        assert cli.main(['--mode=test', *data, f'--cachePath={parts}']) == 0
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.delenv('RANK')
    printed = re.search(r'search them in one process \(without torchrun\) with: (.*)', capsys.readouterr().out)
    tokens = shlex.split(printed.group(1))
    assert tokens[:2] == ['python', 'main.py']
    argv = [match for token in tokens[2:] for match in (sorted(glob.glob(token)) if '*' in token else [token])]
    (runs_path / 'alexnet_offtheshelf' / 'test_test.json').unlink()
    assert cli.main(argv) == 0
    merged = json.loads((runs_path / 'alexnet_offtheshelf' / 'test_test.json').read_text())
    assert merged['recalls'] == expected['recalls']


def test_prune_prints_paths_that_exist_and_fine_tunes_as_the_run_trained(adam_run, capsys):
    """Every path prune prints under the pruned folder exists afterwards (none under .incomplete); its fine-tuning
    runs the run's Adam at 5e-5 (flags.json), and the pruned run keeps those flags."""
    assert cli.main(['--mode=prune', f'--resume={adam_run}', *FAST, '--pruning_criterion=l2',
                      '--finetune_epochs=1', '--nNegSample=20', '--runsPath', adam_run]) == 0
    out = capsys.readouterr().out
    assert '.incomplete' not in out
    assert 'Fine-tuning for 1 epoch with the triplet loss on the train split, ADAM at lr 5e-05' in out
    pruned = f'{adam_run}_pruned_structured_20'
    printed = set(re.findall(re.escape(pruned) + r'[^\s,;:)]*', out))
    assert os.path.join(pruned, 'prune_report.json') in printed
    assert all(os.path.exists(path) for path in printed), printed
    assert json.loads(open(os.path.join(pruned, 'checkpoints', 'flags.json')).read())['optim'] == 'ADAM'


# ---------------------------------------------------------------------------------------------- train

@pytest.mark.parametrize('scratch', [[], ['--fromscratch']], ids=['imagenet', 'fromscratch'])
def test_train_checks_its_dataset_before_weights_centroids_or_writes(tmp_path, monkeypatch, capsys, scratch):
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError('ImageNet weights were asked for before the dataset was checked')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    save = tmp_path / 'runs' / 'run'
    assert cli.main(['--mode=train', '--dataset=tokyoTM', f'--dataPath={tmp_path / "D"}',
                      f'--imagesPath={tmp_path / "TM"}', '--arch=alexnet', f'--savePath={save}', '--nGPU=0',
                      *scratch]) == 2
    paragraph = error_paragraph(capsys.readouterr().err)
    assert 'tokyoTM_train.mat does not exist' in paragraph and 'Cluster file' not in paragraph
    assert not (tmp_path / 'runs').exists()


# ---------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize('umask', [0o022, 0o027, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json({}, str(tmp_path / 'a.json'))
        with open(tmp_path / 'b.json', 'w'):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode) == stat.S_IMODE(os.stat(tmp_path / 'b.json').st_mode)


def test_export_refuses_to_overwrite_without_the_flag(float_run, tmp_path, run_cli, capsys):
    path = tmp_path / 'model.onnx'
    path.write_bytes(b'an earlier export')
    assert run_cli(['--mode=export', f'--resume={float_run}', f'--export_path={path}', '--nGPU=0']) == 2
    assert 'Add --overwrite' in error_paragraph(capsys.readouterr().err)
    assert path.read_bytes() == b'an earlier export'
    assert run_cli(['--mode=export', f'--resume={float_run}', f'--export_path={path}', '--nGPU=0',
                    '--overwrite']) == 0
    assert path.read_bytes() != b'an earlier export'


# ---------------------------------------------------------------------------------------------- small things

@pytest.mark.parametrize('mode, flag', [('pairs', '--num_matched'), ('pairs', '--output'), ('extract', '--export_dir'),
                                        ('query', '--query'), ('prune', '--resume'), ('export', '--resume'),
                                        ('test', '--resume')])
def test_help_marks_required_flags(mode, flag):
    text = cli.mode_parser(mode).format_help()
    entry = re.search(r'\n  ' + re.escape(flag) + r'\b.*?(?=\n  -|\n\n|$)', text, flags=re.S).group(0)
    assert ('Required.' in entry) == (mode != 'test'), entry


def test_plural():
    assert [plural(n, 'epoch') for n in (0, 1, 2)] == ['0 epochs', '1 epoch', '2 epochs']
    assert plural(1, 'query', 'queries') == '1 query' and plural(3, 'query', 'queries') == '3 queries'


def test_report_tells_two_runs_of_one_label_apart():
    record = dict(arch='alexnet', variant='trained', dataset='synthetic', split='test', recalls={'1': 0.5},
                  descriptor_dim=8, file_mb=1.0, latency_ms=None)
    table = results.markdown_table([dict(record, run='runs/a'), dict(record, run='runs/b'),
                                    dict(record, variant='off-the-shelf', run=None)])
    rows = table.splitlines()[2:]
    assert [row.split(' | ')[0] for row in rows] == ['| alexnet trained (runs/a)', '| alexnet trained (runs/b)',
                                                    '| alexnet off-the-shelf']


def test_the_torchao_kernel_preference_warning_is_left_out():
    from netvlad_toolkit.model import int8  # noqa: F401  (sets the filter)
    logger = logging.getLogger('torch.utils._pytree')  # torch's loggers do not propagate: listen on it
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile")
        logger.warning('another warning')
    finally:
        logger.removeHandler(handler)
    assert seen == ['another warning']

