"""Executors: where the model calls that missed the cache run.

The runner (stages/base.py) asks a cached engine for responses; the engine answers what it
has from the DuckDB cache and hands the rest to an executor, storing each response the moment
it comes back (the driver process stays the cache's only writer). `LocalExecutor` runs them
on the backend already loaded in this process, with that engine's own batching and
concurrency. `RayExecutor` sends them, in batches, to a pool of Ray actors per engine that each
start the same engine once per build from the backend's `config` (the managed llama-server with the
project's token ids and grammar, vLLM on a GPU node, an OpenAI-compatible client); stages
never name one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
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


# --- requests and responses as JSON, to and from the actors ---------------------------------------------

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


# --- the actor: one engine per actor, started once per build --------------------------------------

class EngineActor:
    """A Ray actor that loads the engine of an engine config (the same registry call the driver
    makes, so the same token ids, grammar, retries and decisions) when it starts, and keeps it
    (its llama-server, its prompt cache) for every batch of the build: `generate` answers a
    batch of requests with their responses and the actor's model id."""

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
        self.backend.start()  # a lazy engine too: an actor that cannot start its engine fails here
        self.model_id = self.backend.model_id
        if cfg._log_dir is not None:  # one line per engine start: what `engine starts` in the summary counts
            with open(cfg._log_dir / ACTOR_LOG, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()} started "
                        f"{self.backend.kind} {self.backend.model_name}\n")

    def generate(self, requests: list[str]) -> tuple[list[str], str]:
        responses = self.backend.generate([request_from_json(text) for text in requests])
        return [response_to_json(r) for r in responses], self.model_id

    def environment(self) -> list[str]:
        """The names of the environment variables this actor's process sees (what leaks, if anything)."""
        return sorted(os.environ)

    # No __del__: Ray ends actors by killing their process; a managed llama-server dies with it
    # (PR_SET_PDEATHSIG, llama_server.py), like any engine process the actor started.


ACTOR_LOG = "ray-actors.log"  # in the workspace's logs/, where the actor's node can write it

# What a local Ray cluster must not inherit from the driver: its processes (and so every actor)
# start with the environment of the process that calls ray.init.
# Whole words of the name (HF_TOKEN, OPENAI_API_KEY, RATCHET_AUDIT_SECRET), not TOKENIZERS_PARALLELISM.
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_KEY|ACCESS_KEY|PRIVATE_KEY)($|_)",
                         re.IGNORECASE)


@contextlib.contextmanager
def secrets_withheld():
    """os.environ without the variables whose names say they hold a secret (Hub tokens, API keys,
    RATCHET_AUDIT_SECRET; not Ray's own), for the time it takes to start a local cluster."""
    withheld = {name: os.environ.pop(name) for name in list(os.environ)
                if SECRET_NAME.search(name) and not name.startswith("RAY_")}  # Ray's own (RAY_AUTH_TOKEN) it needs
    try:
        yield sorted(withheld)
    finally:
        os.environ.update(withheld)


def engine_env(config) -> dict[str, str]:
    """The variables an engine reads that an actor must be given (Ray's runtime_env, which the
    cluster's GCS stores: whoever can list its actors can read them): the API key its config
    names, and the Hub token for a model the actor downloads from the Hub (a Hub id)."""
    names = [getattr(config, "api_key_env", "")]
    model = str(getattr(config, "model", ""))
    if "/" in model and not model.startswith(("bundled:", "/", ".", "~")) and not Path(model).exists():
        names.append("HF_TOKEN")
    return {name: os.environ[name] for name in names if name and os.environ.get(name)}


class EnginePool:
    """The actors of one engine config (and one CPU/GPU shape) for the whole build: each starts
    the engine once and keeps it across stages, rounds, retries and calibration."""

    def __init__(self, config_dump: dict, options: dict, init: dict):
        self.config_dump, self.options, self.init = config_dump, options, init
        self.actors: list = []
        self.used = 0.0  # when it last ran: the least recently used pool gives way first

    def held(self) -> tuple[float, float]:
        """(CPUs, GPUs) its actors hold on the cluster."""
        return self.options["num_cpus"] * len(self.actors), self.options["num_gpus"] * len(self.actors)

    def holds(self, num_cpus: float, num_gpus: float) -> bool:
        """Whether giving its actors back frees what an actor of that shape needs."""
        return bool(self.actors) and bool((num_cpus and self.options["num_cpus"]) or
                                          (num_gpus and self.options["num_gpus"]))

    def grow(self, n: int) -> None:
        import ray

        remote = ray.remote(EngineActor)
        for _ in range(n):
            self.actors.append(remote.options(**self.options).remote(self.config_dump, **self.init))

    def drop(self, actor) -> None:
        import ray

        self.actors.remove(actor)
        try:
            ray.kill(actor)
        except Exception:  # already gone with its node or the cluster
            pass

    def close(self) -> None:
        for actor in list(self.actors):
            self.drop(actor)


def ray_reason(exc: Exception) -> str:
    """What went wrong on the cluster, in one line: Ray wraps an actor's or a task's exception in
    its own with the remote traceback; the last line of that traceback is the actual error."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {last[:500]}" + (f" (the cluster's traceback has {len(lines)} lines)" if len(lines) > 1
                                                     else "")


def default_batch_size(config) -> int:
    """Twice what one engine keeps in flight (a server's slots, a client's concurrency), so an
    actor's engine stays busy while its batch's last answers finish; 64 for an engine that
    batches by itself (vLLM offline)."""
    in_flight = getattr(config, "in_flight", None)  # every server's slots (0: one a thread, on the driver's cores)
    parallel = in_flight() if in_flight else getattr(config, "concurrency", None)
    return 2 * int(parallel) if parallel else 64


class RayExecutor:
    """Model calls on a Ray cluster: the driver (this process) looks the cache up and keeps
    writing it; the calls that missed go, in batches, to a pool of EngineActors of the backend's
    engine config (`concurrency` of them, each with `num_cpus`/`num_gpus`), and each batch's
    answers are handed to on_answers (which stores them) the moment it comes back. A pool lives
    as long as the build: its actors start their engine once, and a llama-server's prompt cache
    outlives the stage. An actor that dies is restarted by Ray and its batch run again; one that
    cannot start its engine fails its batches, and a stage where nothing came back is an
    EngineError with the actors' reason; a request that never comes back is an error response,
    asked again by the next build. The driver connects when the executor is made, so a cluster
    that cannot be reached is an error before the build ingests anything."""

    name = "ray"
    RESTARTS = 4  # per actor (Ray restarts a killed actor, or one whose node is lost, on a node with room)

    def __init__(self, cfg: "ExecutorConfig"):
        from .backends.base import EngineError

        try:
            import ray  # noqa: F401
        except ImportError:
            raise EngineError("[executor] kind = \"ray\" needs Ray: pip install '.[ray]'") from None
        self.cfg = cfg
        self.stage = ""
        self.started_ray = False
        self.withheld: list[str] = []  # variables a local cluster was started without
        self.pools: dict[str, EnginePool] = {}
        self.engine_starts = 0  # actors the build started (each starts its engine once; Ray's restarts not counted)
        self.throughput: dict[str, dict] = {}  # stage -> {calls, seconds, batches}
        self._connect()

    # -- the cluster --

    def _connect(self) -> None:
        import ray

        from .backends.base import EngineError

        if ray.is_initialized():
            return
        address = self.cfg.address or None
        log.info("connecting to Ray (%s)", address or "Ray's default")
        try:
            # A cluster started here inherits this process's environment: not its secrets.
            with secrets_withheld() as self.withheld:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True, configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(f"[executor] address = {self.cfg.address!r}: cannot connect to Ray: {exc}") from None
        self.started_ray = True

    def settings(self) -> dict:
        """This stage's settings: [executor] with [executor.stages.STAGE] on top."""
        own = self.cfg.stages.get(self.stage)
        keys = ("concurrency", "batch_size", "num_cpus", "num_gpus")
        base = {k: getattr(self.cfg, k) for k in keys}
        if own is not None:
            base.update({k: v for k, v in own.model_dump().items() if v is not None})
        return base

    # -- the pools --

    def pool(self, backend: Backend, s: dict, wanted: int) -> EnginePool:
        """Up to `wanted` actors of the backend's engine, started once per build. Where the
        cluster has no room for more, the least recently used pools of other engines give theirs
        back first (a 2-core node holds the actors of one engine at a time); at least one actor."""
        from .backends import registry

        config = registry.as_loaded(backend.config, backend)
        dump = config.model_dump()
        num_cpus, num_gpus = s["num_cpus"], s["num_gpus"] or 0
        key = json.dumps([dump, num_cpus, num_gpus], sort_keys=True, default=str)
        pool = self.pools.get(key)
        if pool is None:
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": self.RESTARTS,
                       "max_task_retries": self.RESTARTS, "runtime_env": {"env_vars": engine_env(config)}}
            init = {"threads": max(1, int(num_cpus or 1)),
                    "log_dir": str(config.log_dir) if config.log_dir else None}
            pool = self.pools[key] = EnginePool(dump, options, init)
        pool.used = time.monotonic()
        missing = wanted - len(pool.actors)
        if missing > 0:
            room = self._room(num_cpus, num_gpus)
            if not pool.actors and room < 1:  # no actor of this engine yet: other engines make room for one
                self._no_node_fits(num_cpus, num_gpus)
                others = sorted((p for p in self.pools.values() if p is not pool and p.holds(num_cpus, num_gpus)),
                                key=lambda p: p.used)
                for other in others:
                    log.info("giving back %d actor(s) of another engine to make room", len(other.actors))
                    self._give_back([other])
                    room = self._room(num_cpus, num_gpus)
                    if room >= missing:
                        break
            add = max(min(missing, room), 0 if pool.actors else 1)
            pool.grow(add)
            self.engine_starts += add
        return pool

    @staticmethod
    def _no_node_fits(num_cpus: float, num_gpus: float) -> None:
        """An EngineError where no node of the cluster could ever hold one actor of this shape
        (Ray would keep it pending for ever, and the build would wait for it)."""
        import ray

        from .backends.base import EngineError

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
            biggest = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
            raise EngineError(f"[executor] an actor needs {num_cpus:g} CPU(s) and {num_gpus:g} GPU(s), and no node of "
                              f"the cluster has that many (the largest: {biggest[0]:g} CPU(s), {biggest[1]:g} GPU(s)): "
                              "lower num_cpus / num_gpus or add a node")

    @staticmethod
    def _room(num_cpus: float, num_gpus: float) -> int:
        """How many more actors of this shape the cluster has resources for now."""
        import ray

        free = ray.available_resources()
        fits = [int(free.get(name, 0) / need + 1e-9) for name, need in (("CPU", num_cpus), ("GPU", num_gpus)) if need]
        return min(fits) if fits else 1 << 30

    @staticmethod
    def _give_back(pools: list[EnginePool], timeout_s: float = 10.0) -> None:
        """Kill the pools' actors and return once the cluster has their resources free again (Ray
        frees a killed actor's a moment later), or after `timeout_s` (another job may take some)."""
        import ray

        free = ray.available_resources()
        want = {"CPU": free.get("CPU", 0), "GPU": free.get("GPU", 0)}
        for pool in pools:
            cpus, gpus = pool.held()
            want["CPU"] += cpus
            want["GPU"] += gpus
            pool.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(free.get(name, 0) + 1e-9 >= amount for name, amount in want.items()):
                return
            time.sleep(0.2)

    # -- the calls --

    def run(self, backend: Backend, requests: Sequence[Request], on_answers: OnAnswers) -> None:
        import ray

        from .backends.base import EngineError

        if getattr(backend, "config", None) is None:  # an engine made outside the registry cannot start elsewhere
            raise EngineError(f"{backend.kind}: this engine has no config, so it cannot be started on Ray actors")
        if not requests:
            return
        s = self.settings()
        batch_size = s["batch_size"] or default_batch_size(backend.config)
        start = time.perf_counter()
        texts = [request_to_json(r) for r in requests]
        queue = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
        queue.reverse()  # popped from the end: the first batch first
        pool = self.pool(backend, s, min(s["concurrency"], len(queue)))
        idle = pool.actors[:s["concurrency"]]
        running: dict = {}  # the batch's future -> (actor, indices)
        answered: set[int] = set()
        lost: Exception | None = None
        while queue or running:
            while queue and idle:  # one batch in flight per actor: the next goes to whichever finishes first
                actor, batch = idle.pop(), queue.pop()
                running[actor.generate.remote([texts[i] for i in batch])] = (actor, batch)
            if not running:  # every actor failed: the rest of the queue is lost
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=300)
            if not done:  # an actor not yet placed (the cluster busy) or a slow batch: say so, keep waiting
                log.warning("waiting for %d batch(es) of %s on Ray for 5 minutes (actors pending a node?)",
                            len(running), backend.model_name)
                continue
            actor, batch = running.pop(done[0])
            try:  # only Ray's side: an error in the driver's own callbacks (the cache write) is not a lost request
                responses, model_id = ray.get(done[0])
            except Exception as exc:
                lost = exc
                log.warning("a Ray actor failed (%s): %d request(s) of its batch unanswered", ray_reason(exc), len(batch))
                if isinstance(exc, ray.exceptions.RayActorError):  # gone for good: its engine cannot start, restarts spent
                    pool.drop(actor)  # never given another batch, in this stage or a later one
                else:  # its batch failed in a live actor: the actor takes the next one
                    idle.append(actor)
                continue
            arrived = [(i, self._checked(backend, response_from_json(text), model_id))
                       for i, text in zip(batch, responses) if i not in answered]
            answered.update(i for i, _ in arrived)
            on_answers(arrived)  # one write to the cache for the batch
            idle.append(actor)
        if lost is not None and not answered:  # nothing came back: the engine cannot run there
            raise EngineError(f"the Ray executor could not run {backend.model_name} ({self.stage or 'a stage'}): "
                              f"{ray_reason(lost)}") from None
        missing = [i for i in range(len(requests)) if i not in answered]
        if missing:
            reason = (f"the Ray executor lost this request: {ray_reason(lost)}" if lost else
                      "the Ray executor lost this request: its actors are gone")
            log.warning("%s (%d of %d requests unanswered)", reason, len(missing), len(requests))
            on_answers([(i, Response("", "error", error=reason)) for i in missing])
        seconds = time.perf_counter() - start
        stats = self.throughput.setdefault(self.stage or "?", {"calls": 0, "seconds": 0.0, "batches": 0})
        stats["calls"] += len(requests)
        stats["seconds"] += seconds
        stats["batches"] += math.ceil(len(requests) / batch_size)

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
        out["engine_starts"] = self.engine_starts
        out["stages"] = {name: {**s, "seconds": round(s["seconds"], 2),
                                "calls_per_s": round(s["calls"] / s["seconds"], 3) if s["seconds"] else None}
                         for name, s in self.throughput.items()}
        return out

    def close(self) -> None:
        import ray

        pools, self.pools = [p for p in self.pools.values() if p.actors], {}
        if self.started_ray:
            for pool in pools:  # ended here, not left to the cluster (one reached at `auto` stays up)
                pool.close()
            ray.shutdown()
            self.started_ray = False
        elif pools and ray.is_initialized():  # a cluster that stays: its resources back when this returns
            self._give_back(pools)
