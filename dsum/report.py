"""`dsum compare`: how several runs or evaluations differ (recipe, training, evaluated dialogues) and how their
ROUGE compares, as one report in HTML, Markdown and CSV; every run is scored again from its predictions.

    dsum compare runs/flan-t5-base-zero-shot runs/flan-t5-base-full runs/flan-t5-base-lora [--out DIR] [--samples K]
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsum.config import RecipeError
from dsum.data.sources import json_line, text_lines
from dsum.run_dir import EVAL_DIR, METRICS_FILE, RUN_FILE, flat, read_run
from dsum.scoring import BOOTSTRAP_SAMPLES, ROUGE_KEYS, rouge_from_matrix, score_matrix

# What `dsum eval` writes into an evaluation directory (dsum/evaluate.py, which imports torch, names them).
EVAL_METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
REPORT_DIR = "compare"  # the default --out, inside the first run's directory
MISSING = "-"
# Where a run was written says nothing about how it was made.
SETTINGS_LEFT_OUT = ("output_dir",)
FILES = ("report.md", "rouge.csv", "changes.csv", "differences.csv", "samples.csv")


@dataclass
class RunResult:
    name: str
    eval_dir: Path
    run_dir: Path | None  # the training run the evaluation belongs to; None for an evaluation alone
    info: dict  # the run's run.json ({} without a run)
    evaluation: dict  # metrics.json as `dsum eval` wrote it (split, model, shots)
    metrics: dict  # ROUGE scored again from the predictions
    predictions: dict[str, dict]  # id -> row of predictions.jsonl, in dataset order
    scores: dict[str, np.ndarray]  # id -> primary ROUGE of that dialogue (mean over references), per ROUGE_KEYS
    losses: list[dict]  # rows of the run's metrics.jsonl (empty for an evaluation without a run)


@dataclass
class Report:
    out: Path
    differences: str  # the "how the runs differ" table as plain text, for the console
    warnings: list[str]  # one line each


@dataclass
class Sections:
    """What report.md and report.html show, in order (the tables as pandas DataFrames)."""

    differences: Any  # DataFrame: setting, then a column per run
    difference_notes: list[str]
    warnings: list[str]
    rouge: Any
    changes: Any
    samples: Any
    plots: dict[str, str]
    samples_note: str | None


def locate(path: Path) -> tuple[Path, Path | None]:
    """(evaluation directory, run directory or None) of a run directory with eval/ or an evaluation directory."""
    expected = "expected a run directory (with eval/) or an evaluation directory (metrics.json and predictions.jsonl)"
    if not path.exists():
        raise RecipeError(f"{path}: no such directory; {expected}")
    if not path.is_dir():
        raise RecipeError(f"{path}: a file; {expected}")
    if (path / EVAL_DIR / EVAL_METRICS).is_file():
        eval_dir = path / EVAL_DIR
    elif (path / EVAL_METRICS).is_file():
        eval_dir = path
    elif (path / RUN_FILE).is_file():
        raise RecipeError(f"{path}: a run without a finished evaluation (no {EVAL_DIR}/{EVAL_METRICS}); evaluate it "
                          "with dsum eval, or finish it with dsum train --resume auto")
    else:
        raise RecipeError(f"{path}: holds neither {EVAL_DIR}/{EVAL_METRICS} nor {EVAL_METRICS}; {expected}")
    if not (eval_dir / PREDICTIONS).is_file():
        raise RecipeError(f"{eval_dir}: {EVAL_METRICS} but no {PREDICTIONS}; every run is scored again from its "
                          "predictions, so compare evaluations that kept them")
    owner = eval_dir.parent if eval_dir.name == EVAL_DIR else eval_dir
    return eval_dir, owner if (owner / RUN_FILE).is_file() else None


def locate_all(paths: list[Path]) -> list[tuple[Path, Path | None]]:
    """Every path located, and none given twice: one line naming the first that is not a run."""
    located = [locate(p) for p in paths]
    seen: dict[Path, Path] = {}
    for path, (eval_dir, _) in zip(paths, located):
        first = seen.setdefault(eval_dir.resolve(), path)
        if first is not path:
            raise RecipeError(f"{path}: the same evaluation as {first}; give each run once")
    return located


def default_out(paths: list[Path]) -> Path:
    """compare/ in the first run's directory: beside what it describes, never in the current directory."""
    eval_dir, run_dir = locate(paths[0])
    return (run_dir or eval_dir) / REPORT_DIR


def check_out(out: Path) -> None:
    """--out is a directory, or can be made: its nearest existing part is one."""
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "it is a file" if existing == out else f"{existing} is a file"
        raise RecipeError(f"--out {out}: {where}; expected a directory for the report (made if missing)")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecipeError(f"{path}: cannot read it ({err}); expected the JSON object dsum eval writes") from None
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: a JSON {type(value).__name__}; expected the object dsum eval writes")
    return value


def read_predictions(path: Path) -> list[dict]:
    """The rows of predictions.jsonl, each with an id, a prediction and at least one reference."""
    rows, seen = [], set()
    for number, line in enumerate(text_lines(path.read_text(encoding="utf-8")), 1):
        if not line.strip():
            continue
        try:
            row = json_line(line)
        except ValueError as err:
            raise RecipeError(f"{path} line {number}: not JSON ({err})") from None
        problem = prediction_problem(row)
        if problem:
            raise RecipeError(f"{path} line {number}: {problem}; expected a row of dsum eval's {PREDICTIONS}")
        if row["id"] in seen:
            raise RecipeError(f"{path} line {number}: id {row['id']!r} appears twice; expected one row per dialogue")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise RecipeError(f"{path}: no predictions; expected a row per dialogue")
    return rows


def prediction_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("id"), (str, int)):
        return "id: missing, or neither a string nor a number"
    if not isinstance(row.get("prediction"), str):
        return "prediction: missing or not a string"
    refs = row.get("references")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        return "references: expected a non-empty list of strings"
    return None


def read_losses(run_dir: Path | None) -> list[dict]:
    """metrics.jsonl's rows; a line a killed run left cut short is skipped (the plot is all it serves)."""
    log = run_dir / METRICS_FILE if run_dir else None
    if log is None or not log.is_file():
        return []
    rows = []
    for line in text_lines(log.read_text(encoding="utf-8")):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def find_run(path: Path) -> RunResult:
    """A run directory (with eval/) or an evaluation directory (metrics.json and predictions.jsonl)."""
    eval_dir, run_dir = locate(path)
    evaluation = read_json(eval_dir / EVAL_METRICS)
    rows = read_predictions(eval_dir / PREDICTIONS)
    # Scored again from the predictions, so that every run is measured by this version's contract.
    matrix = score_matrix([r["prediction"] for r in rows], [r["references"] for r in rows])
    name = (eval_dir.parent if eval_dir.name == EVAL_DIR else eval_dir).name
    return RunResult(name=name, eval_dir=eval_dir, run_dir=run_dir, info=read_run(run_dir) if run_dir else {},
                     evaluation=evaluation, metrics=rouge_from_matrix(matrix),
                     predictions={r["id"]: r for r in rows},
                     scores={r["id"]: m.mean(axis=0) for r, m in zip(rows, matrix)}, losses=read_losses(run_dir))


def run_names(paths: list[Path], runs: list[RunResult]) -> list[str]:
    """Each run's directory name; where two share one, the evaluation's too, else the path as given."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two evaluations of one run: tell them apart by their directory
        names = [f"{r.name}/{r.eval_dir.name}" if r.eval_dir.name != r.name else r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """Two-sided p-value per metric that the mean of b - a is zero, resampling dialogues in pairs.

    Row i of `a` and of `b` must score the same dialogue: `paired_scores` lines them up by id."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired bootstrap needs the same dialogues on both sides, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    diff = b - a
    n = len(diff)
    means = np.stack([diff[rng.integers(0, n, n)].mean(axis=0) for _ in range(samples)])
    below, above = (means <= 0).mean(axis=0), (means >= 0).mean(axis=0)
    return np.minimum(1.0, 2 * np.minimum(below, above))


def paired_scores(base: RunResult, run: RunResult) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The dialogues both scored, in the baseline's order, and each side's scores on them, row for row."""
    shared = [i for i in base.predictions if i in run.predictions]
    return shared, np.array([base.scores[i] for i in shared]), np.array([run.scores[i] for i in shared])


def change_row(name: str, baseline: str, base: RunResult, run: RunResult) -> dict:
    """The change of `run` over the baseline on the dialogues both scored; no figures where they share none."""
    shared, a, b = paired_scores(base, run)
    row: dict[str, Any] = {"run": name, "baseline": baseline, "paired_n": len(shared)}
    if not shared:
        return row | {f"{k}_change": None for k in ROUGE_KEYS} | {f"{k}_p": None for k in ROUGE_KEYS}
    p = paired_bootstrap(a, b)
    return (row | {f"{k}_change": float(b[:, j].mean() - a[:, j].mean()) for j, k in enumerate(ROUGE_KEYS)}
            | {f"{k}_p": float(p[j]) for j, k in enumerate(ROUGE_KEYS)})


def p_text(p: float | None, samples: int = BOOTSTRAP_SAMPLES) -> str:
    """A p-value as the report shows it: below the bootstrap's resolution, `< 0.001`, never `0.0000`."""
    if p is None or math.isnan(p):
        return MISSING
    floor = 1 / samples
    return f"< {floor:g}" if p < floor else f"{p:.3f}"


def p_note(samples: int = BOOTSTRAP_SAMPLES) -> str:
    return (f"p: two-sided paired bootstrap p-value that the run's mean ROUGE equals the baseline's on the dialogues "
            f"both scored ({samples:,} resamples of those dialogues); < {1 / samples:g}: no resample reached zero change.")


def dialogue_warnings(names: list[str], runs: list[RunResult]) -> list[str]:
    """A line when the runs did not score the same dialogues, and one per run that shares none with the baseline."""
    ids = [set(r.predictions) for r in runs]
    if all(s == ids[0] for s in ids[1:]):
        return []
    scored = ", ".join(f"{name} {len(s)} on {r.evaluation.get('split', 'an unnamed split')}"
                       for name, r, s in zip(names, runs, ids))
    shared = ", ".join(f"{name} {len(ids[0] & s)}" for name, s in zip(names[1:], ids[1:]))
    lines = [f"the runs were not scored on the same dialogues ({scored}); each change and p-value uses only the "
             f"dialogues a run shares with the baseline {names[0]} ({shared})"]
    lines += [f"{name} shares no dialogue with the baseline {names[0]}: no change or p-value for it; compare "
              "evaluations of the same split" for name, s in zip(names[1:], ids[1:]) if not ids[0] & s]
    return lines


def setup(run: RunResult) -> dict[str, Any]:
    """How a run was made, as dotted keys: its recipe (run.json), the processes it trained on, and what its
    evaluation (metrics.json) says it used, which is truer than the recipe for an evaluation made apart."""
    recipe = run.info.get("recipe")
    keys = {k: v for k, v in flat(recipe).items() if k not in SETTINGS_LEFT_OUT} if isinstance(recipe, dict) else {}
    keys.pop("eval.split", None)  # a row of its own, from the evaluation
    if "world_size" in run.info:
        keys["world_size"] = run.info["world_size"]
    if "shots" in run.evaluation:
        keys["prompt.shots"] = run.evaluation["shots"]
    if "model" in run.evaluation:
        keys["evaluated model"] = shown_model(run)
    return keys


def shown_model(run: RunResult) -> str:
    """The evaluated model, inside its run's directory as a relative path (`final`), so that runs compare equal."""
    model = str(run.evaluation["model"])
    if run.run_dir is not None:
        try:
            return str(Path(model).relative_to(run.run_dir.resolve()))
        except ValueError:
            pass
    return model


def differing_keys(setups: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between the runs that have them (an evaluation alone has no recipe)."""
    keys = dict.fromkeys(k for s in setups for k in s)
    return [k for k in keys if len({json.dumps(s[k], sort_keys=True, default=str) for s in setups if k in s}) > 1]


def shown_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def training_facts(run: RunResult) -> dict[str, str]:
    """Per run: optimizer steps, epochs, the training loop's seconds (less validation and saves), real
    tokens/s (run.json's telemetry), and the evaluation's split and number of dialogues scored."""
    info, telemetry = run.info, run.info.get("telemetry") or {}
    since = " (since resume)" if info.get("resumed_from") else ""  # telemetry restarts with the process
    seconds, rate = telemetry.get("training_seconds"), telemetry.get("tokens_per_second")
    return {
        "optimizer steps": str(info["steps"]) if "steps" in info else MISSING,
        "epochs": epochs(run),
        "training seconds": f"{seconds:.1f}{since}" if isinstance(seconds, (int, float)) else MISSING,
        "tokens/s": f"{rate:.0f}{since}" if isinstance(rate, (int, float)) else MISSING,
        "eval split": str(run.evaluation.get("split", MISSING)),
        "n (dialogues scored)": str(len(run.predictions)),
    }


def epochs(run: RunResult) -> str:
    """Epochs of the training split gone through: the last logged epoch, else steps over steps per epoch."""
    logged = [r["epoch"] for r in run.losses if isinstance(r.get("epoch"), (int, float))]
    if logged:
        return f"{logged[-1]:g}"
    steps, per_epoch = run.info.get("steps"), run.info.get("steps_per_epoch")
    return f"{steps / per_epoch:.4g}" if isinstance(steps, int) and isinstance(per_epoch, int) and per_epoch else MISSING


def differences(runs: list[RunResult]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows [what, value per run]: the settings that differ, and each run's training and evaluation."""
    setups = [setup(r) for r in runs]
    settings = [[key, *(shown_value(s[key]) if key in s else MISSING for s in setups)] for key in differing_keys(setups)]
    facts = [training_facts(r) for r in runs]
    return settings, [[what, *(f[what] for f in facts)] for what in facts[0]]


def differences_notes(names: list[str], runs: list[RunResult], settings: list[list[str]]) -> list[str]:
    notes = [] if settings else ["No recipe setting differs between the runs (output_dir aside)."]
    notes += [f"{name}: an evaluation without its run (no {RUN_FILE} beside it): no recipe or training figures."
              for name, r in zip(names, runs) if r.run_dir is None]
    notes += [f"{name}: its {RUN_FILE} does not read as a run's record: no recipe or training figures."
              for name, r in zip(names, runs) if r.run_dir is not None and not r.info]
    return notes


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def compare(paths: list[Path], out: Path, samples: int = 5) -> Report:
    """Write report.html, report.md, the CSV tables and the PNG plots into `out`."""
    locate_all(paths)
    check_out(out)
    runs = [find_run(p) for p in paths]
    names = run_names(paths, runs)
    warnings = dialogue_warnings(names, runs)
    settings, facts = differences(runs)
    notes = differences_notes(names, runs, settings)
    try:
        write_report(out, names, runs, settings + facts, notes, warnings, samples)
    except OSError as err:
        raise RecipeError(f"--out {out}: cannot write the report there ({err.strerror or err}); "
                          "pass --out DIR to write it elsewhere") from None
    return Report(out=out, differences="\n".join([text_table(["", *names], settings + facts), *notes]),
                  warnings=warnings)


def write_report(out: Path, names: list[str], runs: list[RunResult], diff_rows: list[list[str]], notes: list[str],
                 warnings: list[str], samples: int) -> None:
    import pandas as pd

    table = rouge_frame(names, runs)
    changes = pd.DataFrame([change_row(name, names[0], runs[0], r) for name, r in zip(names[1:], runs[1:])])
    everywhere = [i for i in runs[0].predictions if all(i in r.predictions for r in runs[1:])]
    sample_rows = pd.DataFrame([{"id": i, "reference": runs[0].predictions[i]["references"][0],
                                 **{name: r.predictions[i]["prediction"] for name, r in zip(names, runs)}}
                                for i in everywhere[:samples]], columns=["id", "reference", *names])
    difference_table = pd.DataFrame([row[1:] for row in diff_rows], columns=names,
                                    index=pd.Index([row[0] for row in diff_rows], name="setting"))
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "rouge.csv", index=False)
    changes.to_csv(out / "changes.csv", index=False)
    difference_table.to_csv(out / "differences.csv")
    sample_rows.to_csv(out / "samples.csv", index=False)
    plots = {"rouge.png": plot_rouge(table, out / "rouge.png")}
    (out / "loss.png").unlink(missing_ok=True)  # from an earlier comparison that had loss curves
    if any(r.losses for r in runs):
        plots["loss.png"] = plot_losses(names, runs, out / "loss.png")
    sections = Sections(difference_table.reset_index(), notes, warnings, shown_rouge(table), shown_changes(changes),
                        sample_rows, plots, everywhere_note(len(everywhere), samples))
    (out / "report.md").write_text(markdown(sections), encoding="utf-8")
    (out / "report.html").write_text(html_report(sections, out), encoding="utf-8")


def rouge_frame(names: list[str], runs: list[RunResult]):
    """rouge.csv: each run's ROUGE on all the dialogues it scored, with its 95% interval."""
    import pandas as pd

    return pd.DataFrame([{
        "run": name, "n": r.metrics["n"],
        **{k: r.metrics[k] for k in ROUGE_KEYS},
        **{f"{k}_ci_low": r.metrics["confidence_interval_95"][k][0] for k in ROUGE_KEYS},
        **{f"{k}_ci_high": r.metrics["confidence_interval_95"][k][1] for k in ROUGE_KEYS},
    } for name, r in zip(names, runs)])


def shown_rouge(table):
    import pandas as pd

    return pd.DataFrame([{"run": row["run"], "n": row["n"],
                          **{k: f"{row[k]:.4f} [{row[k + '_ci_low']:.4f}, {row[k + '_ci_high']:.4f}]" for k in ROUGE_KEYS}}
                         for _, row in table.iterrows()])


def shown_changes(changes):
    """changes.csv as the report shows it: changes to 4 places, p-values as `p_text` writes them."""
    import pandas as pd

    if not len(changes):
        return changes
    return pd.DataFrame([{
        "run": row["run"], "baseline": row["baseline"], "paired_n": row["paired_n"],
        **{f"{k}_change": MISSING if pd.isna(row[f"{k}_change"]) else f"{row[f'{k}_change']:+.4f}"
           for k in ROUGE_KEYS},
        **{f"{k}_p": p_text(None if pd.isna(row[f"{k}_p"]) else row[f"{k}_p"]) for k in ROUGE_KEYS},
    } for _, row in changes.iterrows()])


def everywhere_note(shared: int, samples: int) -> str | None:
    if samples and not shared:
        return "No dialogue was scored by every run, so there are no samples to set side by side."
    return None


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


DIFFERENCES_TITLE = "How the runs differ"
DIFFERENCES_NOTE = ("Recipe settings that differ between the runs (run.json), then each run's training (run.json's "
                    "telemetry: seconds of the training loop less validation and saves, real tokens/s) and evaluation.")
ROUGE_TITLE = "ROUGE F1 (mean over references, then dialogues; 95% bootstrap CI)"
CHANGES_TITLE = "Change over the first run, on the dialogues both scored (paired bootstrap p-value)"


def markdown(s: Sections) -> str:
    parts = ["# dsum comparison", ""]
    parts += [f"> **Warning:** {w}\n" for w in s.warnings]
    parts += [f"## {DIFFERENCES_TITLE}", "", DIFFERENCES_NOTE, "", markdown_table(s.differences), ""]
    parts += [*s.difference_notes, ""] if s.difference_notes else []
    parts += [f"## {ROUGE_TITLE}", "", markdown_table(s.rouge), ""]
    if len(s.changes):
        parts += [f"## {CHANGES_TITLE}", "", markdown_table(s.changes), "", p_note(), ""]
    parts += [f"![{title}]({name})" for name, title in s.plots.items()]
    parts += ["", "## Sample summaries", "", s.samples_note or markdown_table(s.samples), ""]
    return "\n".join(parts)


def html_report(s: Sections, out: Path) -> str:
    def paragraphs(lines: list[str], css: str = "") -> str:
        return "".join(f"<p{css}>{html.escape(line)}</p>" for line in lines)

    images = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for name, title in s.plots.items())
    change_html = (f"<h2>{html.escape(CHANGES_TITLE)}</h2>" + s.changes.to_html(index=False) + paragraphs([p_note()])
                   if len(s.changes) else "")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>dsum comparison</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.warning{color:#a40000}</style>"
            "</head><body>"
            "<h1>dsum comparison</h1>" + paragraphs([f"Warning: {w}" for w in s.warnings], " class='warning'")
            + f"<h2>{html.escape(DIFFERENCES_TITLE)}</h2>" + paragraphs([DIFFERENCES_NOTE])
            + s.differences.to_html(index=False) + paragraphs(s.difference_notes)
            + f"<h2>{html.escape(ROUGE_TITLE)}</h2>" + s.rouge.to_html(index=False) + change_html + images
            + "<h2>Sample summaries</h2>"
            + (paragraphs([s.samples_note]) if s.samples_note else s.samples.to_html(index=False))
            + "</body></html>\n")
