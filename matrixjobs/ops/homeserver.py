"""A small blocking client for the few Matrix calls the doctor makes.

Network trouble becomes `Unreachable` and error answers `MatrixError`, each with a
one-line message; tokens travel only in headers and are never part of a message.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx2

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0


class Unreachable(Exception):
    """No answer: refused, unknown host, TLS failure, timeout."""


class MatrixError(Exception):
    """The homeserver answered with an error, or with something that is not the answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def strings(answer: dict[str, Any], key: str, path: str) -> list[str]:
    """answer[key] (missing: []) if it is a list of strings; else MatrixError."""
    value = answer.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise MatrixError(f"{path}: '{key}' is not a list of strings", 200)
    return value


def table(answer: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """answer[key] (missing: {}) if it is a JSON object; else MatrixError."""
    value = answer.get(key, {})
    if not isinstance(value, dict):
        raise MatrixError(f"{path}: '{key}' is not an object", 200)
    return value


def quoted(part: str) -> str:
    return quote(part, safe="")


def describe_network_error(exc: Exception) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx2.InvalidURL | UnicodeError):
        # Host names the config's check lets through but IDNA 2008 refuses.
        return f"not a valid URL ({exc})"
    return str(exc).strip() or type(exc).__name__


class Homeserver:
    """`with Homeserver(url) as hs: hs.call("GET", "/_matrix/client/versions")`."""

    def __init__(self, url: str, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        # No base_url: a malformed URL then fails in call(), as Unreachable.
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
        )

    def __enter__(self) -> Homeserver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._http.close()

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             params: dict[str, str] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = self._http.request(method, self.url + path, headers=headers, json=body,
                                          params=params)
        except (httpx2.HTTPError, httpx2.InvalidURL, UnicodeError) as exc:
            raise Unreachable(describe_network_error(exc)) from None
        status = response.status_code
        try:
            data = response.json() if response.content else {}
        except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
            data = None
        if response.is_success and isinstance(data, dict):
            return data
        if response.is_success:
            raise MatrixError(f"{path}: the answer is not a JSON object (HTTP {status})", status)
        errcode = error = ""
        if isinstance(data, dict):
            errcode, error = str(data.get("errcode", "")), str(data.get("error", ""))
        raise MatrixError(f"{error} ({errcode}, HTTP {status})" if error else f"HTTP {status}",
                          status)
