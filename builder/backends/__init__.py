"""Engines. Stages never import one by name: the config picks it through `make_backend`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from .base import Backend, Request, Response

log = logging.getLogger("ratchet.engine")


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a GGUF model runs on and why (`ratchet status` prints it)."""
    backend: str  # llama_server | llama_cpp
    binary: Path | None
    reason: str

    def describe(self) -> str:
        if self.backend == "llama_server":
            return f"llama-server, managed ({self.binary}; {self.reason})"
        return f"llama.cpp in-process ({self.reason})"


def choose_engine(cfg: ModelConfig) -> EngineChoice:
    """For backend "auto" / "llama_server": the managed llama-server when a binary is found,
    else llama.cpp in-process. Other backends are taken as configured."""
    if cfg.backend == "llama_cpp":
        return EngineChoice("llama_cpp", None, "annotator.backend = llama_cpp")
    if cfg.backend not in ("auto", "llama_server"):
        return EngineChoice(cfg.backend, None, f"backend = {cfg.backend}")
    from .llama_server import find_binary

    found = find_binary(cfg.server_binary)
    if found.path is None:
        return EngineChoice("llama_cpp", None, found.source)
    return EngineChoice("llama_server", found.path, f"found via {found.source}")


def _in_process(cfg: ModelConfig, path: Path, note: str | None = None) -> Backend:
    from .llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(path, n_ctx=cfg.n_ctx, threads=cfg.threads, constrained=cfg.constrained)
    backend.engine_note = note
    return backend


def make_backend(cfg: ModelConfig) -> Backend:
    from ..models import resolve_model

    if cfg.backend == "llama_cpp":
        return _in_process(cfg, resolve_model(cfg.model))
    if cfg.backend in ("auto", "llama_server"):
        path = resolve_model(cfg.model)
        choice = choose_engine(cfg)
        if choice.backend == "llama_server":
            from .llama_server import LlamaServerBackend, ServerStartError

            try:
                return LlamaServerBackend(path, choice.binary, n_ctx=cfg.n_ctx, slots=cfg.slots, threads=cfg.threads,
                                          prompt_cache=cfg.prompt_cache, constrained=cfg.constrained,
                                          # N requests in flight share the cores: each may take N times as long
                                          timeout_s=cfg.timeout_s * cfg.slots, max_retries=cfg.max_retries,
                                          log_dir=cfg.log_dir)
            except ServerStartError as exc:
                note = f"llama-server failed to start: {exc}"
                log.warning("%s\nrunning %s with llama.cpp in-process instead", note, path.name)
                return _in_process(cfg, path, note)
        if cfg.backend == "llama_server":  # asked for explicitly: say why it is not used
            log.warning("backend llama_server: %s; running %s with llama.cpp in-process instead", choice.reason, path.name)
        return _in_process(cfg, path, choice.reason)
    if cfg.backend == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, response_format=cfg.response_format)
    if cfg.backend == "transformers":
        from .transformers import TransformersBackend

        # A relative folder is taken as given: the caller resolves it against the workspace.
        return TransformersBackend(Path(cfg.model), n_ctx=cfg.n_ctx, dtype=cfg.dtype, device=cfg.device,
                                   threads=cfg.threads)
    if cfg.backend == "vllm":
        from .vllm import VLLMBackend

        # A local folder (as given, like transformers) or a Hub id that vLLM downloads.
        return VLLMBackend(cfg.model, n_ctx=cfg.n_ctx, dtype=cfg.dtype,
                           gpu_memory_utilization=cfg.gpu_memory_utilization,
                           tensor_parallel_size=cfg.tensor_parallel_size,
                           enable_prefix_caching=cfg.enable_prefix_caching)
    raise ValueError(f"annotator.backend: unknown backend '{cfg.backend}'")


__all__ = ["Backend", "EngineChoice", "Request", "Response", "choose_engine", "make_backend"]
