"""The faithfulness gates on real models (builder/faithfulness.py, issue 29): what a build keeps
quotes its passage verbatim, says what its quote says, and copies nothing from the prompt.

The passages are the bundled corpus's first ones, not picked: the tests assert on whatever the
models write for them, and that the build kept something (a gate that keeps nothing proves
nothing)."""
import json

import pytest

from builder import faithfulness as f
from builder.build import run_build
from builder.compile import split_path
from builder.corpus import jsonl_lines
from builder.prompts import Prompts
from builder.resources import EXAMPLES_DIR
from builder.workspace import Workspace

from ..conftest import write_workspace

CORPUS = [json.loads(line)["text"] for line in
          jsonl_lines((EXAMPLES_DIR / "corpus" / "passages.jsonl").read_text()) if line.strip()]


def collapse(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def qwen_build(tmp_path_factory):
    """The default writer (Qwen2.5-Coder-0.5B, no few-shot examples) on four passages, gates on,
    and the claim judge (off by default) on the best measured model."""
    root = write_workspace(tmp_path_factory.mktemp("faithful") / "ws", CORPUS[:4],
                           ensemble={"k": 0, "members": [{"name": "qwen", "model": "bundled:qwen2.5-coder-0.5b",
                                                          "few_shot": False}]},
                           annotate={"gates": True, "retries": 1, "claim_judge": "bundled:qwen2.5-coder-1.5b"},
                           audit={"rate": 0.0, "auditor": ""})
    ws = Workspace(root)
    return ws, run_build(ws)


def kept(ws) -> list[tuple[str, dict, list]]:
    con = ws.connect(read_only=True)
    rows = con.execute("""SELECT p.text, a.record, a.claim_checks FROM selections s
                          JOIN annotations a USING (generation, passage_id, annotator)
                          JOIN passages p USING (passage_id) WHERE s.annotator IS NOT NULL""").fetchall()
    con.close()
    return [(text, json.loads(record), json.loads(checks)) for text, record, checks in rows]


def test_every_kept_claim_quotes_its_passage_verbatim_and_says_what_the_quote_says(qwen_build):
    ws, summary = qwen_build
    reflections = kept(ws)
    assert reflections, summary["rejection_reasons"]  # the gates let something through
    for passage, record, _ in reflections:
        assert record["claims"]
        for c in record["claims"]:
            assert collapse(c["evidence"]) in collapse(passage)  # verbatim, not just after normalising
            assert f.check_claim(c["claim"], c["evidence"], passage) is None
        for note in [*record["weak_reasoning"], *record["uncertainties"], *record["ethical_stakes"],
                     record["reflection"]]:
            assert f.check_note(note, passage) is None
        for sentence in f._SENTENCE.split(record["reflection"]):  # the prose too: nothing the passage never says
            assert len(f.foreign_words(sentence, passage)) < f.FOREIGN_LIMIT, sentence


def test_every_claim_the_model_wrote_is_recorded_with_its_verdict(qwen_build):
    ws, summary = qwen_build
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT record, claim_checks FROM annotations WHERE status = 'accepted'").fetchall()
    con.close()
    for record, checks in rows:
        checks = json.loads(checks)
        supported = [c for c in checks if c["verdict"] == "supported"]
        assert [c["claim"] for c in supported] == [c["claim"] for c in json.loads(record)["claims"]]
        assert all(c["reason"] for c in checks if c["verdict"] == "dropped")
    gates = summary["faithfulness"]
    assert gates["claims_written"] == sum(len(json.loads(c)) for _, c in rows)
    assert gates["claims_kept"] + sum(gates["claims_dropped"].values()) == gates["claims_written"]
    split = split_path(ws.generation_dir(1), "annotations")
    import pyarrow.parquet as pq

    table = pq.read_table(split).to_pylist()
    assert all(r["claim_checks"] for r in table if r["status"] == "accepted")


def test_the_claim_judge_asks_about_every_claim_the_rules_kept_and_drops_what_it_finds_unsupported(qwen_build):
    ws, summary = qwen_build
    con = ws.connect(read_only=True)
    # the annotations that reached the judge: accepted, or rejected because it dropped every claim
    checks = [c for (cc,) in con.execute("SELECT claim_checks FROM annotations WHERE status = 'accepted' "
                                         "OR reason = 'no supported claim: claim judge'").fetchall()
              for c in json.loads(cc)]
    asked = con.execute("SELECT count(*) FROM model_calls WHERE response LIKE '{\"supported\"%'").fetchone()[0]
    con.close()
    threshold = ws.config.annotate.claim_threshold
    judged = [c for c in checks if "p_unsupported" in c]
    assert judged and asked >= len(judged)  # the judge was asked
    for c in checks:
        by_rules = c["verdict"] == "dropped" and not c["reason"].startswith("claim judge")
        assert by_rules != ("p_unsupported" in c)  # the rules first; the model only about what they kept
        if c["verdict"] == "supported":
            assert c["p_unsupported"] < threshold
        elif c["reason"].startswith("claim judge"):
            assert c["p_unsupported"] >= threshold
    assert all(0 < c["p_unsupported"] < 1 for c in judged)  # a calibrated probability, not a written yes/no


@pytest.fixture(scope="module")
def echo_build(tmp_path_factory):
    """SmolLM2 shown the built-in few-shot examples: small models copy them."""
    root = write_workspace(tmp_path_factory.mktemp("echo") / "ws", CORPUS[:6], annotate={"gates": True, "retries": 0},
                           audit={"rate": 0.0, "auditor": ""})
    ws = Workspace(root)
    return ws, run_build(ws)


def test_a_reflection_that_echoes_a_prompt_example_is_vetoed_and_never_kept(echo_build):
    ws, summary = echo_build
    runs = f.example_runs(Prompts().examples)
    con = ws.connect(read_only=True)
    vetoed = con.execute("SELECT reason FROM annotations WHERE reason LIKE 'echo:%'").fetchall()
    accepted = con.execute("SELECT p.text, a.record FROM annotations a JOIN passages p USING (passage_id) "
                           "WHERE a.status = 'accepted'").fetchall()
    answers = [r for (r,) in con.execute("SELECT response FROM model_calls").fetchall()]
    con.close()
    # The model did copy the examples (what the code before the gates kept), and the gate caught it.
    copied = [a for a in answers if f.echo(json.loads(a), "", runs)]
    assert copied and vetoed and summary["faithfulness"]["vetoed"]["echo"] == len(vetoed)
    assert all(f.echo(json.loads(record), passage, runs) is None for passage, record in accepted)
