"""Executors: where the model calls that missed the cache run.

The runner (stages/base.py) asks a cached engine for responses; the engine answers what it
has from the DuckDB cache and hands the rest to an executor, storing each response the moment
it comes back (the driver process stays the cache's only writer). `LocalExecutor` runs them
on the backend already loaded in this process, with that engine's own batching and
concurrency. Another executor (a Ray cluster, say) takes the same call and the backend's
`config` to start the same engine elsewhere; stages never name one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .backends.base import Backend, OnResponse, Request


class Executor(Protocol):
    name: str

    def run(self, backend: Backend, requests: Sequence[Request], on_response: OnResponse) -> None:
        """Run every request with `backend`'s engine; call on_response(i, response) for each as
        it finishes (in the calling thread). Never raises for one bad request."""


class LocalExecutor:
    name = "local"

    def run(self, backend: Backend, requests: Sequence[Request], on_response: OnResponse) -> None:
        backend.generate(requests, on_response)

    def describe(self) -> dict:
        return {"kind": self.name}


LOCAL = LocalExecutor()
