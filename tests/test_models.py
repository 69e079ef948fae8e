"""Bundled models assembled from chunk packages (builder/models.py): the real Qwen files, and
the errors a missing part or a wrong byte gives."""
import dataclasses
import hashlib
import sys

import pytest

from builder import models
from builder.models import CHUNKED, ModelNotFound, assemble_chunked, file_sha256, resolve_model


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_the_bundled_qwen_models_assemble_to_the_official_files(name):
    path = resolve_model(f"bundled:{name}")
    c = CHUNKED[name]
    assert path.stat().st_size == c.size and file_sha256(path) == c.sha256
    assert path.read_bytes()[:4] == b"GGUF"
    assert resolve_model(f"bundled:{name}") == path  # assembled once, then reused


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Two made-up part packages on sys.path, and a model cache of the test's own."""
    for i, data in enumerate([b"GGUF-first-", b"second"], 1):
        folder = tmp_path / "site" / f"fakepart{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("RATCHET_MODEL_CACHE", str(tmp_path / "cache"))
    whole = b"GGUF-first-second"
    spec = models.Chunked("fake.gguf", "fakepart{i}", "fake-part{i}", "1.0", 2, len(whole),
                          hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(CHUNKED, "fake", spec)
    return spec


def test_parts_are_concatenated_in_order_into_the_cache(fake_parts, tmp_path):
    out = assemble_chunked("fake")
    assert out == tmp_path / "cache" / "fake.gguf" and out.read_bytes() == b"GGUF-first-second"
    assert "fakepart1" not in sys.modules  # located, never imported


def test_a_wrong_checksum_names_the_packages_and_leaves_no_file(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setitem(CHUNKED, "fake", dataclasses.replace(fake_parts, sha256="0" * 64))
    with pytest.raises(ModelNotFound, match=r"fake-part1\.\.2 has sha256 .* expected 0{64}: reinstall"):
        assemble_chunked("fake")
    assert not list((tmp_path / "cache").iterdir())


def test_a_missing_part_names_the_package_to_install(fake_parts, monkeypatch):
    monkeypatch.setitem(CHUNKED, "fake", dataclasses.replace(fake_parts, parts=3))
    with pytest.raises(ModelNotFound, match=r"install fake-part3==1\.0"):
        assemble_chunked("fake")


def test_a_gguf_is_exported_once_per_machine_and_trained_from_a_copy(hf_smollm2, tmp_path):
    """The session's SmolLM2 checkpoint is the model cache's export, keyed by the GGUF's sha256;
    asking again exports nothing, and a workspace's base model is its own copy of it."""
    from builder.models import exported, weights_sha256
    from builder.train import base_checkpoint
    from builder.workspace import Workspace

    gguf = resolve_model("bundled:smollm2")
    assert hf_smollm2.parent == models.model_cache() / "hf" and file_sha256(gguf)[:16] in hf_smollm2.name
    stamps = {p.name: p.stat().st_mtime_ns for p in hf_smollm2.iterdir()}
    assert exported(gguf) == hf_smollm2 and {p.name: p.stat().st_mtime_ns for p in hf_smollm2.iterdir()} == stamps
    (tmp_path / "ratchet.toml").write_text("")
    ws = Workspace(tmp_path)
    base, source = base_checkpoint(ws, "bundled:smollm2")
    assert base == tmp_path / "models" / "base" and source["sha256"] == file_sha256(gguf)
    assert weights_sha256(base) == weights_sha256(hf_smollm2)
    assert not any(a.samefile(b) for a in base.glob("*.safetensors") for b in hf_smollm2.glob("*.safetensors"))


def test_training_args_say_gradient_checkpointing_either_way():
    """TRL's configs default to gradient_checkpointing = True (and bf16 = True): the project's
    `false` defaults must reach the trainer as `false`."""
    from trl import SFTConfig

    from builder.config import TrainConfig
    from builder.train import common_args

    args = SFTConfig(**common_args(TrainConfig(), "/tmp/unused"))
    assert args.gradient_checkpointing is False and args.bf16 is False
    assert SFTConfig(**common_args(TrainConfig(gradient_checkpointing=True), "/tmp/unused")).gradient_checkpointing
