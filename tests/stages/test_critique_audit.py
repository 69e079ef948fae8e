"""Critics are audited too (#15.12): a secret sample of critiques, the critic's record as its
vote weight, human critique verdicts, the view. No model here: the real auditor runs in
test_ratchet.py's two-generation build on SmolLM2."""
import csv
import json

import duckdb
import pytest

from builder.stages.audit import (CritiqueAuditRow, critique_sample, export_critique_sample, import_verdicts,
                                  is_critique_selected, is_selected, store_critique_audits, update_critic_reputation,
                                  update_reputation, store_audits, AuditRow)
from builder.stages.converge import convergence_score
from builder.stages.scrutinize import PRIOR_WEIGHT, vote_weights
from builder.workspace import create_schema

SECRET = b"0123456789abcdef0123456789abcdef"
RECORD = {"claims": [{"claim": "It rained.", "evidence": "rain", "kind": "fact", "support": "strong",
                      "confidence": "high"}], "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [],
          "reflection": "r"}


def db_with_critiques(n=20, critics=("critic", "grounding")):
    """n passages annotated by `author`, each critiqued by every critic in `critics`."""
    con = duckdb.connect()
    create_schema(con)
    for i in range(n):
        pid = f"p{i:03d}"
        con.execute("INSERT INTO passages VALUES (?, 's', 0, ?, 3, now())", [pid, f"text {i}"])
        con.execute("INSERT INTO annotations (generation, passage_id, annotator, status, reason, attempts, truncated, "
                    "record, call_key) VALUES (1, ?, 'author', 'accepted', NULL, 1, 0, ?, NULL)", [pid, json.dumps(RECORD)])
        for critic in critics:
            con.execute("INSERT INTO critiques (generation, passage_id, annotator, critic, status, verdict, claim_verdicts, "
                        "objections, weight, reason, attempts, call_key) "
                        "VALUES (1, ?, 'author', ?, 'accepted', 'survives', '[\"sound\"]', '[]', 0.5, NULL, 1, NULL)",
                        [pid, critic])
    for name, family in [("author", "llama"), ("critic", "llama"), ("grounding", "verifier")]:
        con.execute("INSERT INTO members VALUES (?, ?, 'default', 'm.gguf', 'llama_cpp')", [name, family])
    return con


def test_critique_sample_is_keyed_near_the_rate_and_independent_of_the_annotation_sample():
    keys = [(f"item{i}", "author", critic) for i in range(10000) for critic in ("a", "b")]
    chosen = [k for k in keys if is_critique_selected(SECRET, *k, 1, 0.25)]
    assert 0.23 < len(chosen) / len(keys) < 0.27
    assert chosen == [k for k in keys if is_critique_selected(SECRET, *k, 1, 0.25)]
    # Which critiques are audited says nothing about which annotations are (another domain of the hash).
    annotations = {i for i, _, _ in keys if is_selected(SECRET, i, "author", 1, 0.25)}
    both = [k for k in chosen if k[0] in annotations]
    assert 0.2 < len(both) / len(chosen) < 0.3
    # and two critics of one annotation are chosen independently
    a = {i for i, _, c in chosen if c == "a"}
    b = {i for i, _, c in chosen if c == "b"}
    assert 0.2 < len(a & b) / len(a) < 0.3


def test_the_sample_reads_valid_critiques_including_the_verifiers():
    con = db_with_critiques(40)
    con.execute("UPDATE critiques SET status = 'rejected' WHERE passage_id = 'p000'")
    picked = critique_sample(con, SECRET, 1, 0.5)
    assert picked and {c for _, _, c in picked} == {"critic", "grounding"}
    assert all(p != "p000" for p, _, _ in picked)
    assert critique_sample(con, SECRET, 1, 1.0) == sorted(
        (f"p{i:03d}", "author", c) for i in range(1, 40) for c in ("critic", "grounding"))


def test_a_critic_only_member_is_weighed_by_its_own_audited_record():
    """Before #15.12 a member that only critiques was never audited and kept the prior 0.5 for
    ever, outweighing audited annotators; now its votes weigh its record as a critic."""
    con = db_with_critiques(6)
    # The critic is wrong in 5 of 6 audits, the verifier right in all; the author's annotation record plays no part.
    store_critique_audits(con, [CritiqueAuditRow(f"p{i:03d}", "author", "critic", 1, "auditor", "model",
                                                 "right" if i == 0 else "wrong", [], 0.9 if i == 0 else 0.1)
                                for i in range(6)])
    store_critique_audits(con, [CritiqueAuditRow(f"p{i:03d}", "author", "grounding", 1, "auditor", "model", "right", [],
                                                 0.8) for i in range(6)])
    store_audits(con, 1, [AuditRow("p000", "author", 1, "auditor", "model", "pass", [], [], 1.0)])
    update_reputation(con, 1)
    means = update_critic_reputation(con, 1)
    rows = con.execute("SELECT critic, rights, wrongs, round(right_mass, 4), alpha, beta FROM critic_reputation "
                       "ORDER BY critic").fetchall()
    assert rows == [("critic", 1, 5, 1.4, pytest.approx(2.4), pytest.approx(5.6)),
                    ("grounding", 6, 0, 4.8, pytest.approx(5.8), pytest.approx(2.2))]
    assert means["critic"] == pytest.approx(0.3) and means["grounding"] == pytest.approx(0.725)
    # Generation 1's own audits do not weigh generation 1's votes (its sample is secret) ...
    assert vote_weights(con, 1, "audits") == {}
    # ... they weigh generation 2's; the annotator's pass record is not a vote weight.
    weights = vote_weights(con, 2, "audits")
    assert weights == {"critic": pytest.approx(0.3), "grounding": pytest.approx(0.725)}
    assert "author" not in weights
    # The verifier's survives now counts more than the critic's reject.
    assert convergence_score([("critic", 0.0), ("grounding", 1.0)], weights) == pytest.approx(0.725 / 1.025)
    assert convergence_score([("critic", 0.0), ("grounding", 1.0)], {}) == PRIOR_WEIGHT


def test_view_shows_each_critics_record_and_weight():
    con = db_with_critiques(4)
    store_critique_audits(con, [CritiqueAuditRow("p000", "author", "critic", 1, "m", "model", "right", [], 1.0),
                                CritiqueAuditRow("p001", "author", "critic", 1, "m", "model", "wrong", [], 0.0),
                                CritiqueAuditRow("p001", "author", "critic", 1, "ana", "human", "wrong", [], 0.0)])
    update_critic_reputation(con, 1)
    assert con.execute("SELECT generation, critic, family, audits, right_verdicts, right_rate, human_audits, vote_weight "
                       "FROM critique_audit_rate_by_critic").fetchall() == [(1, "critic", "llama", 3, 1, 0.333, 1, 0.4)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_human_critique_review_round_trip(tmp_path, suffix):
    con = db_with_critiques(8)
    path = tmp_path / f"critiques{suffix}"
    n = export_critique_sample(con, SECRET, 1, 0.5, path)
    expected = critique_sample(con, SECRET, 1, 0.5)
    assert n == len(expected) >= 2
    if suffix == ".csv":
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["item"], r["annotator"], r["critic"]) for r in rows] == expected
    assert "verdict: survives" in rows[0]["critique"] and "claim 1: sound" in rows[0]["critique"]
    assert rows[0]["passage"].startswith("text ") and rows[0]["claims"].startswith("1. It rained.")
    assert all(r["wrong_claims"] == "" for r in rows)  # a column to fill in: the claims the critic got wrong
    for i, row in enumerate(rows):
        row["verdict"] = "wrong" if i == 0 else "right"
        row["reasons"] = "passed an invented claim" if i == 0 else "fair"
    rows[0]["wrong_claims"] = "1"
    rows[1]["verdict"] = "pass"  # an annotation verdict in a critique row: refused, named
    bad_critic = dict(rows[2], critic="nobody") if len(rows) > 2 else dict(rows[0], critic="nobody")
    rows.append(bad_critic)
    if suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    imported, problems = import_verdicts(con, path, "ana")
    assert imported == len(rows) - 2
    assert len(problems) == 2
    assert "verdict 'pass' is not right or wrong" in problems[0]
    assert "no valid critique of" in problems[1] and "from nobody" in problems[1]
    stored = con.execute("SELECT item, critic, auditor, auditor_kind, verdict, right_prob, wrong_claims FROM critique_audits "
                         "ORDER BY item, critic").fetchall()
    assert len(stored) == imported and {r[2:4] for r in stored} == {("ana", "human")}
    assert [json.loads(r[6]) if r[6] else None for r in stored] == [[1]] + [None] * (len(stored) - 1)
    assert con.execute("SELECT count(*) FROM critic_reputation WHERE generation = 1").fetchone()[0] >= 1
    assert con.execute("SELECT count(*) FROM audits").fetchone()[0] == 0  # critique verdicts are not annotation audits


def test_human_critique_verdicts_are_validated_against_their_schema(tmp_path):
    con = db_with_critiques(2)
    f = tmp_path / "review.jsonl"
    rows = [{"item": "p000", "annotator": "author", "critic": "critic", "generation": 1, "verdict": "right",
             "reasons": ["ok"]},
            {"item": "p001", "annotator": "author", "critic": "critic", "generation": 1, "verdict": "wrong",
             "reasons": ["rejected a faithful annotation"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    imported, problems = import_verdicts(con, f, "ana")
    assert imported == 1
    assert problems == [f"{f}:1: does not match schemas/critique_audit.schema.json at reasons/0: 'ok' is too short"]


def test_a_critique_verdict_right_about_the_whole_names_no_claim_the_critic_got_wrong(tmp_path):
    """#31.4: a person may say, claim by claim, where the critic misjudged; a critique called right
    with such a claim contradicts itself and is refused, as a pass with a wrong claim is."""
    con = db_with_critiques(3)
    f = tmp_path / "review.jsonl"
    row = {"annotator": "author", "critic": "critic", "generation": 1}
    rows = [dict(row, item="p000", verdict="wrong", wrong_claims=[1]), dict(row, item="p001", verdict="right", wrong_claims=[1]),
            dict(row, item="p002", verdict="wrong", wrong_claims="4")]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    imported, problems = import_verdicts(con, f, "ana")
    assert imported == 1 and len(problems) == 2
    assert "verdict right, but wrong_claims [1]" in problems[0]
    assert "wrong_claims [4] must be claim numbers 1-3" in problems[1]
    assert con.execute("SELECT item, verdict, wrong_claims FROM critique_audits").fetchall() == [("p000", "wrong", "[1]")]


def test_vote_weights_can_come_from_people_only_or_from_nothing():
    """audit.vote_weights: with an auditor model that cannot tell right from wrong critiques
    (bench/validity.py), only people's critique verdicts, or none, weigh the votes."""
    con = db_with_critiques(4)
    store_critique_audits(con, [CritiqueAuditRow("p000", "author", "critic", 1, "m", "model", "wrong", [], 0.0),
                                CritiqueAuditRow("p001", "author", "critic", 1, "m", "model", "wrong", [], 0.0),
                                CritiqueAuditRow("p002", "author", "critic", 1, "ana", "human", "right", [], 1.0)])
    assert vote_weights(con, 2, "audits") == {"critic": pytest.approx(2 / 5)}
    assert vote_weights(con, 2, "human") == {"critic": pytest.approx(2 / 3)}
    assert vote_weights(con, 2, "prior") == {}


def test_a_late_verdict_reaches_every_later_generations_record(tmp_path):
    """A person's verdict on generation 1 imported after generation 2 was built: generation 2's
    records (which generation 3's vote weights read) count it too."""
    con = db_with_critiques(3)
    con.execute("INSERT INTO annotations (generation, passage_id, annotator, status, reason, attempts, truncated, record, "
                "call_key) VALUES (2, 'p000', 'author', 'accepted', NULL, 1, 0, ?, NULL)", [json.dumps(RECORD)])
    f = tmp_path / "late.jsonl"
    f.write_text(json.dumps({"item": "p001", "annotator": "author", "critic": "critic", "generation": 1,
                             "verdict": "wrong", "reasons": ["passed an invented claim"]}) + "\n"
                 + json.dumps({"item": "p001", "annotator": "author", "generation": 1, "verdict": "fail",
                               "reasons": [], "wrong_claims": [1]}) + "\n")
    assert import_verdicts(con, f, "ana") == (2, [])
    for g in (1, 2):
        assert con.execute("SELECT wrongs FROM critic_reputation WHERE critic = 'critic' AND generation = ?",
                           [g]).fetchone() == (1,)
        assert con.execute("SELECT fails FROM reputation WHERE annotator = 'author' AND generation = ?",
                           [g]).fetchone() == (1,)
