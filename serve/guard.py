"""What a request must show before `genesis serve` reads it: a `Host` naming this server, and JSON bodies.

A page on any site the user visits can make the browser send requests to `http://127.0.0.1:PORT` after
pointing its own name at 127.0.0.1 (DNS rebinding): the browser then treats the server as that page's own
origin, so the page can read `/api/status` and drive generations. Such requests carry the page's name in
`Host`, so only names this server answers to are served: the address it is bound to, the loopback names when
it is bound to loopback, IP literals and this machine's name when it listens on every interface, and names given
with `--allow-host` (a reverse proxy's public name). A body of another type than JSON is refused too: a
cross-site page can POST `text/plain` without the browser asking the server first, but not `application/json`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
# Methods that never carry a body: everything else must send JSON.
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def split_host(value: str) -> tuple[str, int | None]:
    """'Name:port', '[v6]:port', 'name' → (lower-case name without brackets or trailing dot, port or None).
    Raises ValueError for a header that is not a host."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(value)
        ipaddress.IPv6Address(name)
    else:
        name, colon, port = value.partition(":")
        if not colon:
            port = None
    if not name or (port is not None and not port.isdigit()):
        raise ValueError(value)
    return name.rstrip("."), int(port) if port is not None else None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(name: str) -> bool:
    return name == "localhost" or (is_ip(name) and ipaddress.ip_address(name).is_loopback)


@dataclass(frozen=True)
class HostPolicy:
    """The names (and the port) under which this server may be addressed. `allow`: extra names, each `name` (any
    port: a proxy's port is its own) or `name:port`."""

    bind_host: str = "127.0.0.1"
    port: int | None = None
    allow: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for entry in self.allow:
            split_host(entry)  # refuse a malformed --allow-host at start-up, not per request
        bind = self.bind_host.strip("[]").lower()
        names = {bind}
        if is_loopback(bind) or bind in WILDCARD_HOSTS:
            names |= LOOPBACK_NAMES
        if bind in WILDCARD_HOSTS:
            names.add(socket.gethostname().lower())
        # frozen: the names are worked out once, not per request
        object.__setattr__(self, "_wildcard", bind in WILDCARD_HOSTS)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_allowed", tuple(split_host(entry) for entry in self.allow))

    def refusal(self, header: str | None) -> str | None:
        """None when a request with this `Host` header may be served; otherwise the one-line reason."""
        if not header:
            return "request has no Host header; send the address you opened, e.g. " + self.example()
        try:
            name, port = split_host(header)
        except ValueError:
            return f"Host {header!r} is not a host name; open {self.example()}"
        for allowed_name, allowed_port in self._allowed:
            if name == allowed_name and allowed_port in (None, port):
                return None
        own = name in self._names or (self._wildcard and is_ip(name))
        if own and (port is None or self.port is None or port == self.port):
            return None
        return (f"Host {header!r} is not an address of this server; open {self.example()}, or, behind a reverse "
                f"proxy, restart `genesis serve` with --allow-host {name}")

    def example(self) -> str:
        host = "127.0.0.1" if self._wildcard else self.bind_host.strip("[]")
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" if self.port else f"http://{host}/"


class RequestGuard:
    """ASGI middleware in front of every route (static files included): refuses a foreign `Host` (403) and a
    body that is not JSON (415), each as JSON `{"error": "one line"}`."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # the app has none; a foreign page must not reach one added later
            if self.policy.refusal(header(scope, "host")) is not None:
                return await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http":
            reason = self.policy.refusal(header(scope, "host"))
            if reason is not None:
                return await reply(send, 403, reason)
            media_type = (header(scope, "content-type") or "").split(";")[0].strip().lower()
            if scope["method"] not in BODYLESS_METHODS and media_type != "application/json":
                return await reply(send, 415, f"request body: Content-Type {media_type or 'missing'}; "
                                              f"send application/json")
        await self.app(scope, receive, send)


def header(scope, name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


async def reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
