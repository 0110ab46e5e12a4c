"""`dsum compare`: one report on several runs or evaluations, as HTML, Markdown and CSV.

    dsum compare runs/flan-t5-base-zero-shot runs/flan-t5-base-full runs/flan-t5-base-lora --out reports/base

It holds each run's ROUGE with confidence intervals; the absolute change of each run over the first
with a paired bootstrap p-value on the dialogues both scored; a bar chart of ROUGE per run and the
training loss curves (PNG, embedded in the HTML); and K sample dialogues with the human reference
beside each run's summary. Every run is scored again from its `predictions.jsonl`.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsum.config import RecipeError
from dsum.data.sources import text_lines
from dsum.scoring import BOOTSTRAP_SAMPLES, ROUGE_KEYS, rouge_from_matrix, score_matrix


@dataclass
class RunResult:
    name: str
    eval_dir: Path
    metrics: dict
    predictions: dict[str, dict]  # id -> row of predictions.jsonl, in dataset order
    scores: dict[str, np.ndarray]  # id -> primary ROUGE of that dialogue (mean over references), per ROUGE_KEYS
    losses: list[dict]  # rows of the run's metrics.jsonl (empty for an evaluation without a run)


def find_run(path: Path) -> RunResult:
    """A run directory (with eval/) or an evaluation directory (metrics.json and predictions.jsonl)."""
    eval_dir = path / "eval" if (path / "eval" / "metrics.json").is_file() else path
    if not (eval_dir / "metrics.json").is_file() or not (eval_dir / "predictions.jsonl").is_file():
        raise RecipeError(f"{path}: neither a run with eval/metrics.json nor an evaluation directory "
                          "(metrics.json and predictions.jsonl)")
    run_dir = eval_dir.parent if eval_dir.name == "eval" else eval_dir
    rows = [json.loads(line) for line in text_lines((eval_dir / "predictions.jsonl").read_text(encoding="utf-8"))]
    metrics_log = run_dir / "metrics.jsonl"
    losses = [json.loads(line) for line in metrics_log.read_text().splitlines()] if metrics_log.is_file() else []
    # Scored again from the predictions, so that every run is measured by this version's contract.
    matrix = score_matrix([r["prediction"] for r in rows], [r["references"] for r in rows])
    return RunResult(name=run_dir.name, eval_dir=eval_dir, metrics=rouge_from_matrix(matrix),
                     predictions={r["id"]: r for r in rows},
                     scores={r["id"]: m.mean(axis=0) for r, m in zip(rows, matrix)}, losses=losses)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """Two-sided p-value per metric that the mean of b - a is zero, resampling dialogues in pairs."""
    rng = np.random.default_rng(seed)
    diff = b - a
    n = len(diff)
    means = np.stack([diff[rng.integers(0, n, n)].mean(axis=0) for _ in range(samples)])
    below, above = (means <= 0).mean(axis=0), (means >= 0).mean(axis=0)
    return np.minimum(1.0, 2 * np.minimum(below, above))


def compare(paths: list[Path], out: Path, samples: int = 5) -> Path:
    """Write report.html, report.md, rouge.csv, samples.csv and the PNG plots into `out`."""
    import pandas as pd

    runs = [find_run(p) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two evaluations of one run: tell them apart by their directory
        names = [f"{r.name}/{r.eval_dir.name}" if r.eval_dir.name != r.name else r.name for r in runs]
    common = [i for i in runs[0].predictions if all(i in r.predictions for r in runs[1:])]
    if not common:
        raise RecipeError("dsum compare: the runs share no dialogue id; compare evaluations of the same split")
    scores = [np.array([r.scores[i] for i in common]) for r in runs]

    table = pd.DataFrame([{
        "run": name, "n": r.metrics["n"],
        **{k: r.metrics[k] for k in ROUGE_KEYS},
        **{f"{k}_ci_low": r.metrics["confidence_interval_95"][k][0] for k in ROUGE_KEYS},
        **{f"{k}_ci_high": r.metrics["confidence_interval_95"][k][1] for k in ROUGE_KEYS},
    } for name, r in zip(names, runs)])
    changes = pd.DataFrame([{
        "run": name, "baseline": names[0], "paired_n": len(common),
        **{f"{k}_change": float(s[:, j].mean() - scores[0][:, j].mean()) for j, k in enumerate(ROUGE_KEYS)},
        **{f"{k}_p": float(p) for k, p in zip(ROUGE_KEYS, paired_bootstrap(scores[0], s))},
    } for name, s in zip(names[1:], scores[1:])])
    picked = common[:samples]
    sample_rows = pd.DataFrame([{"id": i, "reference": runs[0].predictions[i]["references"][0],
                                 **{name: r.predictions[i]["prediction"] for name, r in zip(names, runs)}}
                                for i in picked])

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "rouge.csv", index=False)
    changes.to_csv(out / "changes.csv", index=False)
    sample_rows.to_csv(out / "samples.csv", index=False)
    plots = {"rouge.png": plot_rouge(table, out / "rouge.png")}
    if any(r.losses for r in runs):
        plots["loss.png"] = plot_losses(names, runs, out / "loss.png")
    shown = pd.DataFrame([{"run": row["run"], "n": row["n"],
                           **{k: f"{row[k]:.4f} [{row[k + '_ci_low']:.4f}, {row[k + '_ci_high']:.4f}]" for k in ROUGE_KEYS}}
                          for _, row in table.iterrows()])
    (out / "report.md").write_text(markdown(shown, changes, sample_rows, plots))
    (out / "report.html").write_text(html_report(shown, changes, sample_rows, out, plots))
    return out


def plot_rouge(table, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(table)
    for i, row in table.iterrows():
        x = np.arange(len(ROUGE_KEYS)) + i * width
        low = [row[k] - row[f"{k}_ci_low"] for k in ROUGE_KEYS]
        high = [row[f"{k}_ci_high"] - row[k] for k in ROUGE_KEYS]
        ax.bar(x, [row[k] for k in ROUGE_KEYS], width, yerr=[low, high], capsize=3, label=row["run"])
    ax.set_xticks(np.arange(len(ROUGE_KEYS)) + width * (len(table) - 1) / 2, ROUGE_KEYS)
    ax.set_ylabel("F1 (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "ROUGE per run"


def plot_losses(names: list[str], runs: list[RunResult], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in zip(names, runs):
        train = [(r["step"], r["loss"]) for r in run.losses if "loss" in r]
        val = [(r["step"], r["validation_loss"]) for r in run.losses if "validation_loss" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{name} train")
            if val:
                ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "training loss"


def markdown_table(frame) -> str:
    def cell(value) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def markdown(table, changes, samples, plots: dict[str, str]) -> str:
    parts = ["# dsum comparison", "", "## ROUGE F1 (mean over references, then dialogues; 95% bootstrap CI)", "",
             markdown_table(table), ""]
    if len(changes):
        parts += ["## Change over the first run (paired bootstrap p-value)", "", markdown_table(changes), ""]
    parts += [f"![{title}]({name})" for name, title in plots.items()]
    parts += ["", "## Sample summaries", "", markdown_table(samples), ""]
    return "\n".join(parts)


def html_report(table, changes, samples, out: Path, plots: dict[str, str]) -> str:
    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for name, title in plots.items())
    change_html = ("<h2>Change over the first run (paired bootstrap p-value)</h2>" + changes.to_html(index=False, float_format="%.4f")
                   if len(changes) else "")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>dsum comparison</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}</style></head><body>"
            "<h1>dsum comparison</h1><h2>ROUGE F1 (mean over references, then dialogues; 95% bootstrap CI)</h2>"
            + table.to_html(index=False, float_format="%.4f") + change_html + images
            + "<h2>Sample summaries</h2>" + samples.to_html(index=False) + "</body></html>\n")
