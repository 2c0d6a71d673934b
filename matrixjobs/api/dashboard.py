"""The web dashboard: its page, static files, login form and live event stream.

URL layout: `/` is the page (one HTML file; views are `#/`, `#/jobs/j12` and
`#/batches/b3`, so no server route per view), `/static/<file>` its script and
style sheet from the package (no build step, no CDN), `/login` and `/logout`
the session, `/v1/events` the live stream (see feed.py). With no token set,
the page is open to what LoopbackGuard lets in and /login leads straight to it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from html import escape
from importlib.resources import files
from string import Template
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from matrixjobs.api.auth import CHALLENGE
from matrixjobs.api.errors import ApiError
from matrixjobs.api.feed import MAX_PAGES, DashboardFeed, SseStream
from matrixjobs.api.routes import known_query
from matrixjobs.api.session import (
    PERSONAL,
    LoginThrottle,
    cleared_cookie,
    named_origin,
    same_origin,
    session_cookie,
    session_value,
)
from matrixjobs.api.stream import OpenStreams
from matrixjobs.app import App
from matrixjobs.errors import StoreUnavailableError
from matrixjobs.store.health import RETRY_AFTER_S

STATIC = files("matrixjobs.api") / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# No inline script or style anywhere, so the policy can forbid them; the page talks to
# its own origin only and may not be framed (clickjacking of Cancel).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
MAX_FORM_BYTES = 4096


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, StaticFile]:
    """Every file of the package's static/ folder, read once (they are a few KiB)."""
    found = {}
    for entry in STATIC.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            found[entry.name] = StaticFile(body, CONTENT_TYPES[suffix], etag)
    return found


class Dashboard:
    def __init__(self, app: App, streams: OpenStreams, token: str | None,
                 throttle: LoginThrottle) -> None:
        self.app = app
        self.token = token
        self.files = load_static()
        self.feed = DashboardFeed(app)
        self.streams = streams
        self.throttle = throttle
        self.login_form = Template(self.files.pop("login.html").body.decode())

    def pages(self) -> list[Route]:
        """For browsers, not API clients: the OpenAPI document leaves them out."""
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/login", self.show_login, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
        ]

    def api_routes(self) -> list[Route]:
        return [Route("/v1/events", self.events, methods=["GET"])]

    async def page(self, request: Request) -> Response:
        return self.serve(request, self.files["index.html"])

    async def static(self, request: Request) -> Response:
        found = self.files.get(request.path_params["name"])
        if found is None:
            raise ApiError(404, "not_found", "no such file")
        return self.serve(request, found)

    def serve(self, request: Request, found: StaticFile) -> Response:
        # Revalidated on every load (names are not versioned), answered by a 304 mostly.
        headers = {**SECURITY_HEADERS, "ETag": found.etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, headers=headers, media_type=found.content_type)

    async def events(self, request: Request) -> SseStream:
        known_query(request, "focus")
        if len(self.feed.clients) >= MAX_PAGES:
            raise ApiError(503, "unavailable", f"{MAX_PAGES} dashboard pages are open already; "
                                               "close one and reload")
        return SseStream(self.feed, self.streams, request.query_params.get("focus"))

    # -- the session -------------------------------------------------------------------------------

    async def show_login(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse("/", 303)
        return self.form()

    async def login(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse("/", 303)
        # The token proves itself; only a page of another site posting here is refused.
        if named_origin(request.headers) is False:
            return self.form("This form only works from this server's own login page.", 403)
        given = await read_token(request)
        try:
            owner = await self.app.token_owner(given)
        except StoreUnavailableError as exc:  # a page, not the API's JSON answer
            return self.form(f"Personal tokens cannot be checked now: {exc}.", 503,
                             {"Retry-After": str(RETRY_AFTER_S)})
        if owner is not None:
            return RedirectResponse("/", 303, {"Set-Cookie": session_cookie(
                PERSONAL + given, over_https(request))})
        wait_s = self.throttle.check(given, self.token, request.scope)
        if wait_s is not None:
            if wait_s > 0:
                return self.form(f"Too many wrong tokens; try again in {int(wait_s) + 1} s.",
                                 429)
            return self.form("Wrong token.", 401, CHALLENGE)
        return RedirectResponse("/", 303, {"Set-Cookie": session_cookie(
            session_value(self.token), over_https(request))})

    async def logout(self, request: Request) -> Response:
        if not same_origin("POST", request.headers):
            raise ApiError(403, "forbidden", "logout only from this server's own pages")
        return RedirectResponse("/login", 303,
                                {"Set-Cookie": cleared_cookie(over_https(request))})

    def form(self, error: str = "", status: int = 200,
             headers: dict[str, str] | None = None) -> Response:
        html = self.login_form.substitute(error=escape(error))
        return Response(html, status, headers={**SECURITY_HEADERS, **(headers or {})},
                        media_type=CONTENT_TYPES[".html"])


def over_https(request: Request) -> bool:
    """Whether the browser sees this page over https: served so, or (behind a TLS proxy,
    which reaches us over plain http) its form posted from an https origin."""
    return (request.url.scheme == "https"
            or request.headers.get("origin", "").startswith("https://"))


async def read_token(request: Request) -> str:
    """The `token` field of a urlencoded form body, or '' (bodies over 4 KiB are refused)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            raise ApiError(413, "body_too_large", f"login form over {MAX_FORM_BYTES} bytes")
    values = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])
    return values[0].strip()
