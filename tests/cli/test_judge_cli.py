"""`ratchet judge` and `ratchet eval-judge` for grounding and harm, end to end on a real bundled
model (Qwen2.5-Coder-0.5B: the smallest of the family the judges default to, to keep the suite
short; bench/judges.py measures every bundled model)."""
import json
from pathlib import Path

from typer.testing import CliRunner

from builder.cli import app

ROOT = Path(__file__).resolve().parents[2]
MODEL = "bundled:qwen2.5-coder-0.5b"
PASSAGE = ("The Marlow Bay harbour bridge reopened to traffic on Tuesday after fourteen months of repairs costing "
           "38 million dollars, according to the regional transport office. Engineers replaced 212 corroded steel "
           "cables and resurfaced the full deck.")


def test_judge_grounding_writes_every_row_back_with_its_probability(tmp_path):
    rows = [{"id": 1, "passage": PASSAGE, "claim": "The bridge reopened after fourteen months of repairs."},
            {"id": 2, "passage": PASSAGE, "claim": "Engineers replaced 300 cables."},  # a rule decides
            {"id": 3, "passage": PASSAGE, "text": "The bridge reopened on Tuesday. Engineers resurfaced the deck."},
            {"id": 4, "passage": PASSAGE, "claim": "The bridge was closed for good."}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = CliRunner().invoke(app, ["judge", "grounding", "--input", str(src), "--output", str(out),
                                      "--model", MODEL, "--cache", str(tmp_path / "cache.duckdb")])
    assert result.exit_code == 0, result.output
    judged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in judged] == [1, 2, 3, 4]  # every row, in order, with its own columns
    assert judged[1]["p_unsupported"] == 0.99 and judged[1]["judged_by"] == "rules"
    assert judged[1]["claims_judged"][0]["rule"] == "number not in the passage: 300"
    model_p = [r["p_unsupported"] for r in judged if r["judged_by"] == "model"]
    assert len(model_p) == 3 and all(0 < p < 1 for p in model_p)  # read from log-probabilities, not a written 0/1
    assert len(set(model_p)) > 1
    assert len(judged[2]["claims_judged"]) == 2  # a text is judged sentence by sentence
    assert "judged 4 rows" in result.output and "1 by rules" in result.output
    # a rerun is answered from the cache
    again = CliRunner().invoke(app, ["judge", "grounding", "--input", str(src), "--output", str(tmp_path / "2.jsonl"),
                                     "--model", MODEL, "--cache", str(tmp_path / "cache.duckdb")])
    assert [json.loads(line)["p_unsupported"] for line in (tmp_path / "2.jsonl").read_text().splitlines()] == \
        [r["p_unsupported"] for r in judged]


def test_eval_judge_scores_harm_and_grounding_files(tmp_path):
    out = tmp_path / "harm.json"
    result = CliRunner().invoke(app, ["eval-judge", str(ROOT / "bench/data/pyrit-harm.sample.jsonl"), "--kind", "harm",
                                      "--model", MODEL, "--limit", "8", "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["n"] == 8 and metrics["positives"] == 4  # per category 2 harmful, then 2 not: two categories
    assert 0 <= metrics["auc"] <= 1 and metrics["auc_ci"][0] <= metrics["auc"] <= metrics["auc_ci"][1]
    assert "AUC" in result.output and "Cohen's kappa" in result.output
    # a file with a passage column is a grounding file
    result = CliRunner().invoke(app, ["eval-judge", str(ROOT / "bench/data/demo-claims.labelled.jsonl"),
                                      "--model", MODEL, "--limit", "6"])
    assert result.exit_code == 0, result.output
    assert "grounding judge" in result.output and "decided by" in result.output


def test_judge_errors_name_the_problem(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"passage": PASSAGE, "claim": "x y"}) + "\n", encoding="utf-8")
    cases = [(["judge", "truthiness", "-i", str(src), "-o", str(tmp_path / "o.jsonl")], "unknown judge 'truthiness'"),
             (["judge", "grounding", "-i", str(src), "-o", str(src)], "would overwrite the input"),
             (["judge", "harm", "-i", str(src), "-o", str(tmp_path / "o.jsonl")], "column 'prompt'"),
             (["judge", "grounding", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")], "nope.jsonl"),
             (["judge", "grounding", "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--model",
               str(tmp_path / "gone.gguf")], "gone.gguf"),
             (["eval-judge", str(src), "--kind", "grounding"], "no 'label' column")]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "o.jsonl").exists()
