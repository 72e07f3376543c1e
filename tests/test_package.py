"""The toolkit as a package: torch.hub beside a project whose modules have the plain names the toolkit once used, and
`pip install` into a fresh virtual environment, run from another folder."""
import json
import shutil
import site
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FAST, REPO
from netvlad_toolkit.api import describe, load_run
from netvlad_toolkit.runs.results import code_commit

USER_MODULES = ('models', 'datasets', 'utils', 'options', 'commons', 'images', 'main')
PACKAGE = 'netvlad_toolkit'


@pytest.fixture
def user_project(tmp_path):
    """A project of someone else's: each plain-named module says whose it is."""
    project = tmp_path / 'user_project'
    project.mkdir()
    for name in USER_MODULES:
        (project / f'{name}.py').write_text(f'OWNER = "user"\n\n\ndef my_{name}():\n    return "{name}"\n')
    return project


def hub_script(project, run, user_first):
    """Loads the run through torch.hub before or after importing the user's modules; prints what it saw as JSON."""
    return textwrap.dedent(f'''
        import importlib, json, sys
        sys.path.insert(0, {str(project)!r})
        import torch
        torch.set_num_threads(1)
        def import_users():
            return {{name: getattr(importlib.import_module(name), 'OWNER', None) for name in {USER_MODULES!r}}}
        owners = import_users() if {user_first} else None
        model = torch.hub.load({str(REPO)!r}, 'netvlad', source='local', run={str(run)!r})
        owners = owners or import_users()
        descriptor = model(model.preprocess({str(run / 'image.png')!r})[None]).detach().numpy()[0]
        owners_after = {{name: getattr(sys.modules[name], 'OWNER', None) for name in {USER_MODULES!r}}}
        repo_modules = sorted(name for name, module in list(sys.modules.items())
                              if (getattr(module, '__file__', None) or '').startswith({str(REPO)!r})
                              and not name.startswith('{PACKAGE}'))
        print(json.dumps(dict(owners=owners, owners_after=owners_after, repo_modules=repo_modules,
                              descriptor=descriptor.tolist())))
    ''')


@pytest.mark.parametrize('user_first', [True, False], ids=['user-modules-first', 'hub-first'])
def test_torch_hub_loads_beside_a_project_with_plain_module_names(float_run, tiny_data, tmp_path, user_project,
                                                                 user_first):
    run = tmp_path / 'run'
    shutil.copytree(float_run, run)
    shutil.copy(sorted((tiny_data / '000').iterdir())[0], run / 'image.png')
    done = subprocess.run([sys.executable, '-c', hub_script(user_project, run, user_first)], cwd=user_project,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen['owners'] == seen['owners_after'] == {name: 'user' for name in USER_MODULES}
    assert seen['repo_modules'] == []  # nothing of the toolkit's outside the package stays in sys.modules
    model, _ = load_run(str(run))
    expected = describe(model, [str(run / 'image.png')])[0]
    np.testing.assert_allclose(np.array(seen['descriptor']), expected, rtol=0, atol=1e-5)


def make_venv(venv):
    """A fresh venv that sees this interpreter's packages (pip, setuptools, torch, ...: nothing is fetched), whether
    this interpreter is a venv itself or not."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=300)
    site_packages = next(venv.glob('lib/python*/site-packages'))
    (site_packages / 'parent_environment.pth').write_text('\n'.join(site.getsitepackages()) + '\n')


def run_in(venv, *argv, cwd):
    done = subprocess.run([str(venv / 'bin' / argv[0]), *map(str, argv[1:])], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_pip_install_gives_the_package_its_command_and_its_api(clustered_data, tmp_path):
    """The checkout installs (nothing fetched: the venv sees this interpreter's pip, setuptools and dependencies) into a venv
    outside the repository; its command and `python -m` run from another folder, the package imported from the
    venv, not from the checkout."""
    source = tmp_path / 'source'  # a copy, so that the build's egg-info is not written into the checkout
    shutil.copytree(REPO / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / 'venv'
    make_venv(venv)
    run_in(venv, 'python', '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index', '-q',
           source, cwd=tmp_path)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    console_help = run_in(venv, 'netvlad-toolkit', '--help', cwd=elsewhere)
    assert 'modes:' in console_help and 'usage: netvlad-toolkit --mode=MODE' in console_help
    module_help = run_in(venv, 'python', '-m', PACKAGE, '--mode=prune', '--help', cwd=elsewhere)
    assert '--pruning_amount' in module_help and f'usage: python -m {PACKAGE} --mode=prune' in module_help
    tested = run_in(venv, 'netvlad-toolkit', '--mode=test', '--arch=alexnet', '--fromscratch', '--num_clusters=8',
                    f'--dataPath={clustered_data}', f'--runsPath={tmp_path / "runs"}', *FAST, cwd=elsewhere)
    assert '====> Recall@1:' in tested
    record = json.loads((tmp_path / 'runs' / 'results.jsonl').read_text().splitlines()[-1])
    assert record['command'].startswith('netvlad-toolkit --mode=test') and record['commit'] is None
    where = run_in(venv, 'python', '-c', f'import {PACKAGE}.api as api; print(api.__file__, callable(api.load_run))',
                   cwd=elsewhere)
    location, loadable = where.split()
    assert location.startswith(str(venv)) and loadable == 'True'


@pytest.mark.skipif(not (REPO / '.git').exists(), reason='the checkout is not a git repository')
def test_results_name_the_checkouts_commit():
    head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True)
    assert code_commit() == head.stdout.strip()
