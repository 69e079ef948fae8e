"""`ratchet build`: ingest → annotate → compile, for one generation of one workspace."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

from .annotate import AnnotationResult, annotate
from .audit import load_secret, model_audit, sample, store_audits, update_reputation
from .backends import make_backend
from .cache import CachedBackend
from .compile import compile_generation
from .corpus import IngestReport, Passage, ingest
from .config import RatchetConfig
from .prompts import Prompts
from .workspace import Workspace, insert_rows


def build_logger(ws: Workspace, generation: int) -> logging.Logger:
    """One log file per generation in the workspace: a line per model call, no prompt text."""
    ws.logs_dir.mkdir(exist_ok=True)
    log = logging.getLogger(f"ratchet.build.{ws.root}.{generation}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(ws.logs_dir / f"build-gen-{generation:04d}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def store_passages(con, generation: int, passages: list[Passage]) -> None:
    con.execute("BEGIN")
    try:
        insert_rows(
            con, "INSERT OR IGNORE INTO passages (passage_id, source, position, text, n_tokens) VALUES (?,?,?,?,?)",
            [[p.passage_id, p.source, p.position, p.text, p.n_tokens] for p in passages])
        con.execute("DELETE FROM generation_passages WHERE generation = ?", [generation])
        insert_rows(con, "INSERT INTO generation_passages VALUES (?,?,?,?,?)",
                    [[generation, i, p.passage_id, p.source, p.position] for i, p in enumerate(passages)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def store_annotations(con, generation: int, annotator: str, results: list[AnnotationResult]) -> None:
    con.execute("BEGIN")
    try:
        con.execute("DELETE FROM annotations WHERE generation = ? AND annotator = ?", [generation, annotator])
        insert_rows(
            con, "INSERT INTO annotations VALUES (?,?,?,?,?,?,?,?,?)",
            [[generation, r.passage_id, annotator, r.status, r.reason, r.attempts, r.truncated,
              json.dumps(r.record) if r.record is not None else None, r.call_key] for r in results])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def store_member(con, name: str, backend, persona: str) -> None:
    con.execute("INSERT OR REPLACE INTO members VALUES (?,?,?,?,?)",
                [name, backend.family, persona, backend.model_name, backend.kind])


def run_audit(ws: Workspace, con, generation: int, cfg: RatchetConfig, annotator_backend, prompts: Prompts,
              progress, log) -> tuple[dict, list[CachedBackend]]:
    """Choose the secret sample, let the model auditor check it, update reputation.
    Only aggregates leave this function: they go to the summary, the manifest and the card."""
    secret = load_secret(ws.root)
    items = sample(con, secret, generation, cfg.audit.rate)
    engines, failed = [], 0
    if cfg.audit.auditor and items:
        shared = cfg.audit.auditor == cfg.annotator.model
        backend = annotator_backend if shared else make_backend(cfg.annotator.model_copy(update={"model": cfg.audit.auditor}))
        auditor = f"{annotator_name(cfg.audit.auditor)}-{cfg.audit.persona}"
        engine = CachedBackend(backend, con, log)
        engines.append(engine)
        task = progress.add_task(f"audit ({auditor})", total=len(items)) if progress else None
        try:
            rows, failed = model_audit(con, items, generation, engine, prompts, cfg, auditor,
                                       on_progress=(lambda n: progress.advance(task, n)) if progress else None)
        finally:
            if not shared:
                backend.close()
        store_audits(con, generation, rows)
    reputation = update_reputation(con, generation)
    audits, passes = con.execute("SELECT count(*), count(*) FILTER (verdict = 'pass') FROM audits WHERE generation = ?",
                                 [generation]).fetchone()
    return {"rate": cfg.audit.rate, "sampled": len(items), "audits": audits,
            "pass_rate": round(passes / audits, 3) if audits else None, "invalid_verdicts": failed,
            "reputation": {k: round(v, 3) for k, v in sorted(reputation.items())}}, engines


def metrics_of(results: list[AnnotationResult], engines: list[CachedBackend], report: IngestReport, seconds: float) -> dict:
    attempts = sum(r.attempts for r in results)
    reasons = Counter((r.reason or "").split(":")[0] for r in results if r.status == "rejected")
    return {
        "passages": len(results),
        "accepted": sum(r.status == "accepted" for r in results),
        "rejected": sum(r.status == "rejected" for r in results),
        "rejection_reasons": dict(sorted(reasons.items())),
        "attempts": attempts,
        "truncation_rate": round(sum(r.truncated for r in results) / attempts, 4) if attempts else 0.0,
        "model_calls": sum(e.stats.calls for e in engines),
        "cached_calls": sum(e.stats.hits for e in engines),
        "engine_errors": sum(e.stats.errors for e in engines),
        "completion_tokens": sum(e.stats.completion_tokens for e in engines),
        "files": report.files,
        "records": report.records,
        "empty_records": report.empty_records,
        "duplicate_passages": report.duplicates,
        "skipped_files": [f"{f}: {why}" for f, why in report.skipped_files],
        "skipped_records": [f"{s}: {why}" for s, why in report.skipped_records],
        "seconds": round(seconds, 2),
    }


def annotator_name(spec: str) -> str:
    """bundled:smollm2 -> smollm2, /models/x.gguf -> x, org/Llama-3.1-8B (a served model) -> Llama-3.1-8B."""
    return spec.removeprefix("bundled:") if spec.startswith("bundled:") else Path(spec).name.removesuffix(".gguf")


def run_build(ws: Workspace, generation: int = 1, corpus: str | None = None, progress=None) -> dict:
    """Build one generation. `progress` is a rich Progress (or None). Returns the summary."""
    cfg = ws.config
    log = build_logger(ws, generation)
    with ws.lock():
        con = ws.connect()
        started = time.perf_counter()
        # We hold the lock, so a build still marked running was killed: say so.
        con.execute("UPDATE builds SET status = 'interrupted' WHERE status = 'running'")
        con.execute("INSERT INTO builds VALUES (?, now(), NULL, 'running', NULL)", [generation])
        status, summary = "failed", None
        try:
            with make_backend(cfg.annotator) as backend:
                corpus_path = ws.resolve(corpus or cfg.corpus.path)
                passages, report = ingest(corpus_path, cfg.corpus.text_field, cfg.corpus.chunk_tokens,
                                          backend.count_tokens, cfg.corpus.on_bad_file)
                log.info("ingested %d passages from %s", len(passages), corpus_path)
                store_passages(con, generation, passages)
                prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
                engine = CachedBackend(backend, con, log)
                annotator = annotator_name(cfg.annotator.model)
                task = progress.add_task(f"annotate ({annotator})", total=len(passages)) if progress else None
                tick = (lambda n: progress.advance(task, n)) if progress else None
                results = annotate(passages, engine, prompts, cfg, on_progress=tick)
                store_annotations(con, generation, annotator, results)
                store_member(con, annotator, backend, persona="default")
                audit, audit_engines = run_audit(ws, con, generation, cfg, backend, prompts, progress, log)
                metrics = metrics_of(results, [engine, *audit_engines], report, time.perf_counter() - started)
                metrics["audit"] = audit
                models = {annotator: backend.describe()}
                out = compile_generation(ws, con, generation, prompts, models, metrics)
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            status = "finished"
            log.info("finished generation %d in %.1fs", generation, metrics["seconds"])
            summary = {"generation": generation, "workspace": str(ws.root), "output": str(out),
                       "database": str(ws.db_path), "card": str(out / "README.md"), **metrics}
            return summary
        except KeyboardInterrupt:
            status = "interrupted"  # Ctrl-C: every finished call is already in the cache
            log.info("interrupted by the user")
            raise
        finally:
            con.execute("UPDATE builds SET finished_at = now(), status = ?, summary = ? WHERE status = 'running'",
                        [status, json.dumps(summary) if summary else None])
            con.close()

