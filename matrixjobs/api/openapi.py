"""The API's OpenAPI 3.1 document, served at /v1/openapi.json.

It is built from the route table: every route must have an entry in OPERATIONS
(and every entry a route), or the server refuses to start. Request bodies and
the job-progress event come from their pydantic models; error codes from
`api/errors.py`. /mcp is left out: it speaks MCP's streamable HTTP (JSON-RPC),
which the MCP specification describes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from matrixjobs import __version__
from matrixjobs.api import hooks
from matrixjobs.api.errors import CORE_ERRORS, HTTP_CODES, OTHER_CORE_ERROR
from matrixjobs.api.routes import (
    DEFAULT_LIMIT,
    MAX_BODY_BYTES,
    MAX_LIMIT,
    Deny,
    IssueToken,
    SubmitBatch,
    SubmitJob,
    json_response,
)
from matrixjobs.api.stream import NDJSON
from matrixjobs.audit import AuditAction
from matrixjobs.fleet import WorkerState
from matrixjobs.models import BATCH_PREFIX, JOB_PREFIX, MAX_ID, Status
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.schedules import ScheduleInfo

PATH = "/v1/openapi.json"
JSON = "application/json"
SCHEMAS = "#/components/schemas/"
# Errors the API layer itself answers (routes.py), beside the core's and Starlette's.
API_ERRORS = frozenset({(400, "bad_json"), (400, "bad_body"), (400, "bad_query"),
                        (413, "body_too_large"), (429, "too_many_requests"),
                        *hooks.ERRORS.values(), hooks.TOO_LARGE, hooks.UNKNOWN})
ERRORS = (API_ERRORS | {(status, code) for _, status, code in CORE_ERRORS}
          | {OTHER_CORE_ERROR} | set(HTTP_CODES.items()))


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: dict[int, dict[str, Any]]
    body: type[BaseModel] | None = None
    parameters: Sequence[dict[str, Any]] = ()
    public: bool = False  # answered without the token
    description: str | None = None
    body_required: bool = True
    raw_body: dict[str, Any] | None = None  # a body no model of ours describes


def ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


def answer(description: str, schema: dict[str, Any], media: str = JSON,
           **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}, **extra}


def event(description: str, **extra: Any) -> dict[str, Any]:
    return answer(description, ref("JobProgressEvent"), **extra)


def events(key: str, description: str) -> dict[str, Any]:
    return answer(description, {
        "type": "object", "required": [key],
        "properties": {key: {"type": "array", "items": ref("JobProgressEvent")}},
    })


def error(description: str, status: int) -> dict[str, Any]:
    """The error shape, with the codes the API answers with this status."""
    codes = sorted(code for answered, code in ERRORS if answered == status)
    return answer(description, {"allOf": [ref("Error"), {
        "properties": {"error": {"properties": {"code": {"enum": codes}}}}}]})


def path_id(kind: str, prefixes: str, example: str) -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": f"^[{prefixes}][0-9]+$"},
            "description": f"a {kind} id", "example": example}


CREATED = {"Location": {"description": "the new job's or batch's URL",
                        "schema": {"type": "string"}}}
LIST_PARAMETERS = (
    {"name": "status", "in": "query", "style": "form", "explode": True,
     "description": "only these states (repeat it, or separate them with commas)",
     "schema": {"type": "array", "items": {"enum": [status.value for status in Status]}}},
    {"name": "limit", "in": "query", "description": "at most this many, newest first",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT}},
)
STREAM = {"name": "stream", "in": "query", "schema": {"type": "boolean", "default": False},
          "description": "follow it: NDJSON, one event per line, until it ends"}
FOLLOW = {"name": "follow", "in": "query", "schema": {"type": "boolean", "default": False},
          "description": "keep sending the log until the run ends"}
BATCH_FILTER = {"name": "batch", "in": "query", "description": "only this batch's operations",
                "schema": {"type": "string", "pattern": f"^[{BATCH_PREFIX}][0-9]+$"}}
HEALTH = ref("Health")
AUDIT_PARAMETERS = (
    {"name": "after", "in": "query", "description": "only records after this seq",
     "schema": {"type": "integer", "minimum": 0, "maximum": MAX_ID}},
    {"name": "since", "in": "query", "schema": {"type": "string"},
     "description": "only records from this time on: ISO 8601 or seconds since the epoch"},
    {"name": "user", "in": "query", "schema": {"type": "string"},
     "description": "only this actor's (a Matrix user id, admin, service)"},
    {"name": "action", "in": "query", "schema": {"enum": list(AuditAction)}},
    {"name": "target", "in": "query", "schema": {"type": "string"},
     "description": "only records about this target"},
    {"name": "limit", "in": "query",
     "description": "at most this many: the first after `after` when it is given, else the "
                    "newest",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT}},
)
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
BAD_QUERY = error("a bad query parameter", 400)
NOT_FOUND = error("no such job or batch (or not an id)", 404)
FORBIDDEN = error("a rule refuses who asks (`forbidden`; the message names the rule), e.g. "
                  "a target that only a Matrix room may start", 403)
SCHEDULE_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "a [schedules.NAME] name", "example": "nightly"}
SCHEDULE_NOT_FOUND = error("no schedule of that name", 404)
BAD_BODY = error("the body is not JSON or not the expected object", 400)
SUBMIT_ERRORS = {
    403: FORBIDDEN,
    400: BAD_BODY,
    404: error("an unknown target", 404),
    409: error("the target's concurrency group has work and its on_busy is \"skip\" "
               "(`group_busy`)", 409),
    413: error(f"a body over {MAX_BODY_BYTES} bytes", 413),
    422: error("arguments the target does not allow, or an empty or oversized batch", 422),
    503: error("the service is shutting down, or the store cannot take new work now "
               "(store_unavailable, with Retry-After)", 503) | {"headers": RETRY_AFTER},
}
# Any endpoint that reads or writes the store: a store that is locked, full or unreachable
# is said so, never as a 500 (README, "HTTP API").
STORE_UNAVAILABLE = error("the store cannot be read or written now (`store_unavailable`: "
                          "disk full, locked or unreachable); `Retry-After` says when to "
                          "try again", 503) | {"headers": RETRY_AFTER}
# What the endpoints that take no body answer to one with fields.
NO_BODY = error("a body with fields (the endpoint takes none: send no body, or {})", 400)
NO_BODY_OR_QUERY = error("a body with fields (the endpoint takes none: send no body, or "
                         "{}), or a query parameter", 400)
CANCEL_ERRORS = {400: NO_BODY, 403: FORBIDDEN, 404: NOT_FOUND,
                 409: error("it had already finished", 409), 503: STORE_UNAVAILABLE}
RERUN_ERRORS = {
    400: NO_BODY,
    403: FORBIDDEN,
    404: error("no such job or batch, or its target is no longer configured", 404),
    422: error("its arguments (or operations) are no longer allowed", 422),
    503: error("the service is shutting down, or the store cannot take new work now "
               "(store_unavailable, with Retry-After)", 503) | {"headers": RETRY_AFTER},
}
JUDGE_ERRORS = {400: NO_BODY, 403: FORBIDDEN, 404: NOT_FOUND,
                409: error("it waits for no approval (any more): `not_awaiting_approval`",
                           409),
                503: STORE_UNAVAILABLE}
APPROVE = ("Count the caller's approval (once per person; the requester's own never counts). "
           "The last one needed releases it to run. Who may: the target's `approvers`, else "
           "whoever may run it; the service token always.")
DENY = "Refuse it: it is cancelled, and its `approval` says who denied it and why."
RERUN = ("The same target and arguments again (for a batch: the same operations), checked "
         "against the current targets; no body. Finished or running work alike.")

HOOK_ANSWER = ref("WebhookAnswer")
HOOK = Operation(
    "A forge's webhook delivery", public=True,
    description=("For the forges (docs/webhooks.md): no token, the forge's signature instead "
                 "(GitHub X-Hub-Signature-256, Forgejo X-Forgejo-Signature, Gitea "
                 "X-Gitea-Signature, GitLab X-Gitlab-Token, generic X-Signature-256). Checked "
                 "in this order: the name, the size, the signature, the rate, then the event, "
                 "branch or tag, and args."),
    parameters=({"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "the webhook's name: [webhooks.NAME]", "example": "site"},),
    raw_body={"type": "object", "description": "the forge's payload, as it sends it"},
    responses={
        201: event("it started this job (or batch), pending", headers=CREATED),
        200: answer("a redelivery: the work the first delivery started; or a ping's answer",
                    {"oneOf": [ref("JobProgressEvent"), HOOK_ANSWER]}),
        202: answer("signed, and ignored: the message says why", HOOK_ANSWER),
        400: error("the payload is not what the forge sends (`bad_payload`)", 400),
        401: error("the signature is missing or wrong (`bad_signature`): nothing runs", 401),
        404: error("no such webhook is configured", 404),
        413: error(f"a body over {hooks.MAX_HOOK_BYTES} bytes", 413),
        422: error("the expanded args are not allowed by the target's args_pattern, or the "
                   "push lacks what a template names: nothing runs", 422),
        409: error("the target's concurrency group is busy and its on_busy is \"skip\" "
                   "(`group_busy`): nothing runs", 409),
        429: error("over the webhook's max_per_minute (`rate_limited`); `Retry-After` says "
                   "when to send again", 429) | {"headers": RETRY_AFTER},
        503: error("the service is shutting down, or the store cannot take new work now "
                   "(store_unavailable, with Retry-After)", 503) | {"headers": RETRY_AFTER},
    })

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", hooks.PATH): HOOK,
    ("GET", "/healthz"): Operation(
        "Whether the service takes work", public=True,
        description="For probes: no token needed, and it tells nothing but this.",
        responses={200: answer("it takes work", HEALTH),
                   503: answer("it is stopping, or degraded: the store cannot take writes",
                               HEALTH)}),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (text format 0.0.4)",
        description="What each metric means: deploy/README.md, section 12.",
        responses={200: answer("the metrics", {"type": "string"}, "text/plain")}),
    ("GET", PATH): Operation(
        "This document", responses={200: answer("OpenAPI 3.1", {"type": "object"})}),
    ("GET", "/v1/jobs"): Operation(
        "List jobs", parameters=(*LIST_PARAMETERS, BATCH_FILTER),
        responses={200: events("jobs", "jobs, newest first"), 400: BAD_QUERY,
                   404: error("`batch` is not a batch id", 404), 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/jobs"): Operation(
        "Run a target", body=SubmitJob,
        responses={201: event("the new job, pending", headers=CREATED), **SUBMIT_ERRORS}),
    ("GET", "/v1/jobs/{id}"): Operation(
        "One job", parameters=(path_id("job", JOB_PREFIX, "j12"),),
        responses={200: event("its current state"), 404: NOT_FOUND, 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/jobs/{id}/cancel"): Operation(
        "Cancel a job", parameters=(path_id("job", JOB_PREFIX, "j12"),),
        description="Answers once it has stopped (its command gets SIGTERM, then SIGKILL).",
        responses={200: event("its final state"), **CANCEL_ERRORS}),
    ("GET", "/v1/jobs/{id}/log"): Operation(
        "A job's whole log", parameters=(path_id("job", JOB_PREFIX, "j12"), FOLLOW),
        description=("Each run's output (stdout and stderr in order) under a header per "
                     "attempt, capped per job as docs/logs.md says; empty when there is none. "
                     "With `follow=true` it is sent as it comes, until the run going on (or "
                     "the next to start) ends; a store that becomes unavailable meanwhile "
                     "ends it with a last line `[the follow ends here: REASON]`."),
        responses={200: answer("the log", {"type": "string"}, "text/plain"),
                   400: BAD_QUERY, 403: FORBIDDEN, 404: NOT_FOUND, 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/jobs/{id}/rerun"): Operation(
        "Run a job again", parameters=(path_id("job", JOB_PREFIX, "j12"),), description=RERUN,
        responses={201: event("the new job, pending", headers=CREATED), **RERUN_ERRORS}),
    ("POST", "/v1/jobs/{id}/approve"): Operation(
        "Approve a job held for approval", parameters=(path_id("job", JOB_PREFIX, "j12"),),
        description=APPROVE, responses={200: event("its state now"), **JUDGE_ERRORS}),
    ("POST", "/v1/jobs/{id}/deny"): Operation(
        "Deny a job held for approval", parameters=(path_id("job", JOB_PREFIX, "j12"),),
        body=Deny, body_required=False, description=DENY,
        responses={200: event("its final state, cancelled"), 400: BAD_BODY, **JUDGE_ERRORS}),
    ("GET", "/v1/batches"): Operation(
        "List batches", parameters=LIST_PARAMETERS,
        responses={200: events("batches", "batches, newest first"), 400: BAD_QUERY,
                   503: STORE_UNAVAILABLE}),
    ("POST", "/v1/batches"): Operation(
        "Run several targets as one batch", body=SubmitBatch,
        responses={201: event("the new batch, pending", headers=CREATED), **SUBMIT_ERRORS}),
    ("GET", "/v1/batches/{id}"): Operation(
        "One batch", parameters=(path_id("batch", BATCH_PREFIX, "b3"),),
        responses={200: event("its current state"), 404: NOT_FOUND, 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/batches/{id}/cancel"): Operation(
        "Cancel a batch and its operations", parameters=(path_id("batch", BATCH_PREFIX, "b3"),),
        responses={200: event("its final state"), **CANCEL_ERRORS}),
    ("POST", "/v1/batches/{id}/rerun"): Operation(
        "Run a batch again", parameters=(path_id("batch", BATCH_PREFIX, "b3"),),
        description=RERUN,
        responses={201: event("the new batch, pending", headers=CREATED), **RERUN_ERRORS}),
    ("POST", "/v1/batches/{id}/approve"): Operation(
        "Approve a batch held for approval", parameters=(path_id("batch", BATCH_PREFIX, "b3"),),
        description=APPROVE, responses={200: event("its state now"), **JUDGE_ERRORS}),
    ("POST", "/v1/batches/{id}/deny"): Operation(
        "Deny a batch held for approval", parameters=(path_id("batch", BATCH_PREFIX, "b3"),),
        body=Deny, body_required=False, description=DENY,
        responses={200: event("its final state, cancelled"), 400: BAD_BODY, **JUDGE_ERRORS}),
    ("GET", "/v1/events"): Operation(
        "Every job and batch, live (server-sent events; what the dashboard shows)",
        parameters=({"name": "focus", "in": "query",
                     "description": "also this job, or this batch and its operations",
                     "schema": {"type": "string", "pattern": "^[jb][0-9]+$"}},),
        description=("`event: snapshot` first (queued and running work, the newest finished "
                     "jobs and batches), then `event: update` per job-progress event and "
                     "`event: refresh` each second for active work with no news; each data line "
                     "is `{\"event\", \"text\", \"sentAt\"}` with the texts worded by the "
                     "service. The store's state goes with the snapshot (`health`) and as "
                     "`event: health` when it changes. Endless until the client leaves or the "
                     "service stops; a reconnect starts with a new snapshot. README, \"Web "
                     "dashboard\"."),
        responses={200: answer("the stream", {"type": "string"}, "text/event-stream"),
                   400: BAD_QUERY,
                   503: error("too many pages have it open, or the store cannot be read "
                              "now (store_unavailable, with Retry-After)", 503)}),
    ("GET", "/v1/status"): Operation(
        "What is queued or running",
        description=("Batches, then jobs outside a batch (a batch's operations show in it). "
                     "While the store cannot take writes, `degraded` says why, as /healthz "
                     "does; new jobs are refused meanwhile."),
        responses={200: answer("queued and running batches and jobs", {
            "type": "object", "required": ["active"],
            "properties": {"active": {"type": "array", "items": ref("JobProgressEvent")},
                           "degraded": {"type": "string", "description": (
                               "only while the store cannot take writes: why, like "
                               "\"store: locked\" or \"store: disk full (…)\"")}}}),
            503: STORE_UNAVAILABLE}),
    ("GET", "/v1/status/{id}"): Operation(
        "A job or batch, or its progress live",
        parameters=(path_id("job or batch", JOB_PREFIX + BATCH_PREFIX, "j12"), STREAM),
        description=("With `stream=true`: first the current state, then each (throttled) "
                     "update, last the final state; then the stream closes."),
        responses={
            200: {"description": "its state; streamed, one event per line",
                  "content": {JSON: {"schema": ref("JobProgressEvent")},
                              NDJSON: {"schema": {"type": "string"}}}},
            400: BAD_QUERY, 404: NOT_FOUND, 503: STORE_UNAVAILABLE}),
    ("GET", "/v1/workers"): Operation(
        "The processes that run jobs from this store",
        description=("Every worker row, by name: live ones and ones that went silent (no "
                     "heartbeat for `[queue] lease_s`, by this service's clock) until retention "
                     "removes them. `running` lists the jobs each holds now."),
        responses={200: answer("the workers", {
            "type": "object", "required": ["workers"],
            "properties": {"workers": {"type": "array", "items": ref("WorkerState")}}}),
            400: BAD_QUERY, 503: STORE_UNAVAILABLE}),
    ("GET", "/v1/schedules"): Operation(
        "The schedules: next run, pause, last job",
        description=("Every `[schedules.NAME]`, by name: `nextRun` in the schedule's own time "
                     "zone (null while paused), who paused it, and its last job or batch with "
                     "its status (null before its first run, or once retention removed it)."),
        responses={200: answer("the schedules", {
            "type": "object", "required": ["schedules"],
            "properties": {"schedules": {"type": "array", "items": ref("ScheduleInfo")}}}),
            400: BAD_QUERY, 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/schedules/{name}/pause"): Operation(
        "Pause a schedule on every node",
        parameters=(SCHEDULE_NAME,),
        description=("Its slots start nothing until it is resumed. Who may: whoever may run "
                     "every target it starts. Pausing a paused schedule changes nothing."),
        responses={200: answer("the schedule now", ref("ScheduleInfo")),
                   400: NO_BODY_OR_QUERY, 403: FORBIDDEN, 404: SCHEDULE_NOT_FOUND,
                   503: STORE_UNAVAILABLE}),
    ("POST", "/v1/schedules/{name}/resume"): Operation(
        "Resume a paused schedule",
        parameters=(SCHEDULE_NAME,),
        description=("It goes on from its next slot: the slots the pause held back do not "
                     "run."),
        responses={200: answer("the schedule now", ref("ScheduleInfo")),
                   400: NO_BODY_OR_QUERY, 403: FORBIDDEN, 404: SCHEDULE_NOT_FOUND,
                   503: STORE_UNAVAILABLE}),
    ("GET", "/v1/audit"): Operation(
        "The audit log", parameters=AUDIT_PARAMETERS,
        description=("Who did what, from where: the newest `limit` records that match, "
                     "oldest first; with `after`, the first `limit` after that record. "
                     "Append-only: no endpoint edits or deletes records. Follow it by asking "
                     "again with `after` = the last `seq` seen (a full page: ask again at "
                     "once)."),
        responses={200: answer("records, oldest first", {
            "type": "object", "required": ["records"],
            "properties": {"records": {"type": "array", "items": ref("AuditRecord")}}}),
            400: BAD_QUERY, 503: STORE_UNAVAILABLE}),
    ("GET", "/v1/whoami"): Operation(
        "Who this request acts as",
        description="A personal token's Matrix user, or `admin` for the service token.",
        responses={200: answer("who", {
            "type": "object", "required": ["user", "admin"],
            "properties": {"user": {"type": "string"}, "admin": {"type": "boolean"}}})}),
    ("GET", "/v1/tokens"): Operation(
        "Personal tokens (never the tokens themselves)",
        description="The service token sees everyone's; a personal token its owner's.",
        responses={200: answer("the tokens", {
            "type": "object", "required": ["tokens"],
            "properties": {"tokens": {"type": "array", "items": ref("PersonalToken")}}}),
            403: FORBIDDEN, 503: STORE_UNAVAILABLE}),
    ("POST", "/v1/tokens"): Operation(
        "Issue a personal token", body=IssueToken,
        description=("The token acts as its user with that user's rules (targets only a "
                     "room may start stay refused). It is shown in this answer only; the "
                     "store keeps its SHA-256. `user` is for the service token; a person "
                     "gets their own."),
        responses={201: answer("the new token, shown once", {
            "type": "object", "required": ["user", "name", "token"],
            "properties": {"user": {"type": "string"}, "name": {"type": "string"},
                           "token": {"type": "string"}}}),
            400: BAD_BODY, 403: FORBIDDEN,
            409: error("that user already has a token of that name", 409),
            422: error("a bad name or user id", 422), 503: STORE_UNAVAILABLE}),
    ("DELETE", "/v1/tokens/{name}"): Operation(
        "Revoke a personal token",
        parameters=({"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "user", "in": "query", "schema": {"type": "string"},
                     "description": "whose (the service token); default: the caller's"}),
        description="It stops working at once, on every node.",
        responses={200: answer("revoked", {"type": "object"}), 400: BAD_QUERY,
                   403: FORBIDDEN, 404: error("no such token", 404),
                   503: STORE_UNAVAILABLE}),
    ("GET", "/v1/audit/verify"): Operation(
        "Check the audit log's hash chain",
        description=("Every record's hash, every link to the record before, no gap, and "
                     "the end the store keeps: an edited, deleted or added record is found "
                     "(as `matrixjobs audit verify` does)."),
        responses={200: answer("the verdict", {
            "type": "object", "required": ["ok", "records", "problems"],
            "properties": {"ok": {"type": "boolean"}, "records": {"type": "integer"},
                           "first": {"type": ["integer", "null"]},
                           "last": {"type": ["integer", "null"]},
                           "problems": {"type": "array", "items": {"type": "string"}}}}),
            400: BAD_QUERY, 503: STORE_UNAVAILABLE}),
}

AUTH_ERRORS = {
    401: error("the service has a token and the request did not carry it", 401),
    403: error("the service has no token and the request came from a foreign host or "
               "another site's page, or the dashboard's session cookie came from another "
               "site's page", 403),
    429: error("more than 5 wrong tokens from this address within a minute (a right token "
               "always gets in); `Retry-After` says when to try again", 429),
}


def openapi_route(routes: Sequence[BaseRoute]) -> Route:
    """The route serving the document of `routes` and of itself."""
    body = json.dumps(document(operations_of(routes) | {("GET", PATH)}))

    async def serve(request: Request) -> Response:
        return json_response(body)

    return Route(PATH, serve, methods=["GET"])


def operations_of(routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """(method, path) of every route (HEAD goes with GET without saying)."""
    return {(method, route.path) for route in routes if isinstance(route, Route)
            for method in route.methods or () if method != "HEAD"}


def document(served: set[tuple[str, str]]) -> dict[str, Any]:
    """The OpenAPI document of the `served` operations, each of which OPERATIONS must
    describe (and nothing else)."""
    if missing := served - OPERATIONS.keys():
        raise LookupError(f"routes without an OpenAPI description: {sorted(missing)}")
    if stale := OPERATIONS.keys() - served:
        raise LookupError(f"OpenAPI descriptions of routes that do not exist: {sorted(stale)}")
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = _operation(operation)
    return {
        "openapi": "3.1.0",
        "info": {"title": "matrixjobs", "version": __version__,
                 "description": "Run configured targets as jobs and follow their progress. "
                                "The job-progress event is described in docs/events.md."},
        "paths": paths,
        "components": {"schemas": _schemas(), "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "needed when the service has a token (MATRIXJOBS_API_TOKEN)"}}},
        "security": [{"bearer": []}],
    }


def _operation(operation: Operation) -> dict[str, Any]:
    spec: dict[str, Any] = {"summary": operation.summary}
    if operation.description:
        spec["description"] = operation.description
    if operation.parameters:
        spec["parameters"] = list(operation.parameters)
    if operation.body is not None:
        spec["requestBody"] = {"required": operation.body_required, "content": {
            JSON: {"schema": ref(operation.body.__name__)}}}
    elif operation.raw_body is not None:
        spec["requestBody"] = {"required": True, "content": {JSON: {"schema": operation.raw_body}}}
    responses = dict(operation.responses)
    if operation.public:
        spec["security"] = []
    else:
        responses |= AUTH_ERRORS
    spec["responses"] = {str(status): responses[status] for status in sorted(responses)}
    return spec


def _schemas() -> dict[str, Any]:
    _, generated = models_json_schema(
        [(JobProgressEvent, "serialization"), (WorkerState, "serialization"),
         (ScheduleInfo, "serialization"),
         (SubmitJob, "validation"),
         (SubmitBatch, "validation"), (Deny, "validation"), (IssueToken, "validation")],
        by_alias=True, ref_template=SCHEMAS + "{model}")
    return {
        **generated["$defs"],
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "requestId": {"type": "string", "description": "with a 500: "
                                         "the id the service logged its traceback under"}}}}},
        "PersonalToken": {"type": "object", "required": ["user", "name", "createdAt"],
                          "properties": {"user": {"type": "string"}, "name": {"type": "string"},
                                         "createdAt": {"type": "number"}}},
        "AuditRecord": {"type": "object", "required": [
            "seq", "at", "action", "actor", "via", "detail", "prevHash", "hash"],
            "properties": {
                "seq": {"type": "integer"}, "at": {"type": "number"},
                "action": {"enum": list(AuditAction)}, "actor": {"type": "string"},
                "via": {"type": "string"}, "subject": {"type": ["string", "null"]},
                "target": {"type": ["string", "null"]}, "roomId": {"type": ["string", "null"]},
                "eventId": {"type": ["string", "null"]}, "detail": {"type": "object"},
                "prevHash": {"type": "string"}, "hash": {"type": "string"}}},
        "WebhookAnswer": {"type": "object", "required": ["outcome", "message"], "properties": {
            "outcome": {"enum": ["ignored", "pong", "redelivered"]},
            "message": {"type": "string", "description": "why it was ignored, like "
                        "\"ignored: branch feature/x matches none of main, release/*\""}}},
        "Health": {"type": "object", "required": ["status", "version"], "properties": {
            "status": {"enum": ["ok", "stopping", "degraded"]},
            "reason": {"type": "string", "description": "why it is degraded, like "
                       "\"store: disk full\", \"store: locked\", \"store: unreachable\""},
            "version": {"type": "string"}}},
    }
