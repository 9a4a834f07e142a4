"""Whom the console answers, and the headers its answers carry.

- **Host names** (DNS rebinding): a web page on an attacker's name that its DNS later points
  at the console's address would be of the console's origin to the browser, free to read
  every run's payload and, with `--allow-cancel`, to cancel runs. So a request is answered
  only when its `Host` is an IP address (which no DNS answer changes), `localhost`, the
  name the console listens on, or a name given with `--allowed-host`.
- **Writes from other origins** (CSRF): a request that changes something (not GET, HEAD or
  OPTIONS) carrying an `Origin` must come from the origin it is sent to, or from a name the
  console serves (a proxy in front may send a `Host` of its own). A browser sends `Origin`
  with every such request; a script or `curl` sends none and is not a page.
- **Framing and sniffing**: every answer forbids framing (the cancel button cannot be
  clicked through a transparent frame), loads scripts and styles from the console alone,
  and is taken as the type it says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_READS = frozenset({"GET", "HEAD", "OPTIONS"})
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def host_name(host: str) -> str:
    """The name in a `Host` header (its port and an IPv6 address's brackets left out), in
    lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 address; without its closing bracket, no name
        return host[1 : host.find("]")] if "]" in host else ""
    name, _, _ = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    return name.removesuffix(".")  # a fully qualified name's root: the same host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """The console's middleware (`middleware`) and its answers' headers (`headers`)."""

    def __init__(self, listen_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        names = {host_name(n) for n in allowed_hosts if n.strip()}
        names.add("localhost")
        if not _is_address(listen_host) and listen_host:
            names.add(host_name(listen_host))
        self.names = frozenset(names)

    def serves(self, host: str | None) -> bool:
        """Whether a request with this `Host` header is answered."""
        if not host:
            return False
        name = host_name(host)
        return _is_address(name) or name in self.names or name.endswith(".localhost")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a `Host` the console does not serve, and a write from another origin."""
        host = request.headers.get("Host")
        if not self.serves(host):
            name = host_name(host or "")
            raise web.HTTPForbidden(
                reason=f"the console does not answer to the host name {name!r}; "
                f"serve it with --allowed-host {name} if that name is its own"
                if name
                else "a request must name its host (the Host header)"
            )
        origin = request.headers.get("Origin")
        if (
            request.method not in _READS
            and origin is not None
            and not self._own_origin(origin, host or "")
        ):
            raise web.HTTPForbidden(
                reason="a change must come from the console's own page (Origin)"
            )
        return await handler(request)

    def _own_origin(self, origin: str, host: str) -> bool:
        """Whether a change's `Origin` is the console's page: the host the request was sent
        to, or a name the console serves (behind a proxy that sends its own `Host`)."""
        netloc = urlsplit(origin).netloc.lower()
        return netloc == host.strip().lower() or host_name(netloc) in self.names

    @staticmethod
    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        """Add `HEADERS` to every answer (`on_response_prepare`)."""
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
