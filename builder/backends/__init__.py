"""Engines. Stages never import one by name: the config picks it through `make_backend`."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .base import Backend, Request, Response


def make_backend(cfg: ModelConfig) -> Backend:
    from ..models import resolve_model

    if cfg.backend == "llama_cpp":
        from .llama_cpp import LlamaCppBackend

        return LlamaCppBackend(resolve_model(cfg.model), n_ctx=cfg.n_ctx, threads=cfg.threads, constrained=cfg.constrained)
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


__all__ = ["Backend", "Request", "Response", "make_backend"]
