"""Blind audit: a secret sample of annotations is checked by auditors; outcomes feed reputation.

Every annotator prompt carries the same audit notice (prompts/audit_notice.txt) and nothing
else about auditing. Which items are audited is decided by an HMAC of (item, annotator,
generation) under a per-workspace secret that no prompt, log line, published file or
training text contains: reproducible for whoever holds the secret, invisible to annotators.
"""
from __future__ import annotations

import csv
import io
import hashlib
import hmac
import json
import os
import secrets
import duckdb
from collections import Counter
from typing import Annotated
from dataclasses import dataclass
from pathlib import Path

from ..config import RatchetConfig, model_short_name
from ..hashes import ANNOTATION_HASH_SQL, CRITIQUE_HASH_SQL
from ..corpus import jsonl_lines
from ..prompts import CLOSE, LINE_MARK, OPEN, Prompts, datamark
from ..resources import load_schema
from ..structured import Outcome, validator_for
from ..tables import Json, Table, doc, insert_rows, transaction
from .base import BuildContext, JudgingTask, Sampling, Stage, run_task
from .reputation import (ANNOTATOR_RECORD, BETA_RECORD_SQL, CRITIC_RECORD, CRITIC_REPUTATION, KINDS,  # noqa: F401
                         REPUTATION, REPUTATION_SQL, critic_record_counts, critic_record_means,
                         refresh_reputations, reputation_means, update_critic_reputation, update_reputation)
from .scrutinize import content_free_record, stage_weights

SECRET_ENV = "RATCHET_AUDIT_SECRET"
SECRET_FILE = ".ratchet-secret"
MIN_SECRET_BYTES = 16


class AuditError(Exception):
    pass


# ---------------------------------------------------------------- the secret and the sample


def create_secret(root: Path) -> Path:
    """A new random secret in ROOT/.ratchet-secret, readable by its owner only (0600)."""
    path = Path(root) / SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    return path


def load_secret(root: Path) -> bytes:
    """The audit secret: $RATCHET_AUDIT_SECRET, else the workspace's secret file (made on first use)."""
    value = os.environ.get(SECRET_ENV)
    source = f"${SECRET_ENV}"
    if value is None:
        path = create_secret(root)
        if path.stat().st_mode & 0o077:
            raise AuditError(f"{path}: the audit secret is readable by others; run `chmod 600 {path}`")
        value, source = path.read_text(encoding="utf-8"), str(path)
    value = value.strip()
    if len(value.encode()) < MIN_SECRET_BYTES:
        # Never echo the value: an error message is a place the secret must not appear.
        raise AuditError(f"{source}: the audit secret is too short (at least {MIN_SECRET_BYTES} characters)")
    return value.encode()


def is_selected(secret: bytes, item: str, annotator: str, generation: int, rate: float) -> bool:
    """Keyed hash of the item's identity only: no prompt, text or model output goes in."""
    digest = hmac.new(secret, f"{item}\x1f{annotator}\x1f{generation}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2**64


def is_critique_selected(secret: bytes, item: str, annotator: str, critic: str, generation: int, rate: float) -> bool:
    """The same keyed hash over a critique's identity, in its own domain: which critiques are
    audited says nothing about which annotations are, and neither depends on any text."""
    return is_selected(secret, f"critique\x1f{item}\x1f{critic}", annotator, generation, rate)


def sample(con, secret: bytes, generation: int, rate: float) -> list[tuple[str, str]]:
    """(item, annotator) of the accepted annotations chosen for audit, in a stable order."""
    rows = con.execute("SELECT passage_id, annotator FROM annotations WHERE generation = ? AND status = 'accepted' "
                       "ORDER BY passage_id, annotator", [generation]).fetchall()
    return [(item, annotator) for item, annotator in rows if is_selected(secret, item, annotator, generation, rate)]


class StaleContent(ValueError):
    """A verdict on text that has changed since the auditor read it."""


@dataclass
class SampledItem:
    item: str
    annotator: str
    passage: str
    record: dict
    content_hash: str | None = None  # of the passage and annotation as read (ANNOTATION_HASH_SQL)
    call_key: str | None = None
    needs_person: str | None = None  # why a judge abstained on it (escalations): first in the queue

    @property
    def key(self) -> tuple[str, str]:
        return self.item, self.annotator


def sampled_items(con, items: list[tuple[str, str]], generation: int) -> list[SampledItem]:
    """Passage and annotation of each sampled (item, annotator), in the sample's order: only
    the sample is read and decoded, not every accepted annotation."""
    if not items:
        return []
    rows = con.execute(f"""SELECT a.passage_id, a.annotator, p.text, a.record, {ANNOTATION_HASH_SQL}, a.call_key
                          FROM annotations a JOIN passages p USING (passage_id)
                          WHERE a.generation = $generation AND a.status = 'accepted'
                            AND a.passage_id IN (SELECT unnest($ids))""",
                       {"generation": generation, "ids": sorted({item for item, _ in items})}).fetchall()
    found = {(r[0], r[1]): SampledItem(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows}
    return [found[key] for key in items if key in found]


def critique_sample(con, secret: bytes, generation: int, rate: float) -> list[tuple[str, str, str]]:
    """(item, annotator, critic) of the valid critiques chosen for audit, in a stable order. The
    grounding verifier's critiques are votes too, so they are sampled like a model critic's."""
    rows = con.execute("SELECT passage_id, annotator, critic FROM critiques WHERE generation = ? AND status = 'accepted' "
                       "ORDER BY passage_id, annotator, critic", [generation]).fetchall()
    return [(item, annotator, critic) for item, annotator, critic in rows
            if is_critique_selected(secret, item, annotator, critic, generation, rate)]


@dataclass
class SampledCritique:
    item: str
    annotator: str
    critic: str
    passage: str
    record: dict  # the annotation the critique is about
    critique: dict  # claim_verdicts, objections, verdict
    content_hash: str | None = None  # of passage, annotation and critique as read (CRITIQUE_HASH_SQL)
    needs_person: str | None = None  # why its critic abstained (escalations.critic): first in the queue

    @property
    def key(self) -> tuple[str, str, str]:
        return self.item, self.annotator, self.critic


def sampled_critiques(con, keys: list[tuple[str, str, str]], generation: int) -> list[SampledCritique]:
    """Passage, annotation and critique of each sampled (item, annotator, critic), in the sample's order."""
    if not keys:
        return []
    rows = con.execute(f"""SELECT c.passage_id, c.annotator, c.critic, p.text, a.record, c.claim_verdicts, c.objections,
                                 c.verdict, {CRITIQUE_HASH_SQL}
                          FROM critiques c JOIN passages p USING (passage_id)
                          JOIN annotations a ON a.generation = c.generation AND a.passage_id = c.passage_id
                                            AND a.annotator = c.annotator
                          WHERE c.generation = $generation AND c.status = 'accepted'
                            AND c.passage_id IN (SELECT unnest($ids))""",
                       {"generation": generation, "ids": sorted({item for item, _, _ in keys})}).fetchall()
    found = {(r[0], r[1], r[2]): SampledCritique(r[0], r[1], r[2], r[3], json.loads(r[4]),
                                                 {"claim_verdicts": json.loads(r[5] or "[]"),
                                                  "objections": json.loads(r[6] or "[]"), "verdict": r[7]}, r[8])
             for r in rows}
    return [found[key] for key in keys if key in found]


# ---------------------------------------------------------------- model auditor


def audit_messages(prompts: Prompts, passage: str, record: dict) -> tuple[dict, ...]:
    values = {"open": OPEN, "close": CLOSE, "line_mark": LINE_MARK}
    return ({"role": "system", "content": prompts.render("audit.system.jinja", **values)},
            {"role": "user", "content": prompts.render("audit.user.jinja", passage=datamark(passage, "line"), **values,
                                                        **record)})


@dataclass
class AuditRow:
    item: str = doc("passage id")
    annotator: str
    generation: int
    auditor: str = doc("a model member name, or the person's name")
    auditor_kind: str = doc("model | human")
    verdict: str = doc("pass | fail")
    reasons: Json | None
    wrong_claims: Json | None = doc("1-based numbers of the claims that misstate the passage")
    pass_prob: float | None = doc("P(pass): the model auditor's under the deciding distribution, a person's 1 or 0",
                                  default=None, added=True)
    content_hash: str | None = doc("hash of the passage and annotation the verdict judged (NULL: recorded before "
                                   "hashes, taken as current); once they change the verdict is stale",
                                   default=None, added=True)
    call_key: str | None = doc("the model call that wrote the judged annotation", default=None, added=True)
    claim_reasons: Json | None = doc("a person's codes and reason for each wrong claim "
                                     "(schemas/claim_reasons.schema.json); one row a claim in `audit_claims`",
                                     default=None, added=True)


AUDITS = Table("audits", AuditRow, key=("item", "annotator", "generation", "auditor", "auditor_kind"),
               extra=("audited_at TIMESTAMP DEFAULT current_timestamp",))


@dataclass
class AuditItemRow:
    item: str
    annotator: str
    generation: int
    by_model: bool
    by_human: bool


AUDIT_ITEMS = Table("audit_items", AuditItemRow, key=("item", "annotator", "generation"),
                    doc="one row per audited item: exact coverage without a per-item GROUP BY over all audits")


@dataclass
class EscalationRow:
    item: str = doc("passage id")
    annotator: str
    generation: int
    judge: str = doc("the judge that abstained: the model auditor's name, `claim judge` or `note judge`")
    p: float = doc("the judge's probability: P(pass) of the auditor, P(unsupported) of the claim or note judge's "
                   "least sure claim or sentence, a critic's likeliest verdict's probability")
    reason: str = doc("what the judge could not decide, as the audit page shows it")
    in_sample: bool = doc("the item is in the secret audit sample; false: a person sees it only because a judge "
                          "abstained, and its verdicts stay out of pass rates (a sample chosen by doubt is not random)")
    critic: str | None = doc("set where what a person must decide is this critic's critique of the annotation (the "
                             "critic abstained: its vote was left out; judge is the critic too); NULL: the annotation",
                             default=None, added=True)

    @property
    def key(self) -> tuple[str, ...]:
        """What a person decides: the annotation, or one critique of it (the audit page's item key)."""
        return (self.item, self.annotator) + ((self.critic,) if self.critic else ())


CLAIM_JUDGE = "claim judge"  # escalations.judge of the claim judge's abstentions (the auditor's: its name)
NOTE_JUDGE = "note judge"  # and of the note judge's (annotations.note_checks)
GATE_JUDGES = (CLAIM_JUDGE, NOTE_JUDGE)  # the judges of the annotate stage's gates: not the model auditor
ESCALATIONS = Table("escalations", EscalationRow, key=("item", "annotator", "generation", "judge"),
                    doc="judgements a model was too unsure to make (judges.abstain_below): for a person to decide "
                        "(Trust or Escalate); the audit page puts these items first")


class AuditorTask(JudgingTask):
    """What the model auditor's tasks share: its sampling and judging config, and the outcome
    itself as the row (the stage builds the audit rows)."""
    what = "audit"

    def __init__(self, prompts: Prompts, config: RatchetConfig, auditor: str):
        super().__init__(Sampling.of(config, config.audit.max_tokens), label=f"{self.what} ({auditor})")
        self.prompts, self.judging = prompts, config.judgements

    def format_output(self, x, outcome: Outcome) -> Outcome:
        return outcome


class AuditTask(AuditorTask):
    """The model auditor checks one sampled annotation against its passage (never learning who
    wrote it); schemas/audit.schema.json, read as P(pass)."""
    schema_name = "audit"
    field, choices = "verdict", ("pass", "fail")

    def content_free(self, text: str) -> SampledItem:
        return SampledItem("content-free", "", text, content_free_record(text))

    def format_input(self, x: SampledItem) -> tuple[dict, ...]:
        return audit_messages(self.prompts, x.passage, x.record)


@dataclass
class CritiqueAuditRow:
    item: str = doc("passage id")
    annotator: str = doc("the annotation's author")
    critic: str = doc("the member whose critique was audited (never shown to the auditor)")
    generation: int
    auditor: str = doc("a model member name, or the person's name")
    auditor_kind: str = doc("model | human")
    verdict: str = doc("right | wrong: was the critique right about the annotation?")
    reasons: Json | None
    right_prob: float | None = doc("P(right): the model auditor's under the deciding distribution, a person's 1 or 0")
    content_hash: str | None = doc("hash of the passage, annotation and critique the verdict judged (NULL: recorded "
                                   "before hashes, taken as current)", default=None, added=True)
    wrong_claims: Json | None = doc("the claims whose verdict the critic got wrong, by number (a person's, from the "
                                    "audit page or an import; the model auditor judges the critique whole)",
                                    default=None, added=True)


CRITIQUE_AUDITS = Table("critique_audits", CritiqueAuditRow,
                        key=("item", "annotator", "critic", "generation", "auditor", "auditor_kind"),
                        extra=("audited_at TIMESTAMP DEFAULT current_timestamp",),
                        doc="audits of a secret sample of critiques: every vote is audited, not only annotations")


def critique_audit_messages(prompts: Prompts, x: SampledCritique) -> tuple[dict, ...]:
    values = {"open": OPEN, "close": CLOSE, "line_mark": LINE_MARK}
    return ({"role": "system", "content": prompts.render("audit_critique.system.jinja", **values)},
            {"role": "user", "content": prompts.render("audit_critique.user.jinja", passage=datamark(x.passage, "line"),
                                                        critique=x.critique, **values, **x.record)})


class CritiqueAuditTask(AuditorTask):
    """The model auditor checks one sampled critique: the passage, the annotation and the
    critique, never who wrote either; schemas/critique_audit.schema.json, read as P(right)."""
    schema_name = "critique_audit"
    field, choices = "verdict", ("right", "wrong")
    what = "audit critiques"

    def content_free(self, text: str) -> SampledCritique:
        return SampledCritique("content-free", "", "", text, content_free_record(text),
                               {"claim_verdicts": ["sound"], "objections": [], "verdict": text or "survives"})

    def format_input(self, x: SampledCritique) -> tuple[dict, ...]:
        return critique_audit_messages(self.prompts, x)


def _model_verdicts(task: AuditorTask, sampled: list, engine, run=None) -> tuple[list[tuple], int, int]:
    """Each sampled item through the auditor, with retries like every model stage (`run`: the
    build's runner, BuildContext.run). Returns (item, outcome, verdict, P(first choice)) of the
    valid verdicts (one read without a distribution counts 1 or 0), the number of audits that
    produced no valid verdict, and the attempts."""
    outcomes = (run or run_task)(task, sampled, engine)
    good = task.choices[0]
    judged = [(x, o, *((o.graded.decided, o.graded.p(good)) if o.graded
                       else (o.record["verdict"], float(o.record["verdict"] == good))))
              for x, o in zip(sampled, outcomes) if o.record]
    return judged, sum(o.record is None for o in outcomes), sum(o.attempts for o in outcomes)


def model_audit(con, items: list[tuple[str, str]], generation: int, engine, prompts: Prompts, config: RatchetConfig,
                auditor: str, run=None) -> tuple[list[AuditRow], int, int]:
    """The sampled annotations audited: (verdicts, audits without a valid verdict, attempts)."""
    judged, failed, attempts = _model_verdicts(AuditTask(prompts, config, auditor), sampled_items(con, items, generation),
                                               engine, run)
    return [AuditRow(x.item, x.annotator, generation, auditor, "model", verdict, o.record["reasons"],
                     sorted(set(o.record["wrong_claims"])), p, x.content_hash, x.call_key)
            for x, o, verdict, p in judged], failed, attempts


def model_audit_critiques(con, keys: list[tuple[str, str, str]], generation: int, engine, prompts: Prompts,
                          config: RatchetConfig, auditor: str, run=None) -> tuple[list[CritiqueAuditRow], int, int]:
    """The sampled critiques audited: (verdicts, audits without a valid verdict, attempts)."""
    judged, failed, attempts = _model_verdicts(CritiqueAuditTask(prompts, config, auditor),
                                               sampled_critiques(con, keys, generation), engine, run)
    return [CritiqueAuditRow(x.item, x.annotator, x.critic, generation, auditor, "model", verdict, o.record["reasons"], p,
                             x.content_hash)
            for x, o, verdict, p in judged], failed, attempts


def store_audits(con, generation: int, rows: list[AuditRow]) -> None:
    AUDITS.insert(con, rows, on_conflict="replace")
    # a replaced verdict's time is the new one's (INSERT OR REPLACE leaves a column it does not name)
    insert_rows(con, "UPDATE audits SET audited_at = current_timestamp WHERE item = ? AND annotator = ? "
                     "AND generation = ? AND auditor = ? AND auditor_kind = ?",
                [[r.item, r.annotator, r.generation, r.auditor, r.auditor_kind] for r in rows])
    insert_rows(
        con,
        "INSERT INTO audit_items VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET "
        "by_model = audit_items.by_model OR excluded.by_model, by_human = audit_items.by_human OR excluded.by_human",
        [[r.item, r.annotator, r.generation, r.auditor_kind == "model", r.auditor_kind == "human"] for r in rows])


def escalate(con, generation: int, secret: bytes, rate: float, cfg: RatchetConfig,
             unsure: list[AuditRow]) -> list[EscalationRow]:
    """The items a person must decide, for this generation (those of an earlier build of it go):
    the sampled annotations the model auditor abstained on (`unsure`: its verdicts, not stored as
    audits), every accepted annotation the claim judge kept a claim of without deciding, and every
    one the note judge kept a note or reflection sentence of without deciding, and every critique
    whose critic was too unsure to vote."""
    rows = [EscalationRow(r.item, r.annotator, generation, r.auditor, r.pass_prob,
                          f"the model auditor was unsure: P(pass) {r.pass_prob:.2f}", True) for r in unsure]
    for item, annotator, record, checks in con.execute(
            "SELECT passage_id, annotator, record, claim_checks FROM annotations WHERE generation = ? "
            "AND status = 'accepted' AND claim_checks IS NOT NULL ORDER BY passage_id, annotator", [generation]).fetchall():
        claims = [c["claim"] for c in json.loads(record)["claims"]]
        open_ = [(claims.index(c["claim"]) + 1, c["p_unsupported"]) for c in json.loads(checks)
                 if c.get("abstain") and c["claim"] in claims]
        if open_:
            p = min((p for _, p in open_), key=lambda p: abs(p - 0.5))
            numbers = ", ".join(str(n) for n, _ in open_)
            rows.append(EscalationRow(item, annotator, generation, CLAIM_JUDGE, p,
                                      f"the claim judge was unsure of claim {numbers}: P(unsupported) {p:.2f}",
                                      is_selected(secret, item, annotator, generation, rate)))
    rows += note_judge_escalations(con, generation, secret, rate) + critic_escalations(con, generation, secret, rate)
    with transaction(con):
        con.execute("DELETE FROM escalations WHERE generation = ?", [generation])
        for r in unsure:  # an earlier build's verdict on the item is not the model's judgement now
            con.execute("DELETE FROM audits WHERE item = ? AND annotator = ? AND generation = ? AND auditor = ? "
                        "AND auditor_kind = 'model'", [r.item, r.annotator, generation, r.auditor])
            con.execute("""UPDATE audit_items SET by_model = EXISTS (
                               SELECT 1 FROM audits a WHERE a.item = audit_items.item AND a.annotator = audit_items.annotator
                               AND a.generation = audit_items.generation AND a.auditor_kind = 'model')
                           WHERE item = ? AND annotator = ? AND generation = ?""", [r.item, r.annotator, generation])
            con.execute("DELETE FROM audit_items WHERE item = ? AND annotator = ? AND generation = ? "
                        "AND NOT by_model AND NOT by_human", [r.item, r.annotator, generation])
        ESCALATIONS.insert(con, rows)
    return rows


def note_judge_escalations(con, generation: int, secret: bytes, rate: float) -> list[EscalationRow]:
    """The accepted annotations holding a sentence the note judge abstained on (it stays: a person
    decides whether the passage bears it), the least sure sentence quoted for the page."""
    rows = []
    for item, annotator, checks in con.execute(
            "SELECT passage_id, annotator, note_checks FROM annotations WHERE generation = ? AND status = 'accepted' "
            "AND note_checks IS NOT NULL ORDER BY passage_id, annotator", [generation]).fetchall():
        open_ = [c for c in json.loads(checks) if c["verdict"] == "abstain"]
        if open_:
            least = min(open_, key=lambda c: abs(c["p_unsupported"] - 0.5))
            more = f" and {len(open_) - 1} more sentence(s)" if len(open_) > 1 else ""
            rows.append(EscalationRow(item, annotator, generation, NOTE_JUDGE, least["p_unsupported"],
                                      f"the note judge was unsure whether the passage says \"{least['text']}\" "
                                      f"({least['field']}){more}: P(unsupported) {least['p_unsupported']:.2f}",
                                      is_selected(secret, item, annotator, generation, rate)))
    return rows


def critic_escalations(con, generation: int, secret: bytes, rate: float) -> list[EscalationRow]:
    """The critiques whose critic abstained (critiques.abstain): not votes; a person says whether
    the critique is right, as for any critique in the sample."""
    rows = []
    for item, annotator, critic, probs in con.execute(
            "SELECT passage_id, annotator, critic, coalesce(calibrated, probs) FROM critiques WHERE generation = ? "
            "AND status = 'accepted' AND abstain ORDER BY passage_id, annotator, critic", [generation]).fetchall():
        ranked = sorted(json.loads(probs).items(), key=lambda kv: -kv[1])
        spread = ", ".join(f"{v} {p:.2f}" for v, p in ranked)
        rows.append(EscalationRow(item, annotator, generation, critic, ranked[0][1],
                                  f"the critic was unsure of its verdict ({spread}): its vote was left out",
                                  is_critique_selected(secret, item, annotator, critic, generation, rate), critic))
    return rows


def escalated(con, generation: int) -> dict[tuple[str, str], str]:
    """(item, annotator) -> why a person must decide it, the least sure judgement first."""
    if not ESCALATIONS.exists(con):
        return {}
    rows = con.execute("SELECT item, annotator, string_agg(reason, '; ' ORDER BY judge) FROM escalations "
                       "WHERE generation = ? AND critic IS NULL GROUP BY ALL ORDER BY min(abs(p - 0.5)), item, annotator",
                       [generation]).fetchall()
    return {(item, annotator): why for item, annotator, why in rows}


def escalated_critiques(con, generation: int) -> dict[tuple[str, str, str], str]:
    """(item, annotator, critic) -> why a person must decide the critique, the least sure first."""
    if not ESCALATIONS.exists(con):
        return {}
    rows = con.execute("SELECT item, annotator, critic, reason FROM escalations WHERE generation = ? "
                       "AND critic IS NOT NULL ORDER BY p, item, annotator, critic", [generation]).fetchall()
    return {(item, annotator, critic): why for item, annotator, critic, why in rows}


def people_on_kept(con) -> dict[int, tuple[int, int]]:
    """generation -> (verdicts, passes) of people on the reflections it kept (selected for sft), in
    the secret sample and on current text: the share of kept reflections a person found faithful."""
    try:
        rows = con.execute("""SELECT a.generation, count(*), count(*) FILTER (verdict = 'pass') FROM audits_in_sample a
                              JOIN selections s ON s.generation = a.generation AND s.passage_id = a.item
                              AND s.annotator = a.annotator
                              WHERE a.auditor_kind = 'human' GROUP BY a.generation""").fetchall()
    except duckdb.CatalogException:  # a workspace an older builder made, opened read-only: its views come later
        return {}
    return {g: (n, passes) for g, n, passes in rows}


def faithful_per_minute(verdicts: int, passes: int, kept: int, seconds: float) -> str:
    """Faithful kept reflections per minute of build, as people's verdicts on a random share of the
    kept ones put it; what nobody has read is said, never guessed."""
    if not verdicts:
        return "no person has audited a kept reflection yet (ratchet audit serve)"
    rate = kept * passes / verdicts / (seconds / 60) if seconds else 0.0
    return (f"{passes} of {verdicts} people's verdicts on kept reflections pass: about {kept * passes / verdicts:.1f} "
            f"of {kept} kept are faithful, {rate:.2f} per minute of build")


def withdraw_audit(con, item: str, annotator: str, generation: int, auditor: str,
                   previous: AuditRow | None = None) -> None:
    """Take back a person's verdict (the audit page's undo): their earlier verdict on the item is
    put back when there was one, else the row goes and the item's coverage is recounted."""
    key = [item, annotator, generation]
    con.execute("DELETE FROM audits WHERE item = ? AND annotator = ? AND generation = ? AND auditor = ? "
                "AND auditor_kind = 'human'", [*key, auditor])
    if previous is not None:
        AUDITS.insert(con, [previous], on_conflict="replace")
    con.execute("""UPDATE audit_items SET by_human = EXISTS (
                       SELECT 1 FROM audits a WHERE a.item = audit_items.item AND a.annotator = audit_items.annotator
                       AND a.generation = audit_items.generation AND a.auditor_kind = 'human')
                   WHERE item = ? AND annotator = ? AND generation = ?""", key)
    con.execute("DELETE FROM audit_items WHERE item = ? AND annotator = ? AND generation = ? "
                "AND NOT by_model AND NOT by_human", key)


# ---------------------------------------------------------------- human auditors


EXPORT_COLUMNS = ["item", "annotator", "generation", "passage", "claims", "reflection", "verdict", "reasons", "wrong_claims",
                  "claim_reasons", "content_hash"]
CRITIQUE_EXPORT_COLUMNS = ["item", "annotator", "critic", "generation", "passage", "claims", "reflection", "critique",
                           "verdict", "reasons", "wrong_claims", "content_hash"]
CHANGED = ("the text changed since it was exported (a rebuild): this verdict judged text that is gone; export again "
           "and judge the new text")


def numbered_claims(record: dict) -> str:
    return "\n".join(f"{i}. {c['claim']} ({c['kind']}; support: {c['support']})" for i, c in enumerate(record["claims"], 1))


def export_sample(con, secret: bytes, generation: int, rate: float, path: Path) -> int:
    """Write the sampled items for a person to review (.csv or .jsonl): the passage and the
    annotation, numbered claims, and empty verdict / reasons / wrong_claims / claim_reasons
    (optional: JSON, see schemas/claim_reasons.schema.json) to fill in."""
    out = [{"item": x.item, "annotator": x.annotator, "generation": generation, "passage": x.passage,
            "claims": numbered_claims(x.record), "reflection": x.record["reflection"], "verdict": "", "reasons": "",
            "wrong_claims": "", "claim_reasons": "", "content_hash": x.content_hash}
           for x in sampled_items(con, sample(con, secret, generation, rate), generation)]
    return write_review(out, Path(path), EXPORT_COLUMNS)


def export_claims(con, path: Path, generation: int | None = None) -> tuple[int, int, int]:
    """Every claim people have judged (the `audit_claims` view, current verdicts only), one JSONL
    row each, labelled `unsupported` where the person called it wrong and `supported` otherwise:
    the format `ratchet validity --labelled` and `ratchet eval-judge --kind grounding` read. A fail
    that names no wrong claim says nothing about which claim was wrong; its claims are left out
    and counted. `in_sample` is false for an item a person saw only because a judge abstained
    (chosen by doubt: filter it out to measure a judge on a random sample). Returns (rows
    written, of them unsupported, claims left out)."""
    where = "c.auditor_kind = 'human'" + (" AND c.generation = ?" if generation else "")
    rows = con.execute(f"""SELECT c.item, c.annotator, c.generation, c.auditor, p.text, c.claim, c.claim_text,
                                  c.evidence, c.wrong, c.codes, c.reason,
                                  c.verdict = 'fail' AND json_array_length(a.wrong_claims) = 0 AS unnamed,
                                  NOT EXISTS (SELECT 1 FROM escalations e WHERE NOT e.in_sample AND e.item = c.item
                                              AND e.annotator = c.annotator AND e.generation = c.generation
                                              AND e.critic IS NULL) AS drawn
                           FROM audit_claims c JOIN passages p ON p.passage_id = c.item
                           JOIN audits a ON a.item = c.item AND a.annotator = c.annotator
                               AND a.generation = c.generation AND a.auditor = c.auditor
                               AND a.auditor_kind = c.auditor_kind
                           WHERE {where}
                           ORDER BY c.generation, c.item, c.annotator, c.auditor, c.claim""",
                       [generation] if generation else []).fetchall()
    out = [{"passage_id": item, "passage": text, "claim": claim, "evidence": evidence,
            "label": "unsupported" if wrong else "supported", "annotator": annotator, "generation": g,
            "auditor": auditor, "claim_number": n, "codes": codes or [], "reason": reason, "in_sample": drawn}
           for item, annotator, g, auditor, text, n, claim, evidence, wrong, codes, reason, unnamed, drawn in rows
           if not unnamed]
    if out:  # nothing judged yet: no empty file
        Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return len(out), sum(r["label"] == "unsupported" for r in out), len(rows) - len(out)


def export_critique_sample(con, secret: bytes, generation: int, rate: float, path: Path) -> int:
    """Write the sampled critiques for a person to review: the passage, the annotation and the
    critique (one verdict per claim, objections, its verdict), with empty verdict (right/wrong)
    reasons and wrong_claims (the claims whose verdict the critic got wrong) to fill in."""
    out = []
    for x in sampled_critiques(con, critique_sample(con, secret, generation, rate), generation):
        c = x.critique
        critique = "\n".join([*(f"claim {i}: {v}" for i, v in enumerate(c["claim_verdicts"], 1)),
                              *(f"objection: {o}" for o in c["objections"]), f"verdict: {c['verdict']}"])
        out.append({"item": x.item, "annotator": x.annotator, "critic": x.critic, "generation": generation,
                    "passage": x.passage, "claims": numbered_claims(x.record), "reflection": x.record["reflection"],
                    "critique": critique, "verdict": "", "reasons": "", "wrong_claims": "",
                    "content_hash": x.content_hash})
    return write_review(out, Path(path), CRITIQUE_EXPORT_COLUMNS)


def write_review(rows: list[dict], path: Path, columns: list[str]) -> int:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise AuditError(f"{path}: use a .csv or .jsonl file name")
    return len(rows)


def _read_rows(path: Path):
    """(where, row dict or None, problem) per data row; where is "LINE" or, in CSV, whose
    fields may span lines, "LINE (row N)"."""
    if path.suffix not in (".csv", ".jsonl"):
        raise AuditError(f"{path}: use a .csv or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuditError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise AuditError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(jsonl_lines(text), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"not valid JSON ({exc.msg})"
                    continue
                if isinstance(row, dict):
                    yield lineno, row, None
                else:
                    yield lineno, None, "not a JSON object"
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))  # csv splits records itself, quotes respected
        for n, row in enumerate(reader, 1):
            yield f"{reader.line_num} (row {n})", row, None


def _as_list(value, cast) -> list:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return [cast(v) for v in value]
    separator = ";" if cast is str else ","
    return [cast(v.strip()) for v in str(value).split(separator) if v.strip()]


def _verdict_and_generation(row: dict, columns: tuple[str, ...], allowed: tuple[str, str], hint: str = "") -> tuple:
    """The verdict (one of `allowed`) and the generation of a person's row, or ValueError."""
    missing = [c for c in (*columns, "generation", "verdict") if not str(row.get(c) or "").strip()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    verdict = str(row["verdict"]).strip().lower()
    if verdict not in allowed:
        raise ValueError(f"verdict {row['verdict']!r} is not {' or '.join(allowed)}{hint}")
    try:
        return verdict, int(row["generation"])
    except ValueError as exc:
        raise ValueError(f"not a number: {exc}") from None


def current_annotations(con, where: str = "", params=None) -> dict[tuple[str, str, int], tuple[str, str | None]]:
    """(item, annotator, generation) -> (content hash, call key) of each accepted annotation now."""
    rows = con.execute(f"""SELECT a.passage_id, a.annotator, a.generation, {ANNOTATION_HASH_SQL}, a.call_key
                           FROM annotations a JOIN passages p USING (passage_id)
                           WHERE a.status = 'accepted' {where}""", params or []).fetchall()
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}


def current_critiques(con, where: str = "", params=None) -> dict[tuple[str, str, str, int], str]:
    """(item, annotator, critic, generation) -> content hash of each valid critique now."""
    rows = con.execute(f"""SELECT c.passage_id, c.annotator, c.critic, c.generation, {CRITIQUE_HASH_SQL}
                           FROM critiques c JOIN passages p USING (passage_id)
                           JOIN annotations a ON a.generation = c.generation AND a.passage_id = c.passage_id
                                             AND a.annotator = c.annotator
                           WHERE c.status = 'accepted' {where}""", params or []).fetchall()
    return {tuple(r[:4]): r[4] for r in rows}


def _current_hash(row: dict, now: str | None) -> str | None:
    """The hash a person's verdict is stored with: the text's hash now, if the row's own (what
    they read) matches it; a row without one (a hand-made file) is taken to judge the text now."""
    seen = str(row.get("content_hash") or "").strip()
    if seen and now and seen != now:
        raise StaleContent(CHANGED)
    return now


def parse_human_row(row: dict, auditor: str, known: dict[tuple[str, str, int], tuple[str, str | None]]) -> AuditRow:
    verdict, generation = _verdict_and_generation(row, ("item", "annotator"), ("pass", "fail"))
    wrong = wrong_claim_numbers(row)
    key = (str(row["item"]).strip(), str(row["annotator"]).strip(), generation)
    if key not in known:
        raise ValueError(f"no accepted annotation {key[0]} by {key[1]} in generation {generation}")
    now, call_key = known[key]
    content_hash = _current_hash(row, now)
    verdict_record = {"verdict": verdict, "reasons": _as_list(row.get("reasons"), str), "wrong_claims": wrong}
    check_against_schema(verdict_record)
    by_claim = claim_reasons(row.get("claim_reasons"), verdict_record["wrong_claims"])
    return AuditRow(key[0], key[1], key[2], auditor, "human", verdict, verdict_record["reasons"],
                    verdict_record["wrong_claims"], float(verdict == "pass"), content_hash, call_key, by_claim or None)


CLAIM_REASONS_EXAMPLE = '[{"claim": 1, "codes": ["invented claim"], "reason": "the passage never says so"}]'


def claim_reasons(value, wrong: list[int]) -> list[dict]:
    """A person's reasons per wrong claim (a list, or its JSON text from a CSV cell), checked
    against schemas/claim_reasons.schema.json, each for a claim among `wrong`, in claim order."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"claim_reasons is not JSON ({exc.msg} at character {exc.pos}); "
                             f"write e.g. {CLAIM_REASONS_EXAMPLE}") from None
    check_against_schema(value, "claim_reasons")
    numbers = [x["claim"] for x in value]
    if len(set(numbers)) < len(numbers):
        raise ValueError(f"claim_reasons names a claim twice: {numbers}")
    if stray := sorted(set(numbers) - set(wrong)):
        raise ValueError(f"claim_reasons gives reasons for claim {', '.join(map(str, stray))}, which wrong_claims "
                         f"does not call wrong")
    return sorted(value, key=lambda x: x["claim"])


def parse_human_critique_row(row: dict, auditor: str, known: dict[tuple[str, str, str, int], str]) -> CritiqueAuditRow:
    verdict, generation = _verdict_and_generation(row, ("item", "annotator", "critic"), ("right", "wrong"),
                                                  " (was the critique right?)")
    key = (str(row["item"]).strip(), str(row["annotator"]).strip(), str(row["critic"]).strip(), generation)
    if key not in known:
        raise ValueError(f"no valid critique of {key[0]} by {key[1]} from {key[2]} in generation {generation}")
    content_hash = _current_hash(row, known[key])
    record = {"reasons": _as_list(row.get("reasons"), str), "verdict": verdict}
    check_against_schema(record, "critique_audit")
    wrong = wrong_claim_numbers(row)
    if verdict == "right" and wrong:
        raise ValueError(f"verdict right, but wrong_claims {wrong} says the critic got claims wrong: "
                         "choose wrong, or leave wrong_claims empty")
    return CritiqueAuditRow(*key[:3], generation, auditor, "human", verdict, record["reasons"], float(verdict == "right"),
                            content_hash, wrong or None)


def wrong_claim_numbers(row: dict) -> list[int]:
    """A row's wrong_claims: claim numbers 1-3 (a list, or '1, 3' from a CSV cell), sorted, once each."""
    try:
        wrong = _as_list(row.get("wrong_claims"), int)
    except ValueError as exc:
        raise ValueError(f"not a number: {exc}") from None
    if any(not 1 <= n <= 3 for n in wrong):
        raise ValueError(f"wrong_claims {wrong} must be claim numbers 1-3")
    return sorted(set(wrong))


def check_against_schema(verdict: dict, schema: str = "audit") -> None:
    """A human verdict meets schemas/SCHEMA.schema.json, as a model auditor's must."""
    error = next(iter(validator_for(load_schema(schema)).iter_errors(verdict)), None)
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the verdict"
        raise ValueError(f"does not match schemas/{schema}.schema.json at {where}: {error.message}")


def store_critique_audits(con, rows: list[CritiqueAuditRow]) -> None:
    CRITIQUE_AUDITS.insert(con, rows, on_conflict="replace")
    # a replaced verdict's time is the new one's (INSERT OR REPLACE leaves a column it does not name)
    insert_rows(con, "UPDATE critique_audits SET audited_at = current_timestamp WHERE item = ? AND annotator = ? "
                     "AND critic = ? AND generation = ? AND auditor = ? AND auditor_kind = ?",
                [[r.item, r.annotator, r.critic, r.generation, r.auditor, r.auditor_kind] for r in rows])


def withdraw_critique_audit(con, item: str, annotator: str, critic: str, generation: int, auditor: str,
                            previous: CritiqueAuditRow | None = None) -> None:
    """Take back a person's verdict on a critique (the audit page's undo), their earlier one put back."""
    con.execute("DELETE FROM critique_audits WHERE item = ? AND annotator = ? AND critic = ? AND generation = ? "
                "AND auditor = ? AND auditor_kind = 'human'", [item, annotator, critic, generation, auditor])
    if previous is not None:
        CRITIQUE_AUDITS.insert(con, [previous], on_conflict="replace")


def model_names(con, cfg: RatchetConfig | None = None) -> set[str]:
    """Names that belong to models: the ensemble's members, every model auditor that has audited,
    and the configured one. A person's name must be none of them."""
    names = {n for (n,) in con.execute("SELECT name FROM members").fetchall()}
    for table in ("audits", "critique_audits"):
        names |= {n for (n,) in con.execute(f"SELECT DISTINCT auditor FROM {table} WHERE auditor_kind = 'model'").fetchall()}
    if cfg is not None:
        names |= {m.display_name for m in cfg.ensemble.members}
        if cfg.audit.auditor:
            names.add(f"{model_short_name(cfg.audit.auditor)}-{cfg.audit.persona}")
    return names


def refuse_model_names(con, people: list[str], cfg: RatchetConfig | None = None) -> None:
    """A person's verdicts are stored under their name: one equal to a model's (case aside) would
    mix with, or replace, that model's rows. Refused, naming the clash."""
    taken = {n.casefold(): n for n in model_names(con, cfg)}
    clash = [p for p in people if p.strip().casefold() in taken]
    if clash:
        raise AuditError(f"--auditor {clash[0]}: that is the name of a model ({taken[clash[0].strip().casefold()]}, an "
                         "ensemble member or model auditor); a person's verdicts would mix with its own: choose "
                         "another name")


def import_verdicts(con, path: Path, auditor: str, cfg: RatchetConfig | None = None) -> tuple[int, list[str]]:
    """Read a reviewed export back: annotation verdicts (pass/fail) and, in a row with a critic,
    critique verdicts (right/wrong). Good rows are stored; bad ones come back as 'line N: why',
    among them a row whose content_hash (what the export showed) no longer matches the text.
    An auditor named like a model is refused (refuse_model_names)."""
    refuse_model_names(con, [auditor], cfg)
    known, known_critiques = current_annotations(con), current_critiques(con)
    good: dict[int, list[AuditRow]] = {}
    critiques: dict[int, list[CritiqueAuditRow]] = {}
    problems = []
    for where, row, problem in _read_rows(Path(path)):
        if problem is None:
            try:
                if str(row.get("critic") or "").strip():
                    audit = parse_human_critique_row(row, auditor, known_critiques)
                    critiques.setdefault(audit.generation, []).append(audit)
                else:
                    audit = parse_human_row(row, auditor, known)
                    good.setdefault(audit.generation, []).append(audit)
                continue
            except ValueError as exc:
                problem = str(exc)
        problems.append(f"{path}:{where}: {problem}")
    for generation, rows in good.items():
        store_audits(con, generation, rows)
    for rows in critiques.values():
        store_critique_audits(con, rows)
    if good or critiques:
        refresh_reputations(con, min([*good, *critiques]))
    return sum(len(r) for r in good.values()) + sum(len(r) for r in critiques.values()), problems


# ---------------------------------------------------------------- the stage


class Audit(Stage):
    """Choose the secret samples (annotations, and the critiques that are votes on them), let the
    model auditor check them, update both reputations. Only aggregates leave this stage: they go
    to the summary, the manifest and the card."""
    name = "audit"
    tables = (AUDITS, AUDIT_ITEMS, ESCALATIONS, REPUTATION, CRITIQUE_AUDITS, CRITIC_REPUTATION)

    def run(self, ctx: BuildContext) -> dict:
        g, cfg = ctx.generation, ctx.cfg
        secret = load_secret(ctx.ws.root)
        items = sample(ctx.con, secret, g, cfg.audit.rate)
        critiques = critique_sample(ctx.con, secret, g, cfg.audit.rate)
        failed = attempts = critique_failed = critique_attempts = 0
        unsure: list[AuditRow] = []
        if cfg.audit.auditor and (items or critiques):
            auditor = f"{model_short_name(cfg.audit.auditor)}-{cfg.audit.persona}"
            engine = ctx.judge_engine(cfg.audit.auditor, "audit.auditor")  # often a member's model: reused
            if items:
                rows, failed, attempts = model_audit(ctx.con, items, g, engine, ctx.prompts, cfg, auditor, ctx.run)
                unsure = [r for r in rows if cfg.judges.abstains(r.pass_prob)]
                store_audits(ctx.con, g, [r for r in rows if r not in unsure])
            if critiques:
                rows, critique_failed, critique_attempts = model_audit_critiques(ctx.con, critiques, g, engine,
                                                                                 ctx.prompts, cfg, auditor, ctx.run)
                store_critique_audits(ctx.con, rows)
        escalations = escalate(ctx.con, g, secret, cfg.audit.rate, cfg, unsure)
        reputation = update_reputation(ctx.con, g)
        record = update_critic_reputation(ctx.con, g)
        vote_weight = stage_weights(ctx, g + 1)  # what the next generation's votes weigh
        audits, passes = ctx.con.execute("SELECT count(*), count(*) FILTER (verdict = 'pass') FROM audits_current "
                                         "WHERE generation = ?", [g]).fetchone()
        judged, right = ctx.con.execute("SELECT count(*), count(*) FILTER (verdict = 'right') FROM critique_audits_current "
                                        "WHERE generation = ?", [g]).fetchone()
        return {"audit": {"rate": cfg.audit.rate, "sampled": len(items), "audits": audits,
                          "pass_rate": round(passes / audits, 3) if audits else None, "invalid_verdicts": failed,
                          "abstained": len(unsure),
                          "needs_a_person": {"items": len({e.key for e in escalations}),
                                             "outside_the_sample": len({e.key for e in escalations if not e.in_sample}),
                                             "by_judge": dict(sorted(Counter(e.judge for e in escalations).items()))},
                          "attempts": attempts + critique_attempts,
                          "reputation": {k: round(v, 3) for k, v in sorted(reputation.items())},
                          "critiques": {"sampled": len(critiques), "audits": judged,
                                        "right_rate": round(right / judged, 3) if judged else None,
                                        "invalid_verdicts": critique_failed, "attempts": critique_attempts,
                                        "record": {k: round(v, 3) for k, v in sorted(record.items())}},
                          "vote_weights_from": cfg.audit.vote_weights,
                          "vote_weight": {k: round(v, 3) for k, v in sorted(vote_weight.items())}}}
