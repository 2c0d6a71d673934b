"""One function per room command. Each gets a `Context` (who said it, where, and how to
answer) and the parsed `Command`; who may give it is decided before (see callbacks.py)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nio import RoomMessageText

from matrixjobs.app import App
from matrixjobs.errors import MatrixJobsError
from matrixjobs.fleet import worker_state
from matrixjobs.matrix import render
from matrixjobs.matrix.commands import Command
from matrixjobs.matrix.edits import EditScheduler
from matrixjobs.matrix.places import Places
from matrixjobs.models import Batch, Job, ProgressMessage
from matrixjobs.policy import Action, Caller, Place
from matrixjobs.progress.events import event_of


@dataclass(frozen=True, slots=True)
class Context:
    app: App
    scheduler: EditScheduler
    places: Places
    prefix: str
    room_id: str
    event: RoomMessageText

    def stranger(self) -> Caller:
        """The sender, whom no rule lets do anything (their room is never read)."""
        return Caller.in_room(self.event.sender, Place(self.room_id), self.event.event_id)

    async def caller(self) -> Caller:
        """The sender, whose room is read as the rules of the targets asked about need."""
        return self.places.caller(self.room_id, self.event.sender, self.event.event_id)

    def reply(self, rendered: render.Rendered) -> None:
        self.scheduler.reply(self.room_id, self.event.event_id, rendered)

    def where(self) -> ProgressMessage:
        """Where a command's job is shown: a reply to the command. Stored with the job in
        one transaction, so a restart always finds and shows it."""
        return ProgressMessage("", self.room_id, None, self.event.sender, self.event.event_id)

    async def show(self, item: Job | Batch) -> None:
        await show(self.app, self.scheduler, self.where(), item)


async def show(app: App, scheduler: EditScheduler, where: ProgressMessage,
               item: Job | Batch) -> None:
    """Post the progress message of new work and keep it up to date."""
    first = event_of(item, time.time())
    scheduler.track(where.room_id, where.requester, where.reply_to, first)
    # The job may have moved on while we were submitting it.
    scheduler.update(await app.status(first.id))


async def build(ctx: Context, command: Command) -> None:
    if not command.args:
        raise MatrixJobsError(f"usage: {ctx.prefix}build TARGET [ARGS…]")
    job = await ctx.app.submit(command.args[0], command.args[1:],
                               dedupe_key=ctx.event.event_id, show=ctx.where(),
                               caller=await ctx.caller())
    await ctx.show(job)


async def batch(ctx: Context, command: Command) -> None:
    if not command.args:
        raise MatrixJobsError(f"usage: {ctx.prefix}batch TARGET [TARGET…]")
    made = await ctx.app.submit_batch(list(command.args), dedupe_key=ctx.event.event_id,
                                      show=ctx.where(), caller=await ctx.caller())
    await ctx.show(made)


async def rerun(ctx: Context, command: Command) -> None:
    if len(command.args) != 1:
        raise MatrixJobsError(f"usage: {ctx.prefix}rerun ID")
    await ctx.show(await ctx.app.rerun(command.args[0], await ctx.caller(),
                                       ctx.event.event_id, ctx.where()))


async def approve(ctx: Context, command: Command) -> None:
    if len(command.args) != 1:
        raise MatrixJobsError(f"usage: {ctx.prefix}approve ID")
    judged = await ctx.app.approve(command.args[0], await ctx.caller())
    ctx.reply(render.render_judged(ctx.app.live(judged), time.time()))


async def deny(ctx: Context, command: Command) -> None:
    if not command.args:
        raise MatrixJobsError(f"usage: {ctx.prefix}deny ID [REASON…]")
    judged = await ctx.app.deny(command.args[0], await ctx.caller(), " ".join(command.args[1:]))
    ctx.reply(render.render_judged(ctx.app.live(judged), time.time()))


async def token(ctx: Context, command: Command) -> None:
    """A new personal API token, answered only in a direct room (the answer holds it)."""
    if len(command.args) > 1:
        raise MatrixJobsError(f"usage: {ctx.prefix}token [NAME]")
    user = ctx.event.sender
    if not ctx.places.direct(ctx.room_id, user):
        raise MatrixJobsError(f"ask for a token in a direct room with me (only you and me "
                              f"in it): the answer holds the token. Here: {ctx.prefix}tokens, "
                              f"{ctx.prefix}revoke NAME")
    name = command.args[0] if command.args else time.strftime("matrix-%Y%m%d-%H%M%S",
                                                              time.gmtime())
    issued = await ctx.app.issue_token(user, name, await ctx.caller())
    ctx.reply(render.render_token(name, issued, ctx.prefix, ctx.places.encrypted(ctx.room_id)))


async def tokens(ctx: Context, command: Command) -> None:
    ctx.reply(render.render_tokens(await ctx.app.tokens(await ctx.caller()), time.time()))


async def revoke(ctx: Context, command: Command) -> None:
    if len(command.args) != 1:
        raise MatrixJobsError(f"usage: {ctx.prefix}revoke NAME")
    await ctx.app.revoke_token(ctx.event.sender, command.args[0], await ctx.caller())
    ctx.reply(render.render_revoked(command.args[0]))


async def status(ctx: Context, command: Command) -> None:
    """One job or batch, or what is active; while the store cannot take writes, the line
    that says so comes first. A store that cannot even be read is said by the error
    ("store: unreachable; try again in 10 s")."""
    now = time.time()
    if command.args:
        shown = render.render_progress(await ctx.app.status(command.args[0]), now, ctx.prefix)
    else:
        shown = render.render_status_summary(await ctx.app.active(), now)
    health = ctx.app.health
    ctx.reply(shown if health.up else render.render_degraded(health.reason, shown))


async def cancel(ctx: Context, command: Command) -> None:
    if len(command.args) != 1:
        raise MatrixJobsError(f"usage: {ctx.prefix}cancel ID")
    result = await ctx.app.cancel(command.args[0], await ctx.caller())
    ctx.reply(render.render_cancelled(result.id, str(result.status)))


async def logs(ctx: Context, command: Command) -> None:
    usage = f"usage: {ctx.prefix}logs ID [LINES]"
    if not 1 <= len(command.args) <= 2:
        raise MatrixJobsError(usage)
    lines = render.LOG_LINES
    if len(command.args) == 2:
        if not command.args[1].isdigit() or int(command.args[1]) < 1:
            raise MatrixJobsError(usage)
        lines = min(int(command.args[1]), render.MAX_LOG_LINES)
    job_id = command.args[0]
    text = await ctx.app.log_tail(job_id, lines, render.MAX_LOG_BYTES, await ctx.caller())
    ctx.reply(render.render_log(job_id.strip().lower(), text))


async def jobs(ctx: Context, command: Command) -> None:
    items: list[Job | Batch] = [*await ctx.app.batches(limit=10)]
    items += [job for job in await ctx.app.jobs(limit=20) if job.batch_id is None]
    items.sort(key=lambda item: item.created_at, reverse=True)
    ctx.reply(render.render_jobs([ctx.app.live(item) for item in items[:10]], time.time()))


async def targets(ctx: Context, command: Command) -> None:
    caller = await (await ctx.caller()).located(ctx.app.targets.names())
    allowed = set(ctx.app.policy.may_run(caller))
    listed = [(name, target.description, target.args_pattern is not None,
               bool(target.approvals))
              for name, target in ctx.app.targets.items() if name in allowed]
    if ctx.app.targets.names():
        ctx.reply(render.render_targets(listed, "You may not run any target here."))
    else:
        ctx.reply(render.render_targets(listed))


async def workers(ctx: Context, command: Command) -> None:
    now, lease_s = time.time(), ctx.app.config.queue.lease_s
    states = [worker_state(worker, now, lease_s) for worker in await ctx.app.workers()]
    ctx.reply(render.render_workers(states, now))


async def schedules(ctx: Context, command: Command) -> None:
    ctx.reply(render.render_schedules(await ctx.app.schedules()))


async def schedule(ctx: Context, command: Command) -> None:
    """`!schedule pause NAME` / `!schedule resume NAME`: the App asks the policy whether the
    sender may run what the schedule starts, from this room."""
    if len(command.args) != 2 or command.args[0].lower() not in ("pause", "resume"):
        raise MatrixJobsError(f"usage: {ctx.prefix}schedule pause NAME or "
                              f"{ctx.prefix}schedule resume NAME")
    what, name = command.args[0].lower(), command.args[1]
    change = ctx.app.pause_schedule if what == "pause" else ctx.app.resume_schedule
    ctx.reply(render.render_schedule_changed(await change(name, await ctx.caller()),
                                             ctx.prefix))


async def help_(ctx: Context, command: Command) -> None:
    ctx.reply(render.render_help(ctx.prefix))


Handler = Callable[[Context, Command], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RoomCommand:
    run: Handler
    action: Action  # what the policy is asked before it runs


COMMANDS: dict[str, RoomCommand] = {
    "build": RoomCommand(build, Action.RUN),
    "batch": RoomCommand(batch, Action.RUN),
    "rerun": RoomCommand(rerun, Action.RERUN),
    "cancel": RoomCommand(cancel, Action.CANCEL),
    "logs": RoomCommand(logs, Action.LOGS),
    "approve": RoomCommand(approve, Action.APPROVE),
    "deny": RoomCommand(deny, Action.APPROVE),
    "token": RoomCommand(token, Action.TOKEN),
    "tokens": RoomCommand(tokens, Action.TOKEN),
    "revoke": RoomCommand(revoke, Action.TOKEN),
    "status": RoomCommand(status, Action.READ),
    "jobs": RoomCommand(jobs, Action.READ),
    "targets": RoomCommand(targets, Action.READ),
    "workers": RoomCommand(workers, Action.READ),
    "schedules": RoomCommand(schedules, Action.READ),
    "schedule": RoomCommand(schedule, Action.SCHEDULE),
    "help": RoomCommand(help_, Action.READ),
}
