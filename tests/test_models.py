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
