"""The service's Prometheus metrics, in one registry per App (tests run several at once).

Job counters and histograms are fed by the progress monitor's lifecycle calls, which
come after each state is committed; the Matrix counters by the bot's edit scheduler;
the gauges are read when scraped. Labels are bounded: a target's name (or, for a job
enqueued without a target, its handler type), an outcome, a state, a kind. Every series
a configured target can have exists from the start at 0, so a rate is never missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from matrixjobs.models import Job, Status

MATRIX_KINDS = ("sent", "edited")
# Jobs are builds and deploys: seconds to hours.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# A free worker starts a due job within milliseconds; a busy queue makes it wait minutes.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


@dataclass(frozen=True, slots=True)
class TargetSeries:
    finished: dict[Status, Counter]  # by outcome
    duration: Histogram


class Metrics:
    def __init__(self, targets: Sequence[str], clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._targets = frozenset(targets)
        self._clock = clock
        # job id → (target label, when its run started), while the run lasts
        self._running: dict[str, tuple[str, float]] = {}
        registry = self.registry
        self._jobs_total = Counter(
            "matrixjobs_jobs", "Jobs that reached a final state, by target and outcome.",
            ["target", "outcome"], registry=registry)
        self._duration = Histogram(
            "matrixjobs_job_duration_seconds",
            "How long the final run of each finished job took, by target.",
            ["target"], buckets=DURATION_BUCKETS, registry=registry)
        self._queue_wait = Histogram(
            "matrixjobs_job_queue_wait_seconds",
            "How long each run waited from due (submitted, or retry time) to start.",
            buckets=WAIT_BUCKETS, registry=registry)
        self._matrix_events = Counter(
            "matrixjobs_matrix_events", "Messages the bot sent to Matrix, and edits of them.",
            ["kind"], registry=registry)
        self._rate_limited = Counter(
            "matrixjobs_matrix_rate_limited",
            "Sends the homeserver refused with a rate limit (429).", registry=registry)
        self._webhook_deliveries = Counter(
            "matrixjobs_webhook_deliveries",
            "Deliveries to POST /hooks/NAME, by configured webhook and outcome.",
            ["webhook", "outcome"], registry=registry)
        self._gauges = ScrapedGauges()
        registry.register(self._gauges)
        # Each target's children, looked up once: `labels()` costs more than the update.
        self._series: dict[str, TargetSeries] = {}
        for target in targets:
            self._series_of(target)
        self._sent, self._edited = (self._matrix_events.labels(kind) for kind in MATRIX_KINDS)

    # -- fed by the progress monitor -----------------------------------------------------------

    def job_started(self, job: Job) -> None:
        # The store's started_at is the first run's: a retry's run is timed here.
        now = self._clock()
        self._running[job.id] = (self._target(job), now)
        self._queue_wait.observe(max(now - max(job.created_at, job.run_after), 0.0))

    def job_settled(self, job: Job) -> None:
        """A run ended, or a job that never ran was cancelled or failed at recovery."""
        run = self._running.pop(job.id, None)
        if not job.status.terminal:
            return  # waiting for a retry: it is counted once it ends
        series = self._series_of(self._target(job) if run is None else run[0])
        series.finished[job.status].inc()
        if run is not None and job.finished_at is not None:
            series.duration.observe(max(job.finished_at - run[1], 0.0))

    def _target(self, job: Job) -> str:
        target = job.data.get("target")
        return target if isinstance(target, str) and target in self._targets else job.type

    def _series_of(self, target: str) -> TargetSeries:
        series = self._series.get(target)
        if series is None:
            series = self._series[target] = TargetSeries(
                finished={status: self._jobs_total.labels(target, status.value)
                          for status in Status if status.terminal},
                duration=self._duration.labels(target))
        return series

    # -- fed by the Matrix bot -----------------------------------------------------------------

    def matrix_sent(self) -> None:
        self._sent.inc()

    def matrix_edited(self) -> None:
        self._edited.inc()

    def matrix_rate_limited(self) -> None:
        self._rate_limited.inc()

    # -- fed by the webhook receiver --------------------------------------------------------

    def webhooks(self, names: Iterable[str], outcomes: Iterable[str]) -> None:
        """Every series the configured webhooks can have, at 0 from the start."""
        for name in names:
            for outcome in outcomes:
                self._webhook_deliveries.labels(name, outcome)

    def webhook_delivery(self, name: str, outcome: str) -> None:
        self._webhook_deliveries.labels(name, outcome).inc()

    # -- read when scraped ---------------------------------------------------------------------

    def set_gauges(self, jobs: Mapping[Status, int] | None, workers: int, subscribers: int,
                   store_up: bool, store_errors: Mapping[str, int]) -> None:
        """`jobs` None: the store could not count them; the last counts stay."""
        if jobs is not None:
            self._gauges.jobs = {status: jobs.get(status, 0) for status in Status}
        self._gauges.workers = workers
        self._gauges.subscribers = subscribers
        self._gauges.store_up = store_up
        self._gauges.store_errors = dict(store_errors)


class ScrapedGauges(Collector):
    """Gauges whose values are read at scrape time (`Metrics.set_gauges`).

    A collector rather than `Gauge`s: the registry refuses a `Gauge` named
    `matrixjobs_jobs` beside the `matrixjobs_jobs` counter (exposed as
    `matrixjobs_jobs_total`), although the text format tells them apart.
    """

    def __init__(self) -> None:
        self.jobs: dict[Status, int] = dict.fromkeys(Status, 0)
        self.workers = 0
        self.subscribers = 0
        self.store_up = True
        self.store_errors: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("matrixjobs_jobs", "Jobs in the store, by state.",
                                 labels=["state"])
        for status, count in self.jobs.items():
            jobs.add_metric([status.value], count)
        yield jobs
        yield GaugeMetricFamily("matrixjobs_workers", "Worker slots that run jobs.",
                                value=self.workers)
        yield GaugeMetricFamily(
            "matrixjobs_stream_subscribers",
            "Live subscriptions to progress events (streams, watches, the Matrix bot).",
            value=self.subscribers)
        yield GaugeMetricFamily(
            "matrixjobs_store_up", "1 while the store takes writes, 0 while it cannot "
            "(disk full, locked, unreachable): /healthz then answers 503.",
            value=int(self.store_up))
        errors = CounterMetricFamily(
            "matrixjobs_store_errors", "Store operations that failed, by kind of fault.",
            labels=["kind"])
        for kind, count in self.store_errors.items():
            errors.add_metric([kind], count)
        yield errors
