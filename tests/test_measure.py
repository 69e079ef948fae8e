"""Votes weighted by measured validity (`ratchet validity`, builder/measure.py): the measurement,
where a build finds it, what it weighs, and a critic at chance left unasked. Orchestration on
fakes and the scripted engine; the real models in tests/cli/test_validity_cli.py."""
import json

import pytest
from typer.testing import CliRunner

import builder.ensemble as ensemble_module
from builder.build import run_build
from builder.cli import app
from builder.config import load_config, parse_config
from builder.ensemble import Ensemble
from builder.judges import JudgeError
from builder.measure import labelled_tasks, measure_critics
from builder.prompts import Prompts
from builder.resources import LABELLED_CLAIMS, PROMPTS_DIR
from builder.stages.scrutinize import (CRITIC_VALIDITY, PRIOR_WEIGHT, Measured, critic_keys, ensemble_critics,
                                       measured_validity, vote_weights)
from builder.validity import vote_weight
from builder.workspace import Workspace, create_schema

from .conftest import SHORT_PASSAGES, write_workspace
from .stages.test_scrutinize_converge import Fake

PASSAGE = "The council raised bus fares by ten percent in March. Riders said the service got worse."


def labelled_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def claims(n: int) -> list[dict]:
    """n labelled claims: supported ones quote the passage, unsupported ones quote words it lacks
    (what the grounding verifier checks, so its AUC is known: 1)."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"passage": PASSAGE, "claim": f"Fares rose by {i} dollars", "evidence": "fares doubled overnight",
                        "label": "unsupported"})
        else:
            out.append({"passage": PASSAGE, "claim": "The council raised bus fares",
                        "evidence": "The council raised bus fares by ten percent in March.", "label": "supported"})
    return out


@pytest.mark.parametrize("auc_low, weight", [(None, 0.0), (0.3, 0.0), (0.5, 0.0), (0.75, 0.5), (0.9, 0.8), (1.0, 1.0)])
def test_a_vote_weighs_the_discrimination_shown_beyond_chance(auc_low, weight):
    assert vote_weight(auc_low) == pytest.approx(weight)


def test_a_labelled_row_without_evidence_or_label_is_an_error_naming_its_line(tmp_path):
    rows = claims(2)
    del rows[1]["evidence"]
    with pytest.raises(JudgeError, match=r"labelled.jsonl:2: each labelled row needs one 'claim' and its 'evidence'"):
        labelled_tasks(labelled_file(tmp_path / "labelled.jsonl", rows))
    rows = claims(2)
    del rows[0]["label"]
    with pytest.raises(JudgeError, match=r"labelled.jsonl:1: no 'label' column"):
        labelled_tasks(labelled_file(tmp_path / "labelled.jsonl", rows))


def test_the_shipped_labelled_claims_load_as_one_claim_reflections():
    tasks, labels = labelled_tasks(LABELLED_CLAIMS)
    assert len(tasks) == 112 and sum(labels) == 47
    assert all(len(t.record["claims"]) == 1 and t.record["claims"][0]["evidence"] for t in tasks)


def fake_ensemble(monkeypatch, answers):
    """A writer, one critic that answers `answers` in turn, and the grounding verifier (gates off)."""
    monkeypatch.setattr(ensemble_module, "make_backend", lambda cfg: Fake("gemma3", list(answers)))
    return Ensemble(parse_config({"annotate": {"gates": False}, "ensemble": {"k": 1, "members": [
        {"model": "bundled:smollm2", "persona": "empiricist", "roles": ["annotate"]},
        {"model": "bundled:gemma3", "persona": "skeptic", "roles": ["critique"]},
        {"kind": "verifier", "name": "grounding"}]}}))


def test_a_critic_that_passes_everything_weighs_nothing_and_the_verifier_earns_its_weight(monkeypatch, tmp_path):
    import duckdb

    path = labelled_file(tmp_path / "labelled.jsonl", claims(12))
    cfg = parse_config({"annotate": {"gates": False}})
    survives = json.dumps({"claim_verdicts": ["sound"], "objections": [], "verdict": "survives"})
    con = duckdb.connect()
    create_schema(con)
    with fake_ensemble(monkeypatch, [survives] * 40) as ensemble:
        measured = {m.critic: m for m in measure_critics(ensemble, Prompts(), cfg, con, path)}
        # The critic said "survives" to supported and unsupported claims alike: AUC 0.5, weight 0.
        assert measured["gemma3-skeptic"].auc == 0.5 and measured["gemma3-skeptic"].weight == 0
        # The verifier saw that every unsupported claim quotes words the passage lacks.
        assert measured["grounding"].auc == 1.0 and measured["grounding"].weight > 0.9
        assert measured["grounding"].n == 12 and measured["grounding"].positives == 6
        stored = {r.critic: r for r in CRITIC_VALIDITY.read(con)}
        assert stored.keys() == {"gemma3-skeptic", "grounding"}
        found = measured_validity(con, ensemble_critics(ensemble), ["grounding"], Prompts(), cfg)
        assert {n: m.weight for n, m in found.items()} == {n: m.weight for n, m in measured.items()}
        assert vote_weights(con, 1, "validity", found) == {"gemma3-skeptic": 0.0, "grounding": measured["grounding"].weight}
        # Another prompt set asks the critic something else: its measurement does not hold there.
        mine = tmp_path / "prompts"
        mine.mkdir()
        (mine / "critique.system.jinja").write_text((PROMPTS_DIR / "critique.system.jinja").read_text() + "\nBe kind.\n")
        assert set(measured_validity(con, ensemble_critics(ensemble), ["grounding"], Prompts(mine), cfg)) == {"grounding"}
        # With the faithfulness gates on, critics judge other reflections: measured apart. (What is
        # found there is the verifier's shipped measurement, prompts/critic_validity.jsonl: every
        # quote is already the passage's, so it sees nothing.)
        gated = measured_validity(con, ensemble_critics(ensemble), ["grounding"], Prompts(), parse_config({}))
        assert "gemma3-skeptic" not in gated and gated["grounding"].auc == 0.5 and gated["grounding"].n == 112


def test_peoples_critique_audits_join_the_measurement_as_it_grows():
    import duckdb

    from builder.stages.audit import CritiqueAuditRow, store_critique_audits, update_critic_reputation

    con = duckdb.connect()
    create_schema(con)
    measured = {"critic": Measured("critic", "k", "f", "s", 10, 5, 0.5, 0.4, 0.6, 0.0, 0, 1.0, "2026-12-03")}
    assert vote_weights(con, 2, "validity", measured) == {"critic": 0.0}
    # Ten human audits, every critique right: the record (rate 11/12) weighs as much as ten labelled claims.
    store_critique_audits(con, [CritiqueAuditRow(f"p{i}", "author", "critic", 1, "ann", "human", "right", [], 1.0)
                                for i in range(10)])
    update_critic_reputation(con, 1)
    rate = 11 / 12
    assert vote_weights(con, 2, "validity", measured)["critic"] == pytest.approx((2 * rate - 1) * 10 / 20, abs=1e-3)
    # The model auditor's audits do not count, and generation 1 never sees its own audits.
    assert vote_weights(con, 1, "validity", measured) == {"critic": 0.0}
    assert vote_weights(con, 2, "prior", measured) == {}


def test_a_build_does_not_ask_a_critic_measured_at_chance(tmp_path):
    ensemble = {"k": 1, "members": [{"name": "writer", "persona": "empiricist", "roles": ["annotate"]},
                                    {"model": "bundled:gemma3", "name": "critic", "persona": "skeptic", "roles": ["critique"]},
                                    {"kind": "verifier", "name": "grounding"}]}
    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES, ensemble=ensemble,
                           annotator={"backend": "scripted", "model": "bundled:smollm2"})
    ws = Workspace(root)
    cfg = load_config(ws.config_path)
    con = ws.connect()
    with Ensemble(cfg) as e:
        keys = critic_keys(ensemble_critics(e), ["grounding"], Prompts(), cfg)
    CRITIC_VALIDITY.insert(con, [Measured("critic", keys["critic"], "l.jsonl", "s", 112, 47, 0.44, 0.33, 0.55, 0.0, 0,
                                          1.0, "2026-12-03")])
    con.close()
    summary = run_build(ws)
    assert summary["votes"] == {"weights_from": "validity", "weight": {"critic": 0.0, "grounding": PRIOR_WEIGHT},
                                "not_asked": ["critic"], "abstained": 0}
    con = ws.connect(read_only=True)
    critics = con.execute("SELECT DISTINCT critic FROM critiques WHERE generation = 1").fetchall()
    kept = con.execute("SELECT count(*) FROM selections WHERE generation = 1 AND annotator IS NOT NULL").fetchone()[0]
    # The reference panel froze the same weights, and its member at weight 0 scores nothing either.
    frozen = dict(con.execute("SELECT name, weight FROM panel").fetchall())
    panel_critics = con.execute("SELECT DISTINCT critic FROM panel_verdicts").fetchall()
    con.close()
    assert critics == [("grounding",)] and kept > 0
    assert frozen == {"critic": 0.0, "grounding": PRIOR_WEIGHT} and panel_critics == [("grounding",)]
    assert summary["ratchet"]["panel_not_asked"] == ["critic"] and summary["ratchet"]["panel_fallback"] is None
    # `ratchet panel` starts no engine: a scripted critic has no model file to hash (the real
    # models' weights are shown in tests/cli/test_validity_cli.py).
    result = CliRunner().invoke(app, ["panel", "-w", str(root)], env={"COLUMNS": "200"})
    assert "no local model file: its weight shows in the build summary" in result.output
    assert "grounding" in result.output and "not measured" in result.output
    # The frozen panel shows the weight the build measured (the vote-weights table above cannot: no model file).
    frozen_table = result.output.split("reference panel (frozen)")[1]
    assert "0.00  not informative: not asked" in frozen_table
