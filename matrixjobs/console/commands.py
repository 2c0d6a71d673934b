"""The client commands: status, submit, batch, rerun, cancel, jobs, logs, workers, schedules
(talking to the API)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from matrixjobs.api.client import (
    ApiClient,
    ApiFailure,
    ServiceUnreachable,
)
from matrixjobs.config import load_config
from matrixjobs.console.display import (
    Board,
    Mode,
    pick_mode,
    print_events,
    print_schedules,
    print_workers,
)
from matrixjobs.errors import ConfigError
from matrixjobs.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from matrixjobs.models import Status
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent

JSON_EVENTS_HELP = "machine-readable output: one job-progress event (JSON) per line"
DISCOVERY_LIMIT = 200
RECENT_LIMIT = 20

Command = Callable[[ApiClient, argparse.Namespace, Mode], Awaitable[int]]


def parse_interval(text: str) -> float:
    """`5s`, `500ms`, `1m`, `2.5` (seconds) → seconds; for argparse `type=`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 5s, 500ms, 1m)")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2) or "s"]
    if value < 0.05:
        raise argparse.ArgumentTypeError("the interval must be at least 50ms")
    return value


def run(command: Command, args: argparse.Namespace) -> int:
    """Run one client command; turns connection and API errors into messages and exit codes."""
    mode = pick_mode(args.json)

    async def main() -> int:
        async with ApiClient(args.api) as api:
            return await command(api, args, mode)

    try:
        return asyncio.run(main())
    except ServiceUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiFailure as exc:
        print(f"error: {exc.describe()} (HTTP {exc.status}, {exc.code})", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def outcome(event: JobProgressEvent | None) -> int:
    return EXIT_OK if event is not None and event.status is Status.COMPLETED else EXIT_FAILED


# -- commands -----------------------------------------------------------------------------------


async def cmd_status(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    if args.watch:
        if args.id:
            return outcome(await follow(api, args.id, mode, args.poll))
        await watch_all(api, mode, args.poll)
        return EXIT_OK
    if args.id:
        print_events([await api.status(args.id)], mode)
        return EXIT_OK
    overview = await api.overview()
    if overview.degraded is not None:  # on stderr: --json's lines stay events only
        print(wording.degraded(overview.degraded), file=sys.stderr, flush=True)
    if mode is Mode.LIVE and not overview.active:
        print("nothing is running")
        return EXIT_OK
    print_events(overview.active, mode, "running")
    return EXIT_OK


async def cmd_jobs(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    print_events(await api.jobs(limit=args.limit), mode, "recent jobs")
    return EXIT_OK


async def cmd_workers(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    print_workers(await api.workers(), mode, time.time())
    return EXIT_OK


async def cmd_schedules(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    """List the schedules, or pause or resume one."""
    if args.what == "list":
        print_schedules(await api.schedules(), mode)
        return EXIT_OK
    if not args.name:
        print(f"error: schedules {args.what} needs a NAME", file=sys.stderr)
        return EXIT_USAGE
    info = await api.pause_schedule(args.name, pause=args.what == "pause")
    print(info.to_json() if mode is Mode.JSON else wording.schedule(info), flush=True)
    return EXIT_OK


async def cmd_submit(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    created = await api.submit(args.target, list(args.args))
    return await after_submit(api, created, args, mode)


async def cmd_batch(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    created = await api.submit_batch(list(args.targets))
    return await after_submit(api, created, args, mode)


async def cmd_rerun(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    created = await api.rerun(args.id)
    return await after_submit(api, created, args, mode)


async def after_submit(
    api: ApiClient, created: JobProgressEvent, args: argparse.Namespace, mode: Mode
) -> int:
    if not args.wait:
        if mode is Mode.JSON:
            print(created.to_json(), flush=True)
        else:
            print(f"submitted {created.id} ({created.name})", flush=True)
        return EXIT_OK
    return outcome(await follow(api, created.id, mode, args.poll))


async def cmd_tokens(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    """Personal tokens: list, create (the token is printed once), revoke."""
    if args.what == "create":
        if not args.name:
            print("error: tokens create needs --name", file=sys.stderr)
            return EXIT_USAGE
        made = await api.issue_token(args.user, args.name)
        if mode is Mode.JSON:
            print(json.dumps(made), flush=True)
        else:
            print(f"token {made['name']} for {made['user']} (shown once; keep it secret):\n"
                  f"{made['token']}", flush=True)
        return EXIT_OK
    if args.what == "revoke":
        name = args.token or args.name
        if not name:
            print("error: tokens revoke needs a NAME", file=sys.stderr)
            return EXIT_USAGE
        gone = await api.revoke_token(args.user, name)
        print(json.dumps(gone) if mode is Mode.JSON
              else f"revoked {gone['user']}'s token {gone['name']}", flush=True)
        return EXIT_OK
    listed = await api.tokens()
    if mode is Mode.JSON:
        print(json.dumps({"tokens": listed}), flush=True)
    for token in [] if mode is Mode.JSON else listed:
        made = datetime.fromtimestamp(token["createdAt"], UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{token['user']} {token['name']} (made {made} UTC)", flush=True)
    return EXIT_OK


async def cmd_approve(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    return said(await api.approve(args.id), mode)


async def cmd_deny(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    return said(await api.deny(args.id, args.reason), mode)


def said(event: JobProgressEvent, mode: Mode) -> int:
    """Print where a job's or batch's approval stands now."""
    if mode is Mode.JSON:
        print(event.to_json(), flush=True)
    elif event.approval is not None:
        print(f"{event.id} ({event.name}): {wording.approval_state(event.approval)}",
              flush=True)
    return EXIT_OK


async def cmd_audit(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    """The audit log's newest records; with --follow, then each new one as it comes."""
    if args.what == "verify":
        return await verify_audit(api, args)
    filters = {name: value for name in ("user", "action", "target", "since")
               if (value := getattr(args, name)) is not None}
    after = None
    while True:
        params = {**filters, "limit": str(args.limit)}
        if after is not None:
            params["after"] = str(after)
        records = await api.audit(params)
        for record in records:
            print(json.dumps(record) if mode is Mode.JSON else audit_line(record), flush=True)
            after = record["seq"]
        if not args.follow:
            return EXIT_OK
        if after is None or len(records) < args.limit:  # else more wait: ask again now
            after = 0 if after is None else after
            await asyncio.sleep(args.poll)


def audit_line(record: dict[str, Any]) -> str:
    """'2026-12-06 19:40:01 #12 started j5 deploy by @alice:example.org via room {…}'."""
    when = datetime.fromtimestamp(record["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    parts = [when, f"#{record['seq']}", record["action"], record["subject"], record["target"],
             f"by {record['actor']} via {record['via']}",
             f"in {record['roomId']}" if record["roomId"] else None,
             json.dumps(record["detail"], ensure_ascii=False) if record["detail"] else None]
    return " ".join(part for part in parts if part)


async def verify_audit(api: ApiClient, args: argparse.Namespace) -> int:
    """Check the chain through the service, or (--config) straight from its store."""
    if args.config is not None:
        # Only here: reading a store directly needs the database drivers.
        from matrixjobs.ops import audit_check
        from matrixjobs.ops.store_probe import StoreProblem

        try:
            verdict = await asyncio.to_thread(audit_check.check, load_config(args.config))
        except (ConfigError, StoreProblem) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        ok, count, first, last, problems = (verdict.ok, verdict.records, verdict.first,
                                            verdict.last, verdict.problems)
    else:
        found = await api.verify_audit()
        ok, count, first, last, problems = (found["ok"], found["records"], found["first"],
                                            found["last"], found["problems"])
    span = f" ({first}-{last})" if count else ""
    if ok:
        print(f"audit log: ok, {count} records{span}", flush=True)
        return EXIT_OK
    print(f"audit log: {len(problems)} problems in {count} records{span}:", flush=True)
    for problem in problems:
        print(f"  {problem}", flush=True)
    return EXIT_FAILED


async def cmd_cancel(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    event = await api.cancel(args.id)
    if mode is Mode.JSON:
        print(event.to_json(), flush=True)
    else:
        print(f"{event.id} ({event.name}) {event.status.value}", flush=True)
    return EXIT_OK


async def cmd_logs(api: ApiClient, args: argparse.Namespace, mode: Mode) -> int:
    """The log is text whatever the mode: it is the job's own output."""
    async for text in api.log(args.id, follow=args.follow):
        sys.stdout.write(text)
        sys.stdout.flush()
    return EXIT_OK


# -- following ----------------------------------------------------------------------------------


async def follow(api: ApiClient, subject: str, mode: Mode, poll: float) -> JobProgressEvent:
    """Show `subject`'s updates until it ends; returns its terminal state."""
    with Board(mode) as board:
        return await stream_into(api, subject, board, poll)


async def stream_into(
    api: ApiClient, subject: str, board: Board, poll: float
) -> JobProgressEvent:
    """Follow one stream into `board`; if it closes early (service restarting), resubscribe."""
    while True:
        last = None
        async for event in api.stream(subject):
            board.update(event)
            last = event
        if last is not None and last.terminal:
            return board.latest.get(subject, last)
        await asyncio.sleep(poll)


async def watch_all(api: ApiClient, mode: Mode, poll: float) -> None:
    """Poll the lists for new jobs and batches; stream each one found until it ends.

    Runs until interrupted. The first poll shows what is active now; later polls
    also pick up anything new since then, even if it already finished between polls.
    """
    followed: dict[str, asyncio.Task[JobProgressEvent]] = {}
    known: set[str] | None = None
    failures: asyncio.Queue[BaseException] = asyncio.Queue()

    def done(task: asyncio.Task[JobProgressEvent]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.put_nowait(task.exception())  # type: ignore[arg-type]

    with Board(mode) as board:
        if mode is not Mode.JSON:
            board.note(f"watching {api.url} (polling every {poll:g}s; Ctrl-C to stop)")
        try:
            while True:
                jobs, batches = await asyncio.gather(
                    api.jobs(limit=DISCOVERY_LIMIT), api.batches(limit=DISCOVERY_LIMIT)
                )
                items = batches + jobs
                if known is None:  # the first poll: finished ones are history, not news
                    known = {item.id for item in items if item.terminal}
                for item in reversed(items):  # oldest first
                    if item.id in known or item.id in followed:
                        if item.id in followed:
                            board.update(item)
                        continue
                    board.update(item)
                    task = asyncio.create_task(stream_into(api, item.id, board, poll))
                    task.add_done_callback(done)
                    followed[item.id] = task
                with contextlib.suppress(TimeoutError):
                    raise await asyncio.wait_for(failures.get(), poll)
        finally:
            for task in followed.values():
                task.cancel()
            await asyncio.gather(*followed.values(), return_exceptions=True)


# -- the subcommands' arguments -----------------------------------------------------------------

EPILOG = (
    "The service's API: --api URL, else $MATRIXJOBS_API_URL, else http://127.0.0.1:8765 "
    "(unix:/path/api.sock for a unix socket); the token comes from $MATRIXJOBS_API_TOKEN. "
    "Exit codes: 0 success; 1 the job/batch failed or was cancelled (with --wait or a watched "
    "ID), or the service refused the request (wrong token 401, refused by a rule 403, unknown "
    "id or target 404, already finished or not awaiting approval 409, bad arguments 422, the "
    "store cannot take new work now 503: the service's message is printed); "
    "2 usage; 3 cannot reach the service."
)


def add_client_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register status, submit, batch, rerun, cancel, approve, deny, jobs, logs, workers and
    schedules on the main parser's subcommands."""

    def client_parser(name: str, help_text: str, command: Command,
                      json_help: str = JSON_EVENTS_HELP) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        sub.add_argument("--api", metavar="URL", default=None,
                         help="the service's API URL (default: $MATRIXJOBS_API_URL or "
                              "http://127.0.0.1:8765)")
        sub.add_argument("--json", action="store_true", help=json_help)
        sub.set_defaults(handler=lambda args: run(command, args))
        return sub

    def poll_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--poll", type=parse_interval, default=5.0, metavar="INTERVAL",
                         help="how often to poll for new jobs and batches (default 5s; "
                              "e.g. 500ms, 2s, 1m)")

    status = client_parser("status", "show running jobs and batches, or one ID; --watch "
                                     "follows them live", cmd_status)
    status.add_argument("id", nargs="?", metavar="ID", help="a job (j12) or batch (b3)")
    status.add_argument("--watch", action="store_true",
                        help="follow live: with ID until it ends, else every job and batch "
                             "(new ones found by polling) until Ctrl-C")
    poll_option(status)

    submit = client_parser("submit", "run a configured target", cmd_submit)
    submit.add_argument("target", metavar="TARGET")
    submit.add_argument("args", nargs="*", metavar="ARGS",
                        help="arguments for the target, if it allows any (put -- before ones "
                             "starting with -)")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    poll_option(submit)

    batch = client_parser("batch", "run several targets as one batch", cmd_batch)
    batch.add_argument("targets", nargs="+", metavar="TARGET")
    batch.add_argument("--wait", action="store_true", help="follow the batch until it ends")
    poll_option(batch)

    rerun = client_parser("rerun", "run a job's target (or a batch's targets) again with the "
                                   "same arguments", cmd_rerun)
    rerun.add_argument("id", metavar="ID", help="a job (j12) or batch (b3)")
    rerun.add_argument("--wait", action="store_true", help="follow the new job or batch until "
                                                           "it ends")
    poll_option(rerun)

    cancel = client_parser("cancel", "cancel a job or batch", cmd_cancel)
    cancel.add_argument("id", metavar="ID", help="a job (j12) or batch (b3)")

    audit = client_parser("audit", "the audit log: who did what, from where; `audit verify` "
                                   "checks its hash chain", cmd_audit,
                          json_help="machine-readable output: one record (JSON) per line")
    audit.add_argument("what", nargs="?", choices=["verify"],
                       help="verify: check the chain (exit 1 if a record was edited, deleted "
                            "or added out of order)")
    audit.add_argument("--config", default=None, metavar="PATH",
                       help="with verify: read the store this config names directly (the "
                            "service may be stopped), not through the API")
    audit.add_argument("--user", help="only this actor's records (a Matrix user id, admin)")
    audit.add_argument("--action", help="only this action (started, cancelled, refused, …)")
    audit.add_argument("--target", help="only records about this target")
    audit.add_argument("--since", metavar="TIME",
                       help="only records from this time on (ISO 8601 or epoch seconds)")
    audit.add_argument("--limit", type=int, default=50, help="how many of the newest "
                                                             "(default 50)")
    audit.add_argument("--follow", action="store_true",
                       help="then print each new record as it comes, until Ctrl-C")
    audit.add_argument("--poll", type=parse_interval, default=1.0, metavar="INTERVAL",
                       help="how often --follow asks (default 1s)")

    tokens = client_parser("tokens", "personal API tokens: list them, create one for a Matrix "
                                     "user (printed once), or revoke one", cmd_tokens,
                           json_help="machine-readable output")
    tokens.add_argument("what", nargs="?", choices=["list", "create", "revoke"],
                        default="list")
    tokens.add_argument("token", nargs="?", metavar="NAME", help="with revoke: which token")
    tokens.add_argument("--name", metavar="NAME", help="with create: its name")
    tokens.add_argument("--user", help="whose (a Matrix user id); default: yours")

    approve = client_parser("approve", "approve a job or batch held for approval", cmd_approve)
    approve.add_argument("id", metavar="ID", help="a job (j12) or batch (b3)")

    deny = client_parser("deny", "refuse a job or batch held for approval (it is cancelled)",
                         cmd_deny)
    deny.add_argument("id", metavar="ID", help="a job (j12) or batch (b3)")
    deny.add_argument("--reason", default=None, help="why, shown with it")

    jobs = client_parser("jobs", "list recent jobs", cmd_jobs)
    jobs.add_argument("--limit", type=int, default=RECENT_LIMIT, help="how many (default 20)")

    client_parser("workers", "list the processes that run jobs: labels, running jobs, last "
                             "heartbeat, and those that went silent", cmd_workers,
                  json_help='machine-readable output: the API\'s answer, {"workers": [...]}')

    schedules = client_parser("schedules", "list the schedules (next run, paused, last job), "
                                           "or pause or resume one on every node",
                              cmd_schedules, json_help="machine-readable output: the API's "
                                                       "answer")
    schedules.add_argument("what", nargs="?", choices=["list", "pause", "resume"],
                           default="list")
    schedules.add_argument("name", nargs="?", metavar="NAME",
                           help="with pause or resume: which schedule")

    logs = client_parser("logs", "print a job's whole output (every attempt)", cmd_logs)
    logs.add_argument("id", metavar="ID", help="a job (j12)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="then print its output as it comes, until the run going on (or "
                           "the next to start) ends")
