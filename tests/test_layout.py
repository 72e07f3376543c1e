"""The module graph: no import cycle, and every module imports only modules below it in the layout table
(docs/architecture.md)."""
import ast
import re

from conftest import REPO


def project_modules():
    return sorted(path.stem for path in REPO.glob('*.py'))


def imported_project_modules(module, known):
    """Project modules that `module` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse((REPO / f'{module}.py').read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return sorted(names & set(known) - {module})


def layout_levels():
    """{module: row} from docs/architecture.md's layout table: row 0 is the top; modules in one row share a level."""
    page = (REPO / 'docs' / 'architecture.md').read_text()
    section = page[page.index('## Layout'):]
    section = section[:section.index('\n## ', 1)]
    levels = {}
    rows = [line for line in section.splitlines() if line.startswith('|') and '.py`' in line.split('|')[1]]
    for row, line in enumerate(rows):
        for name in re.findall(r'`(\w+)\.py`', line.split('|')[1]):
            levels[name] = row
    return levels


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(module, path):
        state[module] = 'open'
        for target in graph[module]:
            if state.get(target) == 'open':
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 'done'
        return None

    for module in graph:
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    modules = project_modules()
    graph = {module: imported_project_modules(module, modules) for module in modules}
    assert find_cycle(graph) is None, f'import cycle: {" -> ".join(find_cycle(graph))}'


def test_the_layout_table_names_every_module_and_no_other():
    levels = layout_levels()
    assert set(levels) == set(project_modules())


def test_every_module_imports_only_modules_below_it():
    levels = layout_levels()
    modules = project_modules()
    upward = [f'{module} (row {levels[module]}) imports {target} (row {levels[target]})'
              for module in modules for target in imported_project_modules(module, modules)
              if levels[target] <= levels[module]]
    assert upward == []


def test_the_checker_sees_a_cycle():
    assert find_cycle({'a': ['b'], 'b': ['c'], 'c': ['a']}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': ['b'], 'b': [], 'c': ['a']}) is None
