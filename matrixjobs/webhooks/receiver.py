"""A delivery's checks, in order, and what it starts.

The HTTP side (api/hooks.py) answers an unknown name (404) and a body over the limit (413)
before it reads the rest; here, in this order: the signature (nothing is parsed or counted
before it holds, so unsigned requests cannot use up a webhook's rate), the rate, a ping,
the event, the payload, the branch or tag, the args; then `App.trigger`, whose dedupe key
makes a redelivery answer with the work the first delivery started.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from matrixjobs.app import App
from matrixjobs.config import WebhookConfig, webhook_secret_env
from matrixjobs.errors import (
    AlreadySubmittedError,
    ConfigError,
    MatrixJobsError,
    StoreUnavailableError,
)
from matrixjobs.models import Trigger, TriggerKind
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent, event_of
from matrixjobs.webhooks.forges import FORGES, BadPayload, Headers, Push, delivery_id, payload
from matrixjobs.webhooks.matching import SHORT_SHA, arguments, event_ignored, push_ignored

log = logging.getLogger(__name__)

RATE_SPAN_S = 60.0  # what max_per_minute counts over


class Outcome(StrEnum):
    """What became of a delivery: the metric's label, and the answer's kind."""

    STARTED = "started"
    REDELIVERED = "redelivered"
    IGNORED = "ignored"
    PONG = "pong"
    BAD_SIGNATURE = "bad_signature"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    BAD_PAYLOAD = "bad_payload"
    REFUSED = "refused"  # the core refused it: args_pattern, a busy group, stopping
    STORE_UNAVAILABLE = "store_unavailable"


@dataclass(frozen=True, slots=True)
class Delivery:
    outcome: Outcome
    message: str = ""
    work: JobProgressEvent | None = None  # what it started (or a redelivery's first started)
    retry_after_s: int = 0


class Window:
    """At most `limit` in any `span_s` seconds: the times of the last `limit` taken."""

    def __init__(self, limit: int, span_s: float = RATE_SPAN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._times: deque[float] = deque(maxlen=limit)
        self._span_s = span_s
        self._clock = clock

    def take(self) -> float:
        """0 when one more fits (it is counted), else the seconds until one will."""
        now = self._clock()
        if len(self._times) == self._times.maxlen:
            wait = self._times[0] + self._span_s - now
            if wait > 0:
                return wait
        self._times.append(now)
        return 0.0


class WebhookReceiver:
    """The configured webhooks, each with its secret and rate window (one per process:
    behind a load balancer each node counts its own)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.hooks = app.config.webhooks
        self._secrets = {name: _secret(app, name) for name in self.hooks}
        self._windows = {name: Window(hook.max_per_minute) for name, hook in self.hooks.items()}
        app.metrics.webhooks(self.hooks, list(Outcome))

    def too_large(self, name: str) -> None:
        self.app.metrics.webhook_delivery(name, Outcome.TOO_LARGE)

    async def deliver(self, name: str, headers: Headers, body: bytes) -> Delivery:
        """Check a delivery to the configured webhook `name` and start what it names.
        The core's refusals (args_pattern, store in trouble…) are counted and raised."""
        try:
            delivery = await self._checked(name, self.hooks[name], headers, body)
        except StoreUnavailableError:
            self.app.metrics.webhook_delivery(name, Outcome.STORE_UNAVAILABLE)
            raise
        except MatrixJobsError as exc:
            log.info("webhook %s: refused: %s", name, exc)
            self.app.metrics.webhook_delivery(name, Outcome.REFUSED)
            raise
        self.app.metrics.webhook_delivery(name, delivery.outcome)
        return delivery

    async def _checked(self, name: str, hook: WebhookConfig, headers: Headers,
                       body: bytes) -> Delivery:
        forge = FORGES[hook.provider]
        if not forge.check(headers, body, self._secrets[name]):
            log.warning("webhook %s: refused a delivery whose signature is missing or wrong",
                        name)
            return Delivery(Outcome.BAD_SIGNATURE, f"{forge.signature_header} is missing or "
                            "wrong: the forge's secret must be the service's "
                            f"{webhook_secret_env(name)}")
        wait_s = self._windows[name].take()
        if wait_s:
            return Delivery(Outcome.RATE_LIMITED, f"more than {hook.max_per_minute} "
                            "deliveries within a minute", retry_after_s=math.ceil(wait_s))
        event = forge.event(headers)
        if event is None:
            return Delivery(Outcome.BAD_PAYLOAD, f"the delivery has no {forge.event_header} "
                                                 "header")
        if event in forge.pings:
            return Delivery(Outcome.PONG, wording.hook_pong(name, hook.starts(), hook.takes))
        if reason := event_ignored(hook, event):
            return _ignored(name, reason)
        try:
            push = forge.push(payload(body), event)
            delivery = delivery_id(forge, headers, push)
        except BadPayload as exc:
            log.info("webhook %s: a bad payload: %s", name, exc)
            return Delivery(Outcome.BAD_PAYLOAD, str(exc))
        if reason := push_ignored(hook, push):
            return _ignored(name, reason)
        return await self._start(name, hook, push, delivery)

    async def _start(self, name: str, hook: WebhookConfig, push: Push,
                     delivery: str | None) -> Delivery:
        trigger = Trigger(TriggerKind.WEBHOOK, name, event=push.event, ref=push.ref,
                          branch=push.branch, tag=push.tag, sha=push.sha, pusher=push.pusher,
                          repo=push.repo)
        key = None if delivery is None else f"webhook:{name}:{delivery}"
        try:
            work = await self.app.trigger(
                trigger, target=hook.target, batch=hook.batch or (),
                args=arguments(hook, push), room=hook.room, dedupe_key=key)
        except AlreadySubmittedError as exc:
            return await self._redelivered(name, exc)
        log.info("webhook %s: %s of %s (%s) by %s started %s", name, push.event, push.ref,
                 (push.sha or "")[:SHORT_SHA], push.pusher or "someone", work.id)
        return Delivery(Outcome.STARTED, work=event_of(work, time.time()))

    async def _redelivered(self, name: str, exc: AlreadySubmittedError) -> Delivery:
        log.info("webhook %s: a delivery again; it started %s", name, exc.subject_id)
        if exc.subject_id is None:
            return Delivery(Outcome.REDELIVERED, str(exc))
        return Delivery(Outcome.REDELIVERED, str(exc),
                        work=await self.app.status(exc.subject_id))


def _secret(app: App, name: str) -> bytes:
    # load_config refuses a webhook without its secret; a Config built otherwise gets here.
    secret = app.config.webhook_secret(name)
    if secret is None:
        raise ConfigError(f"webhooks.{name}: its secret is not set: put it in "
                          f"{webhook_secret_env(name)}")
    return secret.get_secret_value().encode()


def _ignored(name: str, reason: str) -> Delivery:
    log.debug("webhook %s: %s", name, reason)
    return Delivery(Outcome.IGNORED, reason)
