"""A loopback OpenAI-compatible server that stands in for a fleet (bench/scale.py) and for a
misbehaving endpoint (tests/test_executors.py).

Every chat completion waits `latency_s` in one of `slots` slots (a request that finds them all
busy queues, as on a real server) and answers a schema-valid instance of the request's
`response_format` schema, made by the scripted engine from the messages and the seed: the
same request always gets the same answer. `faults` makes chosen requests misbehave: by a word
in its last message, or by the number of the request among those no word singles out (1-based,
in arrival order, so a worded request arriving first never takes a numbered fault), answer
HTTP 500, garbage, or nothing for `hang_s` seconds (a timeout).

    python bench/stub_openai.py --latency 0.5 --slots 8    # serves until Ctrl-C
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from builder.backends.base import Request
from builder.backends.scripted import ScriptedBackend


@dataclass
class Faults:
    """Which requests misbehave and how: {"500" | "garbage" | "hang": ...}, by a word in the
    request's last message (`words`) or else by its arrival number among the requests that no
    word singles out (`numbers`)."""
    numbers: dict[int, str] = field(default_factory=dict)
    words: dict[str, str] = field(default_factory=dict)
    hang_s: float = 30.0

    def by_word(self, body: dict) -> str | None:
        last = (body.get("messages") or [{}])[-1].get("content", "")
        return next((kind for word, kind in self.words.items() if word in last), None)


class StubServer:
    def __init__(self, latency_s: float = 0.0, slots: int = 64, faults: Faults | None = None, port: int = 0):
        self.latency_s, self.faults = latency_s, faults or Faults()
        self.slots = threading.BoundedSemaphore(slots)
        self.engine = ScriptedBackend("stub")
        self.lock = threading.Lock()
        self.received = 0  # requests that arrived
        self.unworded = 0  # of those, the ones no fault word singles out (what `numbers` counts)
        self.answered = 0  # chat completions answered well
        self.by_kind: dict[str, int] = {}  # misbehaviours sent
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict) -> dict:
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema")
        request = Request(messages=tuple(body.get("messages") or ()), schema=schema,
                          max_tokens=body.get("max_tokens", 512), seed=body.get("seed", 0))
        [response] = self.engine.generate([request])
        return {"id": "stub", "object": "chat.completion", "model": body.get("model", "stub"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": response.text},
                             "finish_reason": response.finish_reason}],
                "usage": {"prompt_tokens": 1, "completion_tokens": max(1, len(response.text) // 4)}}

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's spelling
                self._send(200, json.dumps({"data": [{"id": "stub"}]}).encode())

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                fault = stub.faults.by_word(body)
                with stub.lock:
                    stub.received += 1
                    if fault is None:
                        stub.unworded += 1
                        fault = stub.faults.numbers.get(stub.unworded)
                    if fault:
                        stub.by_kind[fault] = stub.by_kind.get(fault, 0) + 1
                if fault == "500":
                    return self._send(500, b"internal error (stub)")
                if fault == "garbage":
                    return self._send(200, b"<html>not json</html>")
                if fault == "hang":
                    time.sleep(stub.faults.hang_s)
                    return self._send(504, b"hung (stub)")
                with stub.slots:
                    time.sleep(stub.latency_s)
                    answer = stub.answer(body)
                with stub.lock:
                    stub.answered += 1
                self._send(200, json.dumps(answer).encode())

            def _send(self, code: int, data: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                    pass

            def log_message(self, *args):
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per request")
    parser.add_argument("--slots", type=int, default=8, help="requests served at once")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with StubServer(args.latency, args.slots, port=args.port) as stub:
        print(f"serving {stub.url}/v1/chat/completions ({args.slots} slots, {args.latency} s each); Ctrl-C stops",
              flush=True)
        try:
            stub.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
