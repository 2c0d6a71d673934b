"""Errors as the API answers them: `{"error": {"code": "...", "message": "..."}}`."""

from __future__ import annotations

import json
import logging
import secrets

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from matrixjobs.errors import (
    AlreadyFinishedError,
    AlreadySubmittedError,
    BadArgumentsError,
    BadBatchError,
    ForbiddenError,
    GroupBusyError,
    MatrixJobsError,
    NotAwaitingApprovalError,
    NotFoundError,
    StoreUnavailableError,
    TokenExistsError,
    UnknownTargetError,
)
from matrixjobs.store.health import RETRY_AFTER_S, classify

log = logging.getLogger(__name__)

STORE_UNAVAILABLE = "store_unavailable"

# The core's errors and how they travel: (HTTP status, error code). Checked in order.
CORE_ERRORS: tuple[tuple[type[MatrixJobsError], int, str], ...] = (
    (StoreUnavailableError, 503, STORE_UNAVAILABLE),
    (ForbiddenError, 403, "forbidden"),
    (NotFoundError, 404, "not_found"),
    (UnknownTargetError, 404, "unknown_target"),
    (BadArgumentsError, 422, "bad_arguments"),
    (BadBatchError, 422, "bad_batch"),
    (AlreadyFinishedError, 409, "already_finished"),
    (AlreadySubmittedError, 409, "already_submitted"),
    (TokenExistsError, 409, "token_exists"),
    (NotAwaitingApprovalError, 409, "not_awaiting_approval"),
    (GroupBusyError, 409, "group_busy"),
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
    status: int, code: str, message: str, headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> Response:
    error: dict[str, str] = {"code": code, "message": message}
    if request_id is not None:
        error["requestId"] = request_id
    if code == STORE_UNAVAILABLE:
        headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_S)}
    return Response(json.dumps({"error": error}), status, headers=headers,
                    media_type="application/json")


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


async def on_disconnect(request: Request, exc: Exception) -> Response:
    """The client went away before its body was read: nobody hears the answer, and it is
    no bug of ours (a forge's delivery timed out, a connection dropped)."""
    assert isinstance(exc, ClientDisconnect)
    log.info("API %s %s: the client went away before sending its whole request",
             request.method, request.url.path)
    return error_response(400, "client_disconnected", "the request's body was cut short")


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    """A store that is busy, full or unreachable is no bug: 503, try again. Anything else
    is one: 500, its traceback logged once under an id the answer names."""
    fault = classify(exc)
    if fault is not None:
        return error_response(503, STORE_UNAVAILABLE,
                              f"store: {fault}; try again in {RETRY_AFTER_S} s")
    request_id = secrets.token_hex(6)
    log.error("API %s %s failed [request %s]", request.method, request.url.path, request_id,
              exc_info=exc)
    return error_response(500, "internal",
                          f"internal error; see the service log for request {request_id}",
                          request_id=request_id)
