"""annotate → compile → load with `datasets`, on the real bundled model."""
import json
import subprocess
import sys

import datasets
import pytest

from builder.build import run_build
from builder.compile import split_path
from builder.models import file_sha256, resolve_model
from builder.workspace import Workspace, WorkspaceLocked

from .conftest import SHORT_PASSAGES, write_workspace


def test_summary_counts_every_record(built):
    _, s = built
    assert s["passages"] == 4
    assert s["empty_records"] == 1 and s["duplicate_passages"] == 1
    assert s["accepted"] + s["rejected"] == 4
    assert s["accepted"] >= 2, s["rejection_reasons"]
    assert 0.0 <= s["truncation_rate"] <= 1.0
    # annotation attempts and audits; the ratchet panel is the member itself, which never scores its own
    # reflections, so it makes no call, and every passage with a reflection is counted as unscored
    assert s["model_calls"] == (s["attempts"] + s["audit"]["attempts"] + s["ratchet"]["panel_attempts"]
                                + s["calibration"]["attempts"])
    assert s["ratchet"]["panel_attempts"] == 0 and s["ratchet"]["self_scores_skipped"] == s["ratchet"]["with_reflection"]
    assert s["ratchet"]["unscored"] == s["ratchet"]["with_reflection"] >= 2
    assert s["cached_calls"] == 0


def test_state_lands_in_duckdb(built):
    ws, s = built
    con = ws.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM passages").fetchone()[0] == 4
    statuses = dict(con.execute("SELECT status, count(*) FROM annotations GROUP BY status").fetchall())
    assert statuses.get("accepted", 0) == s["accepted"]
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == s["model_calls"]
    rejected = con.execute("SELECT reason FROM annotations WHERE status = 'rejected'").fetchall()
    assert all(r[0] for r in rejected)  # every rejection keeps its reason
    con.close()


def test_sft_split_interleaves_text_and_internal(built):
    ws, s = built
    sft = datasets.load_dataset("parquet", data_files=str(split_path(ws.generation_dir(1), "sft")), split="train")
    assert len(sft) == s["accepted"]  # one document per JSONL record; each kept reflection follows its text
    for row in sft:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "text" and "internal" in roles
        assert all(a != b or a == "text" for a, b in zip(roles, roles[1:]))
        assert row["messages"][0]["content"] in SHORT_PASSAGES
        assert "<text>" in row["text"] and "<internal>" in row["text"] and "Claims:" in row["text"]


def test_generation_folder_loads_by_config_name_and_card_parses(built):
    from huggingface_hub import DatasetCard

    ws, s = built
    gen = ws.generation_dir(1)
    sft = datasets.load_dataset(str(gen), "sft", split="train")
    annotations = datasets.load_dataset(str(gen), "annotations", split="train")
    assert len(sft) == s["accepted"] and len(annotations) == 4
    accepted = [a for a in annotations if a["status"] == "accepted"]
    assert all(a["claims"] and a["claims"][0]["kind"] in {"fact", "opinion", "value", "prediction"} for a in accepted)
    card = DatasetCard.load(gen / "README.md")
    assert {c["config_name"] for c in card.data.configs} == {"sft", "annotations", "audit_summary"}
    assert "text-generation" in card.data.task_categories
    # The audit split holds aggregates per annotator, never which passages were audited.
    audit = datasets.load_dataset(str(gen), "audit_summary", split="train")
    assert audit["annotator"] == ["smollm2"] and audit["accepted"] == [s["accepted"]]
    assert audit["audits"] == [s["audit"]["sampled"]]
    ids = {a["passage_id"] for a in annotations}
    assert not any(str(v) in ids for row in audit for v in row.values())


def test_manifest_pins_model_prompts_and_config(built):
    ws, s = built
    manifest = json.loads((ws.generation_dir(1) / "manifest.json").read_text())
    assert manifest["models"]["smollm2"]["sha256"] == file_sha256(resolve_model("bundled:smollm2"))
    assert set(manifest["prompt_hashes"]) >= {"annotate.system.jinja", "audit_notice.txt"}
    assert len(manifest["config_hash"]) == 64
    assert manifest["counts"]["passages"] == 4


def test_rebuild_makes_zero_model_calls_and_identical_files(built):
    ws, s = built
    gen = ws.generation_dir(1)
    before = {p.name: p.read_bytes() for p in (gen / "data").iterdir()}
    again = run_build(ws)
    assert again["model_calls"] == 0
    assert again["cached_calls"] == (s["attempts"] + s["audit"]["attempts"] + s["ratchet"]["panel_attempts"]
                                     + s["calibration"]["attempts"])
    assert {p.name: p.read_bytes() for p in (gen / "data").iterdir()} == before


def test_second_build_on_a_locked_workspace_is_refused(built, tmp_path):
    ws, _ = built
    with ws.lock():
        with pytest.raises(WorkspaceLocked, match="workspace is locked"):
            run_build(ws)
        proc = subprocess.run([sys.executable, "-m", "builder.cli", "build", "--workspace", str(ws.root)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "workspace is locked" in proc.stderr


def test_output_cut_off_by_the_token_limit_is_a_counted_rejection(tmp_path):
    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES[:2], sampling={"max_tokens": 12}, annotate={"retries": 1})
    s = run_build(Workspace(root))
    assert s["accepted"] == 0 and s["rejected"] == 2
    assert s["truncation_rate"] == 1.0
    assert list(s["rejection_reasons"]) == ["truncated"]
    gen = Workspace(root).generation_dir(1)
    manifest = json.loads((gen / "manifest.json").read_text())
    assert "sft" not in manifest["splits"]  # `datasets` cannot load an empty split: not published
    # Same folder name (gen-0001) as the shared build, other rows: `datasets` must not serve
    # the other workspace's cached copy.
    annotations = datasets.load_dataset(str(gen), "annotations", split="train")
    assert [a["status"] for a in annotations] == ["rejected", "rejected"]


def test_bad_corpus_file_writes_nothing(tmp_path):
    from builder.corpus import CorpusError

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES[:1])
    (root / "corpus" / "bad.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CorpusError, match="bad.txt"):
        run_build(Workspace(root))
    con = Workspace(root).connect(read_only=True)
    assert con.execute("SELECT count(*) FROM passages").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0
    con.close()
    assert not (root / "generations" / "gen-0001").exists()


def test_corpus_of_only_empty_records_is_an_error_before_anything_is_written(tmp_path):
    """Not an empty generation that `publish` later calls broken (#15.8)."""
    root = write_workspace(tmp_path / "ws", ["", "   ", "\n\n"])
    out = subprocess.run([sys.executable, "-m", "builder.cli", "build", "-w", str(root)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "no passage to annotate (3 record(s) read from 1 file(s), 3 of them empty)" in out.stdout + out.stderr
    con = Workspace(root).connect(read_only=True)
    assert con.execute("SELECT count(*) FROM passages").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0
    con.close()
    assert not (root / "generations" / "gen-0001").exists()
