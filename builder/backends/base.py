"""The one interface every engine implements: a batch of requests in, a batch of responses out.

Batch-first so that engines that batch (vLLM, a server with slots) and engines that do not
(llama.cpp in-process) fit the same slot. `on_response` is called as each response is
ready, so the caller can store it at once: a build stopped halfway keeps what it finished.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


@dataclass(frozen=True)
class Request:
    messages: tuple[dict, ...]  # [{"role": ..., "content": ...}], content is data where the caller says so
    schema: dict | None = None  # JSON Schema the output must follow (constrained decoding)
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.95
    repeat_penalty: float = 1.0
    seed: int = 0
    # A judgement's decision: (field, allowed values). An engine that can read token
    # log-probabilities returns the distribution over the values at the point where the field's
    # value begins (Response.decision). Not part of the cache key: it asks for more of the same
    # answer, not for another answer.
    decision: tuple[str, tuple[str, ...]] | None = None

    def sampling(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "repeat_penalty": self.repeat_penalty}


@dataclass
class Response:
    text: str
    finish_reason: str  # "stop", "length" (cut off by max_tokens) or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)
    # For a request with a decision: {"field", "logprobs": {value: log-probability, normalised
    # over the values}, "method": how they were read}; None where the engine could not read them.
    decision: dict | None = None
    # Prompt tokens the engine served from a prefix it had already evaluated (llama-server's
    # timings.cache_n, an OpenAI server's usage.prompt_tokens_details.cached_tokens, in-process
    # llama.cpp's reused prefix); None where the engine does not say.
    cached_tokens: int | None = None


OnResponse = Callable[[int, Response], None]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cgroup's cpuset, a pinned
    test worker), not the machine's count. An engine told "all cores" that starts more threads
    than it may use spins them against each other on the same core."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def context_overflow(prompt_tokens: int, request: Request, n_ctx: int) -> Response | None:
    """An error response when prompt + output budget cannot fit in the context window."""
    if prompt_tokens + request.max_tokens <= n_ctx:
        return None
    return Response("", "error", prompt_tokens, error=(
        f"prompt of {prompt_tokens} tokens + {request.max_tokens} output tokens exceeds n_ctx={n_ctx}; "
        "lower corpus.chunk_tokens or raise annotator.n_ctx"))


class EngineConfig(BaseModel):
    """The keys every engine has. Each engine's file subclasses it with its own keys and a
    `backend` Literal of its name; a key that belongs to another engine is an error (see
    registry.py, which picks the class from `backend`)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    backend: str = Field("auto", description="The engine; see `ratchet engines` (or docs/engines.md) for each one's keys.")
    model: str = Field("bundled:smollm2", description="What the engine loads: a GGUF path or bundled:NAME, a "
                       "checkpoint folder, or a served model's name, as the engine takes it.")
    # Where managed servers write their logs: the workspace's logs/ (set by load_config; not a key).
    _log_dir: Path | None = PrivateAttr(None)

    @property
    def log_dir(self) -> Path | None:
        return self._log_dir

    def __eq__(self, other) -> bool:  # the keys, not where a server logs, make an engine config
        return isinstance(other, EngineConfig) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.model_dump().items())))


@dataclass(frozen=True)
class Engine:
    """One engine in the registry (registry.py): its name (the `backend` key), its config
    class, how a config becomes a loaded backend, and what the rest of the builder needs to
    know about it without loading anything."""
    name: str
    config: type[EngineConfig]
    load: Callable[[EngineConfig], "Backend"]
    model_file: str = "name"  # what `model` names: gguf (a GGUF file), checkpoint (a folder), name (a served name)
    summary: str = ""  # one line for `ratchet engines` and the docs
    check_model: Callable[[str], None] | None = None  # raises ModelNotFound before any model runs
    explain: Callable[[EngineConfig], str] | None = None  # which engine runs and why (`ratchet status`)
    where: Callable[[EngineConfig], str] | None = None  # where the model comes from (`ratchet status`)


class EngineError(Exception):
    """An engine that cannot start as configured (a file it needs, a server); the message
    names the file or key."""


class Backend(ABC):
    """An engine bound to one model."""

    kind: str = "base"
    is_model: bool = True  # False: answers without a model (the scripted engine); builds say so
    served: bool = False  # True: a model behind someone's server, with no file here to hash (the openai engine)
    family: str = "unknown"  # the model's architecture: ensembles and audit stats group by it

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Identifies the weights (e.g. sha256 of the model file); part of every cache key."""

    @property
    def model_name(self) -> str:
        """A short name of the model (a file name, a served model name)."""
        return self.model_id

    def describe(self) -> dict:
        """What the manifest records about the model behind this backend."""
        return {"model": self.model_name, "backend": self.kind}

    @abstractmethod
    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text the model sees for these messages (cache keys, debugging)."""

    @abstractmethod
    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        """Run every request; responses in request order. Never raises for one bad request:
        that response has finish_reason "error" and the reason in `error`."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of plain text with this model's tokenizer."""

    def start(self) -> None:  # noqa: B027 - optional
        """Make the engine ready to answer: an engine that loads its model at the first call
        (vLLM) loads it here, so a Ray actor that cannot start it fails when it starts."""

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def request_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool for one batch of requests to a server. Leaving it normally waits for every
    request; leaving it by an exception (Ctrl-C) cancels the requests not yet sent instead of
    sending them all first (a `with ThreadPoolExecutor` runs its whole queue on the way out: a
    build on one slot went on for 25 s after Ctrl-C, answers it then threw away). The ones in
    flight end with the engine's close (a managed server is stopped; a client's connections are
    closed)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def as_answered(futures, poll_s: float = 0.25) -> Iterator[Future]:
    """`as_completed`, waking every `poll_s`: Python runs a signal's handler in the main thread,
    and the kernel may deliver SIGINT to a worker thread instead, which does not wake a main
    thread blocked on a lock without a timeout (Ctrl-C then waited for the next answer)."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=poll_s, return_when=FIRST_COMPLETED)
        yield from done


class SequentialBackend(Backend):
    """An engine that runs one request at a time (llama.cpp in-process, transformers): in
    request order, which keeps a shared prompt prefix warm from one call to the next."""

    @abstractmethod
    def _one(self, request: Request) -> Response:
        """One request; never raises (an error response instead)."""

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        responses = []
        for i, request in enumerate(requests):
            responses.append(self._one(request))
            if on_response:
                on_response(i, responses[-1])
        return responses
