"""`backend = "auto"`, the default: the managed llama-server when a binary is found (and
starts), otherwise llama.cpp in-process. Its keys are the server's, which include every key
of the in-process engine."""
from __future__ import annotations

from typing import Literal

from ..models import resolve_model
from .base import Engine
from .llama_server import ServerKeys, explain, load, where


class AutoConfig(ServerKeys):
    backend: Literal["auto"] = "auto"


ENGINE = Engine("auto", AutoConfig, load, model_file="gguf",
                summary="the default: llama_server when a llama-server binary is found, else llama_cpp",
                check_model=resolve_model, explain=explain, where=where)
