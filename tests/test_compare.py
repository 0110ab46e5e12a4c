"""`dsum compare` on run directories written here file by file (run.json, metrics.jsonl, eval/): what the
runs differ in, a warning and shared-dialogue pairing when they scored different dialogues, p-values that
never print as zero, where the report goes, and the lines that open and close the command's output."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_dsum
from dsum.report import compare, find_run, p_text, paired_bootstrap

REFERENCES = ["Amy books a table for two at seven.", "Bob buys three train tickets to Rome.",
              "Carl has a fever and is told to rest.", "Dana finds the flat too expensive.",
              "Eve asks the way to the station.", "Finn orders a pizza for dinner tonight."]


def recipe(**changes) -> dict:
    tree = {"model": {"family": "seq2seq"}, "adapter": {"method": "lora", "r": 8},
            "train": {"learning_rate": 1e-4, "seed": 0, "max_steps": 20},
            "eval": {"split": "test", "num_beams": 1}, "output_dir": "somewhere"}
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = tree
        for key in path:
            node = node[key]
        node[last] = value
    return tree


def write_run(root: Path, name: str, ids: list[int], *, right: int = 0, split: str = "test", recipe_tree=None,
              steps: int = 20, seconds: float = 7.5, tokens_per_second: float = 4598.4, losses: bool = True) -> Path:
    """A finished run: run.json, metrics.jsonl, and eval/ with a prediction per id; the first `right` ids are
    predicted word for word, the others with an unrelated sentence."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "status": "finished", "recipe": recipe_tree or recipe(), "world_size": 1, "trained": True, "steps": steps,
        "steps_per_epoch": 8, "telemetry": {"training_seconds": seconds, "tokens_per_second": tokens_per_second}}))
    if losses:
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "epoch": s / 8, "loss": 5.0 - s / 10}) + "\n" for s in range(1, steps + 1)))
    rows = [{"id": f"{split}-{i}", "prediction": REFERENCES[i % 6] if n < right else "Nothing to say here.",
             "references": [REFERENCES[i % 6]]} for n, i in enumerate(ids)]
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "metrics.json").write_text(json.dumps({"n": len(rows), "split": split, "shots": 0,
                                                           "model": str((run / "final").resolve())}))
    return run


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty current directory: the report must not land in it by default."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def dsum_compare(*args) -> tuple[list[str], list[str]]:
    result = run_dsum("compare", *map(str, args))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines(), result.stderr.splitlines()


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_table_of_differences_names_the_settings_that_differ_and_each_runs_training(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)), right=2)
    b = write_run(tmp_path, "b", list(range(6)), right=4, steps=40, seconds=15.31, tokens_per_second=3000.6,
                  recipe_tree=recipe(**{"train.learning_rate": 1e-3, "adapter.method": "none", "train.max_steps": 40,
                                        "output_dir": "elsewhere"}))
    out, _ = dsum_compare(a, b)
    table = out[1:-1]
    assert table[0].split() == ["a", "b"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows["adapter.method"] == ["lora", "none"]
    assert rows["train.learning_rate"] == ["0.0001", "0.001"]
    assert rows["train.max_steps"] == ["20", "40"]
    assert "train.seed" not in rows and "output_dir" not in rows and "eval.num_beams" not in rows  # the same, or where
    assert [line for line in table if line.startswith("optimizer steps")][0].split()[2:] == ["20", "40"]
    assert [line for line in table if line.startswith("epochs")][0].split()[1:] == ["2.5", "5"]
    assert [line for line in table if line.startswith("training seconds")][0].split()[2:] == ["7.5", "15.3"]
    assert [line for line in table if line.startswith("tokens/s")][0].split()[1:] == ["4598", "3001"]
    assert [line for line in table if line.startswith("eval split")][0].split()[2:] == ["test", "test"]
    assert [line for line in table if line.startswith("n (dialogues scored)")][0].split()[3:] == ["6", "6"]
    # The same table in the report and in differences.csv.
    saved = {row["setting"]: [row["a"], row["b"]] for row in read_csv(a / "compare" / "differences.csv")}
    assert saved["train.learning_rate"] == ["0.0001", "0.001"] and saved["optimizer steps"] == ["20", "40"]
    assert "| train.learning_rate | 0.0001 | 0.001 |" in (a / "compare" / "report.md").read_text()
    assert "<td>train.learning_rate</td>" in (a / "compare" / "report.html").read_text()


def test_runs_alike_in_their_recipe_say_so_and_an_evaluation_alone_has_no_training_figures(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)))
    b = write_run(tmp_path, "b", list(range(6)))
    (b / "run.json").unlink()  # an evaluation directory of its own: eval/ is all there is
    out, _ = dsum_compare(a, b / "eval")
    assert "b: an evaluation without its run (no run.json beside it): no recipe or training figures." in out
    model = [line for line in out if line.startswith("evaluated model")][0].split()[2:]
    assert model == ["final", str((b / "final").resolve())]  # a run's own final/ is named inside it
    steps = [line for line in out if line.startswith("optimizer steps")][0].split()[2:]
    assert steps == ["20", "-"]
    same, _ = dsum_compare(a, write_run(tmp_path, "c", list(range(6))))
    assert "No recipe setting differs between the runs (output_dir aside)." in same
    (b / "run.json").write_text('{"status": "fini')  # cut short: the evaluation is compared, the record said lost
    cut, _ = dsum_compare(a, b)
    assert "b: its run.json does not read as a run's record: no recipe or training figures." in cut
    assert [line for line in cut if line.startswith("optimizer steps")][0].split()[2:] == ["20", "-"]


def test_runs_scored_on_different_dialogues_are_warned_of_and_paired_on_the_shared_ones(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(12)), right=3)
    b = write_run(tmp_path, "b", [10, 2, 7, 4, 0], right=2)  # neither the first ids nor in the baseline's order
    _, err = dsum_compare(a, b)
    assert err == ["dsum: warning: the runs were not scored on the same dialogues (a 12 on test, b 5 on test); each "
                   "change and p-value uses only the dialogues a run shares with the baseline a (b 5)"]
    assert "> **Warning:** the runs were not scored on the same dialogues" in (a / "compare" / "report.md").read_text()
    change = read_csv(a / "compare" / "changes.csv")[0]
    assert change["paired_n"] == "5"
    base, run = find_run(a), find_run(b)
    shared = [f"test-{i}" for i in (0, 2, 4, 7, 10)]
    before, after = np.array([base.scores[i] for i in shared]), np.array([run.scores[i] for i in shared])
    assert float(change["rouge1_change"]) == pytest.approx(after[:, 0].mean() - before[:, 0].mean())
    assert float(change["rouge1_change"]) != pytest.approx(run.metrics["rouge1"] - base.metrics["rouge1"])
    assert float(change["rouge2_p"]) == pytest.approx(paired_bootstrap(before, after)[1])


def test_runs_on_the_same_dialogues_raise_no_warning(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)), right=1)
    _, err = dsum_compare(a, write_run(tmp_path, "b", list(range(6)), right=3))
    assert err == []
    assert "Warning" not in (a / "compare" / "report.md").read_text()


def test_runs_that_share_no_dialogue_get_no_change_and_say_why(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)), split="test")
    b = write_run(tmp_path, "b", list(range(6)), split="validation",  # the same n, other dialogues
                  recipe_tree=recipe(**{"eval.split": "validation"}))
    out, err = dsum_compare(a, b)
    assert [line.split()[2:] for line in out if line.startswith("eval")] == [["test", "validation"]]  # one row
    assert err[0].startswith("dsum: warning: the runs were not scored on the same dialogues (a 6 on test, "
                             "b 6 on validation)")
    assert err[1] == ("dsum: warning: b shares no dialogue with the baseline a: no change or p-value for it; "
                      "compare evaluations of the same split")
    change = read_csv(a / "compare" / "changes.csv")[0]
    assert change["paired_n"] == "0" and change["rouge1_change"] == "" and change["rouge1_p"] == ""
    report = (a / "compare" / "report.md").read_text()
    assert "No dialogue was scored by every run" in report


def test_a_paired_bootstrap_refuses_scores_that_are_not_row_for_row():
    with pytest.raises(ValueError, match="the same dialogues on both sides, got 3 and 2"):
        paired_bootstrap(np.zeros((3, 4)), np.zeros((2, 4)))


def test_small_p_values_read_below_the_bootstraps_resolution_never_zero(tmp_path, workdir):
    assert [p_text(0.0), p_text(0.0009), p_text(0.002), p_text(0.0456), p_text(1.0), p_text(None)] == \
        ["< 0.001", "< 0.001", "0.002", "0.046", "1.000", "-"]
    a = write_run(tmp_path, "a", list(range(12)), right=0)
    b = write_run(tmp_path, "b", list(range(12)), right=12)  # better on every dialogue: no resample reaches zero
    dsum_compare(a, b)
    assert float(read_csv(a / "compare" / "changes.csv")[0]["rouge1_p"]) == 0.0
    report = (a / "compare" / "report.md").read_text()
    changes = report.split("## Change over the first run")[1].split("![")[0]
    assert "| b | a | 12 | +" in changes and "< 0.001" in changes and "0.0000" not in changes
    assert ("p: two-sided paired bootstrap p-value that the run's mean ROUGE equals the baseline's on the dialogues "
            "both scored (1,000 resamples of those dialogues); < 0.001: no resample reached zero change.") in changes
    assert "&lt; 0.001" in (a / "compare" / "report.html").read_text()


def test_the_report_goes_into_the_first_run_or_out_and_never_into_the_current_directory(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)))
    b = write_run(tmp_path, "b", list(range(6)), losses=False)
    dsum_compare(a / "eval", b)  # the first given as its evaluation: the report still goes into the run
    assert (a / "compare" / "report.html").is_file() and (a / "compare" / "loss.png").is_file()
    assert list(workdir.iterdir()) == []
    chosen = tmp_path / "chosen" / "report"
    out, _ = dsum_compare(b, a, "--out", chosen)
    assert (chosen / "report.html").is_file() and not (b / "compare").exists()
    # A later comparison without loss curves leaves no loss.png of an earlier one behind.
    dsum_compare(b, "--out", chosen)
    assert not (chosen / "loss.png").exists() and "loss.png" not in (chosen / "report.md").read_text()


def test_the_output_opens_with_what_is_compared_and_closes_with_where_the_report_is(tmp_path, workdir):
    a = write_run(tmp_path, "a", list(range(6)))
    b = write_run(tmp_path, "b", list(range(6)))
    out, _ = dsum_compare(a, b)
    assert out[0] == f"comparing 2 runs, the first as the baseline: {a}, {b}"
    assert out[-1] == (f"report written to {a / 'compare' / 'report.html'} (also report.md, rouge.csv, changes.csv, "
                       "differences.csv, samples.csv and the plots)")
    assert sum(line.startswith("comparing") or line.startswith("report written") for line in out) == 2


def test_compare_returns_its_console_table_and_warnings(tmp_path):
    a = write_run(tmp_path, "a", list(range(4)))
    b = write_run(tmp_path, "b", list(range(3)), recipe_tree=recipe(**{"adapter.r": 16}))
    report = compare([a, b], tmp_path / "out", samples=2)
    assert report.out == tmp_path / "out"
    assert re.search(r"^adapter\.r +8 +16$", report.differences, re.M)
    assert len(report.warnings) == 1 and "(b 3)" in report.warnings[0]
    assert len(read_csv(report.out / "samples.csv")) == 2
