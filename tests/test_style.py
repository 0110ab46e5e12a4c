"""The package's own style: every module opens by saying, in one or two sentences, what it owns, and imports
only the stages before it."""

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


# Every module of the package in the order the data flows (recipe → config → data → features → model → loop →
# checkpoint → generate → score → report), the pieces each stage shares first and the commands last. A module
# imports only modules before it, at its top or inside a function: no circle, and nothing imports against the flow.
FLOW = [
    "dsum", "config",                                                       # the recipe
    "distributed", "faults", "preemption", "profiling", "compiling", "cpu_dropout", "run_dir",  # shared by all
    "data.example", "data.sources", "data.synthetic", "data",               # data
    "prompts", "features", "batching", "console", "cpu_speed", "loss", "sizing", "telemetry",  # features
    "modeling",                                                             # model
    "checkpoint", "run_info", "trained",                                    # what a run writes, and reading it back
    "generate", "scoring", "evaluate",                                      # generate, score
    "train",                                                                # the loop, which validates with them
    "report", "score_files", "preview", "submit", "export",                 # report, and the other commands
    "bench.sizes", "bench.harness", "bench.table", "bench.recipes", "bench.options", "bench.peers", "bench.inputs",
    "bench.report", "bench.dsum_way", "bench.no_trainer", "bench.notebook", "bench.goals", "bench.three_ways",
    "bench", "cli", "__main__",                                             # the command on top
]


def module_name(path) -> str:
    parts = path.relative_to(ROOT / "dsum").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "dsum"


def dsum_imports(path) -> set[str]:
    """The dsum modules a file imports anywhere in it, named as FLOW names them."""
    known = {f"dsum.{name}" if name != "dsum" else "dsum" for name in FLOW}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dsum"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dsum":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {name.removeprefix("dsum.") if name != "dsum" else "dsum" for name in found}


def test_each_module_imports_only_the_stages_before_it():
    names = {path: module_name(path) for path in [*MODULES, *(ROOT / "dsum").glob("*/__init__.py")]}
    unplaced = sorted(set(names.values()) - set(FLOW))
    assert not unplaced, f"modules in no place of FLOW: {unplaced}; add each where the data reaches it"
    against = [f"dsum/{path.relative_to(ROOT / 'dsum')} imports {imported}, which comes after {name} in FLOW"
               for path, name in sorted(names.items()) for imported in sorted(dsum_imports(path) - {name})
               if FLOW.index(imported) > FLOW.index(name)]
    assert not against, "\n".join(against)


def test_the_flow_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "checkpoint.py"
    module.write_text('"""Saving."""\n\n\ndef save():\n    from dsum.train import train\n    from dsum import faults\n')
    assert dsum_imports(module) == {"train", "faults"}
