"""The statistics page's figures: the same DuckDB views as `ratchet sql`, plus Cohen's kappa
(scikit-learn) of model auditor vs people and of person vs person on the overlap."""
from __future__ import annotations

import io
import math
import warnings

from ..stages.audit import ESCALATIONS, GATE_JUDGES, KINDS, reputation_means


def _rows(con, sql: str, params) -> list[dict]:
    cur = con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' pass/fail verdicts; None where it is undefined or says
    nothing: no pairs, or either rater gave one value throughout (scikit-learn then gives 0 or
    NaN, which would read as "agreement at chance")."""
    if not pairs:
        return None
    from sklearn.metrics import cohen_kappa_score

    a, b = zip(*pairs)
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = cohen_kappa_score(a, b, labels=["pass", "fail"])
    return None if math.isnan(value) else round(float(value), 3)


PASS_RATE_BY = """SELECT {key}, auditor_kind AS "audited by", count(*) AS audits,
       count(*) FILTER (verdict = 'pass') AS passes, round(passes / audits, 3) AS pass_rate
FROM audits_with_members WHERE generation = ? GROUP BY ALL ORDER BY ALL"""


def stats(con, generation: int) -> dict:
    # People's and the model auditor's verdicts apart: one pass rate over both would hide which spoke.
    by_annotator = _rows(con, PASS_RATE_BY.format(key="annotator"), [generation])
    by_family = _rows(con, PASS_RATE_BY.format(key="family"), [generation])
    model_vs_human = _rows(con, "SELECT both_audited, disagreements, disagreement_rate, model_too_lenient, "
                                "model_too_strict FROM audit_model_vs_human WHERE generation = ?", [generation])
    by_kind = _rows(con, "SELECT auditor_kind, audits, passes, pass_rate FROM audit_pass_rate_by_generation "
                         "WHERE generation = ?", [generation])
    model_human = con.execute("""SELECT m.verdict, h.verdict FROM audits_current m JOIN audits_current h USING (item, annotator, generation)
                                 WHERE generation = ? AND m.auditor_kind = 'model' AND h.auditor_kind = 'human'""",
                              [generation]).fetchall()
    human_human = con.execute("""SELECT a.verdict, b.verdict FROM audits_current a JOIN audits_current b USING (item, annotator, generation)
                                 WHERE generation = ? AND a.auditor_kind = 'human' AND b.auditor_kind = 'human'
                                   AND a.auditor < b.auditor""", [generation]).fetchall()
    # Critics as their audits found them, people and the model auditor apart, with the audited
    # record over every current critique audit (critic_reputation; what weighs a vote is [audit] vote_weights)
    by_critic = _rows(con, """SELECT a.critic, a.auditor_kind AS "audited by", count(*) AS audits,
                                     count(*) FILTER (a.verdict = 'right') AS "right", round("right" / audits, 3) AS right_rate,
                                     count(*) FILTER (json_array_length(a.wrong_claims) > 0) AS "claims marked wrong",
                                     any_value(round(r.mean, 3)) AS reputation
                              FROM critique_audits_current a LEFT JOIN critic_reputation r USING (generation, critic)
                              WHERE a.generation = ? GROUP BY ALL ORDER BY ALL""", [generation])
    # Reputation before people reviewed (model audits only) and after (every audit): the same
    # posterior as the reputation table (stages/audit.py: REPUTATION_SQL).
    before = reputation_means(con, generation, ["model"])
    after = reputation_means(con, generation, KINDS)
    reputation = [{"annotator": a, "before": round(before.get(a, 0.5), 3), "after": round(m, 3)}
                  for a, m in sorted(after.items())]
    # judgements a model abstained on (escalations): what people made of them, and the model
    # auditor's coverage (its agreement with people above is measured where it answered)
    # (a critic's abstention puts its critique, not the annotation, before a person)
    escalated = [] if not ESCALATIONS.exists(con) else _rows(con, """SELECT e.judge,
                                     CASE WHEN e.critic IS NULL THEN 'annotation' ELSE 'critique' END AS "a person decides",
                                     count(DISTINCT (e.item, e.annotator)) AS items,
                                     count(DISTINCT (e.item, e.annotator)) FILTER (e.in_sample) AS in_sample,
                                     count(coalesce(h.verdict, c.verdict)) AS "people's verdicts",
                                     count(*) FILTER (h.verdict = 'pass' OR c.verdict = 'right')
                                         AS "people passed (a critique: found right)"
                              FROM escalations e
                              LEFT JOIN audits_current h ON e.critic IS NULL AND h.auditor_kind = 'human'
                                   AND h.item = e.item AND h.annotator = e.annotator AND h.generation = e.generation
                              LEFT JOIN critique_audits_current c ON c.critic = e.critic AND c.auditor_kind = 'human'
                                   AND c.item = e.item AND c.annotator = e.annotator AND c.generation = e.generation
                              WHERE e.generation = ? GROUP BY ALL ORDER BY ALL""", [generation])
    decided = con.execute("SELECT count(*) FROM audits_current WHERE generation = ? AND auditor_kind = 'model'",
                          [generation]).fetchone()[0]
    abstained = sum(r["items"] for r in escalated if r["judge"] not in GATE_JUDGES and r["a person decides"] == "annotation")
    coverage = round(decided / (decided + abstained), 3) if decided + abstained else None
    # verdicts on text a rebuild has changed since: left out of every figure above, counted here
    stale = con.execute("SELECT count(*) FILTER (auditor_kind = 'human'), count(*) FROM audits_stale "
                        "WHERE generation = ?", [generation]).fetchone()
    return {"stale": {"human": stale[0], "all": stale[1]}, "by_annotator": by_annotator, "by_family": by_family, "by_kind": by_kind, "model_vs_human": model_vs_human,
            "model_human": {"n": len(model_human), "kappa": kappa(model_human),
                            "agree": sum(a == b for a, b in model_human)},
            "human_human": {"n": len(human_human), "kappa": kappa(human_human),
                            "agree": sum(a == b for a, b in human_human)},
            "reputation": reputation, "escalated": escalated, "by_critic": by_critic,
            "auditor_coverage": {"decided": decided, "abstained": abstained, "coverage": coverage}}


def ratchet_rows(con) -> list[tuple[int, float]]:
    """(generation, mean panel score): what the ratchet's figure draws."""
    return con.execute("SELECT generation, mean_score FROM ratchet_by_generation ORDER BY generation").fetchall()


def ratchet_plot(rows: list[tuple[int, float]]) -> bytes:
    """Mean panel score per generation (the ratchet's figure), as a PNG. A Figure of its own,
    not pyplot's global state: two requests may draw at once."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6), dpi=100)
    ax = fig.subplots()
    if rows:
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o")
        ax.set_xticks([r[0] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_xlabel("generation")
    ax.set_ylabel("mean panel score")
    ax.text(0.99, 0.03, "over all passages; one without a reflection counts 0", transform=ax.transAxes,
            ha="right", fontsize=7, color="0.4")
    ax.set_title("The ratchet: mean panel score never falls", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
