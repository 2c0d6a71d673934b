"""The dashboard's login session: a cookie derived from the API token, and its guards.

The cookie never holds the token: it is an HMAC of a fixed label keyed with the
token, so it stops working the moment the token changes, and reading it (from
a browser profile, say) does not reveal the token the API and CLI use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import deque
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import Scope

log = logging.getLogger(__name__)

COOKIE = "matrixjobs_session"
LABEL = b"matrixjobs dashboard session v1"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_value(token: str) -> str:
    return hmac.new(token.encode(), LABEL, hashlib.sha256).hexdigest()


def session_cookie(value: str, secure: bool) -> str:
    """The Set-Cookie value of a fresh session (a browser-session cookie: no Max-Age):
    `session_value` of the service token, or PERSONAL + a personal token."""
    flags = "; Secure" if secure else ""
    return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{flags}"


def cleared_cookie(secure: bool) -> str:
    flags = "; Secure" if secure else ""
    return f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{flags}"


def has_session(headers: Headers, expected: bytes) -> bool:
    """Whether the request carries the service token's session cookie (compared in
    constant time)."""
    return hmac.compare_digest(session_of(headers).encode(), expected)


def session_of(headers: Headers) -> str:
    """The session cookie's value, or ''."""
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return ""


# A personal token's session holds the token itself: it is checked on every request, so
# revoking the token ends the session.
PERSONAL = "p."


def named_origin(headers: Headers) -> bool | None:
    """Whether the page the request comes from (`Origin`, else `Referer`) is of this very
    host: True, False, or None when the request names none."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None:
        return origin.partition("://")[2].rstrip("/") == host
    referer = headers.get("referer")
    if referer is not None:
        return urlsplit(referer).netloc == host
    return None


def same_origin(method: str, headers: Headers) -> bool:
    """Whether a cookie-carried request comes from a page of this very host.

    Browsers send `Origin` on cross-site requests and on every POST; a state-changing
    request must prove its origin (by `Origin`, else `Referer`). A GET naming neither
    is a plain navigation and passes; SameSite=Strict keeps the cookie off cross-site
    ones anyway, this is the second lock.
    """
    verdict = named_origin(headers)
    return method in SAFE_METHODS if verdict is None else verdict


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


class LoginThrottle:
    """Wrong tokens per client address, from the login form and bearer headers alike.

    The right token always gets in: a stranger sending wrong ones must not lock anyone
    out (behind a reverse proxy every visitor shares its address). An address past
    `attempts` wrong tokens in `window_s` seconds is answered 429 and logged once per
    window. No throttle stops a guesser with many addresses or parallel requests: the
    token's length does (a short one is warned about at start). The table forgets quiet
    addresses once it grows past `max_addresses`, so a flood cannot grow it without bound.
    """

    def __init__(self, attempts: int = 5, window_s: float = 60.0,
                 max_addresses: int = 4096) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def check(self, given: str, token: str, scope: Scope) -> float | None:
        """None when `given` is the token; else the failure is counted and the answer is
        the seconds its client should wait (0: just a wrong token)."""
        if hmac.compare_digest(given.encode(), token.encode()):
            return None
        return self.failed(client_address(scope))

    def failed(self, address: str, now: float | None = None) -> float:
        """Count a wrong token; the seconds this address should wait, 0 if not over."""
        now = time.monotonic() if now is None else now
        if len(self._failures) >= self.max_addresses:
            self._forget_quiet(now)
        failures = self._recent(address, now)
        if failures is None:
            failures = self._failures[address] = deque(maxlen=self.attempts + 1)
        before = len(failures)
        failures.append(now)
        if before < self.attempts:
            return 0.0
        if before == self.attempts:  # crossed now: once until its failures age out
            log.warning("api: more than %d wrong tokens from %s within %.0f s", self.attempts,
                        address, self.window_s)
        return failures[0] + self.window_s - now

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def _forget_quiet(self, now: float) -> None:
        for address in list(self._failures):
            if not self._recent(address, now):
                del self._failures[address]
        if len(self._failures) >= self.max_addresses:
            self._failures.clear()  # all of them busy: a flood; start over rather than grow
