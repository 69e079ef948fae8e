"""`ratchet validity` end to end on a real bundled model: a SmolLM2 critic measured on the first
labelled claims of bench/data/demo-claims.labelled.jsonl (the first ones, not chosen: the
shipped file in order), stored, written, shown by `ratchet panel`, and free to rerun."""
import json

import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.resources import LABELLED_CLAIMS
from builder.validity import vote_weight
from builder.workspace import Workspace

from ..conftest import write_workspace

ENSEMBLE = {"k": 1, "members": [{"model": "bundled:qwen2.5-coder-0.5b", "persona": "empiricist", "roles": ["annotate"]},
                                {"model": "bundled:smollm2", "persona": "skeptic", "roles": ["critique"]},
                                {"kind": "verifier", "name": "grounding"}]}


@pytest.mark.slow
def test_validity_measures_a_real_critic_stores_its_weight_and_a_rerun_is_free(tmp_path):
    lines = LABELLED_CLAIMS.read_text(encoding="utf-8").splitlines()[:8]
    labelled = tmp_path / "claims.jsonl"
    labelled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    root = write_workspace(tmp_path / "ws", [], ensemble=ENSEMBLE, annotate={"gates": True})
    out = tmp_path / "validity.jsonl"
    args = ["validity", "-w", str(root), "--labelled", str(labelled), "--write", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "critics on claims.jsonl" in result.output and "smollm2-skeptic" in result.output
    written = {r["critic"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert written.keys() == {"smollm2-skeptic", "grounding"}
    critic = written["smollm2-skeptic"]
    assert critic["n"] + critic["unjudged"] == 8 and critic["positives"] >= 1
    assert critic["weight"] == vote_weight(critic["auc_low"])  # the weight is what the interval allows
    con = Workspace(root).connect(read_only=True)
    stored = con.execute("SELECT critic, weight FROM critic_validity ORDER BY critic").fetchall()
    calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    con.close()
    assert stored == sorted((n, r["weight"]) for n, r in written.items()) and calls >= 8
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    con = Workspace(root).connect(read_only=True)
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == calls  # answered from the cache
    con.close()
    shown = CliRunner().invoke(app, ["panel", "-w", str(root)], env={"COLUMNS": "200"})
    assert f"claims.jsonl: {critic['n']} claims" in shown.output  # before "no panel frozen yet": nothing built
    assert f"{critic['weight']:.2f}" in shown.output
