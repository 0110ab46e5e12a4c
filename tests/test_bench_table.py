"""BENCHMARKS.md's results table: what `dsum bench --table` makes from the committed results JSON files,
so that the figures shown cannot drift from the files; and how the command refuses what it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from dsum.bench import table
from dsum.cli import main
from dsum.config import RecipeError


def test_benchmarks_md_shows_the_table_the_results_files_make():
    document = (ROOT / "BENCHMARKS.md").read_text()
    made = table.with_table(document, table.results_table(ROOT / "benchmarks" / "results"))
    assert document == made, "BENCHMARKS.md's table is not what benchmarks/results/ makes: run `dsum bench --table`"
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):  # every recorded run is in it, and how to rerun it
        results = json.loads(path.read_text())
        assert f"(benchmarks/results/{path.name})" in document and f"`{results['command']}`" in document, path.name


def goals_results(date: str) -> dict:
    """A goals run's results as the bench writes them, cut to what the table reads."""
    machine = {"device": "cuda", "gpu": "NVIDIA H200", "cpu": "x", "cpu_cores": 16, "torch_threads": 16,
               "torch": "2.11.0+cu130", "transformers": "5.23.0", "load_average_before": [0.5, 0.4, 0.3]}
    figures = {"train_seconds": 18.5, "real_tokens_per_second": 90000.0, "mfu": 0.2, "eval_seconds": 2.5}
    goals = {"train_seconds": {"value": 18.5, "goal": "<= 20", "met": True},
             "mfu": {"value": 0.2, "goal": ">= 0.25", "met": False}}
    return {"goals_met": False, "workloads": {"flan-t5-base": {"figures": figures, "goals": goals}},
            "machine": machine, "date": date, "command": "dsum bench --goals --device cuda --record",
            "commit": "2ea07b4301079167c2b38f1d01766862deca9305", "dirty": False, "wall_seconds": 61.0}


def test_the_table_holds_every_run_with_its_date_machine_and_command(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        (results / path.name).write_text(path.read_text())
    (results / "2026-12-05T100000Z-cuda-goals-2ea07b4.json").write_text(
        json.dumps(goals_results("2026-12-05T10:00:00+00:00")))
    made = table.results_table(results)
    lines = made.splitlines()
    row = next(line for line in lines if "flan-t5-base" in line)
    assert row == ("| [2026-12-05 10:00 cuda 2ea07b4](benchmarks/results/2026-12-05T100000Z-cuda-goals-2ea07b4.json) "
                   "| flan-t5-base | 18.5 (<= 20) | 90,000 | 20.0% (>= 0.25) |  | 2.50 | some missed |")
    assert ("- `2026-12-05T100000Z-cuda-goals-2ea07b4.json`: 2026-12-05T10:00:00+00:00; NVIDIA H200; torch "
            "2.11.0+cu130, transformers 5.23.0; commit 2ea07b4; `dsum bench --goals --device cuda --record`; load "
            "average before 0.50; 61 s") in lines
    assert "No goals run is recorded yet." not in made and "No three-way run is recorded yet." not in made
    # Oldest first, a three-way run's figures below their goals in bold.
    assert made.index("1a1827f](") < made.index("9cfd1c0](") < made.index("cuda 2ea07b4](")
    assert "| **27.70x** |" in made


def test_the_table_is_written_between_its_markers_and_nowhere_else(tmp_path, monkeypatch, capsys):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    document = tmp_path / "BENCHMARKS.md"
    document.write_text(f"# Benchmarks\n\nbefore\n\n{table.BEGIN}\nold figures\n{table.END}\n\nafter\n")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--table"]) == 0
    made = table.results_table(Path("benchmarks/results"))
    assert document.read_text() == f"# Benchmarks\n\nbefore\n\n{table.BEGIN}\n{made}\n{table.END}\n\nafter\n"
    assert "No three-way run is recorded yet." in document.read_text()
    assert main(["bench", "--table"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["BENCHMARKS.md: the results table rewritten from benchmarks/results/*.json",
                   "BENCHMARKS.md: the results table already matches benchmarks/results/*.json"]
    with pytest.raises(RecipeError, match="has no results table's markers"):
        table.with_table("# Benchmarks\n", "x")


@pytest.mark.parametrize("args, message", [
    (["--models", "t5"], "--table: it runs nothing, so --models would do nothing; give --table alone"),
    (["--goals", "--record"], "--table: it runs nothing, so --goals, --record would do nothing; give --table alone"),
    ([], "--table: no BENCHMARKS.md and benchmarks/results/ here; run it from the root of a dsum checkout"),
])
def test_table_refusals_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--table", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dsum: error: {message}"]
