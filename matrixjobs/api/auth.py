"""Token check in front of every endpoint (the API's, MCP's and the dashboard's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from matrixjobs.api.errors import error_response, from_core
from matrixjobs.api.session import (
    COOKIE,
    PERSONAL,
    LoginThrottle,
    has_session,
    same_origin,
    session_of,
    session_value,
)
from matrixjobs.errors import MatrixJobsError, StoreUnavailableError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="matrixjobs"'}
# The scope key that names the person a personal token (or its session) let in.
PERSON = "matrixjobs.person"
People = Callable[[str], Awaitable[str | None]]
# Open without a token: probes (systemd, containers, load balancers) hold none, and
# /healthz tells only whether the service answers and its version; the login form and
# logout must be reachable to get or drop a session. /static/ (OPEN_PREFIX) holds the
# dashboard's script and style sheet, the same for everyone and free of data.
OPEN_PATHS = frozenset({"/healthz", "/login", "/logout"})
OPEN_PREFIX = "/static/"
# Forges' webhook deliveries: each carries its forge's signature, checked by the endpoint
# (api/hooks.py) before anything is read from it; a forge has no token, and reaches the
# service through a proxy under a public host name.
HOOKS_PREFIX = "/hooks/"
# Pages a person opens: without a session they lead to the login form, not a JSON 401.
PAGES = frozenset({"/"})


class BearerAuth:
    """Pure ASGI middleware: streaming responses pass through untouched.

    A request gets in with `Authorization: Bearer <token>` (the service token, or a
    person's token: `people` says whose, and the request then acts as them), or with the
    dashboard's session cookie if it comes from a page of this host (see `same_origin`).
    """

    def __init__(self, app: ASGIApp, token: str, throttle: LoginThrottle,
                 people: People) -> None:
        self.app = app
        self._token = token
        self._session = session_value(token).encode()
        self._throttle = throttle
        self._people = people

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] not in ("http", "websocket") or path in OPEN_PATHS
                or path.startswith((OPEN_PREFIX, HOOKS_PREFIX))):
            await self.app(scope, receive, send)
            return
        try:
            refusal = await self._refusal(scope, path)
        except MatrixJobsError as exc:  # whose token it is could not be read: the store
            refusal = self._unchecked(exc, path)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    async def _refusal(self, scope: Scope, path: str) -> Response | None:
        """None to let the request in (a person's request marked as theirs), else the
        answer that keeps it out."""
        headers = Headers(scope=scope)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            given = credentials.strip()
            person = await self._people(given)
            if person is not None:
                scope[PERSON] = person
                return None
            wait_s = self._throttle.check(given, self._token, scope)
            if wait_s is None:
                return None
            if wait_s > 0:
                return error_response(429, "too_many_requests", "too many wrong tokens; "
                                      f"try again in {int(wait_s) + 1} s",
                                      {"Retry-After": str(int(wait_s) + 1)})
            return error_response(401, "unauthorized", "wrong API token", CHALLENGE)
        session = session_of(headers)
        person = (await self._people(session.removeprefix(PERSONAL))
                  if session.startswith(PERSONAL) else None)
        if person is not None or has_session(headers, self._session):
            if not same_origin(scope.get("method", "GET"), headers):
                return error_response(403, "forbidden", "requests with the dashboard's "
                                                        "session must come from its own pages")
            if person is not None:
                scope[PERSON] = person
            return None
        if path in PAGES:
            return RedirectResponse("/login", 303)
        message = (f"this API needs a token: send 'Authorization: Bearer <token>' "
                   f"(or the {COOKIE} cookie from /login)")
        return error_response(401, "unauthorized", message, CHALLENGE)

    @staticmethod
    def _unchecked(exc: MatrixJobsError, path: str) -> Response | None:
        """The answer to a request whose token could not be checked. A page holds no data:
        it opens, and its banner says why its data cannot be read (from the API's 503),
        rather than a browser showing a JSON answer."""
        if path in PAGES and isinstance(exc, StoreUnavailableError):
            return None
        error = from_core(exc)
        return error_response(error.status, error.code, error.message)


def person_of(scope: Scope) -> str | None:
    """The Matrix user whose personal token let the request in; None: the service token."""
    person = scope.get(PERSON)
    return person if isinstance(person, str) else None


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
        if scope["type"] not in ("http", "websocket") or scope.get("path", "").startswith(
                HOOKS_PREFIX):  # signed: neither a rebound host nor another site can sign
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
