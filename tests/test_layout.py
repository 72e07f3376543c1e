"""The module graph: one package, no import cycle, every module imports only modules of its own folder or of the
folders below it in the layout table (docs/architecture.md), modes never import each other, nothing in the package
imports a file at the top of the repository, and the top holds only the thin faces."""
import ast
import re

from conftest import REPO

PACKAGE = 'netvlad_toolkit'
FACES = {'main', 'netvlad', 'pittsburgh', 'prune', 'quantize', 'hubconf'}


def package_modules():
    """{dotted module name: path} of every module in the package (__init__ files left out)."""
    root = REPO / PACKAGE
    return {'.'.join((PACKAGE, *path.relative_to(root).with_suffix('').parts)): path
            for path in root.rglob('*.py') if path.name != '__init__.py'}


def imported_modules(path, known):
    """The package modules a file imports anywhere (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f'{path}: relative import'
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names & set(known)


def folder_of(module):
    """'modes' for netvlad_toolkit.modes.train; '' for a module at the package root."""
    parts = module.split('.')
    return parts[1] if len(parts) > 2 else ''


def layout_floors():
    """{folder: row} from docs/architecture.md's layout table: row 0 is the top; '' is the package root's files."""
    page = (REPO / 'docs' / 'architecture.md').read_text()
    section = page[page.index('## Layout'):]
    section = section[:section.index('\n## ', 1)]
    rows = [line.split('|')[1] for line in section.splitlines() if line.startswith('| `')]
    floors = {}
    for row, cell in enumerate(rows):
        for folder in re.findall(rf'`{PACKAGE}/(\w+)/`', cell):
            floors.setdefault(folder, row)
        if re.search(rf'`{PACKAGE}/\w+\.py`', cell):
            floors.setdefault('', row)
    return floors


def graph():
    modules = package_modules()
    return {module: sorted(imported_modules(path, modules) - {module}) for module, path in modules.items()}


def find_cycle(edges):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(module, path):
        state[module] = 'open'
        for target in edges[module]:
            if state.get(target) == 'open':
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = 'done'
        return None

    for module in edges:
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, f'import cycle: {" -> ".join(cycle)}'


def test_the_layout_table_names_every_folder_and_no_other():
    folders = {folder_of(module) for module in package_modules()}
    assert set(layout_floors()) == folders


def test_every_module_imports_only_its_folder_or_folders_below():
    floors = layout_floors()
    upward = [f'{module} imports {target}' for module, targets in graph().items() for target in targets
              if folder_of(target) != folder_of(module) and floors[folder_of(target)] <= floors[folder_of(module)]]
    assert upward == []


def test_modes_never_import_each_other():
    crossing = [f'{module} imports {target}' for module, targets in graph().items() for target in targets
                if folder_of(module) == folder_of(target) == 'modes']
    assert crossing == []


def test_the_package_imports_nothing_from_the_top_of_the_repository():
    top = {path.stem for path in REPO.glob('*.py')}
    offending = []
    for module, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offending += [f'{module} imports {name}' for name in names if name.split('.')[0] in top]
    assert offending == []


def test_the_top_holds_only_the_faces_and_they_import_only_the_package():
    assert {path.stem for path in REPO.glob('*.py')} == FACES
    for face in FACES:
        tree = ast.parse((REPO / f'{face}.py').read_text())
        imported = {node.module.split('.')[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        assert imported <= {PACKAGE, 'sys'}, f'{face}.py imports {imported}'
