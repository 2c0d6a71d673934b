"""POST /hooks/{name}: a forge's webhook deliveries (matrixjobs/webhooks does the checks).

Open without the API's token (api/auth.py lets /hooks/ through): each delivery carries its
forge's signature instead. Answers, as docs/webhooks.md tells them to operators:
201 started (the job or batch, as POST /v1/jobs answers), 200 a redelivery (what the first
delivery started) or a ping's pong, 202 ignored (the reason), and errors in the API's shape:
400 bad_payload, 401 bad_signature, 404 unknown_webhook, 409 group_busy, 413
body_too_large, 422 bad_arguments, 429 rate_limited (Retry-After), 503 store_unavailable
(Retry-After).
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from matrixjobs.api.errors import ApiError, error_response
from matrixjobs.api.routes import created, json_response
from matrixjobs.errors import echo
from matrixjobs.models import BATCH_PREFIX
from matrixjobs.webhooks.receiver import Delivery, Outcome, WebhookReceiver

PATH = "/hooks/{name}"
# A push delivery is a few KiB; only a push of hundreds of commits (GitHub lists up to 2048
# in full) comes near this, and gets 413, which the forge shows as a failed delivery.
MAX_HOOK_BYTES = 1024 * 1024
# Outcomes that answer with an error: (status, code).
ERRORS = {
    Outcome.BAD_SIGNATURE: (401, "bad_signature"),
    Outcome.BAD_PAYLOAD: (400, "bad_payload"),
    Outcome.RATE_LIMITED: (429, "rate_limited"),
}
TOO_LARGE = (413, "body_too_large")
UNKNOWN = (404, "unknown_webhook")


class HookEndpoint:
    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver

    def routes(self) -> list[Route]:
        return [Route(PATH, self.deliver, methods=["POST"])]

    async def deliver(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.receiver.hooks:
            raise ApiError(*UNKNOWN, f"no webhook '{echo(name)}' is configured")
        try:
            body = await capped_body(request)
        except ApiError:
            self.receiver.too_large(name)
            raise
        return answer(await self.receiver.deliver(name, request.headers, body))


async def capped_body(request: Request) -> bytes:
    """The body, read no further than MAX_HOOK_BYTES whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_HOOK_BYTES:
        raise ApiError(*TOO_LARGE, f"request body over {MAX_HOOK_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_HOOK_BYTES:
            raise ApiError(*TOO_LARGE, f"request body over {MAX_HOOK_BYTES} bytes")
    return bytes(raw)


def answer(delivery: Delivery) -> Response:
    if delivery.outcome in ERRORS:
        status, code = ERRORS[delivery.outcome]
        headers = ({"Retry-After": str(delivery.retry_after_s)}
                   if delivery.retry_after_s else None)
        return error_response(status, code, delivery.message, headers)
    work = delivery.work
    if delivery.outcome is Outcome.STARTED and work is not None:
        collection = "batches" if work.id.startswith(BATCH_PREFIX) else "jobs"
        return created(work, f"/v1/{collection}/{work.id}")
    if work is not None:  # a redelivery: what the first delivery started
        return json_response(work.to_json())
    status = 202 if delivery.outcome is Outcome.IGNORED else 200
    return json_response(json.dumps({"outcome": delivery.outcome.value,
                                     "message": delivery.message}), status)
