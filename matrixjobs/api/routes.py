"""The endpoints of /v1, /healthz and /metrics; each calls the core's public API on `App`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import quote

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from matrixjobs import __version__
from matrixjobs.api.auth import person_of
from matrixjobs.api.client import USER_AGENT_PREFIX
from matrixjobs.api.errors import ApiError
from matrixjobs.api.stream import (
    TEXT,
    ChunkStream,
    OpenStreams,
    event_stream,
    text_stream,
)
from matrixjobs.app import MAX_REASON, App
from matrixjobs.audit import AuditAction, AuditQuery
from matrixjobs.config import MatrixConfig
from matrixjobs.errors import NotFoundError, echo
from matrixjobs.fleet import worker_state
from matrixjobs.models import BATCH_PREFIX, JOB_PREFIX, MAX_ID, PersonalToken, Status, parse_id
from matrixjobs.policy import ADMIN, Caller, Via
from matrixjobs.progress.events import JobProgressEvent, event_of

MAX_BODY_BYTES = 64 * 1024
KNOWN_CLIENTS = (Via.CLI, Via.MCP)
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})
SHOWN_PROBLEMS = 3


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


BodyT = TypeVar("BodyT", bound=Body)
T = TypeVar("T")


class SubmitJob(Body):
    target: StrictStr
    args: list[StrictStr] = Field(default_factory=list)


class SubmitBatch(Body):
    # Checked by the queue (422 bad_batch, as for a batch too large), said in the schema.
    targets: list[StrictStr] = Field(json_schema_extra={"minItems": 1})
    name: StrictStr | None = Field(default=None, min_length=1, max_length=200)


class IssueToken(Body):
    name: StrictStr
    user: StrictStr | None = None  # the service token names whose; a person gets their own


class Deny(Body):
    reason: StrictStr | None = Field(default=None, max_length=MAX_REASON)


class NoBody(Body):
    """What an endpoint that takes no body reads: none, or {} (a client that always sends
    JSON); a field is refused, as unknown fields are everywhere, not ignored (a pause told
    {"paused": false} must not pause)."""


class Endpoints:
    def __init__(self, app: App, streams: OpenStreams) -> None:
        self.app = app
        self.streams = streams

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            by_method("/v1/jobs", GET=self.list_jobs, POST=self.submit_job),
            Route("/v1/jobs/{id}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{id}/cancel", self.cancel_job, methods=["POST"]),
            by_method("/v1/batches", GET=self.list_batches, POST=self.submit_batch),
            Route("/v1/jobs/{id}/log", self.job_log, methods=["GET"]),
            Route("/v1/jobs/{id}/rerun", self.rerun_job, methods=["POST"]),
            Route("/v1/jobs/{id}/approve", self.approve_job, methods=["POST"]),
            Route("/v1/jobs/{id}/deny", self.deny_job, methods=["POST"]),
            Route("/v1/batches/{id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{id}/cancel", self.cancel_batch, methods=["POST"]),
            Route("/v1/batches/{id}/rerun", self.rerun_batch, methods=["POST"]),
            Route("/v1/batches/{id}/approve", self.approve_batch, methods=["POST"]),
            Route("/v1/batches/{id}/deny", self.deny_batch, methods=["POST"]),
            Route("/v1/status", self.active, methods=["GET"]),
            Route("/v1/status/{id}", self.status, methods=["GET"]),
            Route("/v1/workers", self.workers, methods=["GET"]),
            Route("/v1/schedules", self.schedules, methods=["GET"]),
            Route("/v1/schedules/{name}/pause", self.pause_schedule, methods=["POST"]),
            Route("/v1/schedules/{name}/resume", self.resume_schedule, methods=["POST"]),
            Route("/v1/audit", self.audit, methods=["GET"]),
            Route("/v1/whoami", self.whoami, methods=["GET"]),
            by_method("/v1/tokens", GET=self.list_tokens, POST=self.issue_token),
            Route("/v1/tokens/{name}", self.revoke_token, methods=["DELETE"]),
            Route("/v1/audit/verify", self.verify_audit, methods=["GET"]),
        ]

    async def healthz(self, request: Request) -> Response:
        """Open to anyone who reaches the port (probes hold no token): nothing but whether
        the service takes work, and its version. 503 while stopping, or while the store
        cannot take writes ("degraded", with the reason), so a load balancer sends new
        work elsewhere and an alert fires."""
        if not self.app.accepting:
            return json_response(json.dumps({"status": "stopping", "version": __version__}),
                                 503)
        health = self.app.health
        if not health.up:
            return json_response(json.dumps({"status": "degraded", "reason": health.reason,
                                             "version": __version__}), 503)
        return json_response(json.dumps({"status": "ok", "version": __version__}))

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format 0.0.4, whatever the scraper asks for: in OpenMetrics the
        `matrixjobs_jobs` gauge and the `matrixjobs_jobs_total` counter would clash."""
        registry = await self.app.scrape_metrics()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    # -- jobs ------------------------------------------------------------------------------------

    async def list_jobs(self, request: Request) -> Response:
        statuses, limit = list_filters(request, "batch")
        jobs = await self.app.jobs(statuses, limit, batch=request.query_params.get("batch"))
        return list_response("jobs", [self.app.live(job) for job in jobs])

    async def submit_job(self, request: Request) -> Response:
        body = await read_body(request, SubmitJob)
        job = await self.app.submit(body.target, body.args, caller=caller_of(request))
        return created(event_of(job, time.time()), f"/v1/jobs/{job.id}")

    async def get_job(self, request: Request) -> Response:
        subject = subject_of(request, JOB_PREFIX)
        return event_response(await self.with_message_url(await self.app.status(subject)))

    async def cancel_job(self, request: Request) -> Response:
        subject = subject_of(request, JOB_PREFIX)
        await read_body(request, NoBody, optional=True)
        cancelled = await self.app.cancel(subject, caller_of(request))
        return event_response(event_of(cancelled, time.time()))

    async def job_log(self, request: Request) -> Response | ChunkStream[str]:
        """The job's whole log as text; with ?follow=true, then its output as it comes
        until the run going on (or the next to start) ends."""
        subject = subject_of(request, JOB_PREFIX)
        known_query(request, "follow")
        if not flag(request, "follow"):
            return Response(await self.app.log(subject, caller_of(request)), media_type=TEXT)
        chunks = self.app.follow_log(subject, caller_of(request))
        return text_stream(await opened(chunks), chunks, self.streams)

    async def rerun_job(self, request: Request) -> Response:
        return await self._rerun(request, JOB_PREFIX, "jobs")

    # -- batches ---------------------------------------------------------------------------------

    async def list_batches(self, request: Request) -> Response:
        statuses, limit = list_filters(request)
        batches = await self.app.batches(statuses, limit)
        return list_response("batches", [self.app.live(batch) for batch in batches])

    async def submit_batch(self, request: Request) -> Response:
        body = await read_body(request, SubmitBatch)
        batch = await self.app.submit_batch(body.targets, body.name,
                                            caller=caller_of(request))
        return created(event_of(batch, time.time()), f"/v1/batches/{batch.id}")

    async def get_batch(self, request: Request) -> Response:
        subject = subject_of(request, BATCH_PREFIX)
        return event_response(await self.with_message_url(await self.app.status(subject)))

    async def cancel_batch(self, request: Request) -> Response:
        subject = subject_of(request, BATCH_PREFIX)
        await read_body(request, NoBody, optional=True)
        cancelled = await self.app.cancel(subject, caller_of(request))
        return event_response(event_of(cancelled, time.time()))

    async def rerun_batch(self, request: Request) -> Response:
        return await self._rerun(request, BATCH_PREFIX, "batches")

    async def approve_job(self, request: Request) -> Response:
        return await self._approve(request, JOB_PREFIX)

    async def deny_job(self, request: Request) -> Response:
        return await self._deny(request, JOB_PREFIX)

    async def approve_batch(self, request: Request) -> Response:
        return await self._approve(request, BATCH_PREFIX)

    async def deny_batch(self, request: Request) -> Response:
        return await self._deny(request, BATCH_PREFIX)

    async def _approve(self, request: Request, prefix: str) -> Response:
        subject = subject_of(request, prefix)
        await read_body(request, NoBody, optional=True)
        judged = await self.app.approve(subject, caller_of(request))
        return event_response(self.app.live(judged))

    async def _deny(self, request: Request, prefix: str) -> Response:
        subject = subject_of(request, prefix)
        body = await read_body(request, Deny, optional=True)
        judged = await self.app.deny(subject, caller_of(request), body.reason)
        return event_response(self.app.live(judged))

    async def whoami(self, request: Request) -> Response:
        known_query(request)
        caller = caller_of(request)
        return json_response(json.dumps({"user": caller.user, "admin": caller.admin}))

    async def list_tokens(self, request: Request) -> Response:
        known_query(request)
        tokens = await self.app.tokens(caller_of(request))
        return json_response(json.dumps({"tokens": [token_json(token) for token in tokens]}))

    async def issue_token(self, request: Request) -> Response:
        body = await read_body(request, IssueToken)
        caller = caller_of(request)
        user = body.user or caller.user
        token = await self.app.issue_token(user, body.name, caller)
        return json_response(json.dumps({"user": user, "name": body.name, "token": token}),
                             201)

    async def revoke_token(self, request: Request) -> Response:
        known_query(request, "user")
        caller = caller_of(request)
        user = request.query_params.get("user") or caller.user
        await self.app.revoke_token(user, request.path_params["name"], caller)
        return json_response(json.dumps({"user": user, "name": request.path_params["name"],
                                         "revoked": True}))

    async def audit(self, request: Request) -> Response:
        """The audit log's records, oldest first: the newest `limit` that match (with
        `after`, the first `limit` after it, so a follower misses none); a person sees their
        own."""
        query = audit_query(request)
        caller = caller_of(request)
        if not caller.admin:
            query = replace(query, user=caller.user)
        records = await self.app.audit(query)
        return json_response(json.dumps({"records": [record.to_json() for record in records]}))

    async def verify_audit(self, request: Request) -> Response:
        known_query(request)
        verdict = await self.app.verify_audit()
        return json_response(json.dumps({
            "ok": verdict.ok, "records": verdict.records, "first": verdict.first,
            "last": verdict.last, "problems": verdict.problems}))

    async def _rerun(self, request: Request, prefix: str, collection: str) -> Response:
        subject = subject_of(request, prefix)
        await read_body(request, NoBody, optional=True)
        rerun = await self.app.rerun(subject, caller=caller_of(request))
        return created(event_of(rerun, time.time()), f"/v1/{collection}/{rerun.id}")

    async def with_message_url(self, event: JobProgressEvent) -> JobProgressEvent:
        message = await self.app.progress_message(event.id)
        if message is None or message.event_id is None:
            return event
        url = matrix_to(message.room_id, message.event_id, self.app.config.matrix)
        return event.model_copy(update={"message_url": url})

    # -- status ----------------------------------------------------------------------------------

    async def active(self, request: Request) -> Response:
        """What is active; while the store cannot take writes, `degraded` says why, as
        /healthz does ("store: locked"), for the CLI's and other clients' one line."""
        events = ",".join(event.to_json() for event in await self.app.active())
        health = self.app.health
        degraded = "" if health.up else f',"degraded":{json.dumps(health.reason)}'
        return json_response(f'{{"active":[{events}]{degraded}}}')

    async def status(self, request: Request) -> Response | ChunkStream[JobProgressEvent]:
        subject = request.path_params["id"]
        known_query(request, "stream")
        if not flag(request, "stream"):
            return event_response(await self.app.status(subject))
        updates = self.app.watch(subject)
        return event_stream(await opened(updates), updates, self.streams)

    # -- the fleet -------------------------------------------------------------------------------

    async def workers(self, request: Request) -> Response:
        known_query(request)
        now, lease_s = time.time(), self.app.config.queue.lease_s
        states = [worker_state(w, now, lease_s).to_json() for w in await self.app.workers()]
        return json_response(f'{{"workers":[{",".join(states)}]}}')


    # -- schedules -------------------------------------------------------------------------------

    async def schedules(self, request: Request) -> Response:
        known_query(request)
        listed = ",".join(info.to_json() for info in await self.app.schedules())
        return json_response(f'{{"schedules":[{listed}]}}')

    async def pause_schedule(self, request: Request) -> Response:
        known_query(request)
        await read_body(request, NoBody, optional=True)
        info = await self.app.pause_schedule(request.path_params["name"], caller_of(request))
        return json_response(info.to_json())

    async def resume_schedule(self, request: Request) -> Response:
        known_query(request)
        await read_body(request, NoBody, optional=True)
        info = await self.app.resume_schedule(request.path_params["name"], caller_of(request))
        return json_response(info.to_json())


def by_method(path: str, **handlers: Callable[[Request], Awaitable[Response]]) -> Route:
    """One route for all methods of a path: with a route per method, a 405's `Allow`
    header would name only the first route's methods."""

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, dispatch, methods=list(handlers))


# -- reading requests -----------------------------------------------------------------------------


async def read_body(request: Request, model: type[BodyT], optional: bool = False) -> BodyT:
    """The request's JSON body as `model`; with `optional`, no body reads as `{}`."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
    if optional and not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "bad_json", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"request body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, "bad_body", describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """The first few problems (a body of 64 KiB can hold thousands), keys shown in short."""
    problems = []
    errors = exc.errors()
    for error in errors[:SHOWN_PROBLEMS]:
        where = echo(".".join(str(part) for part in error["loc"])) or "body"
        if error["type"] == "missing":
            problems.append(f"{where}: required")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown field")
        else:
            problems.append(f"{where}: {error['msg']}")
    if len(errors) > SHOWN_PROBLEMS:
        problems.append(f"and {len(errors) - SHOWN_PROBLEMS} more")
    return "; ".join(problems)


def subject_of(request: Request, prefix: str) -> str:
    """The path's id, if it names the right kind of thing (a job under /jobs, …)."""
    text = request.path_params["id"]
    parsed = parse_id(text)
    kind = "job" if prefix == JOB_PREFIX else "batch"
    if parsed is None or parsed[0] != prefix:
        raise NotFoundError(f"no {kind} '{echo(text)}' ({kind} ids look like {prefix}12)")
    return f"{parsed[0]}{parsed[1]}"


async def opened(stream: AsyncGenerator[T, None]) -> T:
    """A stream's first item, before the answer starts: a NotFoundError becomes a 404, and
    the stream is closed on any error."""
    try:
        return await anext(stream)
    except BaseException:
        await stream.aclose()
        raise


def known_query(request: Request, *names: str) -> None:
    """Refuse parameters we do not take: a typo (`?limt=5`) would silently change the
    answer, as unknown fields of a body would (those are refused too)."""
    unknown = sorted(set(request.query_params) - set(names))
    if unknown:
        takes = f"takes: {', '.join(names)}" if names else "takes none"
        raise ApiError(400, "bad_query", f"unknown query parameter '{echo(unknown[0])}'; "
                                         f"this endpoint {takes}")


def list_filters(request: Request, *more: str) -> tuple[list[Status] | None, int]:
    """`status` and `limit`; `more` names the other parameters the endpoint takes."""
    known_query(request, "status", "limit", *more)
    words = [word.strip() for value in request.query_params.getlist("status")
             for word in value.split(",") if word.strip()]
    statuses = None
    if words:
        try:
            statuses = [Status(word.lower()) for word in words]
        except ValueError:
            known = ", ".join(status.value for status in Status)
            raise ApiError(400, "bad_query", f"status must be among: {known}") from None
    return statuses, limit_of(request.query_params.get("limit", str(DEFAULT_LIMIT)))


def whole(text: str, low: int, high: int) -> int | None:
    """`text` as a whole number from `low` to `high` (ASCII digits only: int() also reads
    other scripts' digits, and refuses more than 4300 of them with an error), else None."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(high)):
        return None
    number = int(text)
    return number if low <= number <= high else None


def limit_of(text: str) -> int:
    limit = whole(text, 1, MAX_LIMIT)
    if limit is None:
        raise ApiError(400, "bad_query", f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return limit


def token_json(token: PersonalToken) -> dict[str, object]:
    return {"user": token.user, "name": token.name, "createdAt": token.created_at}


def audit_query(request: Request) -> AuditQuery:
    """`after` (a record's seq), `since` (ISO 8601 or seconds since the epoch), `user`,
    `action`, `target`, `limit`."""
    known_query(request, "after", "since", "user", "action", "target", "limit")
    params = request.query_params
    after = params.get("after")
    seq = None if after is None else whole(after, 0, MAX_ID)
    if after is not None and seq is None:
        raise ApiError(400, "bad_query", "after must be a record's number (seq)")
    action = params.get("action")
    if action is not None and action not in set(AuditAction):
        known = ", ".join(AuditAction)
        raise ApiError(400, "bad_query", f"action must be among: {known}")
    return AuditQuery(after=seq, since=moment(params.get("since")), user=params.get("user"),
                      action=action, target=params.get("target"),
                      limit=limit_of(params.get("limit", str(DEFAULT_LIMIT))))


def moment(text: str | None) -> float | None:
    """ISO 8601 (a time without a zone is UTC) or seconds since the epoch."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, "bad_query", "since must be a time (ISO 8601, e.g. "
                       "2026-12-06T10:00:00Z) or seconds since the epoch") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise ApiError(400, "bad_query", f"{name} must be true or false")


# -- writing responses ----------------------------------------------------------------------------


def caller_of(request: Request) -> Caller:
    """Who asks: the person whose token let the request in, else the service token's
    holder; through our CLI or MCP (by their User-Agent), or else the API. Never the
    header's text itself: a name anyone can send must not pass for a person."""
    user = person_of(request.scope) or ADMIN
    agent = request.headers.get("user-agent", "")
    for client in KNOWN_CLIENTS:
        if agent.startswith(f"{USER_AGENT_PREFIX}{client}/"):
            return Caller(user, client)
    return Caller(user, Via.API)


def matrix_to(room_id: str, event_id: str, matrix: MatrixConfig | None) -> str:
    """A matrix.to permalink; `via` names the bot's server, which is in the room (room ids
    of recent room versions carry no server name)."""
    link = f"https://matrix.to/#/{quote(room_id, safe='')}/{quote(event_id, safe='')}"
    if matrix is None:
        return link
    return f"{link}?via={quote(matrix.user_id.partition(':')[2], safe='')}"


def json_response(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


def event_response(event: JobProgressEvent) -> Response:
    return json_response(event.to_json())


def created(event: JobProgressEvent, location: str) -> Response:
    return json_response(event.to_json(), 201, {"Location": location})


def list_response(key: str, events: list[JobProgressEvent]) -> Response:
    return json_response(f'{{"{key}":[{",".join(event.to_json() for event in events)}]}}')
