"""Blind audit: a secret sample of annotations is checked by auditors; outcomes feed reputation.

Every annotator prompt carries the same audit notice (prompts/audit_notice.txt) and nothing
else about auditing. Which items are audited is decided by an HMAC of (item, annotator,
generation) under a per-workspace secret that no prompt, log line, published file or
training text contains: reproducible for whoever holds the secret, invisible to annotators.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from .structured import check_output
from .backends.base import Request
from .config import RatchetConfig
from .prompts import CLOSE, LINE_MARK, OPEN, Prompts, datamark
from .resources import load_schema
from .workspace import insert_rows

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


def sample(con, secret: bytes, generation: int, rate: float) -> list[tuple[str, str]]:
    """(item, annotator) of the accepted annotations chosen for audit, in a stable order."""
    rows = con.execute("SELECT passage_id, annotator FROM annotations WHERE generation = ? AND status = 'accepted' "
                       "ORDER BY passage_id, annotator", [generation]).fetchall()
    return [(item, annotator) for item, annotator in rows if is_selected(secret, item, annotator, generation, rate)]


@dataclass
class SampledItem:
    item: str
    annotator: str
    passage: str
    record: dict


def sampled_items(con, items: list[tuple[str, str]], generation: int) -> list[SampledItem]:
    """Passage and annotation of each sampled (item, annotator), in the sample's order: only
    the sample is read and decoded, not every accepted annotation."""
    if not items:
        return []
    rows = con.execute("""SELECT a.passage_id, a.annotator, p.text, a.record FROM annotations a
                          JOIN passages p USING (passage_id)
                          WHERE a.generation = $generation AND a.status = 'accepted'
                            AND a.passage_id IN (SELECT unnest($ids))""",
                       {"generation": generation, "ids": sorted({item for item, _ in items})}).fetchall()
    found = {(r[0], r[1]): SampledItem(r[0], r[1], r[2], json.loads(r[3])) for r in rows}
    return [found[key] for key in items if key in found]


# ---------------------------------------------------------------- model auditor


def audit_messages(prompts: Prompts, passage: str, record: dict) -> tuple[dict, ...]:
    values = {"open": OPEN, "close": CLOSE, "line_mark": LINE_MARK}
    return ({"role": "system", "content": prompts.render("audit.system.jinja", **values)},
            {"role": "user", "content": prompts.render("audit.user.jinja", passage=datamark(passage, "line"), **values,
                                                        **record)})


@dataclass
class AuditRow:
    item: str
    annotator: str
    auditor: str
    auditor_kind: str  # model | human
    verdict: str
    reasons: list[str] = field(default_factory=list)
    wrong_claims: list[int] = field(default_factory=list)


def model_audit(con, items: list[tuple[str, str]], generation: int, engine, prompts: Prompts, config: RatchetConfig,
                auditor: str, on_progress: Callable[[int], None] | None = None) -> tuple[list[AuditRow], int]:
    """Audit each sampled item once (the auditor never learns who wrote it). Returns the
    verdicts and the number of audits that produced no valid verdict."""
    schema = load_schema("audit")
    validator = jsonschema.Draft202012Validator(schema)
    sampled = sampled_items(con, items, generation)
    s = config.sampling
    requests = [Request(messages=audit_messages(prompts, x.passage, x.record), schema=schema,
                        max_tokens=config.audit.max_tokens, temperature=s.temperature, top_p=s.top_p,
                        repeat_penalty=s.repeat_penalty, seed=s.seed)
                for x in sampled]
    rows: list[AuditRow] = []
    failed = 0

    def on_response(i: int, response) -> None:
        nonlocal failed
        verdict, _reason = check_output(response, validator)
        if verdict is None:
            failed += 1
        else:
            rows.append(AuditRow(sampled[i].item, sampled[i].annotator, auditor, "model", verdict["verdict"],
                                 verdict["reasons"], sorted(set(verdict["wrong_claims"]))))
        if on_progress:
            on_progress(1)

    engine.generate(requests, on_response)
    return rows, failed


def store_audits(con, generation: int, rows: list[AuditRow]) -> None:
    insert_rows(
        con,
        "INSERT OR REPLACE INTO audits (item, annotator, generation, auditor, auditor_kind, verdict, reasons, wrong_claims) "
        "VALUES (?,?,?,?,?,?,?,?)",
        [[r.item, r.annotator, generation, r.auditor, r.auditor_kind, r.verdict, json.dumps(r.reasons),
          json.dumps(r.wrong_claims)] for r in rows])
    insert_rows(
        con,
        "INSERT INTO audit_items VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET "
        "by_model = audit_items.by_model OR excluded.by_model, by_human = audit_items.by_human OR excluded.by_human",
        [[r.item, r.annotator, generation, r.auditor_kind == "model", r.auditor_kind == "human"] for r in rows])


# ---------------------------------------------------------------- reputation


def update_reputation(con, generation: int) -> dict[str, float]:
    """Beta(1 + passes, 1 + fails) posterior of each annotator's pass rate over every audit
    up to this generation; its mean is the annotator's vote weight. Returns name -> mean."""
    con.execute("DELETE FROM reputation WHERE generation = ?", [generation])
    con.execute("""
        INSERT INTO reputation
        SELECT annotator, ?::INTEGER AS generation,
               count(*) FILTER (verdict = 'pass') AS passes, count(*) FILTER (verdict = 'fail') AS fails,
               1 + passes AS alpha, 1 + fails AS beta, alpha / (alpha + beta) AS mean
        FROM audits WHERE generation <= ? GROUP BY annotator""", [generation, generation])
    return dict(con.execute("SELECT annotator, mean FROM reputation WHERE generation = ?", [generation]).fetchall())


# ---------------------------------------------------------------- human auditors


EXPORT_COLUMNS = ["item", "annotator", "generation", "passage", "claims", "reflection", "verdict", "reasons", "wrong_claims"]


def export_sample(con, secret: bytes, generation: int, rate: float, path: Path) -> int:
    """Write the sampled items for a person to review (.csv or .jsonl): the passage and the
    annotation, numbered claims, and empty verdict / reasons / wrong_claims to fill in."""
    out = []
    for x in sampled_items(con, sample(con, secret, generation, rate), generation):
        claims = "\n".join(f"{i}. {c['claim']} ({c['kind']}; support: {c['support']})"
                           for i, c in enumerate(x.record["claims"], 1))
        out.append({"item": x.item, "annotator": x.annotator, "generation": generation, "passage": x.passage,
                    "claims": claims, "reflection": x.record["reflection"], "verdict": "", "reasons": "", "wrong_claims": ""})
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(out)
    else:
        raise AuditError(f"{path}: use a .csv or .jsonl file name")
    return len(out)


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
        for lineno, line in enumerate(text.splitlines(), 1):
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
        reader = csv.DictReader(text.splitlines(keepends=True))
        for n, row in enumerate(reader, 1):
            yield f"{reader.line_num} (row {n})", row, None


def _as_list(value, cast) -> list:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return [cast(v) for v in value]
    separator = ";" if cast is str else ","
    return [cast(v.strip()) for v in str(value).split(separator) if v.strip()]


def parse_human_row(row: dict, auditor: str, known: set[tuple[str, str, int]]) -> AuditRow:
    missing = [c for c in ("item", "annotator", "generation", "verdict") if not str(row.get(c) or "").strip()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    verdict = str(row["verdict"]).strip().lower()
    if verdict not in ("pass", "fail"):
        raise ValueError(f"verdict {row['verdict']!r} is not pass or fail")
    try:
        generation = int(row["generation"])
        wrong = _as_list(row.get("wrong_claims"), int)
    except ValueError as exc:
        raise ValueError(f"not a number: {exc}") from None
    if any(not 1 <= n <= 3 for n in wrong):
        raise ValueError(f"wrong_claims {wrong} must be claim numbers 1-3")
    key = (str(row["item"]).strip(), str(row["annotator"]).strip(), generation)
    if key not in known:
        raise ValueError(f"no accepted annotation {key[0]} by {key[1]} in generation {generation}")
    return AuditRow(key[0], key[1], auditor, "human", verdict, _as_list(row.get("reasons"), str), sorted(set(wrong)))


def import_verdicts(con, path: Path, auditor: str) -> tuple[int, list[str]]:
    """Read a reviewed export back. Good rows are stored; bad ones come back as 'line N: why'."""
    known = {(r[0], r[1], r[2]) for r in con.execute(
        "SELECT passage_id, annotator, generation FROM annotations WHERE status = 'accepted'").fetchall()}
    good: dict[int, list[AuditRow]] = {}
    problems = []
    for where, row, problem in _read_rows(Path(path)):
        if problem is None:
            try:
                audit = parse_human_row(row, auditor, known)
                good.setdefault(int(row["generation"]), []).append(audit)
                continue
            except ValueError as exc:
                problem = str(exc)
        problems.append(f"{path}:{where}: {problem}")
    for generation, rows in good.items():
        store_audits(con, generation, rows)
        update_reputation(con, generation)
    return sum(len(r) for r in good.values()), problems
