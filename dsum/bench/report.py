"""The results of a bench run: the figures and ratios, the fields every results JSON carries (machine,
date, command, commit), the console's table, and the JSON written where asked."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsum.bench.harness import BUSY, OTHERS_BUSY, machine
from dsum.bench.peers import flattened_rows
from dsum.bench.sizes import GOALS, WAYS, Sizes
from dsum.run_info import source_checkout


def model_ratios(model: dict[str, Any]) -> dict[str, float]:
    train, evaluation = model["train"], model["eval"]
    rate = {way: train[way]["real_tokens_per_second"] for way in WAYS}
    speed = {way: evaluation[way]["dialogues_per_second"] for way in WAYS}
    return {
        "train_speedup_vs_notebook": rate["dsum"] / rate["notebook"],
        "train_speedup_vs_no_trainer": rate["dsum"] / rate["no_trainer"],
        "eval_speedup_vs_notebook": speed["dsum"] / speed["notebook"],
        "eval_speedup_vs_no_trainer": speed["dsum"] / speed["no_trainer"],
        "padding_efficiency": train["dsum"]["padding_efficiency"],
    }


def summarize(models: dict[str, dict], sizes: Sizes, data, options, load_before: tuple[float, float, float],
              started: float) -> dict[str, Any]:
    """The three-way results; the top-level figures are the minimum over the models (the claim every
    model supports)."""
    for model in models.values():
        model["ratios"] = model_ratios(model)
    top = {key: min(m["ratios"][key] for m in models.values()) for key in GOALS}
    return {
        **top,
        "combined_over_models": "minimum",
        "goals": GOALS,
        "models": models,
        "data": {"directory": str(data.directory), "train_dialogues": len(data.train),
                 "train_split_dialogues": data.train_split_size, "test_dialogues": len(data.test),
                 "test_rows_flattened": len(flattened_rows(data.test)), "tokenizer_vocab": sizes.vocab_size,
                 "mean_dialogue_tokens": data.mean_dialogue_tokens, "mean_summary_tokens": data.mean_summary_tokens},
        **run_fields(sizes, options, load_before, started),
    }


def run_fields(sizes: Sizes, options, load_before: tuple[float, float, float], started: float) -> dict[str, Any]:
    """What every results JSON says of its run: sizes, `--dsum` settings, machine, date, the command that
    reruns it, the commit, the profiles' directory and the wall time."""
    return {
        "sizes": asdict(sizes),
        "dsum_options": list(options.dsum),  # `--dsum`: dsum ran with these instead of its defaults
        "machine": machine(options.device, load_before),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": options.command(),
        **source_checkout(),  # commit, dirty
        "profile_dir": None if options.profile is None else str(options.profile.resolve()),
        "wall_seconds": time.perf_counter() - started,
    }


def report(table: str, results: dict[str, Any], json_path: Path | None) -> None:
    """Print the table, and write the results as JSON where asked."""
    print(table, flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {json_path}", flush=True)


def format_table(results: dict[str, Any]) -> str:
    lines = []
    header = f"{'':28}{'notebook':>12}{'no_trainer':>12}{'dsum':>12}{'dsum/notebook':>15}{'dsum/no_trainer':>17}"
    for name, model in results["models"].items():
        train, evaluation, ratios = model["train"], model["eval"], model["ratios"]
        lines += ["", f"{name} ({model['family']}, {model['parameters']:,} parameters, {model['adapter']} adapter)",
                  header]
        lines.append(row("train real tokens/s", [train[w]["real_tokens_per_second"] for w in WAYS], "{:,.0f}",
                         [ratios["train_speedup_vs_notebook"], ratios["train_speedup_vs_no_trainer"]]))
        lines.append(row("train padding efficiency", [train[w]["padding_efficiency"] for w in WAYS], "{:.2f}"))
        lines.append(row("eval dialogues/s", [evaluation[w]["dialogues_per_second"] for w in WAYS], "{:,.2f}",
                         [ratios["eval_speedup_vs_notebook"], ratios["eval_speedup_vs_no_trainer"]]))
        lines.append(row("eval new tokens a row", [evaluation[w]["mean_new_tokens"] for w in WAYS], "{:.1f}"))
        notebook = evaluation["notebook"]
        if notebook["extrapolated"]:
            lines.append(f"  notebook eval: {notebook['rows_timed']} of {notebook['rows']} flattened rows generated "
                         f"one at a time and timed; the time is extrapolated to all {notebook['rows']}")
    data = results["data"]
    lines += ["", f"data: {data['train_dialogues']} training dialogues, {data['test_dialogues']} test dialogues "
                  f"({data['test_rows_flattened']} flattened rows); mean dialogue {data['mean_dialogue_tokens']:.0f} "
                  f"tokens ({data['tokenizer_vocab']:,}-token BPE trained on the training split)"]
    if results["dsum_options"]:
        lines.append(f"dsum's way ran with {' '.join(results['dsum_options'])} (--dsum), not its defaults")
    lines.append("overall (minimum over models; goal in brackets):")
    for key, goal in results["goals"].items():
        lines.append(f"  {key:30} {results[key]:8.2f}  [>= {goal:g}]")
    lines.append(f"machine: {results['machine']['cpu']}, {results['machine']['cpu_cores']} cores, torch "
                 f"{results['machine']['torch']}{', ' + results['machine']['gpu'] if 'gpu' in results['machine'] else ''}"
                 f"; load average before {results['machine']['load_average_before'][0]:.2f}")
    speeds = [m[part][way] for m in results["models"].values() for part in ("train", "eval") for way in WAYS]
    others = [s["other_cpu_share"] for s in speeds if s["other_cpu_share"] is not None]
    shares = [s["cpu_share"] for s in speeds if s["cpu_share"] is not None]
    if others and max(others) > OTHERS_BUSY:
        lines.append(f"warning: other processes took up to {max(others):.2f} of the machine's cores during a phase: "
                     "they slowed some ways more than others, so the ratios are not reliable; rerun on a quiet machine "
                     "(on a shared one, OMP_NUM_THREADS=1 is steadier)")
    elif not others and shares and min(shares) < BUSY:
        lines.append(f"warning: this process got as little as {min(shares):.2f} of its {results['machine']['torch_threads']} "
                     "threads' time: other work on the machine slowed some ways more than others, so the ratios are "
                     "not reliable; rerun on a quiet machine (on a shared one, OMP_NUM_THREADS=1 is steadier)")
    lines += provenance(results)
    lines.append(f"total wall time: {results['wall_seconds']:.0f}s")
    return "\n".join(lines)


def provenance(results: dict[str, Any]) -> list[str]:
    """The lines that say which code ran and where its profiles went."""
    commit = results.get("commit")
    lines = [f"dsum commit: {commit[:12] if commit else 'unknown (not a git checkout)'}"
             f"{' with changes to tracked files' if results.get('dirty') else ''}"]
    if results.get("profile_dir"):
        lines.append(f"profiles: {results['profile_dir']} (summary.json holds every run)")
    return lines


def row(label: str, values: list[float], form: str, ratios: list[float] | None = None) -> str:
    cells = "".join(f"{form.format(v):>12}" for v in values)
    if ratios:
        cells += f"{ratios[0]:>14.2f}x{ratios[1]:>16.2f}x"
    return f"  {label:26}{cells}"
