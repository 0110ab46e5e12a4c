"""README.md and docs/*.md against the code: every `dsum` command in their shell blocks parses and loads its
recipe, every path, link, setting and default they name exists, and the cheap offline commands run and print
what the pages quote."""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import DIALOGSUM, ROOT, run_dsum

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "console")
FENCE = re.compile(r"^```(\S*)\s*$")
# Where the pages name the DialogSum directory; a test substitutes the real one.
PLACEHOLDERS = {"$DIALOGSUM": str(DIALOGSUM), "${DIALOGSUM}": str(DIALOGSUM)}
REPO_DIRS = ("recipes", "accelerate_configs", "launch", "benchmarks", "docs", "dsum", "tests")
REPO_PATH = re.compile(rf"(?<![\w./$<-])((?:{'|'.join(REPO_DIRS)})/[\w.{{}},/-]*[\w}}/])")
# Words that stand for a value in a path, not a file: `accelerate_configs/NAME.yaml`, `checkpoints/step-N/`.
PLACEHOLDER_WORDS = {"NAME", "DIR", "FILE", "RECIPE", "N", "R", "JOBID", "PATH"}
SECTIONS = ("model", "tokenizer", "data", "prompt", "adapter", "quantization", "train", "eval")
FILE_SUFFIXES = {"yaml", "py", "json", "jsonl", "md", "csv", "png", "txt", "out", "log", "html", "slurm", "sbatch",
                 "sh", "safetensors"}
# Recipes that build their model from the recipe and read local or synthetic data: `dsum validate` runs offline.
OFFLINE_RECIPES = ("recipes/tiny/", "recipes/scratch/")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    lines: list[str]


@dataclass
class Command:
    """A shell command of a block, continuation lines joined; in a console block, the output that follows it."""

    where: str
    text: str
    output: list[str] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        text = self.text
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        return shlex.split(text, comments=True)

    @property
    def env(self) -> dict[str, str]:
        """The `NAME=value` assignments before the program."""
        env = {}
        for word in self.words:
            name, sep, value = word.partition("=")
            if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
                break
            env[name] = value
        return env

    @property
    def argv(self) -> list[str] | None:
        """The arguments `dsum` gets: after `dsum` or `.venv/bin/dsum`, after `-m dsum` (accelerate launch,
        torchrun, python), or after `launch/train.slurm` or `eval.slurm` (sbatch), which run `dsum train` or
        `dsum eval` with them; None for any other program."""
        words = self.words[len(self.env):]
        if words and Path(words[0]).name == "dsum":
            return words[1:]
        for i, word in enumerate(words[:-1]):
            if word == "-m" and words[i + 1] == "dsum":
                return words[i + 2:]
            if word in ("launch/train.slurm", "launch/eval.slurm"):
                return [Path(word).stem, *words[i + 1:]]
        return None

    @property
    def quoted_error(self) -> str | None:
        """The one-line error a console block shows for this command, if any."""
        return next((line for line in self.output if line.startswith("dsum: error:")), None)


def blocks(page: Path) -> list[Block]:
    found, current = [], None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if fence and current is None:
            current = Block(page, number, fence.group(1), [])
        elif line.startswith("```") and current is not None:
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"{page.name}: a code block opened at line {current.line} is never closed"
    return found


def commands(block: Block) -> list[Command]:
    found: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(block.lines, 1):
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                if found:
                    found[-1].output.append(line)
                continue
            line = line[2:]
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        text = " ".join([*pending, line]).strip()
        pending = []
        if text and not text.startswith("#"):
            found.append(Command(f"{block.page.relative_to(ROOT)}:{block.line + start}", text))
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
ALL_COMMANDS = [c for b in ALL_BLOCKS if b.lang in SHELL for c in commands(b)]
DSUM_COMMANDS = [c for c in ALL_COMMANDS if c.argv is not None]


def parse(argv: list[str]):
    """dsum's own parser, as `dsum.cli.main` uses it: (args, overrides), or a failure naming what it refused."""
    import contextlib
    import io

    from dsum.cli import build_parser

    parser, err = build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
    except SystemExit as exit:
        if exit.code == 0:  # --version, --help
            return None, []
        pytest.fail(f"dsum's parser refused it: {err.getvalue().strip().splitlines()[-1]}")
    unknown = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    assert not unknown, f"unrecognized arguments: {' '.join(unknown)}"
    return args, [*getattr(args, "overrides", []), *extra]


def test_the_pages_hold_dsum_commands_in_every_launch_mode():
    readme = [c for c in DSUM_COMMANDS if c.where.startswith("README.md")]
    launchers = {c.words[len(c.env)] for c in readme}
    assert {"dsum", "accelerate", "torchrun"} <= launchers, launchers
    assert {c.argv[0] for c in readme} >= {"train", "validate", "eval", "compare", "submit", "bench"}
    assert len(DSUM_COMMANDS) >= 40, len(DSUM_COMMANDS)


@pytest.mark.parametrize("command", DSUM_COMMANDS, ids=[c.where for c in DSUM_COMMANDS])
def test_every_dsum_command_parses_and_loads_its_recipe(command):
    from dsum.config import load_recipe

    args, overrides = parse(command.argv)
    words = command.words
    for i, word in enumerate(words[:-1]):
        if word == "--config_file":
            assert (ROOT / words[i + 1]).is_file(), f"--config_file {words[i + 1]}: no such file"
    if args is None or not hasattr(args, "recipe"):
        return
    assert (ROOT / args.recipe).is_file(), f"recipe {args.recipe}: no such file"
    if getattr(args, "accelerate", None):
        name = args.accelerate
        assert (ROOT / (name if Path(name).suffix else f"accelerate_configs/{name}.yaml")).is_file(), name
    if command.quoted_error is None:  # a command shown failing is run below, and must fail as shown
        load_recipe(ROOT / args.recipe, overrides)


def test_every_data_source_in_a_command_is_the_one_placeholder_or_a_shown_error():
    sources = {(c.where, w.partition("=")[2]) for c in DSUM_COMMANDS for w in shlex.split(c.text, comments=True)
               if w.startswith("data.source=") and c.quoted_error is None}
    assert sources, "no command names data.source"
    assert not [s for s in sources if s[1] != "$DIALOGSUM"], "write data.source=$DIALOGSUM"


def repository_paths(text: str) -> set[str]:
    """Paths under the repository's folders that `text` names, braces expanded (`{t5,llama}-full.yaml`);
    paths with a placeholder word in them are left out."""
    paths = set()
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".,")
        if set(re.findall(r"[A-Za-z]+", path)) & PLACEHOLDER_WORDS:
            continue
        parts = re.split(r"\{([^}]*)\}", path)
        choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        paths.update("".join(c) for c in itertools.product(*choices))
    return paths


def test_every_repository_path_the_pages_name_exists():
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        spans = [*(m.group(1) for m in re.finditer(r"`([^`\n]+)`", text)),
                 *("\n".join(b.lines) for b in blocks(page))]
        missing += [f"{page.name}: {path}" for span in spans for path in repository_paths(span)
                    if not (ROOT / path).exists()]
    assert not missing, missing


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def schema_keys() -> dict[str, object]:
    """Every setting of the recipe schema, dotted, with its default (`required` where there is none)."""
    from dsum.config import Recipe, _section_type

    keys: dict[str, object] = {}

    def walk(model, prefix: str) -> None:
        for name, info in model.model_fields.items():
            section = _section_type(info.annotation)
            if section is not None:
                keys[prefix + name] = section
                walk(section, f"{prefix}{name}.")
            else:
                keys[prefix + name] = "required" if info.is_required() else info.get_default(
                    call_default_factory=True)

    walk(Recipe, "")
    return keys


def test_every_setting_the_pages_name_is_in_the_schema():
    keys = schema_keys()
    free = ("model.architecture.",)  # an inline model config takes the model's own keys
    unknown = []
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            match = re.match(rf"^((?:{'|'.join(SECTIONS)})(?:\.[a-z_0-9]+)+)(?:$|[:=\s])", span)
            if not match or match.group(1).rsplit(".", 1)[1] in FILE_SUFFIXES:
                continue
            key = match.group(1)
            if key not in keys and not key.startswith(free):
                unknown.append(f"{page.name}: {key}")
    assert not unknown, unknown


def test_the_settings_table_holds_every_setting_with_its_default():
    import yaml

    keys = {k: v for k, v in schema_keys().items() if not isinstance(v, type)}
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8").split("## Every setting", 1)[1]
    rows = re.findall(r"^\| `([\w.]+)` \| (required|`[^`]*`) \|", text, flags=re.M)
    assert [key for key, _ in rows] == list(keys), "the table's keys are not the schema's, in its order"
    for key, cell in rows:
        default = keys[key]
        shown = cell if cell == "required" else cell.strip("`")
        if isinstance(default, float):
            shown = float(shown)
        elif not isinstance(default, str):  # a number, a boolean, null or a list, as YAML writes it
            shown = yaml.safe_load(shown)
        assert shown == default, f"{key}: the table says {cell}, the schema {default!r}"


def runnable(command: Command) -> bool:
    """Cheap and offline: --version, dsum validate of a tiny or scratch recipe, a dry-run submit, and any
    command a console block shows failing."""
    argv = command.argv
    if argv == ["--version"] or command.quoted_error is not None:
        return True
    if argv[0] == "submit" and "--dry-run" in argv:
        return True
    return argv[0] == "validate" and argv[1].startswith(OFFLINE_RECIPES)


RUNNABLE = list({(tuple(c.argv), tuple(c.env.items())): c for c in DSUM_COMMANDS if runnable(c)}.values())


@pytest.mark.parametrize("command", RUNNABLE, ids=[c.where for c in RUNNABLE])
def test_the_cheap_offline_commands_run_as_the_pages_show(command, monkeypatch):
    from dsum import __version__

    monkeypatch.chdir(ROOT)  # the pages' paths are the repository's; none of these commands writes
    result = run_dsum(*command.argv, env=command.env)
    if command.quoted_error is not None:
        assert result.returncode == 2, result.stdout[-2000:]
        assert result.stderr.strip().splitlines()[-1] == command.quoted_error
        return
    assert result.returncode == 0, result.stderr[-2000:]
    if command.argv == ["--version"]:
        assert result.stdout == f"dsum {__version__}\n"
    elif command.argv[0] == "submit":
        assert result.stdout.startswith("#!/bin/bash\n# Printed by `dsum submit --dry-run`")
        assert "dsum: dry run: nothing was written or submitted" in result.stderr
    else:
        assert "# one training example" in result.stdout
