"""Judgements a model is too unsure to make go to a person (issue 30, scope 5): what the stage
stores, the audit page's queue order, and pass rates that stay a random sample's. No model here;
tests/stages/test_escalation_build.py runs the real auditor."""
import json

import pytest

from builder.config import RatchetConfig
from builder.stages.audit import (AuditRow, escalate, escalated, is_selected, sample, store_audits,
                                  update_reputation)
from builder.web.queue import assign, load_sample

from .test_audit import SECRET, db_with_annotations

RATE = 0.25


def claim_checked(con, item: str, claims: list[tuple[str, float, bool]]) -> None:
    """Give `item`'s annotation claims, each with the claim judge's P(unsupported) and whether it abstained."""
    record = {"claims": [{"claim": c, "evidence": c, "kind": "fact", "support": "stated", "confidence": "high"}
                         for c, _, _ in claims], "reflection": "r"}
    checks = [{"claim": c, "verdict": "supported", "p_unsupported": p, **({"abstain": True} if a else {})}
              for c, p, a in claims]
    con.execute("UPDATE annotations SET record = ?, claim_checks = ? WHERE passage_id = ?",
                [json.dumps(record), json.dumps(checks), item])


def cfg(abstain_below: float) -> RatchetConfig:
    return RatchetConfig.model_validate({"judges": {"abstain_below": abstain_below}})


def test_a_judge_abstains_only_inside_the_band_and_never_at_the_default():
    assert cfg(0.7).judges.abstains(0.5) and cfg(0.7).judges.abstains(0.31) and cfg(0.7).judges.abstains(0.69)
    assert not cfg(0.7).judges.abstains(0.7) and not cfg(0.7).judges.abstains(0.05) and not cfg(0.7).judges.abstains(None)
    assert not any(cfg(0.5).judges.abstains(p / 100) for p in range(101))  # the default: every judgement stands


def test_the_claim_judges_abstentions_are_escalated_inside_and_outside_the_sample():
    con = db_with_annotations(40)
    in_sample = sample(con, SECRET, 1, RATE)
    outside = [f"p{i:03d}" for i in range(40) if (f"p{i:03d}", "smollm2") not in in_sample]
    sampled = in_sample[0][0]
    claim_checked(con, sampled, [("A.", 0.1, False), ("B.", 0.45, True), ("C.", 0.62, True)])
    claim_checked(con, outside[0], [("A.", 0.58, True)])
    claim_checked(con, outside[1], [("A.", 0.9, False)])  # the judge decided: nothing for a person
    rows = escalate(con, 1, SECRET, RATE, cfg(0.7), [])
    by_item = {r.item: r for r in rows}
    assert set(by_item) == {sampled, outside[0]}
    assert by_item[sampled].in_sample and not by_item[outside[0]].in_sample
    assert by_item[sampled].reason == "the claim judge was unsure of claim 2, 3: P(unsupported) 0.45"
    assert by_item[sampled].p == 0.45  # the least sure of its claims
    assert is_selected(SECRET, sampled, "smollm2", 1, RATE) and not is_selected(SECRET, outside[0], "smollm2", 1, RATE)
    # the queue: escalated items first, least sure first, then the rest of the secret sample
    items = load_sample(con, SECRET, 1, RATE)
    assert [x.item for x in items[:2]] == [sampled, outside[0]]
    assert [x.needs_person for x in items[:2]] == [by_item[sampled].reason, by_item[outside[0]].reason]
    assert {x.item for x in items[2:]} == {k for k, _ in in_sample} - {sampled}
    assert all(x.needs_person is None for x in items[2:])


def note_checked(con, item: str, checks: list[tuple[str, str, float, str]]) -> None:
    """Give `item`'s annotation the note judge's checks: (field, sentence, P(unsupported), verdict)."""
    con.execute("UPDATE annotations SET note_checks = ? WHERE passage_id = ?",
                [json.dumps([{"field": f, "text": t, "p_unsupported": p, "verdict": v} for f, t, p, v in checks]), item])


def test_the_note_judges_abstentions_are_escalated_beside_the_claim_judges():
    con = db_with_annotations(40)
    outside = [f"p{i:03d}" for i in range(40) if not is_selected(SECRET, f"p{i:03d}", "smollm2", 1, RATE)]
    note_checked(con, outside[0], [("uncertainties", "The author may be biased.", 0.41, "abstain"),
                                   ("reflection", "The passage is about pools.", 0.05, "kept"),
                                   ("ethical_stakes", "Families could lose their homes.", 0.55, "abstain")])
    note_checked(con, outside[1], [("reflection", "It was 1990.", 0.9, "cut"), ("uncertainties", "X.", 0.1, "kept")])
    note_checked(con, outside[2], [("weak_reasoning", "It generalises.", 0.52, "abstain")])
    claim_checked(con, outside[2], [("A.", 0.44, True)])
    con.execute("UPDATE annotations SET status = 'rejected' WHERE passage_id = ?", [outside[3]])
    note_checked(con, outside[3], [("uncertainties", "Y.", 0.5, "abstain")])  # dropped: nothing kept to decide
    rows = escalate(con, 1, SECRET, RATE, cfg(0.7), [])
    assert sorted((r.item, r.judge) for r in rows) == [(outside[0], "note judge"), (outside[2], "claim judge"),
                                                       (outside[2], "note judge")]
    first = next(r for r in rows if r.item == outside[0])
    assert first.p == 0.55 and not first.in_sample  # its least sure sentence
    assert first.reason == ('the note judge was unsure whether the passage says "Families could lose their homes." '
                            '(ethical_stakes) and 1 more sentence(s): P(unsupported) 0.55')
    why = escalated(con, 1)
    assert list(why)[:2] == [(outside[2], "smollm2"), (outside[0], "smollm2")]  # 0.52 is nearer to even than 0.55
    assert why[(outside[2], "smollm2")] == ("the claim judge was unsure of claim 1: P(unsupported) 0.44; the note judge "
                                            'was unsure whether the passage says "It generalises." (weak_reasoning): '
                                            "P(unsupported) 0.52")
    assert [x.item for x in load_sample(con, SECRET, 1, RATE)[:2]] == [outside[2], outside[0]]


def test_a_rebuild_replaces_the_generations_escalations():
    con = db_with_annotations(10)
    claim_checked(con, "p001", [("A.", 0.5, True)])
    escalate(con, 1, SECRET, RATE, cfg(0.7), [])
    claim_checked(con, "p001", [("A.", 0.9, False)])  # a rebuild's judge decided this time
    claim_checked(con, "p002", [("A.", 0.4, True)])
    escalate(con, 1, SECRET, RATE, cfg(0.7), [])
    assert list(escalated(con, 1)) == [("p002", "smollm2")]


def test_an_unsure_model_verdict_is_not_an_audit_and_replaces_an_earlier_builds_verdict():
    con = db_with_annotations(10)
    sure = AuditRow("p001", "smollm2", 1, "smollm2-auditor", "model", "pass", [], [], 0.9)
    earlier = AuditRow("p002", "smollm2", 1, "smollm2-auditor", "model", "pass", [], [], 0.95)
    store_audits(con, 1, [sure, earlier])
    unsure = AuditRow("p002", "smollm2", 1, "smollm2-auditor", "model", "pass", [], [], 0.55)
    escalate(con, 1, SECRET, RATE, cfg(0.7), [unsure])
    assert con.execute("SELECT item FROM audits").fetchall() == [("p001",)]
    assert con.execute("SELECT item, by_model FROM audit_items ORDER BY item").fetchall() == [("p001", True)]
    assert escalated(con, 1) == {("p002", "smollm2"): "the model auditor was unsure: P(pass) 0.55"}


def test_a_person_s_verdict_on_an_item_outside_the_sample_stays_out_of_pass_rates_and_reputation():
    """Items chosen because a judge doubted them are not a random sample: counting their verdicts
    would bias the pass rate, so only audit_model_vs_human (where they tell most) reads them."""
    con = db_with_annotations(40)
    in_sample = {k for k, _ in sample(con, SECRET, 1, RATE)}
    outside = next(f"p{i:03d}" for i in range(40) if f"p{i:03d}" not in in_sample)
    claim_checked(con, outside, [("A.", 0.5, True)])
    escalate(con, 1, SECRET, RATE, cfg(0.7), [])
    passes = [AuditRow(k, "smollm2", 1, "ana", "human", "pass", [], [], 1.0) for k in sorted(in_sample)[:3]]
    store_audits(con, 1, [*passes, AuditRow(outside, "smollm2", 1, "ana", "human", "fail", [], [], 0.0),
                          AuditRow(outside, "smollm2", 1, "smollm2-auditor", "model", "pass", [], [], 0.9)])
    assert con.execute("SELECT audits, passes FROM audit_pass_rate_by_generation WHERE auditor_kind = 'human'"
                       ).fetchone() == (3, 3)
    assert con.execute("SELECT count(*) FROM audits_current WHERE auditor_kind = 'human'").fetchone()[0] == 4
    update_reputation(con, 1)
    passes_seen, fails_seen = con.execute("SELECT passes, fails FROM reputation WHERE annotator = 'smollm2'").fetchone()
    assert fails_seen == 0 and passes_seen > 0
    assert con.execute("SELECT both_audited, disagreements FROM audit_model_vs_human").fetchone() == (1, 1)


@pytest.mark.parametrize("auditors", [["ana"], ["ana", "bo", "cy"]])
def test_items_that_need_a_person_lead_every_queue_they_are_in(auditors):
    keys = [(f"p{i:03d}", "w") for i in range(30)]
    lead = [keys[21], keys[7]]
    queues = assign(keys, auditors, SECRET, overlap=0.5, lead=lead)
    for items in queues.values():
        mine = [k for k in lead if k in items]
        assert items[:len(mine)] == mine
    plain = assign(keys, auditors, SECRET, overlap=0.5)
    assert {a: sorted(q) for a, q in queues.items()} == {a: sorted(q) for a, q in plain.items()}  # who: unchanged


def test_a_three_way_verdict_abstains_on_its_likeliest_value_and_never_at_the_default():
    unsure = cfg(0.7).judges.unsure
    assert unsure({"survives": 0.45, "revise": 0.35, "reject": 0.2}) and not unsure({"survives": 0.1, "revise": 0.8,
                                                                                    "reject": 0.1})
    assert unsure({"yes": 0.6, "no": 0.4}) == cfg(0.7).judges.abstains(0.6)  # yes/no: the same as abstains()
    assert not unsure(None) and not unsure({})
    assert not cfg(0.5).judges.unsure({"survives": 0.34, "revise": 0.33, "reject": 0.33})  # the default: never


@pytest.fixture(scope="module")
def unsure_critics(tmp_path_factory):
    """A scripted build (its verdict distributions put 0.4 to 0.9 on the written verdict): two
    members critique each other, every vote weighed alike, and a critique whose likeliest verdict
    is below 0.7 abstains. The same answers built at the default threshold are the control."""
    return builds_at_two_thresholds(tmp_path_factory, "critics", 1, ["empiricist", "skeptic"])


def builds_at_two_thresholds(tmp_path_factory, name: str, k: int, personas: list[str]) -> dict:
    """The same scripted answers built at the default threshold (the control) and at 0.7: members
    a, b, ... with these personas, each annotation critiqued by k others, every vote weighed alike."""
    from builder.build import run_build
    from builder.workspace import Workspace

    from ..conftest import write_workspace

    passages = [f"Report {i}: the reservoir held {10 * i} million litres after the storm." for i in range(12)]
    members = [{"name": chr(ord("a") + i), "persona": p} for i, p in enumerate(personas)]
    builds = {}
    for threshold in (0.5, 0.7):
        root = write_workspace(tmp_path_factory.mktemp(f"{name}-{threshold}") / "ws", passages,
                               annotator={"backend": "scripted"}, judges={"abstain_below": threshold},
                               ensemble={"k": k, "members": members}, audit={"rate": 0.25, "vote_weights": "prior"})
        ws = Workspace(root)
        builds[threshold] = ws, run_build(ws)
    return builds


def test_a_critic_too_unsure_to_vote_is_left_out_of_the_score_and_its_critique_goes_to_a_person(unsure_critics):
    from builder.stages.audit import critique_sample, escalated_critiques, load_secret
    from builder.web.queue import load_critiques

    ws, summary = unsure_critics[0.7]
    secret = load_secret(ws.root)
    con = ws.connect(read_only=True)
    critiques = con.execute("SELECT passage_id, annotator, critic, abstain, score, coalesce(calibrated, probs) "
                            "FROM critiques WHERE status = 'accepted'").fetchall()
    scores = {(p, a): (s, n) for p, a, s, n in con.execute(
        "SELECT passage_id, annotator, score, critiques FROM convergence").fetchall()}
    escalations = con.execute("SELECT item, annotator, judge, critic, in_sample, reason FROM escalations").fetchall()
    reasons = dict(con.execute("SELECT passage_id, reason FROM selections").fetchall())
    queue = load_critiques(con, secret, 1, 0.25)
    sampled = critique_sample(con, secret, 1, 0.25)
    why = escalated_critiques(con, 1)
    con.close()
    con2 = ws.connect(read_only=True)
    abstained = {(p, a, c) for p, a, c, abstain, _, _ in critiques if abstain}
    assert 0 < len(abstained) < len(critiques)  # the band splits them: some vote, some do not
    for p, a, c, abstain, score, probs in critiques:
        assert abstain == (max(json.loads(probs).values()) < 0.7)
        votes = [s for p2, a2, _, ab, s, _ in critiques if (p2, a2) == (p, a) and not ab]
        mean = sum(votes) / len(votes) if votes else None
        assert scores[(p, a)] == (pytest.approx(mean) if votes else None, len(votes))  # only the votes count
    # a passage whose every annotation lost its one critic's vote (k = 1) keeps none, and says why
    unvoted = {p for p, _ in scores} - {p for (p, _), (s, _) in scores.items() if s is not None}
    assert unvoted and all(reasons[p] == "no vote: every critic was too unsure (its critique waits for a person)"
                           for p in unvoted)
    # every abstained critique is escalated, as a critique (not its annotation), in the sample or not
    assert {(i, a, c) for i, a, j, c, _, _ in escalations} == abstained and all(j == c for _, _, j, c, _, _ in escalations)
    assert {(i, a, c) for i, a, _, c, inside, _ in escalations if inside} == abstained & set(sampled)
    assert all(r.startswith("the critic was unsure of its verdict (") for *_, r in escalations)
    likeliest = {(p, a, c): max(json.loads(probs).values()) for p, a, c, _, _, probs in critiques}
    sureness = dict(((i, a, c), p) for i, a, c, p in con2.execute("SELECT item, annotator, critic, p FROM escalations")
                    .fetchall())
    assert sureness == pytest.approx({k: likeliest[k] for k in abstained})  # p: its likeliest verdict's probability
    assert [sureness[k] for k in why] == sorted(sureness.values())  # the least sure first
    con2.close()
    # the page: escalated critiques first, with why, then the rest of the secret critique sample
    assert [x.key for x in queue[:len(why)]] == list(why) and set(why) == abstained
    assert all(x.needs_person == why[x.key] for x in queue[:len(why)])
    assert {x.key for x in queue[len(why):]} == set(sampled) - abstained and not any(x.needs_person for x in queue[len(why):])
    con = ws.connect(read_only=True)
    assert not any(x.needs_person for x in load_sample(con, secret, 1, 0.25))  # no annotation is escalated
    con.close()
    needs = summary["audit"]["needs_a_person"]
    assert needs["items"] == len(abstained) and summary["votes"]["abstained"] == len(abstained)
    card = " ".join((ws.generation_dir(1) / "README.md").read_text().split())
    assert f"{len(abstained)} critique(s) were too unsure to vote" in card
    assert needs["outside_the_sample"] == len(abstained - set(sampled))


def test_at_the_default_threshold_every_critique_votes(unsure_critics):
    control, summary = unsure_critics[0.5]
    ws, _ = unsure_critics[0.7]
    con, other = control.connect(read_only=True), ws.connect(read_only=True)
    same = "SELECT passage_id, annotator, critic, verdict, score FROM critiques ORDER BY ALL"
    assert con.execute(same).fetchall() == other.execute(same).fetchall()  # the same answers, read twice
    assert con.execute("SELECT count(*) FROM critiques WHERE abstain").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM escalations").fetchone()[0] == 0 and summary["votes"]["abstained"] == 0
    assert "too unsure" not in (control.generation_dir(1) / "README.md").read_text()  # the card as before
    con.close(), other.close()


def test_the_abstention_threshold_is_part_of_a_generation_s_identity(unsure_critics):
    """At 0.7 critiques abstain and the scores change, so a generation built at another threshold is
    another build: its manifest records the threshold, and a rebuild after the threshold changed is
    refused before any model call (it was left out of the identity, and the change surfaced only at
    compile as splits that differ). The judges of other files (`ratchet judge`) are not the build's:
    naming another one is a rebuild with no model call."""
    import shutil

    from builder.build import run_build
    from builder.compile import compiled_manifest
    from builder.stages.ratchet import RatchetError
    from builder.workspace import Workspace

    (ws, _), (at_07, summary_07) = unsure_critics[0.5], unsure_critics[0.7]
    assert summary_07["votes"]["abstained"] > 0  # the threshold changed what was built
    assert compiled_manifest(at_07.generation_dir(1))["config"]["judges"] == {"abstain_below": 0.7}
    assert compiled_manifest(ws.generation_dir(1))["config"]["judges"] == {"abstain_below": 0.5}
    root = ws.root.parent / "copy"
    shutil.copytree(ws.root, root)
    toml = (root / "ratchet.toml").read_text()
    (root / "ratchet.toml").write_text(toml.replace("abstain_below = 0.5", 'abstain_below = 0.5\ngrounding = "x.gguf"'))
    again = run_build(Workspace(root))
    assert again["model_calls"] == 0
    (root / "ratchet.toml").write_text(toml.replace("abstain_below = 0.5", "abstain_below = 0.7"))
    with pytest.raises(RatchetError, match="ratchet.toml changed since it was built"):
        run_build(Workspace(root))


@pytest.fixture(scope="module")
def unsure_panel(tmp_path_factory):
    """Three scripted members, each annotation critiqued by the other two: a kept reflection can
    have one critique that voted and one that abstained, and the panel (the same members, the same
    cached calls in generation 1) scores it."""
    return builds_at_two_thresholds(tmp_path_factory, "panel", 2, ["empiricist", "skeptic", "default"])


def test_a_panel_member_too_unsure_of_its_verdict_gives_no_point_in_the_ratchet_score(unsure_panel):
    """The ratchet panel reads its verdicts as the critics do: one below the threshold is stored with
    `abstain` and left out of the reflection's panel score; at the default every verdict counts."""
    from statistics import mean

    for threshold, (ws, summary) in unsure_panel.items():
        judges = cfg(threshold).judges
        con = ws.connect(read_only=True)
        verdicts = con.execute("SELECT passage_id, critic, score, coalesce(calibrated, probs), abstain FROM panel_verdicts "
                               "WHERE generation = 1 AND verdict IS NOT NULL").fetchall()
        kept = dict(con.execute("SELECT passage_id, score FROM ratchet WHERE generation = 1 AND decision = 'new'")
                    .fetchall())
        con.close()
        assert verdicts and kept
        assert [bool(a) for *_, a in verdicts] == [judges.unsure(json.loads(p)) for *_, p, _ in verdicts]
        abstained = sum(bool(a) for *_, a in verdicts)
        assert summary["ratchet"]["abstained"] == {"scores": abstained, "pairwise": 0}
        assert (abstained > 0) == (threshold > 0.5)  # at the default every verdict counts
        if threshold > 0.5:  # a kept reflection scored by a member that voted and one that abstained
            assert any(a and pid in kept for pid, *_, a in verdicts)
        by_passage = {}
        for pid, _, score, _, a in verdicts:
            if not a:
                by_passage.setdefault(pid, []).append(score)
        for pid, score in kept.items():  # one reflection scored per passage; the panel's members weigh alike
            expected = round(mean(by_passage[pid]), 4) if pid in by_passage else None
            assert score == pytest.approx(expected) if expected is not None else score is None, pid
