"""A refused rebuild of a compiled generation leaves DuckDB as it was (#15.6): the folder
generations/gen-NNNN/ and the database never disagree, whether the rebuild is refused at compile
(its splits would change), before any model (the corpus changed), or killed mid-way. On the
scripted engine: this is orchestration."""
import pytest

from builder.backends import scripted
from builder.compile import GenerationImmutable
from builder.build import SNAPSHOT_PREFIX, generation_tables, run_build, snapshot_generation, STAGES
from builder.stages.ratchet import RatchetError
from builder.workspace import Workspace

from .conftest import SHORT_PASSAGES, write_workspace

SCRIPTED = {"backend": "scripted", "model": "bundled:smollm2"}


def state(ws: Workspace) -> dict:
    con = ws.connect(read_only=True)
    try:
        out = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}" WHERE generation = 1').fetchall()))
               for t in generation_tables(STAGES)}
        out["snapshots"] = con.execute("SELECT table_name FROM information_schema.tables "
                                       "WHERE starts_with(table_name, ?)", [SNAPSHOT_PREFIX]).fetchall()
        out["model_calls"] = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
        return out
    finally:
        con.close()


@pytest.fixture
def built(tmp_path):
    ws = Workspace(write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator=SCRIPTED))
    run_build(ws)
    return ws, state(ws), (ws.generation_dir(1) / "manifest.json").read_bytes()


def test_a_rebuild_refused_at_compile_leaves_the_generations_rows_as_they_were(built, monkeypatch):
    ws, before, manifest = built
    assert before["annotations"] and before["ratchet"] and not before["snapshots"]
    con = ws.connect()
    con.execute("DELETE FROM model_calls")  # every call is made again ...
    con.close()
    monkeypatch.setattr(scripted, "_words", lambda text: ["other", "answers", "entirely"])  # ... and answers otherwise
    with pytest.raises(GenerationImmutable, match="splits differ"):
        run_build(ws)
    after = state(ws)
    assert after["model_calls"] > 0  # the rebuild did run its models and write its rows ...
    del after["model_calls"], before["model_calls"]
    assert after == before  # ... and every row of generation 1 is back as it was
    assert (ws.generation_dir(1) / "manifest.json").read_bytes() == manifest


def test_a_changed_corpus_is_refused_before_any_model_runs(built):
    ws, before, _ = built
    with open(ws.root / "corpus" / "c.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"text": "A passage added after generation 1 was compiled."}\n')
    with pytest.raises(RatchetError, match=r"the corpus .* changed since it was built \(1 passage\(s\) added, 0 removed\)"):
        run_build(ws)
    assert state(ws) == before  # no model call, no row


def test_a_killed_rebuild_is_put_back_by_the_next_build(built):
    """kill -9 mid-rebuild leaves the copied rows in the database; the next build (of anything)
    puts them back before it does anything else."""
    ws, before, _ = built
    con = ws.connect()
    snapshot_generation(con, 1, generation_tables(STAGES))
    con.execute("DELETE FROM annotations WHERE generation = 1")  # what the killed rebuild had got to
    con.execute("UPDATE ratchet SET score = -1 WHERE generation = 1")
    con.close()
    (ws.root / "ratchet.toml").write_text((ws.root / "ratchet.toml").read_text() + "\n[sampling]\nseed = 7\n")
    with pytest.raises(RatchetError, match="ratchet.toml changed"):  # refused before any model ...
        run_build(Workspace(ws.root))  # a fresh Workspace reads the edited config
    assert state(ws) == before  # ... after putting generation 1 back


def test_a_persons_verdict_after_the_build_leaves_the_compiled_generation_as_it_was(tmp_path):
    """The published audit_summary carries the build's own audits only: a person auditing the
    sample afterwards must not make the next `ratchet build` (make demo again) fail as immutable."""
    import json

    from builder.stages.audit import import_verdicts

    ws = Workspace(write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator=SCRIPTED,
                                    audit={"rate": 1.0, "auditor": "bundled:smollm2"}))
    run_build(ws)
    gen = ws.generation_dir(1)
    before = {p.name: p.read_bytes() for p in (gen / "data").iterdir()}
    con = ws.connect()
    item, annotator = con.execute("SELECT item, annotator FROM audits WHERE auditor_kind = 'model' LIMIT 1").fetchone()
    verdict = tmp_path / "review.jsonl"
    verdict.write_text(json.dumps({"item": item, "annotator": annotator, "generation": 1, "verdict": "fail",
                                   "reasons": ["invented claim"]}) + "\n")
    assert import_verdicts(con, verdict, "ana", ws.config) == (1, [])
    con.close()
    again = run_build(ws)
    assert again["model_calls"] == 0
    assert {p.name: p.read_bytes() for p in (gen / "data").iterdir()} == before
    con = ws.connect(read_only=True)
    assert con.execute("SELECT verdict FROM audits WHERE auditor = 'ana'").fetchall() == [("fail",)]
    con.close()
