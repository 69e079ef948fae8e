"""Engines. Stages never import one by name: the config picks it through `make_backend`."""
from __future__ import annotations

from ..config import ModelConfig
from .base import Backend, Request, Response


def make_backend(cfg: ModelConfig) -> Backend:
    from ..models import resolve_model

    if cfg.backend == "llama_cpp":
        from .llama_cpp import LlamaCppBackend

        return LlamaCppBackend(resolve_model(cfg.model), n_ctx=cfg.n_ctx, threads=cfg.threads)
    if cfg.backend == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, response_format=cfg.response_format)
    raise ValueError(f"annotator.backend: unknown backend '{cfg.backend}'")


__all__ = ["Backend", "Request", "Response", "make_backend"]
