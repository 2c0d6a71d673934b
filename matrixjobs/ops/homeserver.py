"""A small blocking client for the few Matrix calls the doctor makes.

Network trouble becomes `Unreachable` and error answers `MatrixError`, each with a
one-line message; tokens travel only in headers and are never part of a message.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx2

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0


class Unreachable(Exception):
    """No answer: refused, unknown host, TLS failure, timeout."""


class MatrixError(Exception):
    """The homeserver answered with an error."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(f"{error} ({errcode}, HTTP {status})" if error else f"HTTP {status}")
        self.status = status
        self.errcode = errcode


def quoted(part: str) -> str:
    return quote(part, safe="")


def describe_network_error(exc: httpx2.HTTPError) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return "no answer in time"
    return str(exc).strip() or type(exc).__name__


class Homeserver:
    """`with Homeserver(url) as hs: hs.call("GET", "/_matrix/client/versions")`."""

    def __init__(self, url: str, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._http = httpx2.Client(
            base_url=self.url,
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
            response = self._http.request(method, path, headers=headers, json=body,
                                          params=params)
        except httpx2.HTTPError as exc:
            raise Unreachable(describe_network_error(exc)) from None
        try:
            data = response.json() if response.content else {}
        except json.JSONDecodeError:
            data = None
        if response.is_success and isinstance(data, dict):
            return data
        if response.is_success:
            raise MatrixError(response.status_code, "M_NOT_JSON", "the answer is not JSON")
        errcode = error = ""
        if isinstance(data, dict):
            errcode, error = str(data.get("errcode", "")), str(data.get("error", ""))
        raise MatrixError(response.status_code, errcode, error)
