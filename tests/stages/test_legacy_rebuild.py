"""A workspace built by an older builder (commit c61c753, before the stage contract, graded
judgements and evidence quotes; stored in tests/data/legacy-c61c753 with the script that made
it) under today's builder. The stored build used the scripted engine in place of every model
(the script says how); so do the builds here.

Until graded judgements changed the prompts and the annotation schema, this test rebuilt both
generations with zero model calls and byte-identical splits (it checked the stage-contract
refactor, commit a2441c3). Since then the prompts are not the ones that workspace was built
with: a rebuild is refused before any model runs (the compiled generations are immutable) and
the workspace grows by a next generation instead, re-annotating its passages and ratcheting
against its reflections with the panel it froze."""
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


def test_an_older_workspace_is_refused_a_rebuild_before_any_model_call_and_grows_a_next_generation(
        legacy_root, scripted_everywhere):
    from builder.stages.ratchet import RatchetError

    ws = restore(legacy_root)
    before = {g: split_bytes(ws.generation_dir(g)) for g in (1, 2)}
    con = ws.connect(read_only=True)
    calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    con.close()
    for generation in (1, 2):
        with pytest.raises(RatchetError, match="other prompt or schema files.*annotation.schema.json"):
            run_build(ws, generation=generation)
        assert split_bytes(ws.generation_dir(generation)) == before[generation]
    con = ws.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == calls  # nothing was asked
    con.close()
    summary = run_build(ws, generation=3)
    assert summary["parent"] == 2 and summary["model_calls"] > 0 and summary["passages"] == 30
    r = summary["ratchet"]
    assert r["panel"] == ["gemma3-skeptic", "smollm2-care-ethicist", "smollm2-empiricist"]  # the panel it froze
    assert r["with_parent"] > 0 and r["history"][-1]["generation"] == 3
    assert r["history"][-1]["mean_score"] >= r["history"][-2]["mean_score"]  # the ratchet holds across versions
