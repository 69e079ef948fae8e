"""Every table and documented view of a workspace's DuckDB file. Each table is declared once, by
the row type of the module that writes it (tables.py); importing the build pipeline and the
evaluator declares them all. Workspace.connect creates them; nothing below this module imports it."""
from __future__ import annotations

from . import build, evaluate  # noqa: F401 - their modules (and their stages') declare the tables on import
from .hashes import ANNOTATION_HASH_SQL, CRITIQUE_HASH_SQL
from .tables import REGISTRY, primary_keys, schema_sql  # noqa: F401 - schema_sql: every CREATE, for `ratchet sql`


def create_schema(con) -> None:
    """Every table (each declared once, by the row type of the stage that writes it: see
    tables.py) and every documented view."""
    keys = primary_keys(con)
    for table in REGISTRY.values():
        table.create(con, keys)
    con.execute(VIEWS_SQL)


# Documented views (docs/sql.md): users query them with `ratchet sql` or duckdb.
_PASS_RATE_VIEW = """
CREATE OR REPLACE VIEW audit_pass_rate_by_{name} AS
SELECT {keys}, count(*) AS audits, count(*) FILTER (verdict = 'pass') AS passes,
       round(count(*) FILTER (verdict = 'pass') / count(*), 3) AS pass_rate
FROM audits_with_members GROUP BY ALL ORDER BY ALL;
"""

# A verdict is current while the text it judged is still there: its content_hash equals the hash
# of the accepted annotation (and critique) now (stages/audit.py: ANNOTATION_HASH_SQL). A row
# recorded before hashes (NULL) is taken as current. Reputation, vote weights and the views below
# read current verdicts only; the stale ones stay in `audits` for the record.
# Two branches, so that only audits that carry a hash pay for hashing (a join on the key, then the
# hash of that one row): one IN over every annotation's hash took 3-5 s on bench/audit_sql.py's
# 10 M rows.
_STALE_VIEWS = """
CREATE OR REPLACE VIEW {table}_current AS
SELECT x.* FROM {table} x WHERE x.content_hash IS NULL
UNION ALL
SELECT x.* FROM (FROM {table} WHERE content_hash IS NOT NULL) x JOIN {source} ON {match} WHERE x.content_hash = {hash};
CREATE OR REPLACE VIEW {table}_stale AS
SELECT x.* FROM {table} x WHERE x.content_hash IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM {source} WHERE {match} AND {hash} = x.content_hash);
"""
_ANNOTATION = "annotations a JOIN passages p USING (passage_id)"
_MATCH = "a.status = 'accepted' AND a.generation = x.generation AND a.passage_id = x.item AND a.annotator = x.annotator"

VIEWS_SQL = _STALE_VIEWS.format(table="audits", hash=ANNOTATION_HASH_SQL, source=_ANNOTATION, match=_MATCH) + \
    _STALE_VIEWS.format(table="critique_audits", hash=CRITIQUE_HASH_SQL,
                        source=_ANNOTATION + " JOIN critiques c ON c.generation = a.generation AND c.passage_id = "
                                             "a.passage_id AND c.annotator = a.annotator",
                        match=_MATCH + " AND c.critic = x.critic AND c.status = 'accepted'") + """
CREATE OR REPLACE VIEW audits_in_sample AS
-- Current verdicts less those on items a person saw only because a judge abstained (escalations
-- outside the secret sample): chosen by doubt, not at random, so they stay out of pass rates and
-- reputations (audit_model_vs_human still reads them: that is where they tell the most).
SELECT x.* FROM audits_current x WHERE NOT EXISTS (
    SELECT 1 FROM escalations e WHERE NOT e.in_sample AND e.item = x.item AND e.annotator = x.annotator
    AND e.generation = x.generation AND e.critic IS NULL);
CREATE OR REPLACE VIEW critique_audits_in_sample AS
-- The same for critiques: less those a person saw only because their critic abstained.
SELECT x.* FROM critique_audits_current x WHERE NOT EXISTS (
    SELECT 1 FROM escalations e WHERE NOT e.in_sample AND e.item = x.item AND e.annotator = x.annotator
    AND e.generation = x.generation AND e.critic = x.critic);
CREATE OR REPLACE VIEW audit_claims AS
-- One row per claim of every current verdict: the claim the auditor saw, whether they called it
-- wrong, and why (a person's codes and reason, audits.claim_reasons; a model auditor gives none).
-- A fail that calls no claim wrong faulted the rest of the reflection (its notes or prose).
WITH claims AS (
    SELECT x.generation, x.item, x.annotator, x.auditor, x.auditor_kind, x.verdict, x.wrong_claims,
           x.claim_reasons, unnest(CAST(a.record->'claims' AS JSON[])) AS c,
           generate_subscripts(CAST(a.record->'claims' AS JSON[]), 1) AS claim
    FROM audits_current x JOIN annotations a ON a.status = 'accepted' AND a.generation = x.generation
                                              AND a.passage_id = x.item AND a.annotator = x.annotator),
given AS (SELECT *, list_filter(CAST(claim_reasons AS JSON[]), lambda r: CAST(r->>'claim' AS INTEGER) = claim)[1] AS r
          FROM claims)
SELECT generation, item, annotator, auditor, auditor_kind, verdict, claim, c->>'claim' AS claim_text,
       c->>'evidence' AS evidence, c->>'kind' AS kind, c->>'support' AS support,
       coalesce(list_contains(CAST(wrong_claims AS INTEGER[]), claim), false) AS wrong,
       CAST(r->'codes' AS VARCHAR[]) AS codes, r->>'reason' AS reason
FROM given ORDER BY generation, item, annotator, auditor, auditor_kind, claim;
CREATE OR REPLACE VIEW audits_with_members AS
SELECT a.*, coalesce(m.persona, '?') AS persona, coalesce(m.family, '?') AS family
FROM audits_in_sample a LEFT JOIN members m ON m.name = a.annotator;
""" + "".join(_PASS_RATE_VIEW.format(name=name, keys=keys) for name, keys in [
    ("annotator", "annotator, generation"), ("persona", "persona, generation"),
    ("family", "family, generation"), ("generation", "generation, auditor_kind")]) + """
CREATE OR REPLACE VIEW audit_model_vs_human AS
-- Every (model audit, human audit) pair of one item, counted per item: the model's and the person's
-- pass and fail counts multiply out to the pairs. Only items audit_items marks as audited by both
-- kinds are read (a join of audits_current with itself took 1.03 s on bench/audit_sql.py's 10 M
-- rows, grouping them all 1.05 s; this 0.53 s).
WITH both_kinds AS (SELECT item, annotator, generation FROM audit_items WHERE by_model AND by_human),
per_item AS (
    SELECT generation,
           count(*) FILTER (auditor_kind = 'model' AND verdict = 'pass') AS mp,
           count(*) FILTER (auditor_kind = 'model' AND verdict = 'fail') AS mf,
           count(*) FILTER (auditor_kind = 'human' AND verdict = 'pass') AS hp,
           count(*) FILTER (auditor_kind = 'human' AND verdict = 'fail') AS hf
    FROM audits_current JOIN both_kinds USING (item, annotator, generation) GROUP BY generation, item, annotator)
SELECT generation, sum((mp + mf) * (hp + hf))::BIGINT AS both_audited,
       sum(mp * hf + mf * hp)::BIGINT AS disagreements,
       round(disagreements / both_audited, 3) AS disagreement_rate,
       sum(mp * hf)::BIGINT AS model_too_lenient, sum(mf * hp)::BIGINT AS model_too_strict
FROM per_item WHERE mp + mf > 0 AND hp + hf > 0
GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW critique_audit_rate_by_critic AS
WITH audited AS (
    SELECT generation, critic, count(*) AS audits, count(*) FILTER (verdict = 'right') AS right_verdicts,
           count(*) FILTER (auditor_kind = 'human') AS human_audits
    FROM critique_audits_in_sample GROUP BY ALL)
SELECT a.generation, a.critic, coalesce(m.family, '?') AS family, coalesce(m.persona, '?') AS persona, a.audits,
       a.right_verdicts, round(a.right_verdicts / a.audits, 3) AS right_rate, a.human_audits,
       round(r.mean, 3) AS vote_weight
FROM audited a LEFT JOIN critic_reputation r USING (generation, critic) LEFT JOIN members m ON m.name = a.critic
ORDER BY ALL;

CREATE OR REPLACE VIEW agreement_by_member AS
SELECT generation, scope, member, alpha, units, critiques FROM agreement ORDER BY generation, scope, member;

CREATE OR REPLACE VIEW critic_verdicts_by_member AS
SELECT c.generation, c.critic, coalesce(m.family, '?') AS family, coalesce(m.persona, '?') AS persona,
       count(*) FILTER (status = 'accepted') AS critiques, count(*) FILTER (status <> 'accepted') AS invalid,
       count(*) FILTER (verdict = 'survives') AS survives, count(*) FILTER (verdict = 'revise') AS revise,
       count(*) FILTER (verdict = 'reject') AS reject,
       round(count(*) FILTER (verdict = 'survives') / nullif(count(*) FILTER (status = 'accepted'), 0), 3) AS survive_rate
FROM critiques c LEFT JOIN members m ON m.name = c.critic GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW convergence_by_member AS
SELECT v.generation, v.annotator, coalesce(m.family, '?') AS family, coalesce(m.persona, '?') AS persona,
       count(*) AS annotations, round(avg(v.score), 3) AS mean_score, count(*) FILTER (v.selected) AS selected
FROM convergence v LEFT JOIN members m ON m.name = v.annotator GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW critic_scores_by_member AS
SELECT c.generation, c.critic, coalesce(m.family, '?') AS family, count(*) AS critiques,
       round(avg(c.score), 3) AS mean_score, round(stddev_samp(c.score), 3) AS sd_score,
       round(min(c.score), 3) AS min_score, round(max(c.score), 3) AS max_score,
       round(avg(json_extract_string(c.probs, '$.survives')::DOUBLE), 3) AS mean_p_survives_raw,
       string_agg(DISTINCT c.method, ', ') AS read_by
FROM critiques c LEFT JOIN members m ON m.name = c.critic WHERE c.status = 'accepted' GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW conscience_labels AS
SELECT generation, framework, subject, coalesce(label, 'invalid') AS label, count(*) AS n,
       round(avg(p), 3) AS mean_p, string_agg(DISTINCT method, ', ') AS read_by
FROM judgements GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW veto_rate_by_judge AS
SELECT generation, judge, split, count(*) AS examples, count(*) FILTER (veto) AS vetoes,
       count(*) FILTER (status <> 'accepted') AS invalid, round(count(*) FILTER (veto) / count(*), 3) AS veto_rate,
       round(avg(p_no), 3) AS mean_p_no
FROM consents GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW vetoes AS
SELECT generation, split, example_id, list(judge ORDER BY judge) AS judges,
       list(coalesce(reasons::VARCHAR, reason) ORDER BY judge) AS why
FROM consents WHERE veto GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW trait_tags AS
SELECT generation, trait_tag, count(*) AS mentions, count(*) FILTER (consent = 'yes') AS consented
FROM consents WHERE trait_tag IS NOT NULL GROUP BY ALL ORDER BY generation, mentions DESC, trait_tag;

CREATE OR REPLACE VIEW drift_by_generation AS
WITH judged AS (
    SELECT generation, count(DISTINCT (split, example_id)) AS examples, count(DISTINCT judge) AS judges,
           count(DISTINCT (split, example_id)) FILTER (veto) AS vetoed
    FROM consents GROUP BY ALL),
drift AS (SELECT generation, count(*) AS drift_events FROM drift_events GROUP BY ALL)
SELECT j.generation, j.judges, j.examples, j.vetoed, round(j.vetoed / j.examples, 3) AS veto_rate,
       coalesce(d.drift_events, 0) AS drift_events, round(coalesce(d.drift_events, 0) / j.examples, 3) AS drift_rate
FROM judged j LEFT JOIN drift d USING (generation) ORDER BY j.generation;

CREATE OR REPLACE VIEW ratchet_by_generation AS
SELECT generation, count(*) AS passages, count(record) AS with_reflection,
       round(avg(coalesce(score, 0)), 4) AS mean_score,
       count(parent_annotator) AS with_parent,
       count(*) FILTER (decision = 'replaced') AS replaced, count(*) FILTER (decision = 'carried') AS carried,
       count(*) FILTER (decision = 'unchanged') AS unchanged, count(*) FILTER (decision = 'new') AS new,
       round(count(*) FILTER (decision = 'replaced') / nullif(count(parent_annotator), 0), 4) AS replacement_rate,
       round(count(*) FILTER (decision = 'carried') / nullif(count(parent_annotator), 0), 4) AS carried_rate,
       count(*) FILTER (decision = 'tie') AS ties
FROM ratchet GROUP BY generation ORDER BY generation;

CREATE OR REPLACE VIEW audit_coverage AS
WITH done AS (
    SELECT generation, annotator, count(*) AS audited, count(*) FILTER (by_model) AS model_audited,
           count(*) FILTER (by_human) AS human_audited
    FROM audit_items GROUP BY ALL),
accepted AS (
    SELECT generation, annotator, count(*) AS accepted FROM annotations WHERE status = 'accepted' GROUP BY ALL)
SELECT c.generation, c.annotator, c.accepted, coalesce(d.audited, 0) AS audited,
       coalesce(d.model_audited, 0) AS model_audited, coalesce(d.human_audited, 0) AS human_audited,
       round(coalesce(d.audited, 0) / c.accepted, 3) AS coverage
FROM accepted c LEFT JOIN done d USING (generation, annotator) ORDER BY ALL;
"""
