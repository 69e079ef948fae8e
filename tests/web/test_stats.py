"""The statistics page's figures (builder/web/stats.py) on a real DuckDB with the workspace schema:
people's and the model auditor's verdicts apart, kappa n/a where it says nothing."""
import duckdb

from builder.web.stats import kappa, stats
from builder.workspace import create_schema


def test_kappa_is_na_where_either_rater_gave_one_verdict_throughout():
    assert kappa([]) is None
    # One rater always "pass": scikit-learn gives 0.0, which would read as agreement at chance.
    assert kappa([("pass", "pass"), ("pass", "fail"), ("pass", "pass")]) is None
    assert kappa([("pass", "pass"), ("fail", "fail")]) == 1.0
    assert kappa([("pass", "fail"), ("fail", "pass")]) == -1.0


def test_pass_rates_keep_people_and_the_model_auditor_apart_and_the_model_is_compared_with_people():
    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO members VALUES ('writer', 'qwen', 'default', 'q.gguf', 'llama-server')")
    rows = [("i1", "model", "pass", "pass"), ("i2", "model", "pass", "fail"), ("i3", "model", "fail", "fail"),
            ("i4", "model", "pass", None)]
    for item, _, model, human in rows:
        con.execute("INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict) "
                    "VALUES (?, 'writer', 1, 'auditor-model', 'model', ?)", [item, model])
        if human:
            con.execute("INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict) "
                        "VALUES (?, 'writer', 1, 'ana', 'human', ?)", [item, human])
    # what builder.stages.audit.store_audits keeps up to date as audits arrive (these rows skip it)
    con.execute("INSERT INTO audit_items SELECT item, annotator, generation, bool_or(auditor_kind = 'model'), "
                "bool_or(auditor_kind = 'human') FROM audits GROUP BY ALL")
    figures = stats(con, 1)
    by = {r["audited by"]: r for r in figures["by_annotator"]}
    assert (by["human"]["audits"], by["human"]["passes"]) == (3, 1)
    assert (by["model"]["audits"], by["model"]["passes"]) == (4, 3)
    assert [r["family"] for r in figures["by_family"]] == ["qwen", "qwen"]
    [versus] = figures["model_vs_human"]
    assert (versus["both_audited"], versus["disagreements"], versus["model_too_lenient"], versus["model_too_strict"]) \
        == (3, 1, 1, 0)
    assert figures["model_human"] == {"n": 3, "kappa": kappa([("pass", "pass"), ("pass", "fail"), ("fail", "fail")]),
                                      "agree": 2}


def test_the_page_says_what_people_made_of_escalated_items_and_the_model_auditors_coverage():
    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO members VALUES ('writer', 'qwen', 'default', 'q.gguf', 'llama-server')")
    for item in ("i1", "i2", "i3"):  # the model auditor decided three items
        con.execute("INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict) "
                    "VALUES (?, 'writer', 1, 'auditor-model', 'model', 'pass')", [item])
    # it abstained on one sampled item; the claim judge on another, outside the sample
    con.execute("INSERT INTO escalations VALUES ('i4', 'writer', 1, 'auditor-model', 0.55, 'unsure', true, NULL), "
                "('i5', 'writer', 1, 'claim judge', 0.48, 'unsure of claim 1', false, NULL)")
    for item, verdict in (("i4", "fail"), ("i5", "pass")):
        con.execute("INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict) "
                    "VALUES (?, 'writer', 1, 'ana', 'human', ?)", [item, verdict])
    figures = stats(con, 1)
    assert figures["escalated"] == [
        {"judge": "auditor-model", "a person decides": "annotation", "items": 1, "in_sample": 1,
         "people's verdicts": 1, "people passed (a critique: found right)": 0},
        {"judge": "claim judge", "a person decides": "annotation", "items": 1, "in_sample": 0,
         "people's verdicts": 1, "people passed (a critique: found right)": 0 + 1}]
    assert figures["auditor_coverage"] == {"decided": 3, "abstained": 1, "coverage": 0.75}
    # ana's verdict on i5 (outside the sample) is not in a pass rate; the one on i4 is
    by = {r["audited by"]: r for r in figures["by_annotator"]}
    assert (by["human"]["audits"], by["human"]["passes"]) == (1, 0)
