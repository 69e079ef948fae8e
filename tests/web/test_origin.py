"""The audit page's Host and Origin policy (builder/web/origin.py), on a real uvicorn server on
loopback: exactly the printed origin, each --allowed-origin, and under --host 0.0.0.0 the
address a request arrived at (reached here from a second loopback address, 127.0.0.2)."""
import socket
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from builder.web.origin import CheckHost, OriginError, OriginPolicy, parse_origin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A one-route page behind the policy: GET answers; POST answers 200 only from an allowed Origin."""

    def __init__(self, host: str, allowed=()):
        import uvicorn

        self.port = free_port()
        self.policy = OriginPolicy(host, self.port, allowed)

        async def page(request):
            if request.method == "POST" and not self.policy.origin_ok(request.scope, request.headers.get("origin")):
                return PlainTextResponse("origin refused", status_code=403)
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/", page, methods=["GET", "POST"])],
                        middleware=[Middleware(CheckHost, policy=self.policy)])
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def running():
    servers = []

    def start(host, allowed=()):
        servers.append(Server(host, allowed))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def get(url, **headers):
    return httpx.get(url, headers=headers).status_code


def post(url, **headers):
    return httpx.post(url, headers=headers).status_code


def test_loopback_answers_exactly_the_printed_origin(running):
    s = running("127.0.0.1")
    base = f"http://127.0.0.1:{s.port}"
    assert s.policy.printed == base
    assert get(base + "/") == 200 and post(base + "/", Origin=base) == 200
    # Another name for the same address, another port, a foreign name: each is another origin.
    assert get(base + "/", Host=f"localhost:{s.port}") == 400
    assert get(base + "/", Host="127.0.0.1:1") == 400 and get(base + "/", Host="127.0.0.1") == 400
    assert get(base + "/", Host="attacker.example") == 400
    assert post(base + "/", Origin=f"http://localhost:{s.port}") == 403
    assert post(base + "/", Origin=f"https://127.0.0.1:{s.port}") == 403 and post(base + "/") == 403


def test_a_wildcard_bind_answers_at_the_address_a_request_arrived_at(running):
    s = running("0.0.0.0")
    for address in ("127.0.0.1", "127.0.0.2"):  # the second: as another machine reaches this one
        base = f"http://{address}:{s.port}"
        assert get(base + "/") == 200 and post(base + "/", Origin=base) == 200
    # The page is not answered under a name (rebinding), nor for an address it was not reached at.
    assert get(f"http://127.0.0.2:{s.port}/", Host=f"evil.example:{s.port}") == 400
    assert post(f"http://127.0.0.2:{s.port}/", Origin=f"http://127.0.0.3:{s.port}") == 403
    assert post(f"http://127.0.0.2:{s.port}/", Origin="http://0.0.0.0:%d" % s.port) == 403


def test_an_allowed_origin_is_answered_with_its_own_scheme_and_port(running):
    s = running("127.0.0.1", ("https://Audit.Example.org/", "http://lab-pc:8000"))
    base = f"http://127.0.0.1:{s.port}"
    assert get(base + "/", Host="audit.example.org") == 200 and get(base + "/", Host="lab-pc:8000") == 200
    assert post(base + "/", Origin="https://audit.example.org") == 200 and post(base + "/", Origin="http://lab-pc:8000") == 200
    assert post(base + "/", Origin="http://audit.example.org") == 403  # http is another origin than https
    assert get(base + "/", Host="lab-pc:8001") == 400


@pytest.mark.parametrize("text", ["audit.example.org", "ftp://host", "https://host/path", "http://user@host",
                                  "http://host:99999", "http://"])
def test_an_allowed_origin_that_is_no_origin_is_refused_with_an_example(text):
    with pytest.raises(OriginError, match="give an origin such as|port is not a number"):
        parse_origin(text)


def test_origins_are_written_as_a_browser_sends_them():
    assert parse_origin("HTTPS://Audit.Example.org:443") == "https://audit.example.org"
    assert parse_origin("http://lab-pc:80/") == "http://lab-pc"
    assert parse_origin("http://192.168.1.20:8765") == "http://192.168.1.20:8765"


def test_audit_serve_refuses_an_allowed_origin_that_is_no_origin(tmp_path):
    from typer.testing import CliRunner

    from builder.cli import app

    from ..conftest import SHORT_PASSAGES, write_workspace

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES)
    result = CliRunner().invoke(app, ["audit", "serve", "-w", str(root), "--allowed-origin", "audit.example.org"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "give an origin such as https://audit.example.org" in result.output
