"""A workspace: one folder with `ratchet.toml`, one DuckDB file holding all state, and the
compiled generations. Builds take an exclusive lock so two never write at once."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import duckdb

from .config import CONFIG_NAME, RatchetConfig, load_config

DB_NAME = "ratchet.duckdb"
LOCK_NAME = ".ratchet.lock"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS passages (
    passage_id VARCHAR PRIMARY KEY,   -- sha256 of the normalised text, 16 hex digits
    source     VARCHAR NOT NULL,      -- file (and line or row) it came from first
    position   INTEGER NOT NULL,      -- chunk index within that record
    text       VARCHAR NOT NULL,
    n_tokens   INTEGER NOT NULL,
    added_at   TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS generation_passages (
    generation INTEGER NOT NULL,
    ord        INTEGER NOT NULL,      -- corpus order
    passage_id VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (generation, passage_id)
);
CREATE TABLE IF NOT EXISTS model_calls (   -- the cache: a finished call is never made again
    cache_key         VARCHAR PRIMARY KEY,  -- sha256 of model id + rendered prompt + schema + sampling + seed
    model_id          VARCHAR NOT NULL,
    backend           VARCHAR NOT NULL,
    prompt_sha        VARCHAR NOT NULL,
    schema_sha        VARCHAR,
    sampling          JSON,
    seed              BIGINT,
    response          VARCHAR NOT NULL,
    finish_reason     VARCHAR NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    seconds           DOUBLE,
    created_at        TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS annotations (
    generation INTEGER NOT NULL,
    passage_id VARCHAR NOT NULL,
    annotator  VARCHAR NOT NULL,
    status     VARCHAR NOT NULL,      -- accepted | rejected
    reason     VARCHAR,               -- why it was rejected (last attempt)
    attempts   INTEGER NOT NULL,
    truncated  INTEGER NOT NULL,      -- attempts cut off by the token limit
    record     JSON,                  -- the validated annotation (schemas/annotation.schema.json)
    call_key   VARCHAR,               -- the model call that produced it
    PRIMARY KEY (generation, passage_id, annotator)
);
CREATE TABLE IF NOT EXISTS critiques (    -- scrutinize: each accepted annotation, critiqued by k other members
    generation     INTEGER NOT NULL,
    passage_id     VARCHAR NOT NULL,
    annotator      VARCHAR NOT NULL,      -- the author (never shown to the critic)
    critic         VARCHAR NOT NULL,
    status         VARCHAR NOT NULL,      -- accepted | rejected (no valid critique after every retry)
    verdict        VARCHAR,               -- survives | revise | reject
    claim_verdicts JSON,                  -- sound | doubtful | wrong, one per claim
    objections     JSON,
    weight         DOUBLE NOT NULL,       -- the critic's vote weight (reputation from earlier generations)
    reason         VARCHAR,
    attempts       INTEGER NOT NULL,
    call_key       VARCHAR,
    PRIMARY KEY (generation, passage_id, annotator, critic)
);
CREATE TABLE IF NOT EXISTS convergence (  -- converge: one score per accepted annotation
    generation INTEGER NOT NULL,
    passage_id VARCHAR NOT NULL,
    annotator  VARCHAR NOT NULL,
    score      DOUBLE,                    -- weighted share of 'survives'; NULL: not scrutinized or no valid critique
    critiques  INTEGER NOT NULL,          -- valid critiques behind the score
    selected   BOOLEAN NOT NULL,
    PRIMARY KEY (generation, passage_id, annotator)
);
CREATE TABLE IF NOT EXISTS selections (   -- the annotation each passage keeps, or none and why
    generation INTEGER NOT NULL,
    passage_id VARCHAR NOT NULL,
    annotator  VARCHAR,
    score      DOUBLE,
    reason     VARCHAR NOT NULL,
    PRIMARY KEY (generation, passage_id)
);
CREATE TABLE IF NOT EXISTS agreement (    -- Krippendorff's alpha (nominal) of the critics' verdicts
    generation INTEGER NOT NULL,
    scope      VARCHAR NOT NULL,          -- generation | author | critic
    member     VARCHAR NOT NULL,          -- '*' for the whole generation
    alpha      DOUBLE,                    -- NULL where undefined (no annotation with two verdicts, no variation)
    units      INTEGER NOT NULL,          -- annotations with at least two valid verdicts
    critiques  INTEGER NOT NULL,
    PRIMARY KEY (generation, scope, member)
);
CREATE TABLE IF NOT EXISTS members (      -- who annotates: the substrate and perspective of each
    name    VARCHAR PRIMARY KEY,
    family  VARCHAR NOT NULL,             -- model architecture (GGUF general.architecture)
    persona VARCHAR NOT NULL,
    model   VARCHAR NOT NULL,             -- model file name
    backend VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS audits (
    item         VARCHAR NOT NULL,        -- passage id
    annotator    VARCHAR NOT NULL,
    generation   INTEGER NOT NULL,
    auditor      VARCHAR NOT NULL,        -- a model member name, or the person's name
    auditor_kind VARCHAR NOT NULL,        -- model | human
    verdict      VARCHAR NOT NULL,        -- pass | fail
    reasons      JSON,
    wrong_claims JSON,                    -- 1-based numbers of the claims that misstate the passage
    audited_at   TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (item, annotator, generation, auditor)
);
CREATE TABLE IF NOT EXISTS audit_items (  -- one row per audited item, kept by store_audits:
    item       VARCHAR NOT NULL,          -- exact coverage without a per-item GROUP BY over all audits
    annotator  VARCHAR NOT NULL,
    generation INTEGER NOT NULL,
    by_model   BOOLEAN NOT NULL,
    by_human   BOOLEAN NOT NULL,
    PRIMARY KEY (item, annotator, generation)
);
CREATE TABLE IF NOT EXISTS reputation (   -- Beta posterior of each annotator's audit pass rate
    annotator  VARCHAR NOT NULL,
    generation INTEGER NOT NULL,          -- over every audit up to this generation
    passes     BIGINT NOT NULL,
    fails      BIGINT NOT NULL,
    alpha      DOUBLE NOT NULL,
    beta       DOUBLE NOT NULL,
    mean       DOUBLE NOT NULL,           -- the annotator's vote weight
    PRIMARY KEY (annotator, generation)
);
CREATE TABLE IF NOT EXISTS conscience_items (  -- prompt/response items of a generation (conscience.items)
    generation INTEGER NOT NULL,
    item_id    VARCHAR NOT NULL,          -- sha256 of prompt and response, 16 hex digits
    source     VARCHAR NOT NULL,          -- file:line or file#row
    prompt     VARCHAR NOT NULL,
    response   VARCHAR NOT NULL,
    PRIMARY KEY (generation, item_id)
);
CREATE TABLE IF NOT EXISTS judgements (   -- the frozen conscience judge's labels
    generation INTEGER NOT NULL,
    item_id    VARCHAR NOT NULL,
    framework  VARCHAR NOT NULL,          -- prompts/frameworks/NAME.toml
    subject    VARCHAR NOT NULL,          -- original (the item's response) | rewrite
    judge      VARCHAR NOT NULL,
    status     VARCHAR NOT NULL,          -- accepted | rejected (no valid judgement after every retry)
    label      VARCHAR,                   -- ethical | neutral | unethical
    reasons    JSON,
    reason     VARCHAR,
    attempts   INTEGER NOT NULL,
    call_key   VARCHAR,
    PRIMARY KEY (generation, item_id, framework, subject)
);
CREATE TABLE IF NOT EXISTS pairs (        -- every response judged unethical, its rewrite, and the outcome
    generation     INTEGER NOT NULL,
    item_id        VARCHAR NOT NULL,
    framework      VARCHAR NOT NULL,
    judge          VARCHAR NOT NULL,
    prompt         VARCHAR NOT NULL,
    rejected       VARCHAR NOT NULL,      -- the original response
    chosen         VARCHAR,               -- the rewrite (NULL: no valid rewrite)
    reasons        JSON,                  -- why the original is unethical
    chosen_reasons JSON,                  -- the re-judgement's reasons
    kept           BOOLEAN NOT NULL,      -- the rewrite was judged ethical: a dpo pair
    reason         VARCHAR NOT NULL,
    rewrite_key    VARCHAR,
    PRIMARY KEY (generation, item_id, framework)
);
CREATE TABLE IF NOT EXISTS consents (     -- the consent gate: each judge's answer per training example
    generation INTEGER NOT NULL,
    split      VARCHAR NOT NULL,          -- sft | dpo
    example_id VARCHAR NOT NULL,          -- sft: passage id; dpo: ITEM_ID:FRAMEWORK
    judge      VARCHAR NOT NULL,
    status     VARCHAR NOT NULL,          -- accepted | rejected (no valid answer)
    consent    VARCHAR,                   -- yes | no
    veto       BOOLEAN NOT NULL,          -- excluded by this judge (a no, or no answer under on_invalid = veto)
    trait      VARCHAR,                   -- the persona or trait training on it would reinforce
    trait_tag  VARCHAR,
    reasons    JSON,
    reason     VARCHAR,
    attempts   INTEGER NOT NULL,
    call_key   VARCHAR,
    PRIMARY KEY (generation, split, example_id, judge)
);
CREATE TABLE IF NOT EXISTS drift_events ( -- consent judges that disagreed on an example
    generation INTEGER NOT NULL,
    split      VARCHAR NOT NULL,
    example_id VARCHAR NOT NULL,
    judges     JSON NOT NULL,             -- the checkpoints that answered
    said       JSON NOT NULL,             -- judge -> {consent, trait_tag, reasons}
    PRIMARY KEY (generation, split, example_id)
);
CREATE TABLE IF NOT EXISTS panel (        -- the ratchet's fixed reference panel, frozen by the first generation
    name             VARCHAR PRIMARY KEY,
    persona          VARCHAR NOT NULL,
    family           VARCHAR NOT NULL,
    engine           JSON NOT NULL,       -- the engine config it runs with
    sampling         JSON NOT NULL,       -- temperature, top_p, repeat_penalty, max_tokens, seed, retries
    model_hash       VARCHAR NOT NULL,    -- sha256 of the model file: a changed file is refused
    since_generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ratchet (      -- the reflection each passage keeps in a generation, and why
    generation        INTEGER NOT NULL,
    passage_id        VARCHAR NOT NULL,
    decision          VARCHAR NOT NULL,   -- new | replaced | unchanged | carried | none
    annotator         VARCHAR,            -- author of the final reflection
    source_generation INTEGER,            -- the generation that wrote it (older when carried forward)
    record            JSON,               -- the final reflection (schemas/annotation.schema.json)
    reflection        VARCHAR,            -- the record rendered with prompts/reflection.jinja (the sft text)
    score             DOUBLE,             -- its panel score (0..1)
    parent_annotator  VARCHAR,
    parent_generation INTEGER,
    parent_score      DOUBLE,             -- the parent's reflection, re-scored by the panel now
    new_annotator     VARCHAR,
    new_score         DOUBLE,             -- this generation's candidate (converged, not vetoed)
    reflection_key    VARCHAR,            -- hash of the final record
    reason            VARCHAR NOT NULL,
    PRIMARY KEY (generation, passage_id)
);
CREATE TABLE IF NOT EXISTS panel_verdicts ( -- every verdict behind a panel score
    generation INTEGER NOT NULL,
    passage_id VARCHAR NOT NULL,
    reflection VARCHAR NOT NULL,          -- hash of the scored record
    critic     VARCHAR NOT NULL,
    verdict    VARCHAR,                   -- survives | revise | reject; NULL: no valid critique
    call_key   VARCHAR
);
CREATE TABLE IF NOT EXISTS builds (
    generation  INTEGER NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    status      VARCHAR NOT NULL,     -- running | finished | failed | interrupted (killed)
    summary     JSON
);
"""


# Documented views (README, "Audit statistics"): users query them with `ratchet sql` or duckdb.
_PASS_RATE_VIEW = """
CREATE OR REPLACE VIEW audit_pass_rate_by_{name} AS
SELECT {keys}, count(*) AS audits, count(*) FILTER (verdict = 'pass') AS passes,
       round(count(*) FILTER (verdict = 'pass') / count(*), 3) AS pass_rate
FROM audits_with_members GROUP BY ALL ORDER BY ALL;
"""

VIEWS_SQL = """
CREATE OR REPLACE VIEW audits_with_members AS
SELECT a.*, coalesce(m.persona, '?') AS persona, coalesce(m.family, '?') AS family
FROM audits a LEFT JOIN members m ON m.name = a.annotator;
""" + "".join(_PASS_RATE_VIEW.format(name=name, keys=keys) for name, keys in [
    ("annotator", "annotator, generation"), ("persona", "persona, generation"),
    ("family", "family, generation"), ("generation", "generation, auditor_kind")]) + """
CREATE OR REPLACE VIEW audit_model_vs_human AS
SELECT generation, count(*) AS both_audited,
       count(*) FILTER (model_verdict <> human_verdict) AS disagreements,
       round(disagreements / both_audited, 3) AS disagreement_rate,
       count(*) FILTER (model_verdict = 'pass' AND human_verdict = 'fail') AS model_too_lenient,
       count(*) FILTER (model_verdict = 'fail' AND human_verdict = 'pass') AS model_too_strict
FROM (SELECT m.generation, m.verdict AS model_verdict, h.verdict AS human_verdict
      FROM audits m JOIN audits h ON h.item = m.item AND h.annotator = m.annotator AND h.generation = m.generation
      WHERE m.auditor_kind = 'model' AND h.auditor_kind = 'human')
GROUP BY ALL ORDER BY ALL;

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

CREATE OR REPLACE VIEW conscience_labels AS
SELECT generation, framework, subject, coalesce(label, 'invalid') AS label, count(*) AS n
FROM judgements GROUP BY ALL ORDER BY ALL;

CREATE OR REPLACE VIEW veto_rate_by_judge AS
SELECT generation, judge, split, count(*) AS examples, count(*) FILTER (veto) AS vetoes,
       count(*) FILTER (status <> 'accepted') AS invalid, round(count(*) FILTER (veto) / count(*), 3) AS veto_rate
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
       round(count(*) FILTER (decision = 'carried') / nullif(count(parent_annotator), 0), 4) AS carried_rate
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


@contextmanager
def transaction(con):
    """BEGIN ... COMMIT, or ROLLBACK on any exception (Ctrl-C included)."""
    con.execute("BEGIN")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def replace_generation(con, table: str, generation: int, sql: str, rows: list) -> None:
    """Replace one generation's rows of a table in one transaction."""
    with transaction(con):
        con.execute(f"DELETE FROM {table} WHERE generation = ?", [generation])
        insert_rows(con, sql, rows)


def insert_rows(con, sql: str, rows: list) -> None:
    """executemany that accepts no rows (DuckDB's refuses an empty list)."""
    if rows:
        con.executemany(sql, rows)


class WorkspaceError(Exception):
    pass


class WorkspaceLocked(WorkspaceError):
    pass


class Workspace:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        if not (self.root / CONFIG_NAME).exists():
            raise WorkspaceError(f"{self.root}: not a workspace (no {CONFIG_NAME}); run `ratchet init {root}` or pass --workspace")

    config_path = property(lambda self: self.root / CONFIG_NAME)
    db_path = property(lambda self: self.root / DB_NAME)
    generations_dir = property(lambda self: self.root / "generations")
    logs_dir = property(lambda self: self.root / "logs")

    @cached_property
    def config(self) -> RatchetConfig:
        return load_config(self.config_path)

    def generation_dir(self, generation: int) -> Path:
        return self.generations_dir / f"gen-{generation:04d}"

    def resolve(self, path: str) -> Path:
        return (self.root / path).resolve() if not Path(path).is_absolute() else Path(path)

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        if read_only and not self.db_path.exists():
            raise WorkspaceError(f"{self.db_path}: no state yet; run `ratchet build` first")
        try:
            con = duckdb.connect(str(self.db_path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise WorkspaceLocked(f"{self.root}: workspace is locked: a build is writing {self.db_path.name}; wait for it to finish") from None
            raise
        if not read_only:
            con.execute(SCHEMA_SQL)
            con.execute(VIEWS_SQL)
        return con

    @contextmanager
    def lock(self):
        """Exclusive build lock. flock is released by the kernel when the holder dies,
        so a build killed with `kill -9` never leaves a stale lock behind."""
        path = self.root / LOCK_NAME
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise WorkspaceLocked(f"{self.root}: workspace is locked by another build (pid {holder}); wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
