"""Bearer-token check in front of every endpoint (the API's and, later, MCP's)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from matrixjobs.api.errors import error_response

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="matrixjobs"'}
# Probes (systemd, containers, load balancers) hold no token; this path tells only whether
# the service answers and its version.
OPEN_PATHS = frozenset({"/healthz"})


class BearerAuth:
    """Pure ASGI middleware: streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, credentials = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            message = "this API needs a token: send 'Authorization: Bearer <token>'"
        elif not hmac.compare_digest(credentials.strip().encode(), self._token):
            message = "wrong API token"
        else:
            await self.app(scope, receive, send)
            return
        await error_response(401, "unauthorized", message, CHALLENGE)(scope, receive, send)


class LoopbackGuard:
    """Without a token, only this machine's own, non-browser-forged requests get in.

    A web page the user visits can reach a loopback port too: by DNS rebinding
    (its own host name pointed at 127.0.0.1, so `Host` is foreign) or with a
    plain cross-site POST (the browser adds an `Origin` of another site). Both
    are refused with 403; curl, the CLI and other programs send neither.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        origin = headers.get("origin")
        if host and host_name(host) not in self.allowed_hosts:
            message = f"Host '{host}' is not allowed; use 127.0.0.1 or localhost"
        elif origin is not None and origin.partition("://")[2].rstrip("/") != host:
            message = "cross-origin requests are not allowed"
        else:
            await self.app(scope, receive, send)
            return
        await error_response(403, "forbidden", message)(scope, receive, send)


def host_name(host: str) -> str:
    """'127.0.0.1:8765' → '127.0.0.1', '[::1]:8765' → '::1', 'LocalHost' → 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
