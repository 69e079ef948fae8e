"""Engines. Stages never import one by name: the config picks it through `make_backend`."""
from __future__ import annotations

from ..config import ModelConfig
from .base import Backend, Request, Response


def make_backend(cfg: ModelConfig) -> Backend:
    from ..models import resolve_model

    if cfg.backend == "llama_cpp":
        from .llama_cpp import LlamaCppBackend

        return LlamaCppBackend(resolve_model(cfg.model), n_ctx=cfg.n_ctx, threads=cfg.threads)
    raise ValueError(f"annotator.backend: unknown backend '{cfg.backend}'")


__all__ = ["Backend", "Request", "Response", "make_backend"]
