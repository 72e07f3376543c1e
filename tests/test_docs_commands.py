"""Docs that cannot drift: every `python main.py ...` command of README.md and docs/*.md (in code blocks and inline
code) is parsed by the toolkit's own parser of its mode, so that a renamed mode or flag, or a value a flag no longer
takes, fails here rather than in a newcomer's terminal."""
import re
import shlex
from pathlib import Path

import pytest

from netvlad_toolkit import cli
from netvlad_toolkit.utils.commons import UserError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
SHELL_ENDS = {'|', '||', '&&', ';', '>', '>>', '2>&1', '&'}
REQUIRED = re.compile(r'the following arguments are required: (.*?)\. See', re.I)


def code_spans(text):
    """The commands of fenced code blocks (lines continued by a trailing backslash joined) and of inline code."""
    spans = []
    blocks = re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.M | re.S)
    for block in blocks:
        spans += block.replace('\\\n', ' ').splitlines()
    outside = re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.M | re.S)
    spans += re.findall(r'`([^`\n]+)`', outside)
    return spans


def documented_commands():
    """(where, the flags after main.py) of every command of the docs that runs main.py."""
    found = []
    for path in DOCS:
        for span in code_spans(path.read_text()):
            if 'main.py --mode' not in span or 'main.py --mode=MODE' in span:  # MODE: the usage line, not a command
                continue
            tokens = shlex.split(span, comments=True)
            start = tokens.index('main.py') + 1
            end = next((i for i, t in enumerate(tokens) if i >= start and t in SHELL_ENDS), len(tokens))
            shown = [token.strip('[]') for token in tokens[start:end] if token != '...']  # [--flag value]: optional
            found.append((f'{path.name}: {span.strip()}', shown))
    return found


COMMANDS = documented_commands()


def parse_as_documented(argv):
    """The mode's own parser over the documented flags. A command may leave out flags its mode requires (the docs
    show the flags that matter to a point); those get a stand-in value, everything else must parse as shown."""
    argv = [token for token in argv if token not in ('-h', '--help')]
    mode = cli.requested_mode(argv)
    parser = cli.mode_parser(mode)
    try:
        return parser.parse_args(argv)
    except UserError as error:
        missing = REQUIRED.search(str(error))
        if not missing:
            raise
    stand_ins = [token for flag in missing.group(1).split(', ') for token in (flag.split('/')[0], '1')]
    return parser.parse_args(argv + stand_ins)


def test_the_docs_show_commands():
    """The reader found the commands (a change of the docs' layout that hides them from this test fails here)."""
    modes = {next(t for t in argv if t.startswith('--mode')).split('=')[-1] for _, argv in COMMANDS
             if any(t.startswith('--mode=') for t in argv)}
    assert len(COMMANDS) >= 30 and {'train', 'test', 'cluster', 'pca', 'prune', 'quantize', 'query'} <= modes


@pytest.mark.parametrize('argv', [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(argv):
    opt = parse_as_documented(argv)
    given = [token.split('=')[0] for token in argv if token.startswith('--')]
    assert all(hasattr(opt, flag[2:]) for flag in given)


@pytest.mark.parametrize('argv, message', [
    (['--mode=tset', '--split=test'], '--mode=tset does not exist'),
    (['--mode=test', '--splt=test'], 'Unrecognized arguments: --splt=test'),
    (['--mode=pca', '--pca_dim', 'four'], "--pca_dim: 'four' is not an integer"),
    (['--mode=test', '--split=test4'], "--split: invalid choice: 'test4'"),
])
def test_a_drifted_command_fails(argv, message):
    """What the test above would catch: a renamed mode, a flag the mode lacks, a value the flag does not take."""
    with pytest.raises(UserError, match=re.escape(message)):
        parse_as_documented(argv)
