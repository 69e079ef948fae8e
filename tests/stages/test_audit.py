"""The secret sample, human audit import, reputation and the documented views (no model)."""
import csv
import json
import os
import stat

import duckdb
import pytest

from builder.stages.audit import (SECRET_ENV, AuditError, AuditRow, create_secret, current_annotations, export_claims,
                                  export_sample,
                                  import_verdicts, is_selected, load_secret, sample, store_audits, update_reputation)
from builder.config import RatchetConfig
from builder.workspace import create_schema

SECRET = b"0123456789abcdef0123456789abcdef"


def db_with_annotations(n=40, generation=1, annotator="smollm2"):
    con = duckdb.connect()
    create_schema(con)
    for i in range(n):
        con.execute("INSERT INTO passages VALUES (?, 's', 0, ?, 3, now())", [f"p{i:03d}", f"text {i}"])
        con.execute("INSERT INTO annotations (generation, passage_id, annotator, status, reason, attempts, truncated, "
                    "record, call_key) VALUES (?,?,?,'accepted',NULL,1,0,?,NULL)",
                    [generation, f"p{i:03d}", annotator, json.dumps({"claims": [], "reflection": "r"})])
    con.execute("INSERT INTO members VALUES (?, 'llama', 'default', 'm.gguf', 'llama_cpp')", [annotator])
    return con


def test_selection_is_keyed_reproducible_and_near_the_rate():
    ids = [f"item{i}" for i in range(20000)]
    chosen = [i for i in ids if is_selected(SECRET, i, "a", 1, 0.25)]
    assert 0.23 < len(chosen) / len(ids) < 0.27
    assert chosen == [i for i in ids if is_selected(SECRET, i, "a", 1, 0.25)]  # reproducible with the secret
    other = [i for i in ids if is_selected(b"another-secret-of-32-characters!", i, "a", 1, 0.25)]
    assert len(set(chosen) & set(other)) < 0.4 * len(chosen)  # unpredictable without it
    assert not any(is_selected(SECRET, i, "a", 1, 0.0) for i in ids[:500])
    assert all(is_selected(SECRET, i, "a", 1, 1.0) for i in ids[:500])


def test_selection_depends_on_identity_not_on_text():
    a, b = db_with_annotations(), db_with_annotations()
    b.execute("UPDATE passages SET text = 'rewritten: ' || text")  # other prompts, same items
    b.execute("UPDATE annotations SET record = '{\"claims\": [], \"reflection\": \"other\"}'")
    assert sample(a, SECRET, 1, 0.3) == sample(b, SECRET, 1, 0.3)
    assert sample(a, SECRET, 1, 0.3) != sample(a, SECRET, 2, 0.3) or not sample(a, SECRET, 1, 0.3)


def test_secret_file_is_private_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    path = create_secret(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path) == path.read_text().strip().encode()
    monkeypatch.setenv(SECRET_ENV, "from-the-environment-0123456789")
    assert load_secret(tmp_path) == b"from-the-environment-0123456789"


def test_bad_secrets_are_refused_without_echoing_them(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "tiny-s3cret")
    with pytest.raises(AuditError) as exc:
        load_secret(tmp_path)
    assert "too short" in str(exc.value) and "tiny-s3cret" not in str(exc.value)
    monkeypatch.delenv(SECRET_ENV)
    path = create_secret(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(AuditError, match="chmod 600") as exc:
        load_secret(tmp_path)
    assert path.read_text().strip() not in str(exc.value)


def test_import_keeps_good_rows_and_reports_bad_ones_by_line(tmp_path):
    con = db_with_annotations(5)
    csv_file = tmp_path / "review.csv"
    csv_file.write_text(
        "item,annotator,generation,passage,claims,reflection,verdict,reasons,wrong_claims\n"
        "p000,smollm2,1,t,c,r,pass,,\n"
        "p001,smollm2,1,t,c,r,FAIL,invented a claim; wrong support,\"1,2\"\n"
        "p002,smollm2,1,t,c,r,maybe,,\n"
        "p999,smollm2,1,t,c,r,pass,,\n"
        "p003,smollm2,1,t,c,r,fail,,7\n"
        "p004,smollm2,x,t,c,r,pass,,\n")
    imported, problems = import_verdicts(con, csv_file, "ana")
    assert imported == 2
    assert [p.split(": ", 1)[0] for p in problems] == [f"{csv_file}:{n} (row {n - 1})" for n in (4, 5, 6, 7)]
    assert "verdict 'maybe' is not pass or fail" in problems[0]
    assert "no accepted annotation p999" in problems[1]
    rows = con.execute("SELECT item, verdict, reasons, wrong_claims, auditor_kind, auditor FROM audits ORDER BY item").fetchall()
    assert rows == [("p000", "pass", "[]", "[]", "human", "ana"),
                    ("p001", "fail", '["invented a claim", "wrong support"]', "[1, 2]", "human", "ana")]
    # reputation follows: Beta(1 + 1 pass, 1 + 1 fail)
    assert con.execute("SELECT passes, fails, mean FROM reputation").fetchall() == [(1, 1, 0.5)]


def test_import_jsonl_with_a_broken_line(tmp_path):
    con = db_with_annotations(3)
    f = tmp_path / "review.jsonl"
    f.write_text(json.dumps({"item": "p000", "annotator": "smollm2", "generation": 1, "verdict": "pass",
                             "reasons": ["faithful"], "wrong_claims": []}) + "\n{broken\n")
    imported, problems = import_verdicts(con, f, "bo")
    assert imported == 1 and len(problems) == 1 and problems[0].startswith(f"{f}:2: not valid JSON")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_then_import_round_trips_unicode_line_separators(tmp_path, suffix):
    from builder.stages.audit import export_sample

    con = db_with_annotations(n=10)
    con.execute("UPDATE passages SET text = 'a passage\u2028with a line separator\u2029and more\u0085'")
    out = tmp_path / f"review{suffix}"
    n = export_sample(con, SECRET, 1, 0.5, out)
    assert n > 0
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
        for r in rows:
            r.update(verdict="pass", reasons="fine\u2028really")
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        import csv

        with out.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows:
            r.update(verdict="pass", reasons="fine\u2028really")
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    imported, problems = import_verdicts(con, out, "ana")
    assert (imported, problems) == (n, [])


def test_import_refuses_other_file_types(tmp_path):
    with pytest.raises(AuditError, match=".csv or .jsonl"):
        import_verdicts(db_with_annotations(1), tmp_path / "x.xlsx", "a")


def test_model_vs_human_counts_every_pair_of_a_model_and_a_human_audit():
    """The view counts each (model audit, human audit) pair of an item, as a join of the audits with
    themselves does; it is computed per item instead (one pass). Several auditors of each kind, random
    verdicts: the two must agree."""
    import random

    rng = random.Random(7)
    con = db_with_annotations(6)
    rows = [AuditRow(f"p{i:03d}", "smollm2", 1, auditor, kind, rng.choice(["pass", "fail"]), [], [])
            for i in range(6) for auditor, kind in [("m1", "model"), ("m2", "model"), ("h1", "human"), ("h2", "human")]
            if rng.random() < 0.7]
    store_audits(con, 1, rows)
    by_join = con.execute("""
        SELECT m.generation, count(*), count(*) FILTER (m.verdict <> h.verdict),
               count(*) FILTER (m.verdict = 'pass' AND h.verdict = 'fail'),
               count(*) FILTER (m.verdict = 'fail' AND h.verdict = 'pass')
        FROM audits_current m JOIN audits_current h USING (generation, item, annotator)
        WHERE m.auditor_kind = 'model' AND h.auditor_kind = 'human' GROUP BY ALL""").fetchall()
    view = con.execute("SELECT generation, both_audited, disagreements, model_too_lenient, model_too_strict "
                       "FROM audit_model_vs_human").fetchall()
    assert view == by_join and by_join[0][1] > 6  # more pairs than items: several auditors per item


def test_documented_views_answer_from_the_tables():
    con = db_with_annotations(4)
    store_audits(con, 1, [AuditRow(item, "smollm2", 1, auditor, kind, verdict, [], []) for item, auditor, kind, verdict in [
        ("p000", "m", "model", "pass"), ("p000", "h", "human", "fail"), ("p001", "m", "model", "fail"),
        ("p001", "h", "human", "fail"), ("p002", "m", "model", "pass")]])
    assert con.execute("SELECT audits, passes, pass_rate FROM audit_pass_rate_by_annotator").fetchall() == [(5, 2, 0.4)]
    assert con.execute("SELECT family, audits FROM audit_pass_rate_by_family").fetchall() == [("llama", 5)]
    assert con.execute("SELECT persona, audits FROM audit_pass_rate_by_persona").fetchall() == [("default", 5)]
    assert con.execute("SELECT auditor_kind, audits, passes FROM audit_pass_rate_by_generation").fetchall() == [
        ("human", 2, 0), ("model", 3, 2)]
    assert con.execute("SELECT both_audited, disagreements, model_too_lenient, model_too_strict FROM audit_model_vs_human"
                       ).fetchall() == [(2, 1, 1, 0)]
    assert con.execute("SELECT accepted, audited, model_audited, human_audited, coverage FROM audit_coverage").fetchall() == [
        (4, 3, 3, 2, 0.75)]
    update_reputation(con, 1)
    assert con.execute("SELECT passes, fails, alpha, beta, round(mean, 4) FROM reputation").fetchall() == [(2, 3, 3.0, 4.0, 0.4286)]


def test_human_verdicts_are_validated_against_the_audit_schema(tmp_path):
    """schemas/audit.schema.json bounds reasons (at most 2, 3-120 characters each) for model and
    human auditors alike (#15.8)."""
    con = db_with_annotations(3)
    f = tmp_path / "review.jsonl"
    rows = [{"item": "p000", "annotator": "smollm2", "generation": 1, "verdict": "fail", "reasons": ["ok", "x" * 5],
             "wrong_claims": []},
            {"item": "p001", "annotator": "smollm2", "generation": 1, "verdict": "fail",
             "reasons": ["one reason", "another reason", "a third reason"], "wrong_claims": [1]},
            {"item": "p002", "annotator": "smollm2", "generation": 1, "verdict": "fail", "reasons": ["invented a claim"],
             "wrong_claims": [2]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    imported, problems = import_verdicts(con, f, "ana")
    assert imported == 1
    assert problems[0].startswith(f"{f}:1: does not match schemas/audit.schema.json at reasons/0: 'ok' is too short")
    assert problems[1].startswith(f"{f}:2: does not match schemas/audit.schema.json at reasons:")
    assert con.execute("SELECT item FROM audits").fetchall() == [("p002",)]


def test_reasons_claim_by_claim_are_checked_on_import_and_read_one_row_a_claim(tmp_path):
    """#31.6: a person gives codes and a reason per wrong claim (schemas/claim_reasons.schema.json),
    in a CSV cell as JSON or in JSONL as a list; `audit_claims` reads every claim of every current
    verdict, wrong or not, with its codes. A reason for a claim not called wrong, a code the schema
    does not know and broken JSON are refused, by line, and store nothing."""
    con = db_with_annotations(4)
    claims = [{"claim": "The bridge reopened", "evidence": "reopened on Tuesday", "kind": "fact", "support": "strong",
               "confidence": "high"},
              {"claim": "It cost 38 million euros", "evidence": "38 million dollars", "kind": "fact",
               "support": "strong", "confidence": "high"}]
    con.execute("UPDATE annotations SET record = ?", [json.dumps({"claims": claims, "reflection": "r"})])
    why = [{"claim": 2, "codes": ["misreads the passage"], "reason": "dollars, not euros"}]
    f = tmp_path / "review.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["item", "annotator", "generation", "verdict", "wrong_claims", "claim_reasons"])
        out.writerow(["p000", "smollm2", 1, "fail", "2", json.dumps(why)])
        out.writerow(["p001", "smollm2", 1, "fail", "1", json.dumps(why)])  # claim 2 is not called wrong
        out.writerow(["p002", "smollm2", 1, "fail", "2", json.dumps([{"claim": 2, "codes": ["made up"]}])])
        out.writerow(["p003", "smollm2", 1, "fail", "2", "[{claim: 2}"])
    imported, problems = import_verdicts(con, f, "ana")
    assert imported == 1, problems
    assert "reasons for claim 2, which wrong_claims does not call wrong" in problems[0]
    assert "schemas/claim_reasons.schema.json at 0/codes/0: 'made up' is not one of" in problems[1]
    assert "claim_reasons is not JSON" in problems[2] and '"codes": ["invented claim"]' in problems[2]
    jsonl = tmp_path / "review.jsonl"
    jsonl.write_text(json.dumps({"item": "p001", "annotator": "smollm2", "generation": 1, "verdict": "pass",
                                 "wrong_claims": [], "claim_reasons": []}) + "\n" +
                     json.dumps({"item": "p002", "annotator": "smollm2", "generation": 1, "verdict": "fail",
                                 "reasons": ["the prose invents a cause"], "wrong_claims": []}) + "\n")
    assert import_verdicts(con, jsonl, "ana") == (2, [])
    rows = con.execute("SELECT item, claim, claim_text, wrong, codes, reason FROM audit_claims "
                       "WHERE item <> 'p002' ORDER BY ALL").fetchall()
    assert rows == [("p000", 1, "The bridge reopened", False, None, None),
                    ("p000", 2, "It cost 38 million euros", True, ["misreads the passage"], "dollars, not euros"),
                    ("p001", 1, "The bridge reopened", False, None, None),
                    ("p001", 2, "It cost 38 million euros", False, None, None)]
    # as labelled claims (`ratchet audit claims`): p002's fail names no wrong claim, so its claims say nothing
    out = tmp_path / "people.jsonl"
    assert export_claims(con, out) == (4, 1, 2)
    labelled = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["passage_id"], x["claim"], x["label"], x["codes"]) for x in labelled][:2] == [
        ("p000", "The bridge reopened", "supported", []),
        ("p000", "It cost 38 million euros", "unsupported", ["misreads the passage"])]
    assert labelled[1]["evidence"] == "38 million dollars" and labelled[1]["passage"] == "text 0"
    assert all(x["in_sample"] for x in labelled)  # no judge abstained here: every item is the random sample's


@pytest.mark.parametrize("name", ["smollm2", "SmolLM2", "gemma3-auditor", "qwen-auditor"])
def test_a_person_named_like_a_model_is_refused_and_nothing_is_stored(tmp_path, name):
    """A person's verdicts are stored under their name; one equal to a member's or a model
    auditor's would replace or mix with that model's rows (issue 31)."""
    con = db_with_annotations(2)
    con.execute("INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict) "
                "VALUES ('p000', 'smollm2', 1, 'gemma3-auditor', 'model', 'pass')")
    cfg = RatchetConfig.model_validate({"audit": {"auditor": "bundled:qwen", "persona": "auditor"}})
    f = tmp_path / "v.jsonl"
    f.write_text(json.dumps({"item": "p000", "annotator": "smollm2", "generation": 1, "verdict": "fail",
                             "reasons": ["invented claim"]}) + "\n")
    with pytest.raises(AuditError, match=f"--auditor {name}: that is the name of a model"):
        import_verdicts(con, f, name, cfg)
    assert con.execute("SELECT auditor, verdict FROM audits").fetchall() == [("gemma3-auditor", "pass")]
    assert import_verdicts(con, f, "ana", cfg) == (1, [])


def test_a_verdict_on_text_a_rebuild_changed_is_refused_on_import_and_no_longer_counts(tmp_path):
    """#31.1: every verdict keeps the hash of the text it judged. The export carries it; after
    a rebuild changes an annotation, importing that export refuses the changed row (naming its
    line) and keeps the others, and a verdict stored before the change is stale: out of the
    reputation and the pass-rate views, counted in audits_stale."""
    con = db_with_annotations(4)
    export = tmp_path / "review.csv"
    assert export_sample(con, SECRET, 1, 1.0, export) == 4
    store_audits(con, 1, [AuditRow("p001", "smollm2", 1, "ana", "human", "fail", [], [], 0.0,
                                   current_annotations(con)[("p001", "smollm2", 1)][0])])
    update_reputation(con, 1)
    before = con.execute("SELECT passes, fails FROM reputation WHERE annotator = 'smollm2'").fetchone()
    assert before == (0, 1)
    # a rebuild rewrites two reflections: p000 and p001 (which ana has judged already)
    con.execute("UPDATE annotations SET record = '{\"claims\": [], \"reflection\": \"rewritten\"}' "
                "WHERE passage_id IN ('p000', 'p001')")
    rows = list(csv.DictReader(export.open(encoding="utf-8")))
    assert all(len(r["content_hash"]) == 64 for r in rows)
    for r in rows:
        r["verdict"] = "pass"
    with export.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    imported, problems = import_verdicts(con, export, "bea")
    assert imported == 2 and len(problems) == 2
    assert all("text changed since it was exported" in p and p.startswith(f"{export}:") for p in problems)
    lines = sorted(int(p.split(":")[1].split()[0]) for p in problems)  # each named by its line
    assert lines == sorted([r["item"] for r in rows].index(i) + 2 for i in ("p000", "p001"))
    assert con.execute("SELECT item FROM audits WHERE auditor = 'bea' ORDER BY item").fetchall() == [("p002",), ("p003",)]
    # ana's verdict on the old p001 is stale: kept for the record, counted nowhere
    assert con.execute("SELECT auditor, item FROM audits_stale").fetchall() == [("ana", "p001")]
    assert con.execute("SELECT count(*) FROM audits_current WHERE auditor = 'ana'").fetchone() == (0,)
    assert con.execute("SELECT passes, fails FROM reputation WHERE annotator = 'smollm2' AND generation = 1"
                       ).fetchone() == (2, 0)
    assert con.execute("SELECT audits FROM audit_pass_rate_by_annotator").fetchall() == [(2,)]
    # a verdict stored before hashes (NULL) still counts, and a file without the column judges the text now
    store_audits(con, 1, [AuditRow("p002", "smollm2", 1, "old", "human", "fail", [], [], 0.0)])
    plain = tmp_path / "plain.csv"
    plain.write_text("item,annotator,generation,verdict\np001,smollm2,1,fail\n", encoding="utf-8")
    assert import_verdicts(con, plain, "cid") == (1, [])
    assert con.execute("SELECT auditor FROM audits_current WHERE verdict = 'fail' ORDER BY auditor").fetchall() == [
        ("cid",), ("old",)]


def test_faithful_kept_per_minute_counts_people_s_verdicts_on_kept_reflections_only():
    """`ratchet status`'s line: only people's verdicts, only on what was kept (selected), in the
    secret sample; a model's verdicts and a person's on a dropped reflection do not count."""
    from builder.stages.audit import faithful_per_minute, people_on_kept

    con = db_with_annotations(5)
    for i in range(5):  # p000-p002 kept, p003-p004 dropped
        con.execute("INSERT INTO selections VALUES (1, ?, ?, 0.9, 'kept')", [f"p{i:03d}", "smollm2" if i < 3 else None])
    store_audits(con, 1, [AuditRow(item, "smollm2", 1, auditor, kind, verdict, [], []) for item, auditor, kind, verdict in [
        ("p000", "ann", "human", "pass"), ("p001", "ann", "human", "fail"), ("p002", "bob", "human", "pass"),
        ("p001", "m", "model", "pass"), ("p003", "ann", "human", "pass"), ("p004", "bob", "human", "fail")]])
    assert people_on_kept(con) == {1: (3, 2)}  # generation 2: nobody has read it
    assert people_on_kept(duckdb.connect()) == {}  # no views yet (an older workspace read-only): nothing read
    line = faithful_per_minute(3, 2, kept=3, seconds=120)
    assert "2 of 3" in line and "about 2.0 of 3 kept" in line and "1.00 per minute" in line
    assert "no person" in faithful_per_minute(0, 0, kept=3, seconds=120)
