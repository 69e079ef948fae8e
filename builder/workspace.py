"""A workspace: one folder with `ratchet.toml`, one DuckDB file holding all state, and the
compiled generations. Builds take an exclusive lock so two never write at once."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import duckdb

from .catalog import create_schema, schema_sql  # noqa: F401 - `ratchet sql`, tests
from .config import CONFIG_NAME, RatchetConfig, load_config
from .tables import insert_rows, transaction  # noqa: F401 - where callers above the stages expect them

DB_NAME = "ratchet.duckdb"
LOCK_NAME = ".ratchet.lock"

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

    def connect(self, read_only: bool = False, sandboxed: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection to the workspace's DuckDB file. `sandboxed` (for queries a user types):
        no file outside the database can be read or written (COPY, read_csv, ATTACH, extensions)."""
        if read_only and not self.db_path.exists():
            raise WorkspaceError(f"{self.db_path}: no state yet; run `ratchet build` first")
        config = {"enable_external_access": False} if sandboxed else {}
        try:
            con = duckdb.connect(str(self.db_path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise WorkspaceLocked(f"{self.root}: workspace is locked: a build is writing {self.db_path.name}; wait for it to finish") from None
            raise
        if not read_only:
            create_schema(con)
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
