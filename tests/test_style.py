"""The package's own style: every module opens by saying, in one or two sentences, what it owns."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT

MODULES = sorted([*(ROOT / "dsum").glob("*.py"), *(ROOT / "dsum").glob("*/*.py")])
MAX_SENTENCES = 2
MAX_PROSE_CHARS = 3 * 120  # two sentences wrapped at 120 columns take three lines at most
MAX_COMMAND_LINES = 2  # a usage line or two may follow, indented, as the command that runs the module
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
CODE = re.compile(r"`[^`]*`")


def prose_and_commands(docstring: str) -> tuple[str, list[str]]:
    """The docstring's text joined into one line, and its indented lines (commands), apart."""
    lines = docstring.splitlines()
    commands = [line for line in lines if line.startswith((" ", "\t")) and line.strip()]
    prose = " ".join(line.strip() for line in lines if not line.startswith((" ", "\t")) and line.strip())
    return prose, commands


def sentences(prose: str) -> list[str]:
    # Code in backticks (`e.g.`, paths, `key.sub=value`) holds dots that end no sentence.
    return [part for part in SENTENCE_END.split(CODE.sub("code", prose)) if part.strip()]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns_in_one_or_two_sentences(path):
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{path.relative_to(ROOT)} has no module docstring"
    prose, commands = prose_and_commands(docstring)
    found = sentences(prose)
    assert 1 <= len(found) <= MAX_SENTENCES, f"{len(found)} sentences: {found}"
    assert len(prose) <= MAX_PROSE_CHARS, f"{len(prose)} characters of prose"
    assert len(commands) <= MAX_COMMAND_LINES, f"{len(commands)} command lines: {commands}"


def test_the_sentence_count_sees_a_long_docstring():
    long = "What it owns.\n\nWhy it is so. And how:\n\n    dsum train RECIPE\n\nThe rest, e.g. `a.b`."
    prose, commands = prose_and_commands(long)
    assert commands == ["    dsum train RECIPE"]
    assert len(sentences(prose)) == 4  # "e.g. " ends one: pragmatic, and it errs on the strict side
    assert len(sentences("One `key.sub=value`. Two, in `dsum/run_dir.py`.")) == 2
