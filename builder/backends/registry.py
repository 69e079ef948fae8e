"""The engine registry: the one map from an engine's name (the `backend` key) to its config
class and its backend. `make_backend`, `ratchet status`, `ratchet engines`, the model-file
checks and docs/engines.md all read it; nothing else in the builder names an engine.

Adding an engine is one file and one line: a module in builder/backends/ that defines a
config class (a subclass of `EngineConfig` with `backend: Literal["NAME"]` and its own keys),
a backend (a subclass of `Backend`) and `ENGINE = Engine("NAME", Config, load, ...)`; and its
module name in BUILT_IN below. scripted.py is the smallest one to copy.

A config section is picked by its `backend` key, like a pydantic discriminated union, but
through this map so that an engine registered at run time (a plugin, a test) is a config
choice at once. A key that belongs to another engine is an error that names both.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any

from ..models import ModelNotFound
from .base import Backend, Engine, EngineConfig

BUILT_IN = ["auto", "llama_server", "llama_cpp", "openai", "transformers", "vllm", "scripted"]
DEFAULT = "auto"
# The engine `ratchet build --dry-run` puts in place of every model.
DRY_RUN = "scripted"
# The engine that runs a trained generation (a transformers checkpoint folder) unless told otherwise.
DEFAULT_CHECKPOINT_ENGINE = "transformers"

ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


for _module in BUILT_IN:
    register(importlib.import_module(f"{__package__}.{_module}").ENGINE)


class UnknownEngine(ValueError):
    pass


def engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(ENGINES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UnknownEngine(f"unknown backend '{name}' ({hint}known: {', '.join(ENGINES)})") from None


def file_model_hash(cfg: EngineConfig) -> str | None:
    """The sha256 a loaded engine would report for its model (describe()["sha256"]) without
    loading it: the file's, for an engine whose model is a GGUF file; None for the others."""
    from ..models import file_sha256, resolve_model

    return file_sha256(resolve_model(cfg.model)) if engine(cfg.backend).model_file == "gguf" else None


def keys_of(name: str) -> list[str]:
    return list(engine(name).config.model_fields)


def owners(key: str) -> list[str]:
    """The engines that have this key."""
    return [name for name, e in ENGINES.items() if key in e.config.model_fields]


def parse(data: Any) -> EngineConfig:
    """An engine section (a dict from TOML, or a config already parsed) as its engine's config.
    A missing `backend` is the default engine."""
    if isinstance(data, EngineConfig):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"an engine section is a table of keys, not {type(data).__name__}")
    name = data.get("backend", DEFAULT)
    return engine(name).config.model_validate({**data, "backend": name})


def parse_stored(data: dict) -> EngineConfig:
    """An engine config stored by an older version (a manifest, the frozen panel), which kept
    every engine's keys in one flat table: the keys its engine does not have are dropped."""
    fields = engine(data.get("backend", DEFAULT)).config.model_fields
    return parse({k: v for k, v in data.items() if k in fields})


def derive(defaults: EngineConfig, **own) -> EngineConfig:
    """An engine config that takes `defaults`' keys where the engine has them and `own` (the
    keys a member, a judge or a loop step sets; None = not set) on top: a member of another
    engine inherits the shared keys (model, threads, n_ctx, ...) and no other."""
    own = {k: v for k, v in own.items() if v is not None}
    name = own.get("backend") or defaults.backend
    fields = engine(name).config.model_fields
    inherited = {k: v for k, v in defaults.model_dump().items() if k in fields}
    cfg = parse({**inherited, **own, "backend": name})
    cfg._log_dir = defaults.log_dir
    return cfg


def make_backend(cfg: EngineConfig) -> Backend:
    """Load the model behind an engine config. Stages never call an engine by name: the
    config picks it here."""
    backend = engine(cfg.backend).load(cfg)
    backend.config = cfg  # what an executor needs to start the same engine elsewhere
    return backend


def as_loaded(cfg: EngineConfig, backend: Backend) -> EngineConfig:
    """The config of the engine that actually runs `backend`: the default engine picks another
    one (the managed server or llama.cpp in-process), so starting `cfg` elsewhere (a Ray actor)
    could pick differently; this names the one it picked here."""
    if cfg.backend == DEFAULT and backend.kind in ENGINES and backend.kind != DEFAULT:
        return derive(cfg, backend=backend.kind)
    return cfg


def check_model(cfg: EngineConfig, who: str) -> None:
    """Raise ModelNotFound naming `who` (a config key) when the engine can tell, before any
    model runs, that its model is missing."""
    check = engine(cfg.backend).check_model
    if check is None:
        return
    try:
        check(cfg.model)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{who}: {exc}") from None


def explain(cfg: EngineConfig) -> str:
    """Which engine runs this config and why (`ratchet status`)."""
    e = engine(cfg.backend)
    return e.explain(cfg) if e.explain else f"{e.name} (backend = {e.name})"


def where(cfg: EngineConfig) -> str:
    """Where this config's model comes from (`ratchet status`)."""
    e = engine(cfg.backend)
    return e.where(cfg) if e.where else f"{cfg.model} ({e.name})"


def checkpoint_engines() -> list[str]:
    """Engines that load a checkpoint folder, as a trained generation is."""
    return [name for name, e in ENGINES.items() if e.model_file == "checkpoint"]
