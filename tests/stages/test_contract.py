"""The stage contract: a new stage is one class and one line in the stage list; every model
stage runs through one runner (cache, validation, retries, progress), on the scripted engine."""
import json
from dataclasses import dataclass

import pytest

from builder.build import STAGES, run_build
from builder.prompts import datamark
from builder.stages.base import ModelStage
from builder.structured import Outcome
from builder.tables import Table, doc
from builder.workspace import Workspace

from ..conftest import SHORT_PASSAGES, write_workspace

SCRIPTED = {"backend": "scripted", "model": "bundled:smollm2"}


@dataclass
class TitleRow:
    generation: int
    passage_id: str
    title: str | None = doc("a title for the passage; NULL: no valid answer")


TITLES = Table("toy_titles", TitleRow, key=("generation", "passage_id"), register=False)


class Titles(ModelStage):
    """The toy stage: a title per passage, from the first annotator's engine."""
    name = "titles"
    table = TITLES
    max_tokens = 32

    def schema(self, passage) -> dict:
        return {"type": "object", "additionalProperties": False, "required": ["title"],
                "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 40}}}

    def format_input(self, passage) -> tuple[dict, ...]:
        return ({"role": "system", "content": "Give the passage between the marks a short title."},
                {"role": "user", "content": datamark(passage.text)})

    def format_output(self, passage, outcome: Outcome) -> TitleRow:
        return TitleRow(self.ctx.generation, passage.passage_id, outcome.record["title"] if outcome.record else None)


def scripted_workspace(tmp_path, **sections):
    return Workspace(write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator=SCRIPTED, **sections))


def test_a_toy_stage_is_one_class_and_one_line_in_the_stage_list(tmp_path):
    ws = scripted_workspace(tmp_path)
    stages = [*STAGES[:-1], Titles(), STAGES[-1]]  # the one line: before compile
    summary = run_build(ws, stages=stages)
    assert summary["titles"] == {"items": 4, "rows": 4}
    con = ws.connect(read_only=True)
    titles = con.execute("SELECT passage_id, title FROM toy_titles WHERE generation = 1").fetchall()
    con.close()
    assert len(titles) == 4 and all(3 <= len(t) <= 40 for _, t in titles)
    # its calls went through the same cache as every stage's: a rebuild makes none
    again = run_build(ws, stages=stages)
    assert again["model_calls"] == 0 and again["cached_calls"] == summary["model_calls"] + summary["cached_calls"]


def test_the_scripted_engine_is_named_in_the_summary_and_the_manifest(tmp_path):
    ws = scripted_workspace(tmp_path)
    summary = run_build(ws)
    assert summary["scripted_engine"] == ["smollm2"]
    manifest = json.loads((ws.generation_dir(1) / "manifest.json").read_text())
    assert manifest["metrics"]["scripted_engine"] == ["smollm2"]
    assert "scripted engine" in (ws.generation_dir(1) / "README.md").read_text()


def test_a_build_of_real_stages_is_one_list_in_order():
    names = [s.name for s in STAGES]
    assert names == ["ingest", "annotate", "scrutinize", "converge", "conscience", "consent", "ratchet", "audit",
                     "compile"]


def test_the_audit_stage_retries_an_invalid_verdict_like_every_model_stage(tmp_path):
    """The model auditor went around the runner before the stage contract: an invalid verdict
    was lost without a retry. A scripted answers file makes the auditor's first attempt invalid."""
    from builder.backends.scripted import ScriptedBackend
    from builder.stages.audit import AuditTask, SampledItem
    from builder.stages.base import run_task
    from builder.cache import CachedBackend
    from builder.config import RatchetConfig
    from builder.prompts import Prompts
    from builder.workspace import create_schema
    import duckdb

    cfg = RatchetConfig()
    prompts = Prompts()
    item = SampledItem("p1", "m", SHORT_PASSAGES[0], {"claims": [{"claim": "bridge cut times", "kind": "fact",
                                                                 "support": "none", "confidence": "low"}],
                                                      "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [],
                                                      "reflection": "No data is published."})
    task = AuditTask(prompts, cfg, "auditor")
    backend = ScriptedBackend("auditor")
    first = backend.render(task.request(item, 0).messages)
    answers = tmp_path / "answers.jsonl"
    import hashlib

    answers.write_text(json.dumps({"prompt_sha256": hashlib.sha256(first.encode()).hexdigest(), "seed": cfg.sampling.seed,
                                   "text": '{"verdict": "maybe"'}) + "\n")
    con = duckdb.connect()
    create_schema(con)
    engine = CachedBackend(ScriptedBackend("auditor", answers), con)
    [outcome] = run_task(task, [item], engine)
    assert outcome.status == "accepted" and outcome.attempts == 2  # the retry is reseeded, so it gets a new answer
    assert outcome.record["verdict"] in ("pass", "fail")


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_declares_its_tables_and_they_exist_in_a_new_workspace(stage, tmp_path):
    ws = scripted_workspace(tmp_path)
    con = ws.connect()
    existing = {t for t, in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    con.close()
    assert {t.name for t in stage.tables} <= existing
