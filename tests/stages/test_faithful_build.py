"""The faithfulness gates on real models (builder/faithfulness.py, issue 29): what a build keeps
quotes its passage verbatim, says what its quote says, and copies nothing from the prompt.

The passages are the bundled corpus's first ones, not picked: the tests assert on whatever the
models write for them, and that the build kept something (a gate that keeps nothing proves
nothing)."""
import json
import random

import duckdb
import pytest
from sklearn.metrics import roc_auc_score

from builder import faithfulness as f
from builder.backends import registry
from builder.build import run_build
from builder.compile import split_path
from builder.corpus import Passage, jsonl_lines
from builder.config import RatchetConfig
from builder.evaluate import cached_engine
from builder.judges import EntailmentTask
from builder.prompts import Prompts
from builder.resources import EXAMPLES_DIR, ROOT
from builder.stages.base import run_task
from builder.workspace import Workspace, create_schema

from ..conftest import write_workspace

CORPUS = [json.loads(line)["text"] for line in
          jsonl_lines((EXAMPLES_DIR / "corpus" / "passages.jsonl").read_text()) if line.strip()]


NOTICE = f.notice_stems(Prompts().audit_notice)


def collapse(text: str) -> str:
    return " ".join(text.split())


# Two candidates per passage (annotate.best_of), the one with the most verified claims kept.
ANNOTATE = {"gates": True, "retries": 1, "claim_judge": "bundled:qwen2.5-coder-1.5b", "best_of": 2}


@pytest.fixture(scope="module")
def qwen_build(tmp_path_factory):
    """The default writer (Qwen2.5-Coder-0.5B, no few-shot examples) on four passages, gates on,
    two candidates per passage, and the claim judge (off by default) on the best measured model."""
    root = write_workspace(tmp_path_factory.mktemp("faithful") / "ws", CORPUS[:4],
                           ensemble={"k": 0, "members": [{"name": "qwen", "model": "bundled:qwen2.5-coder-0.5b",
                                                          "few_shot": False}]},
                           annotate=ANNOTATE, audit={"rate": 0.0, "auditor": ""})
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
            assert f.from_the_notice(note, passage, NOTICE) is None  # the prompt's audit notice, not the passage
        for sentence in f.sentences(record["reflection"]):  # the prose too: nothing the passage never says
            assert len(f.foreign_words(sentence, passage)) < f.FOREIGN_LIMIT, sentence


def test_no_kept_note_or_sentence_denies_its_passage_restates_a_definition_or_stops_mid_sentence(qwen_build):
    """The writer's notes say "The passage does not mention X" of passages that give X, and write
    a field's definition back ("who could be helped or harmed"): none of it is kept."""
    ws, summary = qwen_build
    reflections = kept(ws)
    assert reflections, summary["rejection_reasons"]
    for passage, record, _ in reflections:
        notes = [(n, True) for key in f.NOTE_FIELDS for n in record[key]]
        for text, note in [*notes, (record["reflection"], False)]:
            for sentence in f.sentences(text):
                if not f.said_by(sentence, passage):  # a copy given back as the passage's is the passage's words
                    assert f.unborne(sentence, passage, NOTICE, note=note) is None, (sentence, passage)


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


def test_of_two_samples_the_one_with_the_most_verified_claims_is_kept(qwen_build):
    """Best-of-N on the real writer: the second sample, at another seed and a higher temperature,
    is another answer (an engine that ignored them would give the first again), and the kept one
    has the most claims the rules verified (the claim judge runs after, on the kept one)."""
    ws, summary = qwen_build
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT status, candidate, candidates FROM annotations").fetchall()
    answers = [r for (r,) in con.execute("SELECT response FROM model_calls WHERE response LIKE '%\"reflection\"%'")
               .fetchall()]
    con.close()
    assert len(rows) == 4 and summary["best_of"]["samples"] == 8
    assert len(set(answers)) > len(rows)  # the second samples are not the first ones again
    for status, candidate, candidates in rows:
        samples = json.loads(candidates)
        assert [s["candidate"] for s in samples] == [0, 1]
        most = max(s["claims"] for s in samples)
        assert samples[candidate]["claims"] == most
        if most:
            assert samples[candidate]["status"] == "accepted"
            assert samples[candidate]["unsupported_words"] == min(s["unsupported_words"] for s in samples
                                                                   if s["claims"] == most)
        else:
            assert status == "rejected" and candidate == 0
    b = summary["best_of"]
    card = (ws.generation_dir(1) / "README.md").read_text()
    assert f"{b['samples']} sampled, {b['samples_accepted']} passed every gate" in card


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


def test_the_note_judge_asks_about_every_note_sentence_the_rules_kept_and_cuts_what_it_finds_unsupported(qwen_build):
    """The note judge is on by default (Qwen2.5-Coder-1.5B): every sentence of every note and of
    the reflection an accepted annotation held after the rules was asked (but those given back as
    the passage's), the kept notes and prose are exactly the sentences it kept (a reflection cut
    whole is rebuilt from its claims' quotes), and its probabilities are the model's. Four
    passages leave the judge few sentences: that it tells them apart is the next test's."""
    ws, summary = qwen_build
    assert ws.config.annotate.note_judge == "bundled:qwen2.5-coder-1.5b"  # the default, not set by this test
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT a.record, a.note_checks, p.text FROM annotations a JOIN passages p USING (passage_id) "
                       "WHERE a.status = 'accepted'").fetchall()
    con.close()
    threshold = ws.config.annotate.note_threshold
    checks = [c for _, nc, _ in rows for c in json.loads(nc or "[]")]
    assert checks, "no note reached the judge: nothing proven"
    for record, note_checks, passage in rows:
        record, note_checks = json.loads(record), json.loads(note_checks or "[]")
        for key in f.NOTE_FIELDS:
            kept = [s for n in record[key] for s in f.sentences(n)]
            assert kept == [c["text"] for c in note_checks if c["field"] == key and c["verdict"] == "kept"]
        prose = [c for c in note_checks if c["field"] == "reflection"]
        if any(c["verdict"] == "rebuilt" for c in prose):  # every sentence cut: the claims' quotes, the passage's
            assert record["reflection"] == " ".join(dict.fromkeys(f.attributed(c["evidence"]) for c in record["claims"]))
        else:  # the sentences it kept, and those given back as the passage's (never asked)
            assert [s for s in f.sentences(record["reflection"]) if not f.said_by(s, passage)] == \
                [c["text"] for c in prose if c["verdict"] == "kept"]
    asked = [c for c in checks if c["verdict"] != "rebuilt"]
    for c in asked:
        limit = ws.config.annotate.prose_threshold if c["field"] == "reflection" else threshold
        assert (c["verdict"] == "cut") == (c["p_unsupported"] >= limit)
    assert all(0 < c["p_unsupported"] < 1 for c in asked)


def test_a_reflection_refused_whole_is_asked_again_of_the_real_writer_and_what_it_gives_passes_the_gates(qwen_build):
    """annotate.refused_reflection = ask on the real writer. The build's kept answers, each given as
    written the reflection of another passage's answer (words its own passage never uses: the
    case the gates refuse whole; made so because the build may refuse none), are asked again of
    Qwen2.5-Coder-0.5B: every answer is a schema-valid {"reflection"} from the model, and each
    reflection kept is either one the gates pass whole, or, where every try failed, the claims'
    quotes said as the passage's. The build's own answers asked again (if any) obey the same."""
    from builder.stages.annotate import AnnotateTask, AnnotationRow, Candidate, rewrite_reflections

    ws, _ = qwen_build
    con = ws.connect(read_only=True)
    stored = con.execute("SELECT a.passage_id, p.text, a.record, a.rewrite FROM annotations a JOIN passages p "
                         "USING (passage_id) WHERE a.status = 'accepted' ORDER BY a.passage_id").fetchall()
    con.close()
    assert len(stored) >= 2, "fewer than two kept answers: nothing to swap"
    passages = {pid: Passage(pid, "corpus", 0, text, 0) for pid, text, _, _ in stored}
    built = [(pid, json.loads(record), json.loads(rewrite)) for pid, _, record, rewrite in stored if rewrite]
    rows = [AnnotationRow(1, pid, "qwen", "accepted", None, 1, 0, {**json.loads(record), "reflection": ""}, None,
                          rewrite={"written": json.loads(stored[(i + 1) % len(stored)][2])["reflection"], "why": "test"})
            for i, (pid, _, record, _) in enumerate(stored)]
    cfg = ws.config.model_copy(update={"annotate": ws.config.annotate.model_copy(
        update={"refused_reflection": "ask"})})
    task = AnnotateTask(Prompts(), cfg, 1, "qwen", "default", few_shot=False)
    calls = duckdb.connect()
    create_schema(calls)
    with cached_engine(calls, registry.parse({"model": "bundled:qwen2.5-coder-0.5b"}), "writer") as engine:
        rewrite_reflections(task, rows, passages, engine)
    answers = calls.execute("SELECT response, finish_reason FROM model_calls").fetchall()
    assert len(answers) >= len(rows)  # one try at least for each
    assert all(set(a := json.loads(text)) == {"reflection"} and a["reflection"] for text, end in answers if end == "stop")
    limit = cfg.annotate.rewrite_reflection
    for row in rows:
        assert row.rewrite["verdict"] in ("rewritten", "rebuilt") and 1 <= row.rewrite["attempts"] <= limit
        if row.rewrite["verdict"] == "rebuilt":
            assert row.record["reflection"] == f.quotes_said(row.record["claims"])
        else:  # the gates pass it whole, and it is not the reflection it replaces
            kept, _, veto = task.gated(Candidate(passages[row.passage_id]), row.record, rewrite=False)
            assert veto is None and kept["reflection"] == row.record["reflection"] != row.rewrite["written"]
    for _, record, rewrite in built:  # the default: rebuilt at once (the note judge asks nothing of a quote)
        assert rewrite["verdict"] == "rebuilt" and rewrite["attempts"] == 0
        assert record["reflection"] == f.quotes_said(record["claims"])


def test_the_note_judge_ranks_a_random_sample_of_labelled_notes_better_than_chance():
    """12 note sentences a person labelled (bench/data/demo-notes.labelled.jsonl), drawn at random
    (seed 0, 6 of each label among those the rules keep), not picked: the judge's P(unsupported)
    must rank the unsupported ones above the supported ones more often than not (its AUC on all
    of them: 0.89, bench/note_judge.py)."""
    rows = [json.loads(line) for line in (ROOT / "bench" / "data" / "demo-notes.labelled.jsonl").read_text().splitlines()]
    notes = [r for r in rows if r["field"] != "reflection" and f.unborne(r["text"], r["passage"], NOTICE, note=True) is None
             and f.check_note(r["text"], r["passage"]) is None]
    rng = random.Random(0)
    sample = [r for label in ("supported", "unsupported") for r in rng.sample([r for r in notes if r["label"] == label], 6)]
    con = duckdb.connect()
    create_schema(con)
    with cached_engine(con, registry.parse({"model": "bundled:qwen2.5-coder-1.5b"}), "judge") as engine:
        outcomes = run_task(EntailmentTask(Prompts(), RatchetConfig()), [(r["passage"], r["text"]) for r in sample], engine)
    p = [o.graded.p("no") for o in outcomes]
    assert roc_auc_score([r["label"] == "unsupported" for r in sample], p) > 0.5, list(zip(p, sample))


def test_judgements_too_unsure_to_make_go_to_the_top_of_the_audit_queue(qwen_build, tmp_path):
    """Issue 30 scope 5 on the real judges: the claim and note judges (Qwen2.5-Coder-1.5B) and the
    model auditor (SmolLM2) abstain where their confidence is below judges.abstain_below; an
    abstained claim or note sentence stays (no drop, no vouching), an abstained audit is not a
    verdict, and every such item leads the audit page's queue. The threshold is not picked: it is
    the median confidence the three judges showed on this build, so that some judgements fall on
    each side whatever they were."""
    import shutil

    from builder.web.queue import load_sample
    from builder.stages.audit import GATE_JUDGES, load_secret

    ws, _ = qwen_build
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root)

    def rebuild(abstain_below: float):
        write_workspace(root, None, ensemble={"k": 0, "members": [{"name": "qwen", "model": "bundled:qwen2.5-coder-0.5b",
                                                                   "few_shot": False}]},
                        annotate=ANNOTATE, audit={"rate": 1.0, "auditor": "bundled:smollm2"}, judges={"abstain_below": abstain_below})
        copy = Workspace(root)
        return copy, run_build(copy, overwrite=True)

    copy, summary = rebuild(0.5)  # nobody abstains: every judgement, as the judges made it
    con = copy.connect(read_only=True)
    claim_p = [c["p_unsupported"] for (cc,) in con.execute("SELECT claim_checks FROM annotations WHERE status = "
                                                           "'accepted'").fetchall()
               for c in json.loads(cc) if c.get("p_unsupported") is not None]
    audit_p = [p for (p,) in con.execute("SELECT pass_prob FROM audits WHERE auditor_kind = 'model'").fetchall()]
    note_p = [c["p_unsupported"] for (nc,) in con.execute("SELECT note_checks FROM annotations WHERE status = "
                                                          "'accepted' AND note_checks IS NOT NULL").fetchall()
              for c in json.loads(nc) if c.get("p_unsupported") is not None]
    con.close()
    assert summary["audit"]["needs_a_person"]["items"] == 0 and claim_p and audit_p and note_p
    confidence = sorted({round(max(p, 1 - p), 4) for p in claim_p + audit_p + note_p if 0 < p < 1})
    assert len(confidence) >= 2, "every judgement equally sure: nothing to split"
    threshold = confidence[len(confidence) // 2]

    copy, summary = rebuild(threshold)  # the same cached answers, read with the threshold
    con = copy.connect(read_only=True)
    annotations = con.execute("SELECT passage_id, record, claim_checks, note_checks FROM annotations "
                              "WHERE status = 'accepted'").fetchall()
    audits = {r[0]: r[1] for r in con.execute("SELECT item, pass_prob FROM audits WHERE auditor_kind = 'model'").fetchall()}
    escalations = con.execute("SELECT item, judge, p FROM escalations").fetchall()
    items = load_sample(con, load_secret(root), 1, 1.0)
    con.close()
    unsure_claims, unsure_notes = set(), set()
    for item, record, checks, notes in annotations:
        for c in json.loads(notes or "[]"):
            if c["p_unsupported"] is not None:
                assert (c["verdict"] == "abstain") == (max(c["p_unsupported"], 1 - c["p_unsupported"]) < threshold)
            if c["verdict"] == "abstain":  # it stays, as written: neither cut nor vouched for
                assert c["text"] in " ".join([json.loads(record)["reflection"], *sum(
                    (json.loads(record).get(k) or [] for k in f.NOTE_FIELDS), [])])
                unsure_notes.add(item)
        kept = [c["claim"] for c in json.loads(record)["claims"]]
        for c in json.loads(checks):
            if c.get("p_unsupported") is None:
                continue
            assert c.get("abstain", False) == (max(c["p_unsupported"], 1 - c["p_unsupported"]) < threshold)
            if c.get("abstain"):
                assert c["claim"] in kept  # neither dropped nor vouched for
                unsure_claims.add(item)
    assert {i for i, j, _ in escalations if j == "claim judge"} == unsure_claims
    assert {i for i, j, _ in escalations if j == "note judge"} == unsure_notes
    unsure_audits = {i for i, j, _ in escalations if j not in GATE_JUDGES}
    assert all(max(p, 1 - p) >= threshold for p in audits.values())
    assert all(max(p, 1 - p) < threshold for i, j, p in escalations)
    # every reflection kept now is judged or escalated: not len(audit_p), since an abstained claim
    # stays, so a reflection the first build rejected for want of claims can be kept and audited now
    assert unsure_audits.isdisjoint(audits) and unsure_audits | set(audits) == {item for item, *_ in annotations}
    assert unsure_claims or unsure_audits or unsure_notes  # the median splits: someone abstained
    needs = [x for x in items if x.needs_person]
    assert items[:len(needs)] == needs and {x.item for x in needs} == unsure_claims | unsure_audits | unsure_notes
    assert summary["audit"]["needs_a_person"]["items"] == len(needs)
    assert summary["audit"]["abstained"] == len(unsure_audits)


@pytest.fixture(scope="module")
def echo_build(tmp_path_factory):
    """SmolLM2 shown the built-in few-shot examples: small models copy them. (No note judge: the echo
    veto is the rules' and comes first.)"""
    root = write_workspace(tmp_path_factory.mktemp("echo") / "ws", CORPUS[:6],
                           annotate={"gates": True, "retries": 0, "note_judge": ""}, audit={"rate": 0.0, "auditor": ""})
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
