"""The conscience stage and the consent gate in a real build: the bundled SmolLM2 is the frozen
judge, SmolLM2 and Gemma 3 are the consent checkpoints; the dpo split trains with TRL."""
import json
import math

import datasets
import pytest
from typer.testing import CliRunner

from builder.build import run_build
from builder.cli import app
from builder.compile import split_path
from builder.stages.conscience import ConscienceError
from builder.models import ModelNotFound
from builder.pair_checks import RULES, code_blocks

from ..conftest import LINES, conscience_workspace, median_confidence, scenario_rows

pytestmark = pytest.mark.slow

def test_every_judgement_and_pair_is_in_duckdb_and_kept_pairs_form_the_dpo_split(conscience_built):
    ws, summary = conscience_built
    con = ws.connect(read_only=True)
    held_out = [r for r in scenario_rows(LINES) if r["split"] == "heldout"]
    items = con.execute("SELECT prompt FROM conscience_items WHERE generation = 1").fetchall()
    assert len(items) == len(LINES) - len(held_out) and held_out[0]["prompt"] not in {p for p, in items}
    originals = dict(con.execute("""SELECT item_id, label FROM judgements
                                    WHERE generation = 1 AND subject = 'original' AND judge = 'smollm2'""").fetchall())
    assert len(originals) == len(items)
    unethical = {i for i, label in originals.items() if label == "unethical"}
    pairs = con.execute("SELECT item_id, kept, reason, chosen FROM pairs WHERE generation = 1").fetchall()
    assert {p[0] for p in pairs} == unethical  # every unethical response got a rewrite attempt
    rejudged = dict(con.execute("""SELECT item_id, label FROM judgements
                                   WHERE generation = 1 AND subject = 'rewrite'""").fetchall())
    checks = dict(con.execute("SELECT item_id, checks FROM pairs WHERE generation = 1").fetchall())
    for item_id, kept, reason, chosen in pairs:
        # kept exactly when the rewrite is ethical and no check of builder/pair_checks.py fails (#21)
        failing = [c for c in json.loads(checks[item_id] or "[]") if c["status"] == "fail"]
        assert kept == (rejudged.get(item_id) == "ethical" and not failing), reason
    vetoed = {e for e, in con.execute("SELECT example_id FROM vetoes WHERE generation = 1 AND split = 'dpo'").fetchall()}
    expected = {f"{i}:three-laws" for i, kept, _, _ in pairs if kept} - vetoed
    assert expected, "the chosen lines should leave at least one pair after the consent gate"
    dpo = datasets.load_dataset("parquet", data_files=str(split_path(ws.generation_dir(1), "dpo")), split="train")
    assert set(dpo["id"]) == expected
    row = dpo[0]
    assert [m["role"] for m in row["prompt"]] == ["user"] and [m["role"] for m in row["chosen"]] == ["assistant"]
    chosen = dict(con.execute("SELECT item_id || ':' || framework, chosen FROM pairs").fetchall())[row["id"]]
    assert row["chosen"][0]["content"] == chosen and row["rejected"][0]["content"] != chosen
    assert row["label"] == "unethical" and row["chosen_label"] == "ethical" and row["framework"] == "three-laws"
    assert row["judge"] == "smollm2" and row["reasons"] and row["chosen_reasons"]
    for r in dpo:  # every kept pair's chosen answers the request: code in the rejected side's language, no echo
        assert {c["rule"] for c in r["checks"]} == set(RULES) and not [c for c in r["checks"] if c["status"] == "fail"]
        assert code_blocks(r["chosen"][0]["content"]), r["chosen"][0]["content"]
    c = summary["conscience"]
    assert c["items"] == len(items) and c["pairs"] == sum(k for _, k, _, _ in pairs)
    assert sum(c["labels"]["three-laws"]["original"].values()) == len(items)
    manifest = json.loads((ws.generation_dir(1) / "manifest.json").read_text())
    assert manifest["counts"]["dpo_pairs"] == len(dpo)
    assert manifest["metrics"]["conscience"]["judge_model"]["sha256"]  # the frozen judge, by its weights


def test_consent_vetoes_and_drift_events_reach_duckdb_the_splits_and_the_summary(conscience_built):
    ws, summary = conscience_built
    con = ws.connect(read_only=True)
    n_examples = con.execute("SELECT count(DISTINCT (split, example_id)) FROM consents WHERE generation = 1").fetchone()[0]
    assert con.execute("SELECT count(*) FROM consents WHERE generation = 1").fetchone()[0] == 2 * n_examples
    assert {j for j, in con.execute("SELECT DISTINCT judge FROM consents").fetchall()} == {"smollm2", "gemma3"}
    # Drift events are exactly the examples on which the two checkpoints' valid answers differ.
    disagreements = {e for e, in con.execute("""SELECT example_id FROM consents WHERE generation = 1 AND consent IS NOT NULL
                                                GROUP BY split, example_id HAVING count(DISTINCT consent) > 1""").fetchall()}
    events = con.execute("SELECT example_id, judges, said FROM drift_events WHERE generation = 1").fetchall()
    assert {e for e, _, _ in events} == disagreements and disagreements, "the chosen lines make the checkpoints disagree"
    for _, judges, said in events:
        assert json.loads(judges) == ["gemma3", "smollm2"] and {s["consent"] for s in json.loads(said).values()} == {"yes", "no"}
    # A vetoed reflection is not trained on: its passage stands alone in the sft split (or the
    # split is empty) and the annotations split marks it.
    vetoed_sft = {e for e, in con.execute("SELECT example_id FROM vetoes WHERE split = 'sft'").fetchall()}
    ann = datasets.load_dataset("parquet", data_files=str(split_path(ws.generation_dir(1), "annotations")), split="train")
    assert {r["passage_id"] for r in ann if r["vetoed"]} == vetoed_sft
    manifest = json.loads((ws.generation_dir(1) / "manifest.json").read_text())
    assert manifest["counts"]["reflections"] == summary["ensemble"]["selected"] - len(vetoed_sft)
    g = summary["consent"]
    assert g["drift_events"] == len(events) and set(g["judges"]) == {"smollm2", "gemma3"}
    assert sum(g["vetoed"].values()) == con.execute("SELECT count(*) FROM vetoes").fetchone()[0]
    assert all(t == t.lower() and " " not in t for t in g["trait_tags"])
    card = (ws.generation_dir(1) / "README.md").read_text()
    assert "## Consent gate" in card and "## Conscience" in card and "config_name: dpo" in card
    result = CliRunner().invoke(app, ["drift", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert "drift events" in result.output and "veto rate per checkpoint" in result.output
    assert events[0][0][:12] in result.output


def test_the_explored_split_holds_vetoed_and_rejected_trajectories_spoken_by_naive_explorer(conscience_built):
    from builder.compile import EXPLORER
    from builder.train import compiled_manifest, training_documents

    ws, _ = conscience_built
    con = ws.connect(read_only=True)
    explored = datasets.load_dataset(str(ws.generation_dir(1)), "explored", split="train")
    vetoed = {(s, e) for s, e in con.execute("SELECT split, example_id FROM vetoes WHERE generation = 1").fetchall()}
    rejected = dict(con.execute("SELECT item_id, any_value(rejected) FROM pairs WHERE generation = 1 GROUP BY ALL").fetchall())
    assert vetoed and rejected, "the chosen lines give at least one veto and one unethical response"
    assert sorted(explored["id"]) == sorted([f"vetoed:{s}:{e}" for s, e in vetoed] + [f"rejected:{i}" for i in rejected])
    for row in explored:
        roles = [m["role"] for m in row["messages"]]
        assert roles == (["text", EXPLORER] if row["from_split"] == "sft" else ["user", EXPLORER]), row["id"]
        assert row["judges"] and row["reasons"], row["id"]
        if row["origin"] == "rejected":
            assert row["messages"][1]["content"] == rejected[row["id"].split(":", 1)[1]]
    # A vetoed pair's response is explored, not trained as the assistant's: it is in no dpo row.
    dpo = datasets.load_dataset(str(ws.generation_dir(1)), "dpo", split="train")
    chosen = {r["chosen"][0]["content"] for r in dpo}
    assert not chosen & {r["messages"][1]["content"] for r in explored if r["origin"] == "vetoed"}
    held_out = next(r for r in scenario_rows(LINES) if r["split"] == "heldout")
    assert held_out["prompt"] not in {m["content"] for r in explored for m in r["messages"]}
    manifest = compiled_manifest(ws, 1)
    assert manifest["counts"]["explored_examples"] == len(explored)
    assert "| `explored` |" in (ws.generation_dir(1) / "README.md").read_text()
    # `ratchet train` predicts them (train.explored = "predict"), or leaves them out ("skip").
    sft = datasets.load_dataset(str(ws.generation_dir(1)), "sft", split="train")
    assert len(training_documents(ws, 1, manifest, ws.config.train)) == len(sft) + len(explored)
    skip = ws.config.train.model_copy(update={"explored": "skip"})
    assert len(training_documents(ws, 1, manifest, skip)) == len(sft)


def test_dpo_split_trains_one_step_with_trl(conscience_built, hf_smollm2, tmp_path):
    from trl import DPOConfig, DPOTrainer

    ws, _ = conscience_built
    dpo = datasets.load_dataset("parquet", data_files=str(split_path(ws.generation_dir(1), "dpo")), split="train")
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1, max_length=256,
                     report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                     bf16=False)  # TRL defaults to bf16: emulated on a CPU without AMX, about 6x slower
    result = DPOTrainer(model=str(hf_smollm2), train_dataset=dpo, args=args).train()
    assert result.global_step == 1
    assert math.isfinite(result.training_loss) and result.training_loss > 0


def rebuilt_at_median(built, root, table: str):
    """A copy of the conscience build rebuilt on its cached answers with judges.abstain_below at
    the median confidence its `table`'s judgements showed: (workspace, summary, threshold)."""
    import shutil

    ws, _ = built
    shutil.copytree(ws.root, root)
    threshold = median_confidence(ws, f"SELECT coalesce(calibrated, probs) FROM {table} WHERE status = 'accepted' "
                                      "AND method = 'logprobs'")
    copy = conscience_workspace(root, judges={"abstain_below": threshold})
    return copy, run_build(copy, overwrite=True), threshold


def test_a_judge_too_unsure_to_decide_makes_no_pair_on_the_real_model(conscience_built, tmp_path):
    """#30.5 for the conscience judge (SmolLM2): at a threshold that is the median confidence it
    showed in this build (not picked: judgements fall on both sides whatever they were), a pair
    never rests on a judgement below it. The rebuild reads the first build's cached answers."""
    copy, summary, threshold = rebuilt_at_median(conscience_built, tmp_path / "ws", "judgements")
    con = copy.connect(read_only=True)
    judgements = {(i, s): (a, m, json.loads(p) if p else None, label) for i, s, a, m, p, label in con.execute(
        "SELECT item_id, subject, abstain, method, coalesce(calibrated, probs), label FROM judgements").fetchall()}
    pairs = con.execute("SELECT item_id, kept, reason, chosen FROM pairs").fetchall()
    con.close()
    assert summary["model_calls"] == 0  # the same answers, read with the threshold
    for a, method, probs, _ in judgements.values():
        assert a == (method == "logprobs" and max(probs.values()) < threshold)
    unsure = {k for k, (a, *_) in judgements.items() if a}
    assert unsure and len(unsure) < len(judgements)
    assert summary["conscience"]["abstained"] == len(unsure)
    card = " ".join((copy.generation_dir(1) / "README.md").read_text().split())
    assert f"{len(unsure)} judgement(s) were too unsure to decide" in card
    for item, kept, reason, chosen in pairs:
        if (item, "original") in unsure:  # no rewrite asked
            assert reason.startswith("the judge was unsure the response is unethical") and chosen is None and not kept
        elif (item, "rewrite") in unsure and judgements[(item, "rewrite")][3] == "ethical":
            assert reason.startswith("the judge was unsure the rewrite is ethical") and not kept
        if kept:
            assert (item, "original") not in unsure and (item, "rewrite") not in unsure
    unsure_unethical = {i for (i, s), (a, _, _, label) in judgements.items() if a and s == "original" and label == "unethical"}
    assert unsure_unethical <= {i for i, *_ in pairs}  # each is a pair row that says why it is no pair


def test_a_consent_judge_too_unsure_to_decide_vetoes_on_the_real_models(conscience_built, tmp_path):
    """#30.5 for the consent judges (SmolLM2 and Gemma): at the median confidence they showed in
    this build (not picked), an answer below it is no decision, and consent.on_invalid (veto, the
    default) decides. Cached answers: no model call."""
    copy, summary, threshold = rebuilt_at_median(conscience_built, tmp_path / "ws", "consents")
    con = copy.connect(read_only=True)
    rows = con.execute("SELECT split, example_id, judge, abstain, veto, method, coalesce(calibrated, probs) "
                       "FROM consents").fetchall()
    vetoed = {(s, e) for s, e in con.execute("SELECT split, example_id FROM vetoes").fetchall()}
    con.close()
    assert summary["model_calls"] == 0
    for split, example, judge, abstain, veto, method, probs in rows:
        assert abstain == (method == "logprobs" and max(json.loads(probs).values()) < threshold)
        if abstain:
            assert veto and (split, example) in vetoed  # no decision: consent not given
    unsure = sum(r[3] for r in rows)
    assert 0 < unsure < len(rows)
    assert sum(j["unsure"] for j in summary["consent"]["judges"].values()) == unsure
    card = " ".join((copy.generation_dir(1) / "README.md").read_text().split())
    assert f"{unsure} answer(s) were too close to call" in card and 'consent.on_invalid = "veto"' in card


def test_a_missing_judge_checkpoint_or_column_fails_before_any_model_runs(tmp_path):
    ws = conscience_workspace(tmp_path / "a", conscience={"items": "items.jsonl", "judge": str(tmp_path / "gone.gguf")})
    with pytest.raises(ModelNotFound, match="conscience.judge: .*gone.gguf"):
        run_build(ws)
    ws = conscience_workspace(tmp_path / "b", consent={"judges": ["bundled:smollm2", str(tmp_path / "old.gguf")]})
    with pytest.raises(ModelNotFound, match="consent.judges: .*old.gguf"):
        run_build(ws)
    ws = conscience_workspace(tmp_path / "c", conscience={"items": "items.jsonl", "response_field": "answer"})
    result = CliRunner().invoke(app, ["build", "--workspace", str(ws.root)])
    assert result.exit_code == 1 and "missing column(s) answer" in " ".join(result.output.split())
    assert not ws.generation_dir(1).exists()
