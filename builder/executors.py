"""Executors: where the model calls that missed the cache run.

The runner (stages/base.py) asks a cached engine for responses; the engine answers what it
has from the DuckDB cache and hands the rest to an executor, storing each response the moment
it comes back (the driver process stays the cache's only writer). `LocalExecutor` runs them
on the backend already loaded in this process, with that engine's own batching and
concurrency. `RayExecutor` sends them, as a Ray Dataset, to actors on a Ray cluster that each
start the same engine from the backend's `config` (the managed llama-server with the
project's token ids and grammar, vLLM on a GPU node, an OpenAI-compatible client); stages
never name one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .backends.base import Backend, Request, Response

# Answers that arrived together, (index, response) each: the cache stores them in one write.
OnAnswers = Callable[[list[tuple[int, Response]]], None]

if TYPE_CHECKING:
    from .config import ExecutorConfig

log = logging.getLogger("ratchet.executor")


class Executor(Protocol):
    name: str
    stage: str  # the stage whose calls run now (set by the build; per-stage settings key on it)

    def run(self, backend: Backend, requests: Sequence[Request], on_answers: OnAnswers) -> None:
        """Run every request with `backend`'s engine; call on_answers([(i, response), ...]) (in
        the calling thread) as answers finish, each answer once: one at a time, or a batch that
        arrived together. Never raises for one bad request."""

    def describe(self) -> dict:
        """What the summary and the manifest say about where the calls ran."""

    def close(self) -> None:
        """Give back what the executor started (a local Ray cluster)."""


class LocalExecutor:
    name = "local"
    stage = ""

    def run(self, backend: Backend, requests: Sequence[Request], on_answers: OnAnswers) -> None:
        # one at a time: each is stored the moment it returns
        backend.generate(requests, lambda i, response: on_answers([(i, response)]))

    def describe(self) -> dict:
        return {"kind": self.name}

    def close(self) -> None:
        pass


LOCAL = LocalExecutor()


def make_executor(cfg: "ExecutorConfig", kind: str | None = None) -> Executor:
    """The executor of a workspace's `[executor]` section; `kind` (`--executor`) overrides its kind."""
    kind = kind or cfg.kind
    if kind == "local":
        return LOCAL
    if kind == "ray":
        return RayExecutor(cfg)
    raise ValueError(f"executor kind '{kind}' is not one of: local, ray")


# --- requests and responses as rows of a Ray Dataset ---------------------------------------------

def request_to_json(request: Request) -> str:
    return json.dumps(dataclasses.asdict(request), ensure_ascii=False)


def request_from_json(text: str) -> Request:
    data = json.loads(text)
    data["messages"] = tuple(data["messages"])
    if data.get("decision"):
        field, values = data["decision"]
        data["decision"] = (field, tuple(values))
    return Request(**data)


def response_to_json(response: Response) -> str:
    data = dataclasses.asdict(response)
    data["extra"] = {k: v for k, v in data["extra"].items() if _json_safe(v)}  # an engine's note that cannot travel stays
    return json.dumps(data, ensure_ascii=False)


def _json_safe(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def response_from_json(text: str) -> Response:
    return Response(**json.loads(text))


# --- the actor: one engine per actor, started once, for every batch it is given -----------------

class EngineActor:
    """A Ray Data map_batches actor: loads the engine of an engine config (the same registry
    call the driver makes, so the same token ids, grammar, retries and decisions) and answers
    batches of rows {index, request} with rows {index, response, model_id}."""

    def __init__(self, config: dict, log_dir: str | None = None, threads: int = 0):
        import socket

        from .backends import registry
        from .backends.base import EngineError

        cfg = registry.parse(config)
        if threads and getattr(cfg, "threads", None) == 0:  # the cores Ray gave this actor, not the node's
            cfg = cfg.model_copy(update={"threads": threads})
        # The driver's workspace logs/ where this node has it (a local cluster, a shared disk); else
        # the engine's temp folder: never a stray copy of the driver's path on another machine.
        cfg._log_dir = Path(log_dir) if log_dir and os.access(log_dir, os.W_OK) else None
        self.backend = registry.make_backend(cfg)
        if self.backend.kind != cfg.backend:  # e.g. no llama-server binary here: in-process llama.cpp instead
            kind, note = self.backend.kind, getattr(self.backend, "engine_note", "") or ""
            self.backend.close()
            raise EngineError(f"node {socket.gethostname()}: engine {cfg.backend} could not start, {kind} would answer "
                              f"instead ({note}); install the same extras on every node")
        self.model_id = self.backend.model_id

    def __call__(self, batch: dict) -> dict:
        requests = [request_from_json(text) for text in batch["request"]]
        responses = self.backend.generate(requests)
        return {"index": list(batch["index"]), "response": [response_to_json(r) for r in responses],
                "model_id": [self.model_id] * len(responses)}

    # No __del__: Ray ends actors by killing their process; a managed llama-server dies with it
    # (PR_SET_PDEATHSIG, llama_server.py), like any engine process the actor started.


def ray_reason(exc: Exception) -> str:
    """What went wrong on the cluster, in one line: Ray wraps an actor's or a task's exception in
    its own with the remote traceback; the last line of that traceback is the actual error."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {last[:500]}" + (f" (the cluster's traceback has {len(lines)} lines)" if len(lines) > 1
                                                     else "")


def default_batch_size(config) -> int:
    """Twice what one engine keeps in flight (a server's slots, a client's concurrency), so an
    actor's engine stays busy while its batch's last answers finish; 64 for an engine that
    batches by itself (vLLM offline)."""
    parallel = getattr(config, "slots", None) or getattr(config, "concurrency", None)
    return 2 * int(parallel) if parallel else 64


class RayExecutor:
    """Model calls on a Ray cluster through Ray Data: the driver (this process) looks the cache
    up and keeps writing it; the calls that missed go out as a Dataset of rows, map_batches runs
    them on `concurrency` EngineActors (each starts its own engine, with `num_cpus`/`num_gpus`),
    and the answers stream back batch by batch, each batch handed to on_answers (which stores it)
    the moment it arrives. An actor that dies is restarted by Ray and its batch run again
    (Ray Data's default for actors); a row that never comes back is an error response, asked
    again by the next build. The driver connects when the executor is made, so a cluster that
    cannot be reached is an error before the build ingests anything."""

    name = "ray"

    def __init__(self, cfg: "ExecutorConfig"):
        from .backends.base import EngineError

        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise EngineError("[executor] kind = \"ray\" needs Ray Data: pip install '.[ray]' (ray[data])") from None
        self.cfg = cfg
        self.stage = ""
        self.started_ray = False
        self.throughput: dict[str, dict] = {}  # stage -> {calls, seconds, datasets}
        self._connect()

    # -- the cluster --

    def _connect(self) -> None:
        import ray
        import ray.data

        from .backends.base import EngineError

        if not ray.is_initialized():
            address = self.cfg.address or None
            log.info("connecting to Ray (%s)", address or "Ray's default")
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True, configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineError(f"[executor] address = {self.cfg.address!r}: cannot connect to Ray: {exc}") from None
            self.started_ray = True
        context = ray.data.DataContext.get_current()
        # An actor that dies while it starts its engine (its node lost) is replaced; one that cannot
        # start it at all (a model or binary missing on the node) fails the stage at its 4th death in a
        # row (Ray Data fails once the count exceeds the budget of 3).
        context.max_consecutive_actor_init_deaths = 3
        context.enable_progress_bars = False  # the build's own bars advance as answers arrive
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": on purpose

    def settings(self) -> dict:
        """This stage's settings: [executor] with [executor.stages.STAGE] on top."""
        own = self.cfg.stages.get(self.stage)
        keys = ("concurrency", "batch_size", "num_cpus", "num_gpus")
        base = {k: getattr(self.cfg, k) for k in keys}
        if own is not None:
            base.update({k: v for k, v in own.model_dump().items() if v is not None})
        return base

    # -- the calls --

    def run(self, backend: Backend, requests: Sequence[Request], on_answers: OnAnswers) -> None:
        import ray.data

        from .backends import registry
        from .backends.base import EngineError

        config = getattr(backend, "config", None)
        if config is None:  # an engine made outside the registry has no config to start elsewhere
            raise EngineError(f"{backend.kind}: this engine has no config, so it cannot be started on Ray actors")
        s = self.settings()
        batch_size = s["batch_size"] or default_batch_size(config)
        actors = max(1, min(s["concurrency"], math.ceil(len(requests) / batch_size)))
        start = time.perf_counter()
        rows = [{"index": i, "request": request_to_json(r)} for i, r in enumerate(requests)]
        # one block per batch: an answer comes back as soon as its batch is done, not its block
        dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size)).map_batches(
            EngineActor,
            fn_constructor_kwargs={"config": registry.as_loaded(config, backend).model_dump(),
                                   "threads": max(1, int(s["num_cpus"] or 1)),
                                   "log_dir": str(config.log_dir) if config.log_dir else None},
            batch_size=batch_size, batch_format="default",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=s["num_cpus"], num_gpus=s["num_gpus"] or None)
        answered: set[int] = set()
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        lost: Exception | None = None
        while True:
            try:  # only Ray's side: an error in the driver's own callbacks (the cache write) is not a lost request
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # the Dataset failed as a whole (actors that cannot start, the cluster gone)
                lost = exc
                break
            arrived = []
            for i, text, model_id in zip(batch["index"].to_pylist(), batch["response"].to_pylist(),
                                         batch["model_id"].to_pylist()):
                if i in answered:  # a batch run twice (its actor died after answering): once is enough
                    continue
                answered.add(i)
                arrived.append((i, self._checked(backend, response_from_json(text), model_id)))
            on_answers(arrived)  # one write to the cache for the batch
        if lost is not None and not answered:  # nothing came back: the engine cannot run there
            raise EngineError(f"the Ray executor could not run {backend.model_name} ({self.stage or 'a stage'}): "
                              f"{ray_reason(lost)}") from None
        missing = [i for i in range(len(requests)) if i not in answered]
        if missing:
            reason = (f"the Ray executor lost this request: {ray_reason(lost)}" if lost else
                      "the Ray executor lost this request: its row never came back")
            log.warning("%s (%d of %d requests unanswered)", reason, len(missing), len(requests))
            on_answers([(i, Response("", "error", error=reason)) for i in missing])
        seconds = time.perf_counter() - start
        stats = self.throughput.setdefault(self.stage or "?", {"calls": 0, "seconds": 0.0, "datasets": 0})
        stats["calls"] += len(requests)
        stats["seconds"] += seconds
        stats["datasets"] += 1

    @staticmethod
    def _checked(backend: Backend, response: Response, model_id: str) -> Response:
        """An answer from an actor whose model is not the driver's (another file at that path on
        that node) would be cached under the wrong key: an error response instead."""
        if model_id != backend.model_id:
            return Response("", "error", error=f"a Ray actor loaded another model than the driver "
                                                f"({model_id[:12]} vs {backend.model_id[:12]}): the model file "
                                                "differs on that node")
        return response

    # -- what ran where --

    def describe(self) -> dict:
        out = {"kind": self.name, "address": self.cfg.address or "default"}
        try:
            import ray

            if ray.is_initialized():
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                resources = ray.cluster_resources()
                out.update({"nodes": len(nodes), "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)})
        except Exception:  # a cluster that went away: the summary says what it knows
            pass
        out["stages"] = {name: {**s, "seconds": round(s["seconds"], 2),
                                "calls_per_s": round(s["calls"] / s["seconds"], 3) if s["seconds"] else None}
                         for name, s in self.throughput.items()}
        return out

    def close(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

