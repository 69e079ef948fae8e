"""Which Host headers and Origins the audit page answers (DNS rebinding and cross-site forms).

Exactly the origin the server prints (scheme http, host and port as printed: `127.0.0.1` is not
`localhost`, and another port is another origin), each `--allowed-origin` (a reverse proxy's or
a LAN name's, with its own scheme), and, bound to every address (`--host 0.0.0.0`), the address
a request actually arrived at, written as an IP literal: another machine reaches the page by
this machine's address, while a rebinding attacker's host name never matches.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse

WILDCARDS = ("0.0.0.0", "")
DEFAULT_PORTS = {"http": 80, "https": 443}


class OriginError(ValueError):
    """An --allowed-origin that is no origin."""


def parse_origin(text: str) -> str:
    """`scheme://host[:port]`, lower-cased, without a default port: what a browser sends as Origin."""
    parts = urlsplit(text.strip())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.username or parts.password:
        raise OriginError(f"--allowed-origin {text!r}: give an origin such as https://audit.example.org or "
                          "http://192.168.1.20:8765 (scheme, host and port only)")
    try:
        port = parts.port
    except ValueError:
        raise OriginError(f"--allowed-origin {text!r}: the port is not a number from 1 to 65535") from None
    host = parts.hostname.lower()
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[parts.scheme] else "")


def _netloc(origin: str) -> str:
    """The Host header a browser sends for this origin."""
    return origin.split("://", 1)[1]


def _normal_host(value: str, scheme: str = "http") -> str:
    """A Host header as an origin's netloc: lower-cased, the scheme's default port dropped."""
    value = value.strip().lower()
    default = f":{DEFAULT_PORTS[scheme]}"
    return value[:-len(default)] if value.endswith(default) else value


class OriginPolicy:
    def __init__(self, host: str, port: int, allowed: tuple[str, ...] = ()):
        self.host, self.port = host, port
        self.allowed = tuple(parse_origin(o) for o in allowed)
        self.wildcard = host in WILDCARDS

    @property
    def printed(self) -> str:
        """The origin the start links carry."""
        return f"http://{'127.0.0.1' if self.wildcard else self.host}:{self.port}"

    def origins(self, scope) -> set[str]:
        """Every origin this request may come from (its connection's, under a wildcard bind)."""
        out = {self.printed, *self.allowed}
        local = (scope.get("server") or (None, None))[0]
        if self.wildcard and local:
            address = ipaddress.ip_address(local)
            out.add(f"http://{address}:{self.port}" if address.version == 4 else f"http://[{address}]:{self.port}")
        return {o.removesuffix(":80") if o.startswith("http://") else o for o in out}

    def host_ok(self, scope, host: str | None) -> bool:
        if not host:
            return False
        return any(_normal_host(host, o.split("://")[0]) == _netloc(o) for o in self.origins(scope))

    def origin_ok(self, scope, origin: str | None) -> bool:
        return bool(origin) and origin.strip().lower() in self.origins(scope)


class CheckHost:
    """ASGI middleware: a request whose Host header is not one of the policy's is answered 400
    (a page on another site that rebinds its name to this address reaches nothing)."""

    def __init__(self, app, policy: OriginPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.policy.host_ok(scope, host):
                return await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)
