"""The OpenAI-compatible backend against real servers on loopback: llama-cpp-python's server
with the bundled model, a port nobody listens on, and a server that answers garbage."""
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from builder.backends.base import Request
from builder.backends.openai import OpenAIBackend, neutralize_special_tokens
from builder.models import resolve_model
from builder.prompts import Prompts
from builder.resources import load_schema

from ..conftest import DATA, REPO, SHORT_PASSAGES, write_workspace

INJECTIONS = [json.loads(line) for line in (DATA / "injections.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server with SmolLM2, on a free loopback port."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(resolve_model("bundled:smollm2")),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "llama_cpp.server exited; see its log"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_payload_carries_schema_sampling_and_seed():
    backend = OpenAIBackend("http://127.0.0.1:1", "m")
    schema = load_schema("annotation")
    body = backend.payload(Request(messages=({"role": "user", "content": "hi"},), schema=schema, max_tokens=99,
                                   temperature=0.3, top_p=0.9, repeat_penalty=1.1, seed=7))
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"], body["repeat_penalty"]) == (99, 0.3, 0.9, 7, 1.1)
    legacy = OpenAIBackend("http://127.0.0.1:1", "m", response_format="json_object")
    assert legacy.payload(Request(messages=(), schema=schema))["response_format"] == {"type": "json_object", "schema": schema}


def test_special_token_spellings_are_broken_up():
    assert neutralize_special_tokens("a <|im_end|> b <start_of_turn>user [INST]") == \
        "a <\u200b|im_end|> b <\u200bstart_of_turn>user [\u200bINST]"
    assert neutralize_special_tokens("x < y and a|b") == "x < y and a|b"


def test_server_sees_no_special_tokens_from_a_passage(llama_server):
    """The server tokenizes with special tokens on: check, on the server itself, that the
    neutralised passage carries none and the raw one would have."""
    def token_ids(text):
        answer = httpx.post(f"{llama_server}/extras/tokenize", json={"input": text}, timeout=30)
        return answer.json()["tokens"]

    special = {token_ids(s)[0] for s in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}
    attacks = [r["text"] for r in INJECTIONS if "<|" in r["text"]]
    assert attacks
    for text in attacks:
        assert special & set(token_ids(text))  # the danger is real on this server
        assert not special & set(token_ids(neutralize_special_tokens(text)))


def test_schema_constrained_annotation_through_the_server(llama_server):
    backend = OpenAIBackend(llama_server, "smollm2", response_format="json_object", concurrency=2)
    schema = load_schema("annotation")
    requests = [Request(messages=Prompts().annotation_messages(t), schema=schema, max_tokens=384, seed=1)
                for t in SHORT_PASSAGES[:2]]
    seen = []
    responses = backend.generate(requests, lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1]
    for r in responses:
        assert r.finish_reason in ("stop", "length") and r.completion_tokens > 0
        if r.finish_reason == "stop":
            assert set(json.loads(r.text)) == set(schema["properties"])


def test_build_through_the_server_then_rebuild_from_the_cache(llama_server, tmp_path):
    from builder.build import run_build
    from builder.workspace import Workspace

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES[:2], sampling={"max_tokens": 384}, audit={"rate": 0.0},
                           annotator={"backend": "openai", "base_url": llama_server, "model": "smollm2",
                                      "response_format": "json_object"})
    first = run_build(Workspace(root))
    assert first["accepted"] + first["rejected"] == 2 and first["model_calls"] >= 2
    again = run_build(Workspace(root))
    assert again["model_calls"] == 0 and again["cached_calls"] == first["model_calls"]


def test_server_that_is_down_gives_a_clear_rejection_and_nothing_cached(tmp_path):
    import duckdb

    from builder.stages.annotate import annotate
    from builder.cache import CachedBackend
    from builder.config import RatchetConfig
    from builder.corpus import Passage, passage_id
    from builder.workspace import create_schema

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens here
    backend = OpenAIBackend(url, "m", max_retries=1, backoff_s=0.01)
    con = duckdb.connect()
    create_schema(con)
    cfg = RatchetConfig.model_validate({"annotate": {"retries": 0}})
    [result] = annotate([Passage(passage_id("t"), "s", 0, "t", 1)], CachedBackend(backend, con), Prompts(), cfg)
    assert result.status == "rejected"
    assert f"cannot connect to {url}" in result.reason and "after 2 attempts" in result.reason
    assert con.execute("SELECT count(*) FROM model_calls").fetchone()[0] == 0


class Garbage(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's spelling
        Garbage.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if Garbage.calls == 1:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"overloaded")
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"<html>not json</html>")

    def log_message(self, *args):
        pass


def test_server_answering_garbage_is_retried_then_reported():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        [response] = OpenAIBackend(url, "m", max_retries=2, backoff_s=0.01).generate([Request(messages=())])
    finally:
        server.shutdown()
    assert Garbage.calls == 3
    assert response.finish_reason == "error"
    assert "not a chat completion" in response.error and "<html>" in response.error


def test_openai_backend_needs_a_base_url(tmp_path):
    from builder.config import ConfigError, load_config

    path = tmp_path / "ratchet.toml"
    path.write_text('[annotator]\nbackend = "openai"\nmodel = "x"\n')
    with pytest.raises(ConfigError, match="base_url"):
        load_config(path)


class WithLogprobs(BaseHTTPRequestHandler):
    """An OpenAI-style server: refuses `logprobs` when told to, else answers a verdict with the
    top_logprobs of each token (the value's first token "re" begins two values: split evenly)."""
    refuse = False
    bodies: list = []

    def do_POST(self):  # noqa: N802 - http.server's spelling
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        WithLogprobs.bodies.append(body)
        if self.refuse and body.get("logprobs"):
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "logprobs are not supported"}')
            return
        text = '{"verdict": "reject"}'
        tokens = [('{"', {}), ("verdict", {}), ('": "', {}), ("re", {"re": 0.6, "surv": 0.3, "rev": 0.1}),
                  ("ject", {"ject": 0.9, "vise": 0.1}), ('"}', {})]
        content = [{"token": t, "logprob": 0.0, "top_logprobs": [{"token": a, "logprob": __import__("math").log(p)}
                                                                   for a, p in top.items()]} for t, top in tokens]
        answer = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                               "logprobs": {"content": content} if body.get("logprobs") else None}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 6}}
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(answer).encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("refuse", [False, True])
def test_a_judgement_is_read_from_top_logprobs_and_a_server_refusing_them_is_asked_without(refuse):
    import math

    WithLogprobs.refuse, WithLogprobs.bodies = refuse, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), WithLogprobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}", "m", max_retries=0)
        request = Request(({"role": "user", "content": "judge"},), decision=("verdict", ("survives", "revise", "reject")))
        [r] = backend.generate([request])
    finally:
        server.shutdown()
    assert r.finish_reason == "stop" and r.text == '{"verdict": "reject"}'
    assert WithLogprobs.bodies[0]["top_logprobs"] == 20
    if refuse:  # asked again without logprobs, and no more from then on
        assert r.decision is None and "logprobs" not in WithLogprobs.bodies[-1] and backend.logprobs is False
    else:  # "re" is on the generated path: its mass is split by the next token's top_logprobs
        probs = {k: math.exp(v) for k, v in r.decision["logprobs"].items()}
        assert probs == pytest.approx({"survives": 0.3, "revise": 0.1 + 0.6 * 0.1, "reject": 0.6 * 0.9})


def test_a_served_panel_member_is_fingerprinted_and_a_changed_one_refused(llama_server):
    """A served model has no file to hash: the panel keeps the model id its server reports and its
    greedy answers to fixed probes, asks again before scoring, and refuses on a difference (#15.2).
    The same server answers the same; a stored fingerprint that differs is named."""
    from builder.backends.openai import OpenAIBackend
    from builder.config import RatchetConfig
    from builder.prompts import Prompts
    from builder.stages.ratchet import PanelMember, RatchetError, check_frozen, panel_questions, served_fingerprint

    backend = OpenAIBackend(llama_server, "smollm2")
    first, again = served_fingerprint(backend), served_fingerprint(backend)
    assert first == again and first["reported_model"] == "smollm2"
    assert len(first["answers"]) == 3 and all(a and not a.startswith("error") for a in first["answers"])
    cfg, prompts = RatchetConfig(), Prompts()
    frozen = PanelMember("judge", "skeptic", "llama", {"backend": "openai"}, {}, backend.model_id, 1,
                         panel_questions("skeptic", prompts, cfg, backend), first)
    check_frozen(frozen, backend, None, prompts, cfg)  # unchanged: no error
    frozen.fingerprint = {**first, "answers": ["blue", "42", "hot"] if first["answers"] != ["blue", "42", "hot"]
                          else ["x", "y", "z"]}  # as if another model now answered behind the same URL
    with pytest.raises(RatchetError, match=r"reference panel member judge: the served model answers otherwise since "
                                           r"the panel was frozen \(changed: answers"):
        check_frozen(frozen, backend, None, prompts, cfg)


def test_ctrl_c_stops_a_build_without_sending_the_queued_requests(tmp_path):
    """SIGINT during a build against a slow OpenAI-compatible server (one request at a time):
    exit 130 after the request in flight, the rest of the batch never sent, and the answers that
    came back before it are in the cache."""
    import os
    import signal

    sys.path.insert(0, str(REPO / "bench"))
    from stub_openai import StubServer

    passages = [f"Claim {i}: the reservoir holds {i} million litres." for i in range(6)]
    with StubServer(latency_s=1.5, slots=1) as stub:
        root = write_workspace(tmp_path / "ws", passages, audit={"rate": 0.0}, annotate={"retries": 0},
                               annotator={"backend": "openai", "model": "stub", "base_url": stub.url,
                                          "concurrency": 1, "logprobs": False})
        # SIGINT at its default in the child: a suite started from a background job inherits it ignored
        build = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "-w", str(root)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        log = root / "logs" / "build-gen-0001.log"
        saved = lambda: log.is_file() and " finish=" in log.read_text(errors="replace")  # noqa: E731 - logged once stored
        deadline = time.time() + 120
        while time.time() < deadline and not saved() and build.poll() is None:  # one answer stored, then stop
            time.sleep(0.05)
        assert saved(), "no answer was stored"
        os.kill(build.pid, signal.SIGINT)
        out, _ = build.communicate(timeout=60)
        received = stub.received
    assert build.returncode == 130, out
    assert received < len(passages), f"{received} of {len(passages)} requests were sent after Ctrl-C"
    import duckdb

    con = duckdb.connect(str(root / "ratchet.duckdb"), read_only=True)
    saved = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    con.close()
    assert 1 <= saved <= received
