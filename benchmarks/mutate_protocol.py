"""Mutation check of the protocol's numbers: change each numeric default and module constant, one at a time, in the
modules that hold them, run the tests that import the module, and report the mutants no test kills.

What is mutated (found with ast, never by text search): numeric `default=` of every add_argument call; numbers in
module-level assignments and in the class bodies of module-level classes (dataclass field defaults); numeric
defaults of function parameters; numeric keyword arguments named in PROTOCOL_KEYWORDS wherever they are (the
thresholds a dataset writer puts in its files). An integer n becomes n + 1, a float x becomes 2x (0.0 becomes 0.5).

Each mutant runs in a copy of the working tree (the tracked and untracked, not ignored, files), so the checkout is
never touched. Its tests: FIRST_TESTS, then the test files that import the mutated module, then those that reach it
through other modules or main.py (each group smallest first), each with `pytest -x`, until one fails (killed) or the
mutant's time budget runs out (timeout: not killed within it).
A test file that kills a mutant is run once unmutated, so that a failure of its own is not taken for a kill.

    nice python benchmarks/mutate_protocol.py                  # every module of MODULE_FILES
    nice python benchmarks/mutate_protocol.py --first-only     # FIRST_TESTS only: a quick pass
    nice python benchmarks/mutate_protocol.py --retry out.jsonl   # only the mutants out.jsonl did not see killed
    python benchmarks/mutate_protocol.py --list                # the mutants, without running anything
"""
import argparse
import ast
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The modules that hold protocol numbers, as paths from the repository root (update when modules move), and what
# of each is left out: names of module constants that are not numbers of the protocol (pixel art of the synthetic
# images).
MODULE_FILES = {
    'netvlad_toolkit/training/training.py': (),
    'netvlad_toolkit/utils/options.py': (),
    'netvlad_toolkit/cli.py': (),
    'netvlad_toolkit/modes/train.py': (),
    'netvlad_toolkit/modes/cluster.py': (),
    'netvlad_toolkit/datasets/datasets.py': (),
    'netvlad_toolkit/datasets/pittsburgh.py': (),
    'netvlad_toolkit/datasets/folder_dataset.py': (),
    'netvlad_toolkit/datasets/msls.py': (),
    'netvlad_toolkit/datasets/synthetic.py': ('PALETTE',),
    'netvlad_toolkit/search/retrieval.py': (),
    'netvlad_toolkit/search/patch_netvlad.py': (),
    'netvlad_toolkit/modes/prune.py': (),
    'netvlad_toolkit/modes/quantize.py': (),
}
TESTS_DIR = 'tests'
PACKAGE = 'netvlad_toolkit'
CLI = 'netvlad_toolkit.cli'
FIRST_TESTS = ['tests/test_protocol_defaults.py']  # the defaults table: fast, and imports every module above
PROTOCOL_KEYWORDS = {'posDistThr', 'posDistSqThr', 'nonTrivPosDistSqThr'}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- finding mutants

def numbers_in(node):
    """The numeric literals under `node` (bools and those inside lambdas left out), each with its sign node when
    negated, so that -1 is mutated as a whole."""
    found = []

    def visit(child, parent=None):
        if isinstance(child, ast.Lambda):
            return
        if isinstance(child, ast.Constant) and type(child.value) in (int, float):
            found.append(parent if isinstance(parent, ast.UnaryOp) else child)
            return
        for grandchild in ast.iter_child_nodes(child):
            visit(grandchild, child)
    visit(node)
    return found


def assigned_name(statement):
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    return ', '.join(ast.unparse(t) for t in targets)


def mutation_sites(source, skipped=()):
    """(node, where) of every number to mutate in a module's source; `where` says what it is."""
    tree = ast.parse(source)
    sites = []
    for statement in tree.body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            name = assigned_name(statement)
            if name not in skipped:
                sites += [(n, f'constant {name}') for n in numbers_in(statement.value)]
        if isinstance(statement, ast.ClassDef):
            for member in statement.body:
                if isinstance(member, (ast.Assign, ast.AnnAssign)) and member.value is not None:
                    sites += [(n, f'{statement.name}.{assigned_name(member)}') for n in numbers_in(member.value)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            is_flag = isinstance(node.func, ast.Attribute) and node.func.attr == 'add_argument'
            for keyword in node.keywords:
                if (is_flag and keyword.arg == 'default') or keyword.arg in PROTOCOL_KEYWORDS:
                    flag = node.args[0].value if is_flag and node.args and isinstance(node.args[0], ast.Constant) \
                        else keyword.arg
                    sites += [(n, f'default of {flag}' if is_flag else f'{keyword.arg}=')
                              for n in numbers_in(keyword.value)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
            pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
            for argument, default in pairs:
                sites += [(n, f'{node.name}({argument.arg}=)') for n in numbers_in(default)]
    unique = {(n.lineno, n.col_offset): (n, where) for n, where in sites}
    return [unique[key] for key in sorted(unique)]


def literal_value(node):
    value = node.operand.value if isinstance(node, ast.UnaryOp) else node.value
    return -value if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else value


def mutated_value(value):
    if isinstance(value, int):
        return value + 1
    return value * 2 if value else 0.5


def line_offsets(source):
    offsets, total = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(total)
        total += len(line.encode())
    return offsets


def mutants_of(path, skipped=()):
    """Each mutant of a module: dict(file, line, column, where, original, mutated, source)."""
    source = (REPO / path).read_text()
    encoded, starts = source.encode(), line_offsets(source)
    mutants = []
    for node, where in mutation_sites(source, skipped):
        begin = starts[node.lineno - 1] + node.col_offset  # ast's columns count UTF-8 bytes
        end = starts[node.end_lineno - 1] + node.end_col_offset
        original = literal_value(node)
        new = mutated_value(original)
        text = repr(new) if not isinstance(node, ast.UnaryOp) or new >= 0 else f'({new!r})'
        mutated = (encoded[:begin] + text.encode() + encoded[end:]).decode()
        mutants.append(dict(file=path, line=node.lineno, column=node.col_offset, where=where,
                            original=encoded[begin:end].decode(), mutated=text, source=mutated))
    return mutants


# ---------------------------------------------------------------------------------------------- choosing tests

def imported_names(path):
    """The modules a file imports (import a.b / from a.b import c: a.b, and a.b.c in case c is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
    return names


def module_name(path):
    """netvlad_toolkit.training.training for netvlad_toolkit/training/training.py."""
    return '.'.join(Path(path).with_suffix('').parts)


def reached_modules(names, graph):
    """The package modules `names` import, directly or through each other; the command line (cli) reaches every
    module (it imports the modes by name)."""
    seen, todo = set(), [n for n in names if n in graph]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [n for n in graph[name] if n in graph]
    return set(graph) if CLI in seen else seen


def test_files_reaching(module_path):
    """FIRST_TESTS, then the other test files that import the module, then those that reach it through other
    modules (or the conftest fixture that runs the command line), each group smallest first."""
    graph = {module_name(p.relative_to(REPO)): imported_names(p) for p in (REPO / PACKAGE).rglob('*.py')}
    name = module_name(module_path)
    first = [REPO / f for f in FIRST_TESTS]
    found = {}
    for test in sorted((REPO / TESTS_DIR).glob('test_*.py')):
        names = imported_names(test) | ({CLI} if 'run_cli' in test.read_text() else set())
        if test not in first and name in reached_modules(names, graph):
            found[test] = (name not in names, test.stat().st_size)
    return [str(p.relative_to(REPO)) for p in first + sorted(found, key=found.get)]


# ---------------------------------------------------------------------------------------------- running

def copy_tree(target):
    listed = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            destination = Path(target) / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


HEAVY_IMPORTS = ('torch', 'torchvision', 'numpy', 'scipy.io', 'scipy.spatial', 'faiss', 'h5py', 'PIL.Image',
                 'tqdm', 'pytest')  # imported once here, so that each forked test run starts without them


def preload():
    for name in HEAVY_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def run_tests(tree, test_file, seconds):
    """'pass', 'fail' or 'timeout' of one test file run with -x in `tree`, in a forked child of this process (the
    project's modules are imported there, from the tree, afresh each time)."""
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        os.chdir(tree)
        sys.path.insert(0, tree)
        os.environ['PYTHONDONTWRITEBYTECODE'] = '1'
        sys.dont_write_bytecode = True
        import pytest
        os._exit(int(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', test_file])))
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return 'timeout'
        time.sleep(0.1)
    code = os.waitstatus_to_exitcode(status)
    return 'fail' if code in (1, 2, 3, 4) or code < 0 else 'pass'


class Baseline:
    """Whether a test file passes unmutated (run once per file, on demand)."""

    def __init__(self, tree, seconds):
        self.tree, self.seconds, self.known = tree, seconds, {}

    def passes(self, test_file):
        if test_file not in self.known:
            self.known[test_file] = run_tests(self.tree, test_file, self.seconds) == 'pass'
        return self.known[test_file]


def run_mutant(tree, mutant, test_files, budget, baseline):
    """Outcome of one mutant: killed (by which file), survived, or timeout (files tried within the budget)."""
    target = Path(tree) / mutant['file']
    original = target.read_text()
    target.write_text(mutant['source'])
    started, tried = time.monotonic(), []
    try:
        for test_file in test_files:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                return dict(outcome='timeout', tried=tried)
            result = run_tests(tree, test_file, left)
            tried.append(test_file)
            if result == 'timeout':
                return dict(outcome='timeout', tried=tried)
            if result == 'fail':
                target.write_text(original)
                if baseline.passes(test_file):
                    return dict(outcome='killed', by=test_file, tried=tried)
                target.write_text(mutant['source'])
        return dict(outcome='survived', tried=tried)
    finally:
        target.write_text(original)


def mutant_key(mutant):
    return mutant['file'], mutant['line'], mutant['column']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--modules', nargs='+', default=list(MODULE_FILES), help='Module files to mutate.')
    parser.add_argument('--budget', type=float, default=300, help='Seconds of tests per mutant.')
    parser.add_argument('--first-only', action='store_true', help='Run FIRST_TESTS only.')
    parser.add_argument('--list', action='store_true', help='List the mutants and exit.')
    parser.add_argument('--output', default=None, help='JSON-lines file of every mutant\'s outcome.')
    parser.add_argument('--retry', default=None, metavar='FILE',
                        help='Run only the mutants that an earlier --output FILE records as not killed.')
    args = parser.parse_args()
    mutants = [m for path in args.modules for m in mutants_of(path, MODULE_FILES.get(path, ()))]
    if args.retry:
        earlier = [json.loads(line) for line in open(args.retry)]
        left = {mutant_key(r) for r in earlier if r['outcome'] != 'killed'}
        mutants = [m for m in mutants if mutant_key(m) in left]
    if args.list:
        for m in mutants:
            print(f'{m["file"]}:{m["line"]}  {m["where"]}: {m["original"]} -> {m["mutated"]}')
        print(f'{len(mutants)} mutants')
        return 0
    survivors, started = [], time.monotonic()
    output = open(args.output, 'w') if args.output else None
    preload()
    with tempfile.TemporaryDirectory(prefix='mutate_protocol_') as tree:
        copy_tree(tree)
        baseline = Baseline(tree, args.budget)
        for first in FIRST_TESTS:
            if not baseline.passes(first):
                raise SystemExit(f'{first} fails without a mutation: fix it first.')
        for number, mutant in enumerate(mutants, 1):
            files = test_files_reaching(mutant['file'])
            files = [f for f in files if f in FIRST_TESTS] if args.first_only else files
            result = run_mutant(tree, mutant, files, args.budget, baseline) if files else dict(outcome='untested')
            record = {k: v for k, v in mutant.items() if k != 'source'} | result
            print(f'[{number}/{len(mutants)}] {mutant["file"]}:{mutant["line"]} {mutant["where"]}: '
                  f'{mutant["original"]} -> {mutant["mutated"]}: {result["outcome"]}'
                  + (f' by {result["by"]}' if 'by' in result else ''), flush=True)
            if output:
                output.write(json.dumps(record) + '\n')
                output.flush()
            if result['outcome'] != 'killed':
                survivors.append(record)
    print(f'\n{len(mutants)} mutants, {len(mutants) - len(survivors)} killed, {len(survivors)} not killed, '
          f'{time.monotonic() - started:.0f} s')
    for record in survivors:
        print(f'  {record["outcome"]:8s} {record["file"]}:{record["line"]} {record["where"]}: '
              f'{record["original"]} -> {record["mutated"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
