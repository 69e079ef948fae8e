"""A workspace built by the builder before the stage contract and the engine registry
(commit c61c753, stored in tests/data/legacy-c61c753 with the script that made it), rebuilt by
today's builder: no model call, and every split byte-identical. The stored build used the
scripted engine in place of every model (the script says how); so does the rebuild."""
import dataclasses
import shutil
from pathlib import Path

import pytest

from builder.backends import registry
from builder.backends.scripted import ScriptedBackend
from builder.build import run_build
from builder.workspace import Workspace

from ..conftest import DATA

LEGACY = DATA / "legacy-c61c753"
# That builder wrote absolute corpus paths into the splits (the `source` column): the workspace
# is rebuilt where it was built (tests/data/legacy-c61c753/make.py).
BUILT_AT = Path("/tmp/ratchet-legacy-c61c753")


def restore(root: Path) -> Workspace:
    """The stored workspace with its DuckDB file imported from the exported parquet files."""
    import duckdb

    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(LEGACY / "workspace", root)
    (root / ".ratchet-secret").chmod(0o600)  # git does not keep the mode
    con = duckdb.connect(str(root / "ratchet.duckdb"))
    con.execute((LEGACY / "database" / "schema.sql").read_text())
    for line in (LEGACY / "database" / "load.sql").read_text().splitlines():
        if line.strip():
            con.execute(line.replace("FROM '", f"FROM '{LEGACY / 'database'}/"))
    con.close()
    return Workspace(root)


def split_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("*.parquet"))}


@pytest.fixture
def scripted_everywhere(monkeypatch):
    """Every engine the config names loads the scripted engine, named after its model, as the
    stored build did."""
    for name, engine in list(registry.ENGINES.items()):
        monkeypatch.setitem(registry.ENGINES, name, dataclasses.replace(
            engine, load=lambda cfg: ScriptedBackend(cfg.model), check_model=None))


@pytest.fixture
def legacy_root():
    from filelock import FileLock

    with FileLock(f"{BUILT_AT}.lock"):  # one test run at a time uses the fixed path
        yield BUILT_AT / "workspace"
        shutil.rmtree(BUILT_AT, ignore_errors=True)


def test_a_workspace_built_before_the_refactor_rebuilds_without_a_model_call(legacy_root, scripted_everywhere):
    ws = restore(legacy_root)
    before = {g: split_bytes(ws.generation_dir(g)) for g in (1, 2)}
    assert all(before.values())
    for generation in (1, 2):
        summary = run_build(ws, generation=generation)
        assert summary["model_calls"] == 0, f"generation {generation} made {summary['model_calls']} model calls"
        assert summary["cached_calls"] > 100
        assert summary["compiled"].startswith("unchanged")  # the same splits: the folder is left as it was
        assert split_bytes(ws.generation_dir(generation)) == before[generation]
    # Rebuilt into a fresh folder, the splits come out byte-identical too (not merely left alone).
    shutil.rmtree(ws.generation_dir(2))
    summary = run_build(ws, generation=2)
    assert summary["model_calls"] == 0 and summary["compiled"] == "written"
    assert split_bytes(ws.generation_dir(2)) == before[2]
