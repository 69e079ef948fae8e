"""Engines. Stages never import one by name: the config picks it through the registry."""
from __future__ import annotations

from .base import Backend, EngineConfig, Request, Response
from .registry import ENGINES, make_backend

__all__ = ["Backend", "ENGINES", "EngineConfig", "Request", "Response", "make_backend"]
