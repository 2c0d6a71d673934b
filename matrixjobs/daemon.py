"""Run the service as a daemon: signals, graceful shutdown and systemd's notify protocol.

SIGTERM/SIGINT stop the service gracefully (see `App.stop`); a second one kills the job
subprocesses and exits at once — SQLite's journal keeps the store consistent, and the jobs
that were running are retried after the next start, as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from matrixjobs.app import App
from matrixjobs.exitcodes import EXIT_FAILED
from matrixjobs.systemd import Notifier

log = logging.getLogger(__name__)

# How long READY=1 waits for the interfaces. A homeserver that is down must not keep
# systemd from considering the service started (and killing it at TimeoutStartSec) while
# the queue already runs jobs: after this, READY is sent anyway and the bot keeps retrying.
READY_WAIT_S = 45.0
# Sending the last edits after the jobs stopped (see MatrixBot.stop), and closing up.
STOP_SLACK_S = 20.0


async def serve(app: App, notifier: Notifier | None = None) -> None:
    """Run `app` until SIGTERM or SIGINT, telling systemd how it goes."""
    notifier = notifier or Notifier.from_environ()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: killing running jobs and exiting now", name)
            app.kill_jobs()
            logging.shutdown()
            os._exit(EXIT_FAILED)  # no cleanup on purpose: that is what the first signal does
        log.info("%s: shutting down", name)
        stop.set()

    # Handlers first: a signal that arrives while starting still means "stop cleanly".
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watchdog = asyncio.create_task(notifier.watchdog(), name="systemd-watchdog")
    try:
        notifier.notify("STATUS=starting")
        await app.start()
        await _announce_ready(app, notifier, stop)
        await stop.wait()
        grace_s = app.config.queue.shutdown_grace_s
        running = app.queue.running_count
        budget_s = grace_s + app.config.queue.kill_grace_s + STOP_SLACK_S
        # EXTEND_TIMEOUT_USEC: the stop may take as long as the config allows, whatever
        # the unit's TimeoutStopSec says.
        notifier.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int(budget_s * 1_000_000)}",
                        f"STATUS=stopping: {running} running jobs get up to {grace_s:g}s")
    finally:
        await app.stop(app.config.queue.shutdown_grace_s)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _announce_ready(app: App, notifier: Notifier, stop: asyncio.Event) -> None:
    ready = asyncio.create_task(app.ready())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({ready, stopping}, timeout=READY_WAIT_S,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        stopping.cancel()
    if stop.is_set():
        return
    if ready.done() and not ready.cancelled() and ready.exception() is None:
        status = "running"
    else:
        status = "running; not connected to Matrix yet (retrying)"
        log.warning("ready without Matrix: the homeserver did not answer within %.0fs; "
                    "jobs from the API run meanwhile", READY_WAIT_S)
    notifier.notify("READY=1", f"STATUS={status}")
