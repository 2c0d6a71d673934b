"""The Matrix bot's wording: progress messages, notices and command replies (pure functions)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from matrixjobs.fleet import worker_state
from matrixjobs.matrix.render import (
    MAX_LOG_BYTES,
    STATUS_EMOJI,
    Rendered,
    progress_bar,
    render_cancelled,
    render_denied,
    render_error,
    render_final_notice,
    render_help,
    render_jobs,
    render_log,
    render_progress,
    render_status_summary,
    render_targets,
    render_unknown_command,
    render_workers,
)
from matrixjobs.models import Batch, Job, Status, Worker
from matrixjobs.progress.events import JobProgressEvent, ProgressInfo, batch_event, job_event

NOW = 1_700_000_000.0
BAR_CHARS = re.compile("[🟩⬜]+")


def make_job(**fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": "j12", "type": "command", "name": "docs", "data": {},
        "status": Status.PROCESSING, "priority": 0, "retry_count": 0, "max_retries": 2,
        "timeout_s": 600.0, "created_at": NOW - 70, "started_at": NOW - 65,
    }
    values.update(fields)
    return Job(**values)


def running(current: float, total: float | None, message: str | None = None,
            eta: float | None = None, **fields: Any) -> JobProgressEvent:
    percentage = None if total is None else round(min(current / total, 1.0) * 100, 1)
    progress = ProgressInfo(current=current, total=total, percentage=percentage)
    return job_event(make_job(**fields), NOW, progress, message, eta)


def failed(error: str) -> JobProgressEvent:
    job = make_job(status=Status.FAILED, finished_at=NOW - 5, error=error)
    return job_event(job, NOW)


def make_batch(**fields: Any) -> Batch:
    values: dict[str, Any] = {
        "id": "b7", "name": "docs, api, web", "status": Status.PROCESSING, "total": 3,
        "created_at": NOW - 40, "started_at": NOW - 30, "completed": 1, "failed": 1,
        "errors": ["j44 api: exit code 2"],
    }
    values.update(fields)
    return Batch(**values)


def bar_of(text: str) -> str:
    """The first run of bar cells in a text."""
    found = BAR_CHARS.search(text)
    assert found is not None, text
    return found.group()


def lines(rendered: Rendered) -> list[str]:
    return rendered.body.split("\n")


# -- small helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percentage", "green"),
    [(0, 0), (34, 3), (99, 9), (99.9, 9), (100, 10), (30.0, 3), (70, 7), (150, 10), (-5, 0)],
)
def test_progress_bar_rounds_down_and_only_100_is_full(percentage: float, green: int) -> None:
    assert progress_bar(percentage) == "🟩" * green + "⬜" * (10 - green)


def test_progress_bar_unknown_is_all_empty_and_cells_configurable() -> None:
    assert progress_bar(None) == "⬜" * 10
    assert progress_bar(50, cells=4) == "🟩🟩⬜⬜"


# -- the progress message -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "emoji"),
    [
        (Status.PENDING, "⏳"), (Status.PROCESSING, "🔄"), (Status.COMPLETED, "✅"),
        (Status.FAILED, "❌"), (Status.CANCELLED, "🚫"),
    ],
)
def test_title_line_has_status_emoji_name_and_id(status: Status, emoji: str) -> None:
    finished = NOW - 1 if status.terminal else None
    event = job_event(make_job(status=status, finished_at=finished), NOW)
    rendered = render_progress(event, NOW)
    assert STATUS_EMOJI[status] == emoji
    assert lines(rendered)[0].startswith(f"{emoji} docs (j12)")
    assert rendered.html.startswith(f"{emoji} <b>docs</b> (<code>j12</code>)")


def test_running_job_shows_bar_percentage_counts_message_elapsed_and_eta() -> None:
    event = running(34, 100, "compiling part 3", eta=125)
    rendered = render_progress(event, NOW)
    title, bar_line, message, timing = lines(rendered)
    assert title == "🔄 docs (j12) — running"
    assert bar_line == "🟩🟩🟩⬜⬜⬜⬜⬜⬜⬜ 34% · 34/100"
    assert message == "compiling part 3"
    assert timing == "⏱ 1m 05s elapsed · ETA 2m 05s"
    assert "🟩🟩🟩⬜⬜⬜⬜⬜⬜⬜ <b>34%</b> · 34/100" in rendered.html
    assert "<i>compiling part 3</i>" in rendered.html
    assert "ETA 2m 05s" in rendered.html


def test_percentage_shown_rounded_down_like_the_bar() -> None:
    body = render_progress(running(999, 1000), NOW).body
    assert "🟩" * 9 + "⬜ 99% · 999/1000" in body
    assert "100%" not in body


def test_whole_numbers_have_no_decimals_and_fractions_stay_short() -> None:
    assert "· 3/10" in render_progress(running(3.0, 10.0), NOW).body
    assert ".0" not in render_progress(running(3.0, 10.0), NOW).body
    assert "· 2.5/10" in render_progress(running(2.5, 10), NOW).body


def test_unknown_total_shows_count_so_far_and_an_empty_bar() -> None:
    rendered = render_progress(running(34, None, "scanning"), NOW)
    bar_line = lines(rendered)[1]
    assert bar_line == "⬜⬜⬜⬜⬜⬜⬜⬜⬜⬜ … · 34 done"
    assert "%" not in rendered.body and "/" not in bar_line
    assert "⬜⬜⬜⬜⬜⬜⬜⬜⬜⬜ … · 34 done" in rendered.html


def test_queued_job_shows_time_in_queue_since_creation() -> None:
    event = job_event(make_job(status=Status.PENDING, started_at=None), NOW)
    rendered = render_progress(event, NOW)
    assert lines(rendered)[0] == "⏳ docs (j12) — queued"
    assert "⏱ queued for 1m 10s" in rendered.body
    assert "ETA" not in rendered.body


def test_finished_job_elapsed_stops_at_finish_and_has_no_eta() -> None:
    job = make_job(status=Status.COMPLETED, started_at=NOW - 125, finished_at=NOW - 100)
    event = job_event(job, NOW, ProgressInfo(current=10, total=10, percentage=100.0), eta_seconds=9)
    later = render_progress(event, NOW + 3600)
    assert "⏱ took 25s" in later.body
    assert "ETA" not in later.body
    assert bar_of(later.body) == "🟩" * 10
    assert "100% · 10/10" in later.body


def test_completed_job_with_unknown_total_shows_a_full_bar() -> None:
    job = make_job(status=Status.COMPLETED, finished_at=NOW - 1)
    event = job_event(job, NOW, ProgressInfo(current=7))
    body = render_progress(event, NOW).body
    assert "🟩🟩🟩🟩🟩🟩🟩🟩🟩🟩 100% · 7 done" in body


def test_job_waiting_for_retry_says_attempt_and_last_error() -> None:
    job = make_job(status=Status.PENDING, retry_count=1, max_retries=2,
                   error="exit code 2\nTraceback <most recent>\nValueError")
    rendered = render_progress(job_event(job, NOW), NOW)
    assert lines(rendered)[0] == "⏳ docs (j12) — waiting to retry"
    assert "🔁 Will retry: attempt 2 of 3" in rendered.body
    assert "Last error: exit code 2" in rendered.body
    assert "Traceback" not in rendered.body  # only the first line
    assert "🔁 Will retry: attempt 2 of 3" in rendered.html
    assert "Last error: <code>exit code 2</code>" in rendered.html


TAIL = ["make: *** [all] Error 2", "<script>alert(1)</script>", "cats & dogs"]


def test_failed_job_shows_reason_and_escaped_output_tail_in_a_code_block() -> None:
    rendered = render_progress(failed("\n".join(["exit code 2", *TAIL])), NOW)
    assert lines(rendered)[0] == "❌ docs (j12) — failed"
    assert "Failed: exit code 2" in rendered.body
    assert "```\n" + "\n".join(TAIL) + "\n```" in rendered.body
    assert "Failed: <b>exit code 2</b>" in rendered.html
    code = re.search(r"<pre><code>(.*?)</code></pre>", rendered.html, re.DOTALL)
    assert code is not None
    assert code.group(1) == (
        "make: *** [all] Error 2\n&lt;script&gt;alert(1)&lt;/script&gt;\ncats &amp; dogs"
    )
    assert "<script>" not in rendered.html
    assert "exit code 2" not in code.group(1)  # the reason is not repeated in the tail


def test_failed_job_with_one_line_error_has_no_code_block() -> None:
    rendered = render_progress(failed("timed out after 600s"), NOW)
    assert "Failed: timed out after 600s" in rendered.body
    assert "```" not in rendered.body
    assert "<pre>" not in rendered.html


def test_huge_output_tail_is_capped_below_the_matrix_event_limit() -> None:
    error = "\n".join(["exit code 1", *(f"{n:02d} " + "<&" * 250 for n in range(30))])
    rendered = render_progress(failed(error), NOW)
    assert "29 <&" in rendered.body and "09 <&" not in rendered.body  # the last 20 lines
    # An edit carries the body twice ("* " fallback and m.new_content) plus the HTML.
    size = 2 * len(rendered.body.encode()) + len(rendered.html.encode())
    assert size < 40_000


def test_user_provided_text_is_escaped_in_html() -> None:
    event = running(1, 2, "a < b & c", name="<img src=x>")
    html = render_progress(event, NOW).html
    assert "&lt;img src=x&gt;" in html and "<img" not in html
    assert "a &lt; b &amp; c" in html


def test_running_batch_shows_operations_counts_current_operation_and_errors() -> None:
    event = batch_event(make_batch(), NOW, current_operation="web <x>", eta_seconds=30)
    rendered = render_progress(event, NOW)
    body = lines(rendered)
    assert body[0] == "🔄 docs, api, web (b7) — running"
    assert body[1] == "🟩🟩🟩🟩🟩🟩⬜⬜⬜⬜ 66% · 2/3 operations"
    assert "✅ 1 · ❌ 1" in body
    assert "▶️ Now: web <x>" in body
    assert "⏱ 30s elapsed · ETA 30s" in body
    assert body[-2:] == ["Errors:", "• j44 api: exit code 2"]
    assert "🚫" not in rendered.body
    assert "▶️ Now: <b>web &lt;x&gt;</b>" in rendered.html
    assert "<ul><li>j44 api: exit code 2</li></ul>" in rendered.html


def test_finished_batch_lists_each_error_and_cancelled_count() -> None:
    batch = make_batch(status=Status.FAILED, completed=1, failed=1, cancelled=1,
                       finished_at=NOW - 2,
                       errors=["j44 api: exit code 2", "j45 web: cancelled"])
    rendered = render_progress(batch_event(batch, NOW, current_operation="web"), NOW)
    assert lines(rendered)[0] == "❌ docs, api, web (b7) — failed"
    assert "✅ 1 · ❌ 1 · 🚫 1" in rendered.body
    assert "Now:" not in rendered.body
    assert rendered.body.endswith("• j44 api: exit code 2\n• j45 web: cancelled")
    assert "<li>j44 api: exit code 2</li><li>j45 web: cancelled</li>" in rendered.html


# -- the final notice ------------------------------------------------------------------


def test_final_notice_mentions_requester_with_outcome_and_duration() -> None:
    job = make_job(status=Status.COMPLETED, started_at=NOW - 130, finished_at=NOW - 5)
    rendered = render_final_notice(job_event(job, NOW), "@alice:x", NOW)
    assert rendered.body == "@alice:x ✅ docs (j12) completed in 2m 05s"
    assert rendered.html.startswith('<a href="https://matrix.to/#/@alice:x">@alice:x</a> ✅ ')
    assert "<b>docs</b> (<code>j12</code>) completed in 2m 05s" in rendered.html


def test_final_notice_for_failure_gives_the_first_line_of_the_error() -> None:
    rendered = render_final_notice(failed("exit code 2\n<lots of output>"), "@bob:y", NOW)
    assert rendered.body.startswith("@bob:y ❌ docs (j12) failed: exit code 2")
    assert "lots of output" not in rendered.body
    assert '<a href="https://matrix.to/#/@bob:y">@bob:y</a>' in rendered.html


def test_final_notice_for_failed_batch_counts_failed_operations() -> None:
    batch = make_batch(status=Status.FAILED, completed=2, failed=1, finished_at=NOW)
    rendered = render_final_notice(batch_event(batch, NOW), "@alice:x", NOW)
    assert "❌ docs, api, web (b7) failed: 1 of 3 operations failed" in rendered.body


@pytest.mark.parametrize(("status", "retry_count", "max_retries", "said"), [
    (Status.COMPLETED, 1, 2, "passed on attempt 2 of 3"),
    (Status.COMPLETED, 0, 2, None),  # a first-try success says nothing
    (Status.FAILED, 2, 2, "failed on attempt 3 of 3"),
    (Status.FAILED, 0, 2, "failed on attempt 1 of 3, not retried"),
    (Status.FAILED, 0, 0, None),  # no retries configured: nothing to count
    (Status.CANCELLED, 1, 2, None),
])
def test_a_finished_job_says_on_which_attempt_it_ended(status: Status, retry_count: int,
                                                         max_retries: int,
                                                         said: str | None) -> None:
    job = make_job(status=status, retry_count=retry_count, max_retries=max_retries,
                   finished_at=NOW - 5, error="exit code 2" if status is Status.FAILED else None)
    event = job_event(job, NOW)
    message = render_progress(event, NOW).body
    notice = render_final_notice(event, "@alice:x", NOW).body
    if said is None:
        assert "attempt" not in message and "attempt" not in notice
    else:
        assert f"🔁 {said[0].upper()}{said[1:]}" in lines(render_progress(event, NOW))
        assert notice.endswith(f", {said}")


def test_final_notice_of_a_fix_says_fixed() -> None:
    job = make_job(status=Status.COMPLETED, started_at=NOW - 10, finished_at=NOW - 5)
    rendered = render_final_notice(job_event(job, NOW), "@alice:x", NOW, fixed=True)
    assert rendered.body == "@alice:x ✅ docs (j12) fixed, completed in 5s"
    assert "fixed, completed in 5s" in rendered.html


# -- command replies ---------------------------------------------------------------------


def test_help_lists_every_command_with_the_configured_prefix() -> None:
    rendered = render_help("?")
    for usage in ("build TARGET [ARGS…]", "batch TARGET [TARGET…]", "status [ID]",
                  "cancel ID", "jobs", "targets", "workers", "help"):
        assert re.search(rf"^• \?{re.escape(usage)} — \S", rendered.body, re.MULTILINE), usage
        assert f"<code>?{usage}</code> — " in rendered.html
    assert "!" not in rendered.body


def test_targets_list_names_descriptions_and_whether_they_take_arguments() -> None:
    rendered = render_targets([("docs", "Build the <docs>", False, False),
                               ("deploy", "", True, False), ("release", "Ship", False, True)])
    assert lines(rendered) == ["Targets:", "• docs — Build the <docs>", "• deploy [ARGS…]",
                               "• release — Ship (needs approval)"]
    assert "<li><code>docs</code> — Build the &lt;docs&gt;</li>" in rendered.html
    assert "<li><code>deploy [ARGS…]</code></li>" in rendered.html
    assert render_targets([]).body == "No targets are configured."


def test_jobs_list_is_one_line_per_job_with_status_percentage_and_age() -> None:
    done = job_event(make_job(id="j11", name="api", status=Status.COMPLETED,
                              created_at=NOW - 600, finished_at=NOW - 500), NOW)
    batch = batch_event(make_batch(), NOW)
    rendered = render_jobs([running(34, 100), done, batch], NOW)
    assert lines(rendered) == [
        "Jobs:",
        "🔄 j12 docs — running 34% · 1m 10s ago",
        "✅ j11 api — completed · 10m 00s ago",
        "🔄 b7 docs, api, web — running 66% · 40s ago",
    ]
    assert "🔄 <code>j12</code> <b>docs</b> — running 34% · 1m 10s ago" in rendered.html


def test_workers_list_says_load_and_beat_of_live_ones_and_how_long_others_are_silent() -> None:
    def row(name: str, beat: float, labels: list[str], running: list[str]) -> Worker:
        return Worker(id=f"{name}:1:ab", name=name, host="h", pid=1, role="worker",
                      labels=labels, slots=4, version="1", started_at=NOW - 999,
                      heartbeat_at=beat, running=running)

    states = [worker_state(row("build-01", NOW - 3, ["gpu", "x<y"], ["j1", "j2"]), NOW, 30),
              worker_state(row("build-02", NOW - 125, [], []), NOW, 30)]
    rendered = render_workers(states, NOW)
    assert lines(rendered) == [
        "Workers:",
        "🟢 build-01 (gpu, x<y) 2/4 running · beat 3s ago",
        "🔴 build-02 silent for 2m 05s",
    ]
    assert "🟢 <b>build-01</b> (gpu, x&lt;y) 2/4 running · beat 3s ago" in rendered.html
    assert render_workers([], NOW).body == "No workers."


def test_jobs_list_when_empty() -> None:
    assert render_jobs([], NOW) == Rendered("No jobs yet.", "No jobs yet.")


def test_status_summary_shows_active_ones_with_a_mini_bar() -> None:
    queued = job_event(make_job(id="j13", name="web", status=Status.PENDING, started_at=None,
                                created_at=NOW - 12), NOW)
    done = job_event(make_job(id="j11", status=Status.COMPLETED, finished_at=NOW), NOW)
    rendered = render_status_summary([running(40, 100, eta=30), queued, done], NOW)
    assert lines(rendered) == [
        "Active (2):",
        "🔄 j12 docs 🟩🟩⬜⬜⬜ 40% · 1m 05s elapsed · ETA 30s",
        "⏳ j13 web ⬜⬜⬜⬜⬜ … · queued for 12s",
    ]
    assert "<code>j13</code> <b>web</b>" in rendered.html


def test_status_summary_when_nothing_is_running() -> None:
    done = job_event(make_job(status=Status.COMPLETED, finished_at=NOW), NOW)
    assert render_status_summary([], NOW).body == "Nothing is running."
    assert render_status_summary([done], NOW).body == "Nothing is running."


def test_error_denied_and_unknown_command_replies() -> None:
    assert render_error("no target <x>") == Rendered("⚠️ no target <x>", "⚠️ no target &lt;x&gt;")
    assert render_denied().body == "⛔ You are not allowed to run jobs here."
    unknown = render_unknown_command("frob", "!")
    assert unknown.body == "❓ Unknown command !frob. Try !help."
    assert unknown.html == "❓ Unknown command <code>!frob</code>. Try <code>!help</code>."
    assert render_unknown_command("!frob", "!").body == unknown.body


def test_cancel_reply_depends_on_how_the_job_ended() -> None:
    assert render_cancelled("j12", Status.CANCELLED).body == "🚫 Cancelled j12."
    assert render_cancelled("j12", "completed").body == "j12 had already finished (completed)."
    assert render_cancelled("b3", Status.FAILED).html == "b3 had already finished (failed)."


def test_log_reply_is_a_code_block_well_under_the_event_limit_at_worst() -> None:
    rendered = render_log("j3", "a < b\n& done\n")
    assert rendered.body == "📜 j3: the last 2 lines of its log\n```\na < b\n& done\n```"
    assert rendered.html.endswith("<pre><code>a &lt; b\n&amp; done\n</code></pre>")
    assert render_log("j3", "").body == "📜 j3 has no output yet."
    worst = ('"\x00' * MAX_LOG_BYTES)[:MAX_LOG_BYTES]
    worst_case = render_log("j3", worst)
    content = json.dumps({"msgtype": "m.notice", "body": worst_case.body,
                          "format": "org.matrix.custom.html",
                          "formatted_body": worst_case.html})
    assert len(content) * 4 / 3 < 60 * 1024  # base64 of the encrypted payload
