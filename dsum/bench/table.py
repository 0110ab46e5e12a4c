"""BENCHMARKS.md's results table, made from the results JSON files in benchmarks/results/ and written
between its markers (`dsum bench --table`), so that the figures shown are those of the files."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsum.config import RecipeError

BEGIN = "<!-- results table: made by `dsum bench --table` from benchmarks/results/*.json; do not edit by hand -->"
END = "<!-- end of the results table -->"


def results_table(results_dir: Path) -> str:
    """The table of every results file in `results_dir`, oldest first: the three-way runs, then the goals
    runs, then each file's date, machine and command."""
    files = sorted(results_dir.glob("*.json"))
    runs = [(path.name, json.loads(path.read_text())) for path in files]
    bench = [(name, results) for name, results in runs if "models" in results]
    goals = [(name, results) for name, results in runs if "workloads" in results]
    lines = ["The three ways (`dsum bench`), per model: dsum's rate and its ratio to each other way's; in bold, a figure "
             "below its goal (the goals the run reported).", ""]
    lines += bench_rows(bench) if bench else ["No three-way run is recorded yet."]
    lines += ["", "dsum alone against the GPU goals (`dsum bench --goals`):", ""]
    lines += goals_rows(goals) if goals else ["No goals run is recorded yet."]
    lines += ["", "The runs:", ""]
    lines += [f"- `{name}`: {describe_run(results)}" for name, results in runs] or ["- none"]
    return "\n".join(lines)


def bench_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| run | model | dsum train, real tokens/s | ÷ notebook | ÷ no_trainer | dsum padding efficiency "
             "| dsum eval, dialogues/s | ÷ notebook | ÷ no_trainer |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, results in runs:
        for number, (model, figures) in enumerate(results["models"].items()):
            ratios, goals = figures["ratios"], results["goals"]

            def judged(key: str, form: str) -> str:
                shown = form.format(ratios[key])
                return f"**{shown}**" if ratios[key] < goals.get(key, 0) else shown

            lines.append(f"| {run_label(name, results) if number == 0 else ''} | {model} "
                         f"| {figures['train']['dsum']['real_tokens_per_second']:,.0f} "
                         f"| {judged('train_speedup_vs_notebook', '{:.2f}x')} "
                         f"| {judged('train_speedup_vs_no_trainer', '{:.2f}x')} "
                         f"| {judged('padding_efficiency', '{:.2f}')} "
                         f"| {figures['eval']['dsum']['dialogues_per_second']:,.1f} "
                         f"| {judged('eval_speedup_vs_notebook', '{:.2f}x')} "
                         f"| {judged('eval_speedup_vs_no_trainer', '{:.2f}x')} |")
    return lines


GOAL_FIGURES = (("train_seconds", "train s", "{:.1f}"), ("real_tokens_per_second", "real tokens/s", "{:,.0f}"),
                ("mfu", "MFU", "{:.1%}"), ("peak_gpu_reserved_gib", "peak GPU reserved, GiB", "{:.2f}"),
                ("eval_seconds", "eval s", "{:.2f}"))


def goals_rows(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| run | workload | " + " | ".join(label for _, label, _ in GOAL_FIGURES) + " | goals |",
             "| --- | --- | " + " | ".join("---:" for _ in GOAL_FIGURES) + " | --- |"]
    for name, results in runs:
        for number, (model, workload) in enumerate(results["workloads"].items()):
            cells = [cell(workload["figures"].get(key), form, workload["goals"].get(key))
                     for key, _, form in GOAL_FIGURES]
            verdicts = [goal["met"] for goal in workload["goals"].values()]
            verdict = ("none on this device" if not verdicts else "all met" if all(verdicts)
                       else "some missed" if False in verdicts else "not all measured")
            lines.append(f"| {run_label(name, results) if number == 0 else ''} | {model} | " + " | ".join(cells)
                         + f" | {verdict} |")
    return lines


def cell(value: float | None, form: str, goal: dict[str, Any] | None) -> str:
    shown = "" if value is None else form.format(value)
    return f"{shown} ({goal['goal']})" if goal is not None else shown


def run_label(name: str, results: dict[str, Any]) -> str:
    """A row's run: its date (UTC), device and commit, linked to its file."""
    moment = datetime.fromisoformat(results["date"]).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    commit = (results.get("commit") or "nogit")[:7]
    return f"[{moment} {results['machine']['device']} {commit}](benchmarks/results/{name})"


def describe_run(results: dict[str, Any]) -> str:
    """One line: date, machine, software, the command that reruns it, and how busy the machine was."""
    machine = results["machine"]
    where = machine.get("gpu") or (f"{machine['cpu']}, {machine['cpu_cores']} cores, "
                                   f"{machine['torch_threads']} torch threads")
    commit = results.get("commit")
    code = "unknown commit" if not commit else f"commit {commit[:7]}{' with changes' if results.get('dirty') else ''}"
    parts = [results["date"], where, f"torch {machine['torch']}, transformers {machine['transformers']}", code,
             f"`{results['command']}`", f"load average before {machine['load_average_before'][0]:.2f}"]
    others = [speed.get("other_cpu_share") for model in results.get("models", {}).values()
              for part in ("train", "eval") for speed in model[part].values()]
    others = [share for share in others if share is not None]
    if others:
        parts.append(f"other processes took at most {max(others):.3f} of the cores in a phase")
    parts.append(f"{results['wall_seconds']:.0f} s")
    return "; ".join(parts)


def with_table(document: str, table: str, name: str = "BENCHMARKS.md") -> str:
    """`document` with what lies between its markers replaced by `table`."""
    if document.count(BEGIN) != 1 or document.count(END) != 1 or document.index(BEGIN) > document.index(END):
        raise RecipeError(f"--table: {name} has no results table's markers (one line each, in order): {BEGIN} "
                          f"and {END}")
    before, rest = document.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    return f"{before}{BEGIN}\n{table}\n{END}{after}"


def write_table(document: Path = Path("BENCHMARKS.md"), results_dir: Path = Path("benchmarks") / "results") -> bool:
    """Rewrite `document`'s table from `results_dir` (from a checkout's root by default); True if it changed."""
    if not document.is_file() or not results_dir.is_dir():
        raise RecipeError(f"--table: no {document} and {results_dir}/ here; run it from the root of a dsum checkout")
    text = document.read_text()
    updated = with_table(text, results_table(results_dir), str(document))
    if updated != text:
        document.write_text(updated)
    return updated != text
