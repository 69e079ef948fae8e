"""The engine registry: one map from engine name to config and backend. A new engine is one
class and one registry line; a key of another engine is an error naming both; nothing outside
builder/backends/ names an engine."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from builder.backends import registry
from builder.backends.base import Backend, Engine, EngineConfig, Response
from builder.backends.scripted import _Picker, _words, instance
from builder.build import run_build
from builder.config import ConfigError, parse_config
from builder.workspace import Workspace

from ..conftest import REPO, SHORT_PASSAGES, write_workspace


class EchoBackend(Backend):
    """The toy engine: answers every request with a schema-valid record made of the prompt's words."""

    kind = "echo"
    family = "echo"

    class Config(EngineConfig):
        backend: Literal["echo"] = "echo"
        shout: bool = False

    def __init__(self, cfg: "EchoBackend.Config"):
        self.shout = cfg.shout

    model_id = property(lambda self: f"echo:{self.shout}")

    def render(self, messages):
        return "\n".join(m["content"] for m in messages)

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, requests, on_response=None):
        out = []
        for i, r in enumerate(requests):
            words = [w.upper() if self.shout else w for w in _words(r.messages[-1]["content"])]
            out.append(Response(json.dumps(instance(r.schema, words, _Picker(self.render(r.messages)))), "stop"))
            if on_response:
                on_response(i, out[-1])
        return out


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(registry.ENGINES, "echo", None)  # removed again after the test
    return registry.register(Engine("echo", EchoBackend.Config, EchoBackend))  # the one registry line


def test_a_toy_engine_is_one_class_and_one_registry_line(echo, tmp_path):
    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator={"backend": "echo", "shout": True})
    summary = run_build(Workspace(root))
    assert summary["accepted"] == 4 and summary["model_calls"] > 0
    con = Workspace(root).connect(read_only=True)
    assert con.execute("SELECT DISTINCT backend FROM model_calls").fetchall() == [("echo",)]
    record = json.loads(con.execute("SELECT record FROM annotations LIMIT 1").fetchone()[0])
    con.close()
    assert record["reflection"].isupper()  # the engine's own key reached it


def test_a_key_of_another_engine_is_an_error_naming_both():
    with pytest.raises(ConfigError) as err:
        parse_config({"annotator": {"backend": "openai", "base_url": "http://127.0.0.1:9", "slots": 8}}, "ws/ratchet.toml")
    message = str(err.value)
    assert "ws/ratchet.toml" in message and "'annotator.slots' is not a key of engine 'openai'" in message
    assert "llama_server" in message and "base_url" in message  # who has it, and what openai has


def test_a_misspelt_key_or_engine_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'slots'"):
        parse_config({"annotator": {"slot": 2}})
    with pytest.raises(ConfigError, match="did you mean 'llama_cpp'"):
        parse_config({"annotator": {"backend": "lama_cpp"}})
    with pytest.raises(ConfigError, match=r"members\.0\.backend.*did you mean 'openai'"):
        parse_config({"ensemble": {"members": [{"backend": "opnai"}], "k": 0}})


def test_a_member_of_another_engine_inherits_only_the_keys_its_engine_has():
    cfg = parse_config({"annotator": {"n_ctx": 2048, "slots": 2},
                        "ensemble": {"k": 0, "members": [{"persona": "default"},
                                                          {"name": "served", "backend": "openai",
                                                           "base_url": "http://127.0.0.1:9", "model": "m"}]}})
    served = cfg.ensemble.members[1].engine(cfg.annotator)
    assert served.backend == "openai" and served.base_url == "http://127.0.0.1:9" and not hasattr(served, "slots")
    local = cfg.ensemble.members[0].engine(cfg.annotator)
    assert local.n_ctx == 2048 and local.slots == 2
    with pytest.raises(ConfigError, match=r"members\[0\].*'base_url' is not a key of engine 'auto'"):
        parse_config({"ensemble": {"k": 0, "members": [{"base_url": "http://x"}]}})


def test_the_toml_a_user_writes_does_not_change():
    """The starter config (every key of the default engine) still parses, and so does an
    engine config stored by the version before the registry (every engine's keys in one table)."""
    import tomllib

    from builder.config import starter_config

    cfg = parse_config(tomllib.loads(starter_config()))
    assert cfg.annotator.backend == "auto" and cfg.annotator.slots == 4
    old = {"backend": "llama_cpp", "model": "bundled:smollm2", "n_ctx": 4096, "threads": 0, "slots": 4,
           "base_url": "", "concurrency": 4, "dtype": "auto", "constrained": "auto"}
    assert registry.parse_stored(old).model_dump() == {"backend": "llama_cpp", "model": "bundled:smollm2",
                                                       "n_ctx": 4096, "threads": 0, "constrained": "auto"}


def test_every_engine_has_its_own_config_class_and_a_summary():
    for name, e in registry.ENGINES.items():
        assert e.config.model_fields["backend"].default == name
        assert e.summary and e.config is not EngineConfig


# Words that are engine names but mean something else here.
NOT_ENGINES = {("builder/train.py", "transformers"): "the library's package name, in a version stamp",
               ("builder/config.py", "auto"): "train.device = auto (cuda when available)"}


def test_no_engine_is_named_outside_the_backends_package():
    names = set(registry.BUILT_IN)
    found = []
    for path in sorted((REPO / "builder").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("builder/backends/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in NOT_ENGINES:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.ImportFrom) and node.module and any(
                    part in names for part in node.module.split(".")) and "backends" in node.module:
                found.append(f"{rel}:{node.lineno}: imports {node.module}")
    assert found == []


def test_the_engines_doc_lists_every_engine_and_key():
    doc = (REPO / "docs" / "engines.md").read_text()
    for name in registry.ENGINES:
        assert f"`{name}`" in doc, name
        for key in registry.keys_of(name):
            assert f"`{key}`" in doc, (name, key)


def test_an_engine_started_elsewhere_is_the_one_the_default_picked_here():
    """A Ray actor gets the engine the driver runs, not `auto` to resolve again on its node."""
    class Loaded:
        kind = "llama_server"

    cfg = registry.parse({"backend": "auto", "model": "bundled:smollm2", "slots": 2, "n_ctx": 1024})
    loaded = registry.as_loaded(cfg, Loaded())
    assert loaded.backend == "llama_server" and loaded.slots == 2 and loaded.n_ctx == 1024
    explicit = registry.parse({"backend": "scripted", "model": "m"})
    assert registry.as_loaded(explicit, Loaded()) is explicit


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_all_cores_means_the_cores_the_process_may_use():
    """An engine told `threads = 0` under taskset (or a pinned test worker, or a cgroup cpuset)
    starts one thread per core it may run on, not one per core of the machine."""
    code = "from builder.backends.base import usable_cores; print(usable_cores())"
    core = min(os.sched_getaffinity(0))
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(pinned.stdout) == 1
    assert int(free.stdout) == len(os.sched_getaffinity(0))


def test_no_slot_count_means_one_slot_per_thread_of_each_server():
    """`slots = 0`: on CPU a sequence's sampler runs on one of its server's threads, and one slot a
    core decoded fastest (docs/performance.md); the Ray batch size follows the count."""
    from builder.backends.base import usable_cores
    from builder.backends.llama_server import explain, server_slots
    from builder.executors import default_batch_size

    one = registry.parse({"backend": "llama_server", "model": "bundled:smollm2", "slots": 0, "threads": 3})
    assert server_slots(one) == 3 and default_batch_size(one) == 6
    shared = registry.parse({"backend": "llama_server", "model": "bundled:smollm2", "slots": 0, "threads": 4,
                             "replicas": 2})
    assert server_slots(shared) == 2  # two servers of two threads each
    assert default_batch_size(shared) == 8  # twice what both servers keep in flight
    cores = registry.parse({"backend": "llama_server", "model": "bundled:smollm2", "slots": 0})
    assert server_slots(cores) == usable_cores() >= 1
    assert server_slots(registry.parse({"backend": "llama_server", "slots": 5, "threads": 1})) == 5  # as set
    if "llama_server" in explain(one):
        assert "3 slot(s)" in explain(one)
    with pytest.raises(ValueError, match="slots"):
        registry.parse({"backend": "llama_server", "slots": -1})
