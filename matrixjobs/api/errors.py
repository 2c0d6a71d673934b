"""Errors as the API answers them: `{"error": {"code": "...", "message": "..."}}`."""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from matrixjobs.errors import (
    AlreadyFinishedError,
    AlreadySubmittedError,
    BadArgumentsError,
    BadBatchError,
    MatrixJobsError,
    NotFoundError,
    UnknownTargetError,
)

log = logging.getLogger(__name__)

# The core's errors and how they travel: (HTTP status, error code). Checked in order.
CORE_ERRORS: tuple[tuple[type[MatrixJobsError], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (UnknownTargetError, 404, "unknown_target"),
    (BadArgumentsError, 422, "bad_arguments"),
    (BadBatchError, 422, "bad_batch"),
    (AlreadyFinishedError, 409, "already_finished"),
    (AlreadySubmittedError, 409, "already_submitted"),
)
# Anything else the core raises is a message meant for people, e.g. "shutting down".
OTHER_CORE_ERROR = (503, "unavailable")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


class ApiError(Exception):
    """An error answer decided by the API layer itself (bad body, bad query, …)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return Response(body, status, headers=headers, media_type="application/json")


def from_core(exc: MatrixJobsError) -> ApiError:
    for kind, status, code in CORE_ERRORS:
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    status, code = OTHER_CORE_ERROR
    return ApiError(status, code, str(exc))


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message)


async def on_core_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MatrixJobsError)
    error = from_core(exc)
    return error_response(error.status, error.code, error.message)


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors: unknown path (404), wrong method (405)."""
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "error")
    messages = {404: "no such endpoint",
                405: f"{request.method} is not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("API %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error; see the service log")
