"""What a `dsum bench` run was asked for (`BenchOptions`), checked before anything runs, and where
its results go."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from dsum.bench.sizes import DSUM_OPTIONS, MODELS, SIZES, ModelSpec, Sizes
from dsum.config import RecipeError, apply_override

RESULTS = Path("benchmarks") / "results"  # where --record writes, from the current directory (a dsum checkout)


@dataclass(frozen=True)
class BenchOptions:
    device: str = "cpu"
    data: Path | None = None
    json_path: Path | None = None
    models: tuple[str, ...] | None = None  # None: every model of the device
    train_steps: int | None = None  # None: the device's Sizes
    eval_dialogues: int | None = None
    notebook_rows: int | None = None
    workdir: Path | None = None  # None: a temporary directory, removed afterwards
    goals: bool = False  # dsum alone on the workloads with absolute goals (dsum.bench.goals), not the three ways
    dsum: tuple[str, ...] = ()  # KEY=VALUE settings of dsum's own way (DSUM_OPTIONS)
    profile: Path | None = None  # torch.profiler's tables of a few steps of each training run go here
    record: bool = False  # write the JSON under RESULTS, named by date, device, kind and commit
    recipes: Path | None = None  # the recipes directory of the GPU models' settings (None: the checkout's)

    def sizes(self) -> Sizes:
        sizes = SIZES[self.device]
        given = {"train_steps": self.train_steps, "eval_dialogues": self.eval_dialogues,
                 "notebook_rows": self.notebook_rows}
        for name, value in given.items():
            if value is not None and value < 1:
                raise RecipeError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
        return replace(sizes, **{k: v for k, v in given.items() if v is not None})

    def dsum_settings(self) -> dict[str, dict[str, Any]]:
        """`--dsum KEY=VALUE` as recipe sections, {"train": {...}, "eval": {...}}, each value read as the
        recipe schema types it (checked in full with the rest of the recipe, by `check_dsum_settings`)."""
        sections: dict[str, dict[str, Any]] = {"train": {}, "eval": {}}
        for item in self.dsum:
            if item.partition("=")[0] not in DSUM_OPTIONS or "=" not in item:
                raise RecipeError(f"--dsum {item}: expected KEY=VALUE, KEY one of {', '.join(DSUM_OPTIONS)} (the "
                                  "settings of dsum's own way that the other ways do not read)")
            apply_override(sections, item)
        return sections

    def command(self) -> str:
        """The command line that reruns this bench."""
        words = ["dsum", "bench", *(["--goals"] if self.goals else []), "--device", self.device]
        for flag, value in (("--data", self.data), ("--json", self.json_path), ("--record", self.record or None),
                            ("--models", ",".join(self.models) if self.models else None),
                            ("--train-steps", self.train_steps), ("--eval-dialogues", self.eval_dialogues),
                            ("--notebook-rows", self.notebook_rows), ("--workdir", self.workdir),
                            ("--profile", self.profile), ("--recipes", self.recipes)):
            if value is True:
                words.append(flag)
            elif value is not None:
                words += [flag, str(value)]
        for item in self.dsum:
            words += ["--dsum", item]
        return " ".join(words)

    def check_outputs(self) -> None:
        """What the run will write, refused before anything runs: --profile names a directory (made if
        missing), and --record picks the file that --json would name."""
        if self.profile is not None:
            check_directory("--profile", self.profile, "the profile files")
        if self.record:
            if self.json_path is not None:
                raise RecipeError(f"--record: it names the results file itself, under {RESULTS}/; give --record or "
                                  "--json, not both")
            check_directory("--record", RESULTS, "the recorded results")

    def results_path(self, results: dict[str, Any]) -> Path | None:
        """--json's file; with --record, RESULTS/<UTC date and time>-<device>-<bench|goals>-<commit>.json."""
        if not self.record:
            return self.json_path
        return RESULTS / record_name(results["date"], self.device, "goals" if self.goals else "bench",
                                     results["commit"], results["dirty"])


def record_name(date: str, device: str, kind: str, commit: str | None, dirty: bool | None) -> str:
    """`2026-12-04T140512Z-cuda-bench-2ea07b4.json` for results dated 2026-12-04T14:05:12+00:00 (UTC), at
    commit 2ea07b4; `-dirty` after a commit whose tracked files were changed, `nogit` outside a checkout."""
    moment = datetime.fromisoformat(date).astimezone(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    source = "nogit" if commit is None else commit[:7] + ("-dirty" if dirty else "")
    return f"{moment}-{device}-{kind}-{source}.json"


def check_directory(flag: str, path: Path, what: str) -> None:
    """`path` is a directory, or can be made one: the nearest of it and its parents that exists is one."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise RecipeError(f"{flag} {path}: {where}; expected a directory for {what} (made if missing)")


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda: torch sees no CUDA GPU on this machine; run it on a GPU machine, "
                          "or use --device cpu")


def select_models(device: str, names: Sequence[str] | None, recipes: Path | None = None) -> list[ModelSpec]:
    """The device's models named by --models (all where none are), their recipe files read from `recipes`."""
    from dsum.bench.recipes import load_recipes

    known = {spec.name: spec for spec in MODELS[device]}
    if not names:
        return load_recipes(known.values(), recipes)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RecipeError(f"--models: {', '.join(unknown)} not benched on {device}; choose from {', '.join(known)}")
    return load_recipes([known[name] for name in dict.fromkeys(names)], recipes)


def data_directory(given: Path | None) -> Path:
    path = given or (Path(os.environ["DSUM_DIALOGSUM_DIR"]) if os.environ.get("DSUM_DIALOGSUM_DIR") else None)
    if path is None:
        raise RecipeError("--data: give the DialogSum directory (train/validation/test .jsonl), "
                          "or set DSUM_DIALOGSUM_DIR")
    if not path.is_dir():
        raise RecipeError(f"--data {path}: no such directory")
    return path.resolve()
