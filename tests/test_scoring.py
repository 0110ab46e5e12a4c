"""The ROUGE contract: values match rouge_score computed independently; the variants differ as they should."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from dsum.scoring import ROUGE_KEYS, interleave, rouge, rouge_from_matrix, score_matrix, split_sentences, spread_scores

PREDICTIONS = ["Tom books a table for four at 7 pm.", "Mary buys two tickets to Paris. She pays by card.",
               "The man asks the way to the station."]
REFERENCES = [
    ["Tom books a table for four on Friday at 7 pm.", "Tom reserves a table for four people."],
    ["Mary buys two train tickets to Paris and pays by card.", "Mary gets tickets.", "Two tickets to Paris for Mary."],
    ["#Person1# asks #Person2# the way to the station."],
]


def independent(prediction: str, reference: str, key: str) -> float:
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=True)
    if key == "rougeLsum":
        prediction, reference = "\n".join(prediction.split(". ")), "\n".join(reference.split(". "))
    return scorer.score(reference, prediction)[key].fmeasure


def test_primary_is_the_mean_over_references_then_dialogues():
    metrics = rouge(PREDICTIONS, REFERENCES)
    for key in ROUGE_KEYS:
        per_dialogue = [sum(independent(p, r, key) for r in refs) / len(refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
        assert metrics[key] == pytest.approx(sum(per_dialogue) / 3, abs=1e-9)
        best = [max(independent(p, r, key) for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
        first = [independent(p, refs[0], key) for p, refs in zip(PREDICTIONS, REFERENCES)]
        assert metrics["best_reference"][key] == pytest.approx(sum(best) / 3, abs=1e-9)
        assert metrics["first_reference"][key] == pytest.approx(sum(first) / 3, abs=1e-9)
        # The variants differ as they should: best >= mean over references; here the first is the best match.
        assert metrics["best_reference"][key] > metrics[key]
        assert metrics["first_reference"][key] > metrics[key]
        low, high = metrics["confidence_interval_95"][key]
        assert 0 <= low <= metrics[key] <= high <= 1
    assert metrics["n"] == 3
    assert metrics["references_per_dialogue"] == pytest.approx(2.0)


def test_reproduces_published_figures():
    """Outputs and figures published with the reference implementations, reproduced exactly.

    - rouge_score's README (google-research/rouge): prediction "The quick brown dog jumps on the log."
      against "The quick brown fox jumps over the lazy dog", stemmer on: rouge1 F1 0.7058823529411765,
      rougeL F1 0.5882352941176471.
    - The Hugging Face `evaluate` ROUGE metric card, several references per prediction (it keeps the
      best reference): rouge1 0.8333, rouge2 0.5, rougeL 0.8333, rougeLsum 0.8333.
    """
    single = rouge(["The quick brown dog jumps on the log."], [["The quick brown fox jumps over the lazy dog"]])
    assert single["rouge1"] == 0.7058823529411765
    assert single["rougeL"] == 0.5882352941176471

    several = rouge(["hello there", "general kenobi"], [["hello", "there"], ["general kenobi", "general yoda"]])
    assert {k: round(v, 4) for k, v in several["best_reference"].items()} == {
        "rouge1": 0.8333, "rouge2": 0.5, "rougeL": 0.8333, "rougeLsum": 0.8333}
    # The primary figure averages over references instead, so it is lower on the same outputs.
    # Dialogue 1: 2/3 against each reference; dialogue 2: 1 and 1/2, mean 3/4.
    assert several["rouge1"] == pytest.approx((2 / 3 + 3 / 4) / 2, abs=1e-12)


def test_flattened_rows_scored_one_by_one_give_the_primary_figure():
    rows = [(p, r) for p, refs in zip(PREDICTIONS, REFERENCES) for r in refs]
    flat = rouge([p for p, _ in rows], [[r] for _, r in rows])
    per_dialogue = rouge(PREDICTIONS, REFERENCES)
    # Equal only when every dialogue has the same number of references, as DialogSum's test split has.
    same_count = rouge(PREDICTIONS[:1] * 2, [REFERENCES[0], REFERENCES[0][::-1]])
    flat_same = rouge(PREDICTIONS[:1] * 4, [[r] for r in REFERENCES[0] * 2])
    assert flat_same["rouge1"] == pytest.approx(same_count["rouge1"], abs=1e-12)
    assert flat["rouge1"] != pytest.approx(per_dialogue["rouge1"], abs=1e-6)


def test_one_reference_makes_the_variants_agree_and_identical_text_scores_one():
    metrics = rouge(["a cat sat on the mat."], [["a cat sat on the mat."]])
    for key in ROUGE_KEYS:
        assert metrics[key] == metrics["best_reference"][key] == metrics["first_reference"][key] == pytest.approx(1.0)


def test_bootstrap_is_seeded():
    assert rouge(PREDICTIONS, REFERENCES)["confidence_interval_95"] == rouge(PREDICTIONS, REFERENCES)["confidence_interval_95"]


def test_scores_spread_over_ranks_come_back_in_dataset_order():
    import numpy as np

    # 7 dialogues, each scoring differently (cut to different lengths), with 1 to 3 references.
    predictions = [" ".join(p.split()[: 3 + i]) for i, p in enumerate(PREDICTIONS * 3)][:7]
    references = (REFERENCES * 3)[:7]
    whole = score_matrix(predictions, references)
    for world in (1, 3, 10):  # 10 ranks: three of them score nothing
        shares = [spread_scores(predictions, references, rank, world) for rank in range(world)]
        assert sum(map(len, shares)) == 7 and max(map(len, shares)) - min(map(len, shares)) <= 1
        merged = interleave(shares)
        assert len(merged) == len(whole)
        for ours, theirs in zip(merged, whole):
            np.testing.assert_array_equal(ours, theirs)
        assert rouge_from_matrix(merged) == rouge_from_matrix(whole)
    assert rouge_from_matrix(whole[::-1]) != rouge_from_matrix(whole)  # the order matters: to the bootstrap


def test_sentences_are_split_offline_for_rougelsum():
    assert split_sentences("Hi there. How are you? Fine!") == "Hi there.\nHow are you?\nFine!"


def run_score(*args):
    from conftest import run_dsum

    return run_dsum("score", *args)


def test_score_command_reads_jsonl_csv_and_txt(tmp_path):
    import csv
    import json

    expected = rouge(PREDICTIONS, REFERENCES)
    # One JSONL file with both columns, as dsum eval writes it.
    both = tmp_path / "predictions.jsonl"
    both.write_text("".join(json.dumps({"id": str(i), "prediction": p, "references": r}) + "\n"
                            for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES))))
    # A CSV of references (several columns, one left empty) matched by id to a shuffled CSV of predictions.
    refs_csv, preds_csv = tmp_path / "refs.csv", tmp_path / "preds.csv"
    with refs_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "summary1", "summary2", "summary3"])
        for i, r in enumerate(REFERENCES):
            w.writerow([str(i), *r, *[""] * (3 - len(r))])
    with preds_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "summary"])
        for i in (2, 0, 1):
            w.writerow([str(i), PREDICTIONS[i]])
    # Plain text, matched by order to single references.
    (tmp_path / "p.txt").write_text("\n".join(PREDICTIONS) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(r[0] for r in REFERENCES) + "\n")
    for args, want in [
        (["--predictions", str(both)], expected),
        (["--predictions", str(preds_csv), "--prediction-field", "summary", "--references", str(refs_csv),
          "--reference-field", "summary1", "--reference-field", "summary2", "--reference-field", "summary3"], expected),
        (["--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")],
         rouge(PREDICTIONS, [r[:1] for r in REFERENCES])),
    ]:
        result = run_score(*args, "--json")
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout)  # --json prints the metrics object and nothing else
        for key in ROUGE_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_score_command_refuses_too_few_predictions_and_missing_columns(tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    (tmp_path / "r.txt").write_text("one\ntwo\nthree\n")
    result = run_score("--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt"))
    assert result.returncode == 2
    assert "2 predictions for 3 references" in result.stderr
    (tmp_path / "x.jsonl").write_text('{"prediction": "a"}\n')
    result = run_score("--predictions", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2
    assert "no 'references', 'summary' or 'summary1', ... column" in result.stderr
