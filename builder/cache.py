"""Every model call goes through here. The key is (model id, rendered prompt, schema,
sampling, seed); a finished call is stored the moment it returns, so a stopped build
resumes where it stopped and a finished one rebuilds without a single model call."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import duckdb

from .backends.base import Backend, OnResponse, Request, Response
from .tables import Json, Table, doc


@dataclass
class ModelCall:
    cache_key: str = doc("sha256 of model id + rendered prompt + schema + sampling + seed")
    model_id: str
    backend: str
    prompt_sha: str
    schema_sha: str | None
    sampling: Json | None
    seed: Annotated[int, "BIGINT"] | None
    response: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float | None
    decision: Json | None = doc("a judgement's distribution over its values: {field, logprobs, method}", added=True)
    cached_tokens: int | None = doc("prompt tokens the engine served from a prefix it had already evaluated "
                                    "(NULL: the engine did not say)", added=True)


MODEL_CALLS = Table("model_calls", ModelCall, key=("cache_key",), extra=("created_at TIMESTAMP DEFAULT current_timestamp",),
                    doc="the cache: a finished call is never made again")


def sha256(value) -> str:
    data = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    calls: int = 0
    errors: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from a cached prefix (where the engine says)

    def count(self, response: Response) -> None:
        self.calls += 1
        self.completion_tokens += response.completion_tokens
        self.prompt_tokens += response.prompt_tokens
        self.cached_tokens += response.cached_tokens or 0

    def tokens(self) -> dict:
        """What the engine had to evaluate: prompt tokens not served from a cached prefix, and completions."""
        return {"calls": self.calls, "prompt": self.prompt_tokens, "cached": self.cached_tokens,
                "completion": self.completion_tokens, "evaluated": self.prompt_tokens - self.cached_tokens
                + self.completion_tokens}


class CachedBackend:
    """Wraps a backend with the DuckDB call cache; same interface as a backend."""

    def __init__(self, backend: Backend, con: duckdb.DuckDBPyConnection, log=None, executor=None):
        from .executors import LOCAL

        self.backend = backend
        self.con = con
        self.log = log
        self.executor = executor or LOCAL  # where the calls that missed the cache run
        self.stats = CacheStats()

    def __getattr__(self, name):  # count_tokens, render, model_id, kind, ...
        return getattr(self.backend, name)

    def key(self, request: Request) -> tuple[str, str, str | None]:
        prompt_sha = sha256(self.backend.render(request.messages))
        schema_sha = sha256(request.schema) if request.schema is not None else None
        key = sha256({"model": self.backend.model_id, "prompt": prompt_sha, "schema": schema_sha,
                      "sampling": request.sampling(), "seed": request.seed})
        return key, prompt_sha, schema_sha

    def _lookup(self, keys: list[str]) -> dict[str, Response]:
        if not keys:
            return {}
        rows = self.con.execute(
            "SELECT cache_key, response, finish_reason, prompt_tokens, completion_tokens, seconds, decision "
            "FROM model_calls WHERE cache_key IN (SELECT unnest($keys))", {"keys": keys}).fetchall()
        return {r[0]: Response(r[1], r[2], r[3] or 0, r[4] or 0, r[5] or 0.0, extra={"cached": True, "cache_key": r[0]},
                               decision=json.loads(r[6]) if r[6] else None)
                for r in rows}

    def _row(self, key, prompt_sha, schema_sha, request: Request, response: Response) -> ModelCall:
        return ModelCall(key, self.backend.model_id, self.backend.kind, prompt_sha, schema_sha, request.sampling(),
                         request.seed, response.text, response.finish_reason, response.prompt_tokens,
                         response.completion_tokens, response.seconds, response.decision, response.cached_tokens)

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        keyed = [self.key(r) for r in requests]
        cached = self._lookup([k for k, _, _ in keyed])
        results: list[Response | None] = [None] * len(requests)
        misses = []
        for i, (key, _, _) in enumerate(keyed):
            if key in cached:
                results[i] = cached[key]
                self.stats.hits += 1
                if on_response:
                    on_response(i, cached[key])
            else:
                misses.append(i)

        def done(answered: list[tuple[int, Response]]) -> None:
            """Store answers that arrived together in one write (one, or a Ray batch), then hand each on."""
            stored = []
            for j, response in answered:
                i = misses[j]
                response.extra["cache_key"] = keyed[i][0]  # stages record which call produced a record
                results[i] = response
                if response.finish_reason == "error":
                    self.stats.errors += 1  # not cached: a server that was down must be asked again
                else:
                    stored.append(self._row(*keyed[i], requests[i], response))
                    self.stats.count(response)
            # one row per key: a batch may answer the same request twice, and one INSERT must not hold both
            MODEL_CALLS.insert_batch(self.con, list({row.cache_key: row for row in reversed(stored)}.values()),
                                     on_conflict="ignore")
            for j, response in answered:
                if self.log:
                    self.log.info("call %s finish=%s tokens=%d seconds=%.2f", keyed[misses[j]][0][:12],
                                  response.finish_reason, response.completion_tokens, response.seconds)
                if on_response:
                    on_response(misses[j], response)

        if misses:
            self.executor.run(self.backend, [requests[i] for i in misses], done)
        return results  # type: ignore[return-value]
