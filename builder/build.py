"""`ratchet build`: one generation of one workspace, as a list of stages run over one context.

Each stage (builder/stages/) reads what the earlier ones left in the context, writes its own
tables and returns its metrics; the model work of every stage goes through one runner
(stages/base.py) and one executor seam (executors.py). To add a stage: write one class (see
docs/architecture.md) and put it in STAGES where it belongs.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .compile import Compile
from .config import ConfigError, RatchetConfig
from .ensemble import Ensemble
from .executors import Executor, make_executor
from .prompts import Prompts
from .stages.annotate import Annotate
from .stages.audit import Audit
from .stages.base import BuildContext, Stage
from .stages.conscience import Conscience
from .stages.consent import ConsentGate
from .stages.converge import Converge
from .stages.ingest import Ingest
from .stages.ratchet import Ratchet
from .stages.scrutinize import Scrutinize
from .tables import Json, Table, transaction

if TYPE_CHECKING:  # the workspace is above the pipeline: it creates the tables the stages declare
    from .workspace import Workspace

# The build, in order. Consent sees the converged reflections and the conscience's DPO pairs;
# the ratchet sees what consent let through; the audit comes after everything published is
# decided (its sample is secret); compile writes what the others stored.
STAGES: list[Stage] = [Ingest(), Annotate(), Scrutinize(), Converge(), Conscience(), ConsentGate(), Ratchet(),
                       Audit(), Compile()]


@dataclass
class BuildRow:
    generation: int
    started_at: datetime
    finished_at: datetime | None
    status: str  # running | finished | failed | interrupted (killed)
    summary: Json | None


BUILDS = Table("builds", BuildRow, doc="every build of a generation: running | finished | failed | interrupted")


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


# ---------------------------------------------------------------- a rebuild that leaves no trace
# Rebuilding a compiled generation writes its rows stage by stage and may be refused only at
# compile (its splits would change). So the generation's rows are copied aside first, into real
# tables (a `kill -9` mid-rebuild leaves them for the next build to put back), and put back
# unless the rebuild compiles: DuckDB and generations/gen-NNNN/ never disagree.
SNAPSHOT_PREFIX = "rebuild_snapshot__"


def generation_tables(stages: Sequence[Stage]) -> list[str]:
    """The stages' tables that hold rows per generation."""
    return sorted({t.name for stage in stages for t in stage.tables if "generation" in t.names})


def snapshot_generation(con, generation: int, tables: list[str]) -> None:
    with transaction(con):
        con.execute(f'CREATE OR REPLACE TABLE "{SNAPSHOT_PREFIX}meta" AS SELECT ?::INTEGER AS generation, '
                    '?::VARCHAR[] AS tables', [generation, tables])
        for t in tables:
            con.execute(f'CREATE OR REPLACE TABLE "{SNAPSHOT_PREFIX}{t}" AS SELECT * FROM "{t}" WHERE generation = ?',
                        [generation])


def drop_snapshot(con) -> None:
    names = [n for (n,) in con.execute("SELECT table_name FROM information_schema.tables "
                                       "WHERE starts_with(table_name, ?)", [SNAPSHOT_PREFIX]).fetchall()]
    with transaction(con):
        for n in names:
            con.execute(f'DROP TABLE "{n}"')


def restore_snapshot(con) -> int | None:
    """Put back the rows a refused, failed or killed rebuild replaced; the generation, or None."""
    found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                        [f"{SNAPSHOT_PREFIX}meta"]).fetchone()[0]
    if not found:
        return None
    generation, tables = con.execute(f'SELECT generation, tables FROM "{SNAPSHOT_PREFIX}meta"').fetchone()
    with transaction(con):
        for t in tables:
            con.execute(f'DELETE FROM "{t}" WHERE generation = ?', [generation])
            con.execute(f'INSERT INTO "{t}" BY NAME SELECT * FROM "{SNAPSHOT_PREFIX}{t}"')
    drop_snapshot(con)
    return generation


def run_build(ws: Workspace, generation: int = 1, corpus: str | None = None, progress=None,
              overwrite: bool = False, config: RatchetConfig | None = None, stages: Sequence[Stage] | None = None,
              executor: Executor | None = None, executor_kind: str | None = None) -> dict:
    """Build one generation. `progress` is a rich Progress (or None). Generation 1 ingests the
    corpus; generation N > 1 re-annotates generation N - 1's passages and keeps, per passage,
    the better of the two reflections by the fixed panel (the ratchet). `config` replaces the
    workspace's ratchet.toml for this build (e.g. `ratchet loop` adding the trained model as a
    member); the manifest records the config the build ran with. `stages` replaces STAGES and
    `executor` the one of the config's [executor] section (`executor_kind`, `--executor`, picks
    another kind). Returns the summary."""
    cfg = config or ws.config
    stages = list(STAGES if stages is None else stages)
    unknown = sorted(set(cfg.executor.stages) - {s.name for s in stages})
    if unknown:
        raise ConfigError(f"[executor.stages.{unknown[0]}]: no stage is called '{unknown[0]}' "
                          f"(stages: {', '.join(s.name for s in stages)})")
    owned = executor is None  # made here from the config: closed here (a local Ray cluster stops)
    executor = executor or make_executor(cfg.executor, executor_kind)
    try:
        return _run_build(ws, generation, corpus, progress, overwrite, cfg, stages, executor)
    finally:
        if owned:
            executor.close()


def _run_build(ws: Workspace, generation: int, corpus: str | None, progress, overwrite: bool, cfg: RatchetConfig,
               stages: list[Stage], executor: Executor) -> dict:
    log = build_logger(ws, generation)
    with ws.lock():
        con = ws.connect()
        # We hold the lock, so a build still marked running was killed: say so, and put back what
        # a killed rebuild of a compiled generation had replaced.
        con.execute("UPDATE builds SET status = 'interrupted' WHERE status = 'running'")
        restored = restore_snapshot(con)
        if restored is not None:
            log.warning("put back generation %d's rows, which a killed rebuild had replaced", restored)
        con.execute("INSERT INTO builds VALUES (?, now(), NULL, 'running', NULL)", [generation])
        status, summary = "failed", None
        prompts, rebuilding = None, False
        try:
            prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
            ctx = BuildContext(ws, con, generation, cfg, prompts, log, progress=progress, executor=executor,
                               corpus=corpus, overwrite=overwrite)
            for stage in stages:
                for table in stage.tables:
                    table.create(con)
                stage.prepare(ctx)  # everything that can fail without a model fails here
            rebuilding = ws.generation_dir(generation).exists() and not overwrite
            if rebuilding:
                snapshot_generation(con, generation, generation_tables(stages))
            with Ensemble(cfg) as ensemble, ctx.stack:
                ctx.ensemble = ensemble
                for line in ensemble.warnings():
                    log.warning(line)
                for stage in stages:
                    executor.stage = stage.name  # per-stage executor settings key on it
                    ctx.metrics.update(stage.run(ctx) or {})
            if rebuilding:
                drop_snapshot(con)  # compiled (or identical): the new rows stand
                rebuilding = False
            ctx.metrics["seconds"] = round(time.perf_counter() - ctx.started, 2)
            status = "finished"
            log.info("finished generation %d in %.1fs", generation, ctx.metrics["seconds"])
            summary = {"generation": generation, "parent": generation - 1 if generation > 1 else None,
                       "compiled": "written" if ctx.written else "unchanged (already compiled with identical splits)",
                       "workspace": str(ws.root), "output": str(ctx.output), "database": str(ws.db_path),
                       "card": str(ctx.output / "README.md") if ctx.output else None,
                       "executor": ctx.executor.describe(), **ctx.metrics}
            return summary
        except KeyboardInterrupt:
            status = "interrupted"  # Ctrl-C: every finished call is already in the cache
            log.info("interrupted by the user")
            raise
        finally:
            if rebuilding and restore_snapshot(con) is not None:
                log.info("put back generation %d's rows as they were before this rebuild", generation)
            con.execute("UPDATE builds SET finished_at = now(), status = ?, summary = ? WHERE status = 'running'",
                        [status, json.dumps(summary) if summary else None])
            con.close()


def dry_run(ws: Workspace, corpus: str | None = None, progress=None) -> dict:
    """Generation 1 of this workspace's config with every engine replaced by the scripted one
    (no model), in a throwaway copy of the workspace: the config, the corpus, the prompt files,
    the conscience items and every stage are exercised in seconds, and nothing is written here.
    Passages are measured in words (the scripted engine has no tokenizer), so they may be cut
    a little differently than with the real model."""
    import shutil
    import tempfile

    from .backends import registry
    from .stages.audit import create_secret

    cfg = ws.config
    absolute = {"corpus": {"path": str(ws.resolve(corpus or cfg.corpus.path))},
                "annotate": {"prompts": str(ws.resolve(cfg.annotate.prompts)) if cfg.annotate.prompts else ""},
                "conscience": {"items": str(ws.resolve(cfg.conscience.items)) if cfg.conscience.items else ""}}
    members = [m.model_copy(update={"backend": None, "base_url": None}) for m in cfg.ensemble.members]
    dry = cfg.model_copy(update={
        "annotator": registry.parse({"backend": registry.DRY_RUN, "model": cfg.annotator.model}),
        "ensemble": cfg.ensemble.model_copy(update={"members": members}),
        **{section: getattr(cfg, section).model_copy(update=keys) for section, keys in absolute.items()}})
    root = Path(tempfile.mkdtemp(prefix="ratchet-dry-run-"))
    try:
        shutil.copy2(ws.config_path, root / ws.config_path.name)
        create_secret(root)
        summary = run_build(type(ws)(root), config=dry, progress=progress, executor_kind="local")
        summary.update(dry_run=True, compiled="written to a throwaway copy of the workspace, then deleted")
        return summary
    finally:
        shutil.rmtree(root, ignore_errors=True)
