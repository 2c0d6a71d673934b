"""Everything the Matrix bot says, as pure functions: event/state in, `Rendered` text out.

Each function returns the plain-text `body` and the HTML `formatted_body`
(org.matrix.custom.html) of one message. Nothing here does I/O or reads the
clock: the current time is passed in as `now` (epoch seconds).

Wording decisions worth knowing:

* Numbers, percentages, durations and counts are worded by `progress/wording.py`,
  as in every other view. The bar rounds down like the percentage (99.9% shows 9 🟩).
* Unknown total (no `percentage`): the bar is all ⬜ followed by "…" and the
  count so far ("⬜⬜⬜⬜⬜⬜⬜⬜⬜⬜ … · 34 done"), so the message keeps the same
  shape when the total becomes known. A completed job with an unknown total
  shows a full bar.
* A batch's `X/Y operations` counts finished operations (completed, failed or
  cancelled), matching its bar; the ✅/❌/🚫 counts split them up.
* Output tails, errors and handler messages are cut to `LINE_LIMIT` characters a
  line and the tail to `TAIL_LINES` lines, so an edit (which carries the text
  twice plus the escaped HTML) stays well under Matrix's 64 KiB event limit.
* A job's name (its target and arguments, as typed) is cut to `NAME_LIMIT`
  characters: a message never repeats a long command back to the room.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

from matrixjobs.errors import echo
from matrixjobs.fleet import WorkerState
from matrixjobs.models import PersonalToken, Status
from matrixjobs.progress import wording
from matrixjobs.progress.events import JobProgressEvent
from matrixjobs.schedules import ScheduleInfo

BAR_CELLS = 10
MINI_BAR_CELLS = 5
FILLED = "🟩"
EMPTY = "⬜"
TAIL_LINES = 20
LINE_LIMIT = 200
NAME_LIMIT = 80
LOG_LINES = 30
MAX_LOG_LINES = 200
# `!logs` text is sent twice (body and HTML), each byte up to 6 in JSON (a control
# character is written \u0000) and in HTML ('"' is &quot;), then base64 in an encrypted
# room (4/3): 16 bytes a byte at worst, so 3500 stay under Matrix's 64 KiB event limit.
MAX_LOG_BYTES = 3500

STATUS_EMOJI: dict[Status, str] = {
    Status.PENDING: "⏳",
    Status.PROCESSING: "🔄",
    Status.COMPLETED: "✅",
    Status.FAILED: "❌",
    Status.CANCELLED: "🚫",
}

COMMANDS: tuple[tuple[str, str], ...] = (
    ("build TARGET [ARGS…]", "run a configured target"),
    ("batch TARGET [TARGET…]", "run several targets as one batch"),
    ("status [ID]", "show one job or batch, or everything that is active"),
    ("rerun ID", "run a job or batch again with the same arguments"),
    ("cancel ID", "cancel a job or batch"),
    ("approve ID", "approve a job or batch that waits for approval (or react ✅)"),
    ("deny ID [REASON]", "refuse it: it is cancelled (or react 👎)"),
    ("token [NAME]", "a personal API token (in a direct room with me)"),
    ("tokens · revoke NAME", "your personal tokens · withdraw one"),
    ("logs ID [N]", f"the last N lines of a job's output (default {LOG_LINES})"),
    ("jobs", "list recent and active jobs"),
    ("targets", "list what can be built"),
    ("workers", "list the workers: their labels, running jobs, and those gone silent"),
    ("schedules", "list the schedules: next run, paused or not, last job"),
    ("schedule pause|resume NAME", "hold a schedule's runs on every node, or let them go "
                                   "on"),
    ("help", "show this help"),
)


@dataclass(frozen=True, slots=True)
class Rendered:
    """One message: plain `body` and HTML `formatted_body`."""

    body: str
    html: str


@dataclass(slots=True)
class _Message:
    """Collects a message line by line, keeping text and HTML in step."""

    text: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    blocks: list[bool] = field(default_factory=list)

    def line(self, text: str, html: str | None = None) -> None:
        self._add(text, escape(text) if html is None else html, block=False)

    def block(self, text: str, html: str) -> None:
        """A block element (`<pre>`, `<ul>`): no `<br>` needed around it."""
        self._add(text, html, block=True)

    def _add(self, text: str, html: str, block: bool) -> None:
        self.text.append(text)
        self.html.append(html)
        self.blocks.append(block)

    def rendered(self) -> Rendered:
        html = ""
        for index, (fragment, block) in enumerate(zip(self.html, self.blocks, strict=True)):
            if index and not block and not self.blocks[index - 1]:
                html += "<br>"
            html += fragment
        return Rendered("\n".join(self.text), html)


def _single(text: str, html: str | None = None) -> Rendered:
    return Rendered(text, escape(text) if html is None else html)


# -- numbers and times ------------------------------------------------------------------


def progress_bar(percentage: float | None, cells: int = BAR_CELLS) -> str:
    """🟩 for done cells, ⬜ for the rest; rounds down, so only 100% is all green."""
    if percentage is None or not math.isfinite(percentage):
        return EMPTY * cells
    filled = cells if percentage >= 100 else math.floor(max(percentage, 0.0) * cells / 100)
    return FILLED * filled + EMPTY * (cells - filled)


def _clip(text: str, limit: int = LINE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _name(event: JobProgressEvent) -> str:
    return _clip(event.name, NAME_LIMIT)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return _clip(lines[0]) if lines else ""


# -- the progress message ---------------------------------------------------------------


def _waiting_for_retry(event: JobProgressEvent) -> bool:
    return event.type == "job" and event.status is Status.PENDING and bool(event.error)


def _state_word(event: JobProgressEvent) -> str:
    """'running', 'waiting to retry', 'awaiting approval 0/1', 'denied by @bob: no'…"""
    if _waiting_for_retry(event):
        return "waiting to retry"
    approval = event.approval
    if approval is not None and (wording.awaiting_approval(event) or (
            event.status is Status.CANCELLED and (approval.denied_by or approval.expired))):
        return wording.approval_state(approval)
    return wording.STATUS_WORD[event.status]


def _title(event: JobProgressEvent) -> tuple[str, str]:
    word = _state_word(event)
    emoji = STATUS_EMOJI[event.status]
    text = f"{emoji} {_name(event)} ({event.id}) — {word}"
    html = (f"{emoji} <b>{escape(_name(event))}</b> (<code>{escape(event.id)}</code>) — "
            f"{escape(word)}")
    return text, html


def _add_approval(message: _Message, event: JobProgressEvent, prefix: str) -> None:
    """How to approve held work; once approved, by whom."""
    approval = event.approval
    if approval is None:
        return
    if wording.awaiting_approval(event):
        approve, deny = f"{prefix}approve {event.id}", f"{prefix}deny {event.id} [reason]"
        message.line(f"React ✅ or {approve}; 👎 or {deny} refuses",
                     f"React ✅ or <code>{escape(approve)}</code>; 👎 or "
                     f"<code>{escape(deny)}</code> refuses")
    elif len(approval.approved_by) >= approval.required:
        message.line(f"👍 {wording.approval_state(approval)}")


def _bar_line(event: JobProgressEvent) -> tuple[str, str]:
    percentage = wording.shown_percentage(event)
    bar = progress_bar(percentage)
    if percentage is not None:
        shown = wording.percent(percentage)
        shown_html = f"<b>{shown}</b>"
    elif not event.terminal:
        shown = shown_html = "…"
    else:
        shown = shown_html = ""
    counts = wording.counts(event)
    tail = f" · {counts}" if counts else ""
    text = " ".join(part for part in (bar, shown) if part) + tail
    html = " ".join(part for part in (bar, shown_html) if part) + escape(tail)
    return text, html


def _timing_line(event: JobProgressEvent, now: float) -> str:
    return f"⏱ {wording.timing(event, now)}"


def _add_retry(message: _Message, event: JobProgressEvent) -> None:
    details = event.job_details
    if details is None:
        message.line("🔁 Will retry")
    else:
        attempt, attempts = details.retry_count + 1, details.max_retries + 1
        message.line(f"🔁 Will retry: attempt {attempt} of {attempts}")
    reason = _first_line(event.error or "")
    message.line(f"Last error: {reason}", f"Last error: <code>{escape(reason)}</code>")


def _add_failure(message: _Message, error: str) -> None:
    lines = error.strip("\n").splitlines()
    if not lines:
        return
    reason = _clip(lines[0].strip())
    message.line(f"Failed: {reason}", f"Failed: <b>{escape(reason)}</b>")
    tail = [_clip(line) for line in lines[1:]][-TAIL_LINES:]
    if any(line.strip() for line in tail):
        body = "\n".join(tail)
        message.block(f"```\n{body}\n```", f"<pre><code>{escape(body)}</code></pre>")


def _add_batch(message: _Message, event: JobProgressEvent) -> None:
    details = event.batch_details
    if details is None:
        return
    counts = f"✅ {details.completed_operations} · ❌ {details.failed_operations}"
    if details.cancelled_operations:
        counts += f" · 🚫 {details.cancelled_operations}"
    message.line(counts)
    if details.current_operation:
        now_running = _clip(details.current_operation)
        message.line(f"▶️ Now: {now_running}", f"▶️ Now: <b>{escape(now_running)}</b>")


def _add_batch_errors(message: _Message, event: JobProgressEvent) -> None:
    errors = [_clip(error) for error in (event.batch_details.errors if event.batch_details else [])]
    if errors:
        message.line("Errors:", "<b>Errors:</b>")
        message.block("\n".join(f"• {error}" for error in errors), _html_list(errors))


def _html_list(items: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def render_progress(event: JobProgressEvent, now: float, prefix: str = "!") -> Rendered:
    """The one message per job/batch: title, bar, then details.

    The bar line is left out for a failed/cancelled job that never reported progress, and
    for work held for approval (an empty bar would say nothing).
    """
    message = _Message()
    message.line(*_title(event))
    if event.trigger is not None:
        message.line(wording.started_by(event.trigger))
    if (event.progress is not None or event.status not in (Status.FAILED, Status.CANCELLED)) \
            and not wording.awaiting_approval(event):
        message.line(*_bar_line(event))
    _add_approval(message, event, prefix)
    if event.type == "batch":
        _add_batch(message, event)
    if event.message:
        text = _clip(event.message)
        message.line(text, f"<i>{escape(text)}</i>")
    message.line(_timing_line(event, now))
    tries = wording.attempts(event)
    if tries:
        message.line(f"🔁 {tries[0].upper()}{tries[1:]}")
    _add_batch_errors(message, event)
    if _waiting_for_retry(event):
        _add_retry(message, event)
    elif event.status is Status.FAILED and event.error:
        _add_failure(message, event.error)
    return message.rendered()


# -- short replies ----------------------------------------------------------------------


def _outcome(event: JobProgressEvent, now: float) -> str:
    spent = wording.duration(wording.run_seconds(event, now))
    if event.status is Status.COMPLETED:
        return f"completed in {spent}"
    if event.status is Status.CANCELLED:
        return f"cancelled after {spent}"
    if event.status is Status.FAILED:
        return f"failed: {_failure_reason(event)} (after {spent})"
    return wording.STATUS_WORD[event.status]


def _failure_reason(event: JobProgressEvent) -> str:
    details = event.batch_details
    if event.type == "batch" and details is not None:
        return f"{details.failed_operations} of {details.total_operations} operations failed"
    return _first_line(event.error or "") or "unknown error"


def render_final_notice(event: JobProgressEvent, requester: str, now: float,
                        fixed: bool = False) -> Rendered:
    """The reply that pings the requester when a job or batch ends; `fixed`: the same work
    failed the last time it ran."""
    emoji = STATUS_EMOJI[event.status]
    outcome = ", ".join(part for part in (
        "fixed" if fixed else "", _outcome(event, now), wording.attempts(event)) if part)
    text = f"{requester} {emoji} {_name(event)} ({event.id}) {outcome}"
    link = f'<a href="https://matrix.to/#/{escape(requester)}">{escape(requester)}</a>'
    html = (
        f"{link} {emoji} <b>{escape(_name(event))}</b> (<code>{escape(event.id)}</code>) "
        f"{escape(outcome)}"
    )
    return Rendered(text, html)


def render_help(prefix: str) -> Rendered:
    message = _Message()
    message.line("Commands:", "<b>Commands:</b>")
    lines = [(f"{prefix}{usage}", purpose) for usage, purpose in COMMANDS]
    message.block(
        "\n".join(f"• {usage} — {purpose}" for usage, purpose in lines),
        "<ul>"
        + "".join(f"<li><code>{escape(usage)}</code> — {purpose}</li>" for usage, purpose in lines)
        + "</ul>",
    )
    return message.rendered()


def render_targets(targets: list[tuple[str, str, bool, bool]],
                   empty: str = "No targets are configured.") -> Rendered:
    """(name, description, takes_args, needs_approval) per target; `empty` when there are
    none."""
    if not targets:
        return _single(empty)
    texts, htmls = [], []
    for name, description, takes_args, needs_approval in targets:
        usage = f"{name} [ARGS…]" if takes_args else name
        about = f" — {description}" if description else ""
        about += " (needs approval)" if needs_approval else ""
        texts.append(f"• {usage}{about}")
        htmls.append(f"<li><code>{escape(usage)}</code>{escape(about)}</li>")
    message = _Message()
    message.line("Targets:", "<b>Targets:</b>")
    message.block("\n".join(texts), "<ul>" + "".join(htmls) + "</ul>")
    return message.rendered()


def _list_line(event: JobProgressEvent, now: float) -> tuple[str, str]:
    emoji = STATUS_EMOJI[event.status]
    state = _state_word(event)
    percentage = event.progress.percentage if event.progress else None
    if event.status is Status.PROCESSING and percentage is not None:
        state += f" {wording.percent(percentage)}"
    age = wording.age(event.created_at, now)
    text = f"{emoji} {event.id} {_name(event)} — {state} · {age}"
    html = (
        f"{emoji} <code>{escape(event.id)}</code> <b>{escape(_name(event))}</b> "
        f"— {escape(state)} · {age}"
    )
    return text, html


def render_token(name: str, token: str, prefix: str, encrypted: bool) -> Rendered:
    """A new personal token, shown this once."""
    message = _Message()
    message.line(f"🔑 Your new token {name} (shown once; it acts as you):",
                 f"🔑 Your new token <b>{escape(name)}</b> (shown once; it acts as you):")
    message.block(token, f"<pre><code>{escape(token)}</code></pre>")
    message.line(f"Send it as 'Authorization: Bearer …' or log in to the dashboard with it; "
                 f"{prefix}revoke {name} withdraws it.")
    if not encrypted:
        message.line("⚠️ This room is not encrypted: the homeserver keeps this message. "
                     "Revoke the token and ask again in an encrypted room if that matters.")
    return message.rendered()


def render_tokens(tokens: Sequence[PersonalToken], now: float) -> Rendered:
    if not tokens:
        return _single("You have no personal tokens.")
    lines = [f"• {token.name} · made {wording.duration(now - token.created_at)} ago"
             for token in tokens]
    return _listing("Your tokens:", [(line, escape(line)) for line in lines])


def render_revoked(name: str) -> Rendered:
    return _single(f"🗑️ Token {name} revoked: it no longer works.")


def render_judged(event: JobProgressEvent, now: float) -> Rendered:
    """The reply to !approve and !deny: where the work's approval stands now."""
    return Rendered(*_list_line(event, now))


def _listing(title: str, lines: list[tuple[str, str]]) -> Rendered:
    message = _Message()
    message.line(title, f"<b>{escape(title)}</b>")
    for text, html in lines:
        message.line(text, html)
    return message.rendered()


def render_jobs(events: list[JobProgressEvent], now: float) -> Rendered:
    """`!jobs`: one line per job/batch, in the order given."""
    if not events:
        return _single("No jobs yet.")
    return _listing("Jobs:", [_list_line(event, now) for event in events])


def _summary_line(event: JobProgressEvent, now: float) -> tuple[str, str]:
    emoji = STATUS_EMOJI[event.status]
    percentage = event.progress.percentage if event.progress else None
    bar = progress_bar(percentage, MINI_BAR_CELLS)
    shown = wording.percent(percentage) if percentage is not None else "…"
    timing = wording.timing(event, now)
    text = f"{emoji} {event.id} {_name(event)} {bar} {shown} · {timing}"
    html = (
        f"{emoji} <code>{escape(event.id)}</code> <b>{escape(_name(event))}</b> "
        f"{bar} {shown} · {timing}"
    )
    return text, html


def render_status_summary(events: list[JobProgressEvent], now: float) -> Rendered:
    """`!status` without an id: the active jobs/batches (finished ones are skipped)."""
    active = [event for event in events if not event.terminal]
    if not active:
        return _single("Nothing is running.")
    title = f"Active ({len(active)}):"
    return _listing(title, [_summary_line(event, now) for event in active])


def _worker_line(worker: WorkerState, now: float) -> tuple[str, str]:
    labels = f" ({', '.join(worker.labels)})" if worker.labels else ""
    if worker.alive:
        emoji = "🟢"
        state = f"{wording.load(worker)} · beat {wording.age(worker.heartbeat_at, now)}"
    else:
        emoji, state = "🔴", wording.liveness(worker)
    text = _clip(f"{emoji} {worker.name}{labels} {state}")
    return text, f"{emoji} <b>{escape(worker.name)}</b>{escape(labels)} {escape(state)}"


def render_workers(workers: list[WorkerState], now: float) -> Rendered:
    """`!workers`: one line per worker, silent ones too, in the order given."""
    if not workers:
        return _single("No workers.")
    return _listing("Workers:", [_worker_line(worker, now) for worker in workers])


def render_schedules(schedules: list[ScheduleInfo]) -> Rendered:
    """`!schedules`: one line per schedule, by name."""
    if not schedules:
        return _single("No schedules are configured.")
    return _listing("Schedules:", [(_clip(line), escape(_clip(line)))
                                   for line in map(wording.schedule, schedules)])


def render_schedule_changed(info: ScheduleInfo, prefix: str) -> Rendered:
    """The answer to `!schedule pause|resume NAME`: where the schedule stands now."""
    if info.paused:
        return _single(f"⏸️ {info.name} is {wording.schedule_when(info)}: it starts nothing "
                       f"until {prefix}schedule resume {info.name}")
    return _single(f"▶️ {info.name} runs: {wording.schedule_when(info)}")


def render_log(job_id: str, text: str) -> Rendered:
    """The end of a job's log as a code block."""
    if not text:
        return _single(f"📜 {job_id} has no output yet.")
    count = text.count("\n")
    message = _Message()
    message.line(f"📜 {job_id}: the last {count} lines of its log")
    message.block(f"```\n{text}```", f"<pre><code>{escape(text)}</code></pre>")
    return message.rendered()


def render_error(text: str) -> Rendered:
    return Rendered(f"⚠️ {text}", "⚠️ " + escape(text).replace("\n", "<br>"))


def render_denied(reason: str | None = None) -> Rendered:
    """A refusal: which rule refused (e.g. "deploy needs power level 50 in this room"), or
    to a stranger, that they may not run anything."""
    return _single(f"⛔ {reason}" if reason else "⛔ You are not allowed to run jobs here.")


def render_unknown_command(name: str, prefix: str) -> Rendered:
    """`name` is the command word; a leading prefix is not doubled."""
    command = echo(name if name.startswith(prefix) else f"{prefix}{name}")
    text = f"❓ Unknown command {command}. Try {prefix}help."
    html = (
        f"❓ Unknown command <code>{escape(command)}</code>. "
        f"Try <code>{escape(prefix)}help</code>."
    )
    return Rendered(text, html)


def render_cancelled(subject_id: str, status: str) -> Rendered:
    """The reply to `!cancel`, given the state the job/batch ended in."""
    if status == Status.CANCELLED:
        return _single(f"🚫 Cancelled {subject_id}.")
    if status in (Status.COMPLETED, Status.FAILED):
        return _single(f"{subject_id} had already finished ({status}).")
    return _single(f"🚫 Cancelling {subject_id}…")


def render_undecryptable(device_id: str) -> Rendered:
    return _single(
        f"🔒 I could not decrypt your message, so I did nothing. Your client did not share "
        f"its key with my device {device_id}: check that it trusts it, then send again.")


def render_untrusted_session(device_id: str | None, verified_only: bool) -> Rendered:
    """A command from a session the bot refuses (trust = verified: not configured; tofu:
    its keys changed since first seen)."""
    session = f"your session {device_id}" if device_id else "a session of yours I do not know"
    why = ("which is not one of the sessions I am set up to trust. Ask my admin to add it "
           "to my verified devices" if verified_only else
           "whose keys are not the ones I first saw for it. Send from another session (I "
           "trust a new login on first use)")
    return _single(f"🔒 I did nothing: your message came from {session}, {why}.")


def render_degraded(reason: str, shown: Rendered) -> Rendered:
    """A reply while the store cannot take writes: the one line that says so, then the
    reply itself. `reason` as /healthz gives it ("store: locked")."""
    line = f"⚠️ {wording.degraded(reason)}"
    return Rendered(f"{line}\n{shown.body}", f"{escape(line)}<br>{shown.html}")


def render_cleartext() -> Rendered:
    """A command sent unencrypted into an encrypted room (e.g. by a script with the user's
    access token): no device of theirs vouches for it."""
    return _single("🔒 I did nothing: your message was not encrypted, and this room is. "
                   "Send it from a client that encrypts (your Matrix app does).")
