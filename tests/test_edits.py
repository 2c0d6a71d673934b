"""The edit scheduler, driven with a fake clock and a recording sender."""

from __future__ import annotations

import itertools
import time

from matrixjobs.matrix.edits import (
    PING_FAILED,
    EditScheduler,
    Pings,
    RateLimitedError,
    SendFailedError,
)
from matrixjobs.matrix.ratelimit import TokenBucket
from matrixjobs.matrix.render import render_error
from matrixjobs.metrics import Metrics
from matrixjobs.models import Job, ProgressMessage, Status
from matrixjobs.progress.events import ProgressInfo, job_event


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[float, str, dict]] = []
        self.fail_with: list[Exception] = []
        self.txn_ids: list[str] = []
        self.uploads: list[tuple[str, bytes, str, str]] = []
        self.clock: Clock | None = None

    async def send(self, room_id, content, txn_id):
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.txn_ids.append(txn_id)
        self.sent.append((self.clock.now, room_id, content))
        return f"$event{len(self.sent)}"

    async def upload(self, room_id, data, filename, content_type):
        self.uploads.append((room_id, data, filename, content_type))
        return {"url": f"mxc://test/{len(self.uploads)}"}


def scheduler(store, rate=0.2, burst=10, interval=0.5, **kwargs):
    clock = Clock()
    sender = Recorder()
    sender.clock = clock
    bucket = TokenBucket(rate, burst, clock)
    sched = EditScheduler(sender, store, bucket, interval, clock=clock, monotonic=clock, **kwargs)
    return sched, sender, clock


def state(clock, status=Status.PROCESSING, current=None, total=10, job_id="j1", started=None):
    job = Job(id=job_id, type="command", name="docs", data={}, status=status, priority=0,
              retry_count=0, max_retries=0, timeout_s=60, created_at=started or clock.now,
              started_at=started or clock.now)
    if status.terminal:
        job.finished_at = clock.now
    progress = None
    if current is not None:
        progress = ProgressInfo(current=current, total=total, percentage=current / total * 100)
    return job_event(job, clock.now, progress, f"step {current}")


async def drain(sched, clock, until, step=0.05):
    while clock.now < until:
        while await sched.send_next():
            pass
        clock.now += step


def is_edit_of(content, original):
    return content.get("m.relates_to") == {"rel_type": "m.replace", "event_id": original}


async def test_first_message_is_a_reply_and_edits_replace_the_original(store):
    sched, sender, clock = scheduler(store)
    sched.track("!room", "@alice:x", "$command", state(clock, Status.PENDING))
    assert not await sched.send_next()  # a queued job's first message waits one interval
    clock.now += 0.5
    await sched.send_next()
    first = sender.sent[0][2]
    assert first["msgtype"] == "m.notice"
    assert first["m.relates_to"] == {"m.in_reply_to": {"event_id": "$command"}}
    assert first["format"] == "org.matrix.custom.html" and first["formatted_body"]
    clock.now += 1
    sched.update(state(clock, current=3))
    await sched.send_next()
    edit = sender.sent[1][2]
    assert is_edit_of(edit, "$event1")
    assert edit["body"] == "* " + edit["m.new_content"]["body"]
    assert edit["m.new_content"]["formatted_body"] and "3/10" in edit["m.new_content"]["body"]
    assert edit["m.mentions"] == {} and edit["m.new_content"]["m.mentions"] == {}
    [saved] = await store.open_messages()
    assert (saved.subject_id, saved.event_id, saved.edits) == ("j1", "$event1", 1)


async def test_updates_are_coalesced_and_edits_spaced_by_the_interval(store):
    sched, sender, clock = scheduler(store, rate=0, interval=0.5)
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.01)
    for step in range(1, 41):  # 40 updates over 2 s
        sched.update(state(clock, current=step % 10, started=started))
        await drain(sched, clock, clock.now + 0.05, step=0.05)
    times = [at for at, _, _ in sender.sent[1:]]
    assert 3 <= len(times) <= 5
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times))


async def test_five_second_job_shows_final_state_promptly_on_a_fresh_default_budget(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    for step in range(50):  # progress every 100 ms for 5 s
        sched.update(state(clock, current=step / 5, started=started))
        await drain(sched, clock, clock.now + 0.1)
    finished = clock.now
    sched.update(state(clock, Status.COMPLETED, current=10, started=started))
    await drain(sched, clock, clock.now + 2)
    final = [at for at, _, c in sender.sent if "✅" in c.get("m.new_content", c)["body"]]
    assert final and final[0] - finished <= 1.5
    assert len(sender.sent) <= 11  # never more than the homeserver's burst in 5 s


async def test_final_states_jump_the_queue_and_reserve_survives_many_live_jobs(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    for number in range(1, 6):
        sched.track("!room", "@a:x", f"$c{number}",
                    state(clock, Status.PENDING, job_id=f"j{number}"))
    await drain(sched, clock, clock.now + 0.6)
    assert len(sender.sent) == 5  # five first messages
    for second in range(10):  # busy progress on all five
        for number in range(1, 6):
            sched.update(state(clock, current=second, job_id=f"j{number}"))
        await drain(sched, clock, clock.now + 1)
    before = len(sender.sent)
    for number in range(1, 6):
        sched.update(state(clock, Status.COMPLETED, current=10, job_id=f"j{number}"))
    await drain(sched, clock, clock.now + 0.1)
    finals = sender.sent[before:]
    assert len(finals) == 5 and all("✅" in c["m.new_content"]["body"] for _, _, c in finals)


async def test_job_that_ends_before_its_first_message_gets_one_message(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=1)  # starts with no budget
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    sched.update(state(clock, current=5))
    sched.update(state(clock, Status.FAILED, current=5))
    await drain(sched, clock, clock.now + 6)
    assert len(sender.sent) == 1
    assert "❌" in sender.sent[0][2]["body"] and "m.new_content" not in sender.sent[0][2]
    assert await store.open_messages() == []


async def test_rate_limit_response_backs_off_and_retries(store, caplog):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [RateLimitedError(3.0)]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()
    assert sender.sent == [] and "rate-limiting the bot" in caplog.text
    assert not await sched.send_next()
    clock.now += 3.01
    assert await sched.send_next() and len(sender.sent) == 1


async def test_sends_edits_and_429s_are_counted_once_each(store):
    metrics = Metrics([])
    sched, sender, clock = scheduler(store, rate=0, counter=metrics)
    sender.fail_with = [RateLimitedError(3.0)]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()  # refused with a 429: nothing went out
    clock.now += 3.01
    await sched.send_next()
    sched.update(state(clock, current=5))
    sched.update(state(clock, Status.COMPLETED, current=10))
    sched.reply("!room", "$other", sched._render(state(clock), clock.now))
    await drain(sched, clock, clock.now + 2)
    assert len(sender.sent) == 3  # the first message, its final edit, the reply
    counted = {(s.name, s.labels.get("kind")): s.value for family in metrics.registry.collect()
               for s in family.samples if s.name.endswith("_total")}
    assert counted[("matrixjobs_matrix_events_total", "sent")] == 2
    assert counted[("matrixjobs_matrix_events_total", "edited")] == 1
    assert counted[("matrixjobs_matrix_rate_limited_total", None)] == 1


async def test_transient_failures_back_off_and_permanent_ones_give_up(store):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [SendFailedError("connection reset")]
    sched.track("!room", "@a:x", "$cmd", state(clock))
    clock.now += 0.5
    await sched.send_next()
    assert not await sched.send_next()  # paused
    clock.now += 1.01
    await sched.send_next()
    assert len(sender.sent) == 1
    sender.fail_with = [SendFailedError("M_FORBIDDEN", permanent=True)]
    sched.reply("!gone", "$x", sched._render(state(clock), clock.now))
    await sched.send_next()
    assert sched.backlog == 0


async def test_edits_per_message_are_capped_but_the_final_one_still_goes(store):
    sched, sender, clock = scheduler(store, rate=0, interval=0.1, max_edits=5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    for step in range(30):
        sched.update(state(clock, current=step % 10))
        await drain(sched, clock, clock.now + 0.2)
    sched.update(state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 0.2)
    edits = [c for _, _, c in sender.sent if "m.new_content" in c]
    assert len(edits) == 5 and "✅" in edits[-1]["m.new_content"]["body"]


async def test_long_job_ends_with_a_reply_that_mentions_the_requester(store):
    sched, sender, clock = scheduler(store, rate=0, pings=Pings(long_s=30))
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.1)
    clock.now += 45
    sched.update(state(clock, Status.COMPLETED, current=10, started=started))
    await drain(sched, clock, clock.now + 0.1)
    notice = sender.sent[-1][2]
    assert notice["m.mentions"] == {"user_ids": ["@alice:x"]}
    assert notice["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    assert "@alice:x" in notice["body"]


async def test_restored_message_keeps_editing_the_same_event(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", "$original", "@a:x", "$cmd", edits=7)
    sched.restore(message, state(clock, Status.COMPLETED, current=10))
    await sched.send_next()
    [(_, room, content)] = sender.sent
    assert room == "!room" and is_edit_of(content, "$original")


async def test_restored_message_that_was_never_sent_is_sent_now(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", None, "@a:x", "$cmd")
    sched.restore(message, state(clock, Status.PROCESSING, current=2))
    await sched.send_next()
    [(_, _, content)] = sender.sent
    assert "m.new_content" not in content
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    [saved] = await store.open_messages()
    assert saved.event_id == "$event1"


async def test_a_job_quicker_than_the_interval_needs_a_single_event(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    await drain(sched, clock, clock.now + 0.2)
    sched.update(state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 1)
    [(_, _, content)] = sender.sent
    assert content["body"].startswith("✅") and "m.new_content" not in content


async def test_a_started_job_shows_running_in_its_first_message(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=10, interval=0.5)
    sched.track("!room", "@a:x", "$cmd", state(clock, Status.PENDING))
    sched.update(state(clock, current=1))
    assert not await sched.send_next()
    clock.now += 0.5
    await sched.send_next()
    assert sender.sent[0][2]["body"].startswith("🔄")


def test_after_a_429_exactly_one_send_is_allowed_when_the_wait_ends():
    clock = Clock()
    bucket = TokenBucket(0.2, 10, clock)
    bucket.limited(4.4)
    assert bucket.available() == 0
    clock.now += 4.4
    assert bucket.available() >= 1 - 1e-9


async def test_a_retried_first_message_reuses_its_transaction_and_content(store):
    sched, sender, clock = scheduler(store, rate=0)
    sender.fail_with = [SendFailedError("response lost")]
    sched.track("!room", "@a:x", "$cmd", state(clock, current=1))
    clock.now += 0.5
    await sched.send_next()  # failed: the server may or may not have it
    sched.update(state(clock, current=2))
    clock.now += 1.01
    await sched.send_next()
    assert sender.txn_ids == ["mj-j1-first"]
    assert "1/10" in sender.sent[0][2]["body"]  # the content first attempted
    await drain(sched, clock, clock.now + 1)
    assert "2/10" in sender.sent[-1][2]["m.new_content"]["body"]  # then edited forward
    assert len(set(sender.txn_ids)) == len(sender.txn_ids)


async def test_restored_unsent_message_is_followed_by_an_edit_with_the_latest_state(store):
    sched, sender, clock = scheduler(store, rate=0)
    message = ProgressMessage("j1", "!room", None, "@a:x", "$cmd")
    sched.restore(message, state(clock, Status.COMPLETED, current=10))
    await drain(sched, clock, clock.now + 1)
    assert len(sender.sent) == 2  # the first send may have been a repeat from before
    assert is_edit_of(sender.sent[1][2], "$event1")
    assert "✅" in sender.sent[1][2]["m.new_content"]["body"]
    assert await store.open_messages() == []


async def test_replies_wait_behind_first_messages_and_the_final_reserve(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=3, interval=0.5)
    sched.track("!room", "@a:x", "$cmd", state(clock))
    for n in range(5):
        sched.reply("!room", f"$x{n}", sched._render(state(clock), clock.now))
    clock.now += 0.5
    await sched.send_next()
    assert "m.in_reply_to" in sender.sent[0][2]["m.relates_to"]
    assert sender.sent[0][2]["m.relates_to"]["m.in_reply_to"]["event_id"] == "$cmd"
    await sched.send_next()  # one token left over the reserve of one
    assert not await sched.send_next()  # the last token is kept for the final edit
    sched.update(state(clock, Status.COMPLETED, current=10))
    assert await sched.send_next()
    assert "✅" in sender.sent[-1][2]["m.new_content"]["body"]


async def test_reply_queue_is_bounded(store, caplog):
    sched, _sender, clock = scheduler(store, rate=0.2, burst=1)
    for n in range(80):
        sched.reply("!room", f"$x{n}", sched._render(state(clock), clock.now))
    assert sched.backlog == 50 and "dropping one" in caplog.text


async def test_flush_sends_every_latest_state_and_reply_at_once(store):
    """At shutdown nothing waits for the interval: first messages, progress, finals, replies."""
    sched, sender, clock = scheduler(store, rate=0, interval=5.0)
    for number in (1, 2):
        sched.track("!room", "@alice:x", f"$cmd{number}",
                    state(clock, Status.PENDING, job_id=f"j{number}"))
    clock.now += 5
    await drain(sched, clock, clock.now + 0.01)
    assert len(sender.sent) == 2
    sched.update(state(clock, current=4, job_id="j1"))
    sched.update(state(clock, Status.COMPLETED, current=10, job_id="j2"))
    sched.track("!room", "@alice:x", "$cmd3", state(clock, Status.PENDING, job_id="j3"))
    sched.reply("!room", "$cmd4", render_error("matrixjobs is shutting down"))
    assert await sched.flush(1.0) == 0
    bodies = [content.get("m.new_content", content)["body"] for _, _, content in sender.sent[2:]]
    assert len(bodies) == 4, bodies
    # Final states first, then first messages, replies, progress.
    assert bodies[0].startswith("✅")
    assert "j3" in bodies[1]
    assert "shutting down" in bodies[2]
    assert "4/10" in bodies[3]
    assert sched.backlog == 0


async def test_flush_gives_up_at_its_timeout_and_says_what_is_left(store):
    sched, sender, clock = scheduler(store, rate=0.2, burst=2, interval=0.5)  # one token
    for number in (1, 2, 3):
        sched.track("!room", "@alice:x", f"$cmd{number}",
                    state(clock, Status.COMPLETED, current=10, job_id=f"j{number}"))
    began = time.monotonic()
    assert await sched.flush(0.3) == 2  # the fake clock stands still: no refill
    assert time.monotonic() - began < 1.0
    assert len(sender.sent) == 1
    assert sender.sent[0][2]["m.relates_to"]["m.in_reply_to"]["event_id"] == "$cmd1"


async def test_a_failed_job_gets_its_log_as_a_file_in_a_thread_after_its_final_edit(store):
    async def load_log(job_id):
        return f"the log of {job_id}\n"

    sched, sender, clock = scheduler(store, rate=0, load_log=load_log)
    sched.track("!room", "@alice:x", "$cmd", state(clock, job_id="j7"))
    await drain(sched, clock, clock.now + 1)
    sched.update(state(clock, Status.FAILED, job_id="j7"))
    sched.track("!room", "@alice:x", "$cmd2", state(clock, Status.COMPLETED, job_id="j8"))
    await drain(sched, clock, clock.now + 1)
    assert sender.uploads == [("!room", b"the log of j7\n", "j7-docs.log", "text/plain")]
    contents = [content for _, _, content in sender.sent]
    assert "❌" in contents[1]["m.new_content"]["body"]  # the final edit went first
    [attachment] = [c for c in contents if c["msgtype"] == "m.file"]
    assert attachment == {
        "msgtype": "m.file", "body": "j7-docs.log", "filename": "j7-docs.log",
        "info": {"mimetype": "text/plain", "size": 14}, "url": "mxc://test/1",
        "m.mentions": {},
        "m.relates_to": {"rel_type": "m.thread", "event_id": "$event1", "is_falling_back": True,
                         "m.in_reply_to": {"event_id": "$event1"}},
    }
    assert len(sender.sent) == 5  # j7: first message, final edit, failure ping, file; j8: one
    assert sched.backlog == 0


async def test_a_file_whose_send_failed_is_sent_again_without_a_second_upload(store):
    async def load_log(job_id):
        return "log\n"

    sched, sender, clock = scheduler(store, rate=0, load_log=load_log)
    sched.track("!room", "@alice:x", "$cmd", state(clock, job_id="j7"))
    await drain(sched, clock, clock.now + 1)
    sched.update(state(clock, Status.FAILED, job_id="j7"))
    await sched.send_next()  # the final edit
    sender.fail_with.append(SendFailedError("network down"))
    await drain(sched, clock, clock.now + 5)
    assert len(sender.uploads) == 1
    assert [c["msgtype"] for _, _, c in sender.sent].count("m.file") == 1
    assert "mj-j7-log" in sender.txn_ids  # (the failure ping goes after it)


async def finish_quickly(sched, clock, status, job_id="j1"):
    """Track a job, end it in `status` a second later, and send everything."""
    started = clock.now
    sched.track("!room", "@alice:x", "$cmd", state(clock, Status.PENDING, job_id=job_id))
    await drain(sched, clock, clock.now + 0.6)
    clock.now += 1
    sched.update(state(clock, status, current=10, job_id=job_id, started=started))
    await drain(sched, clock, clock.now + 0.6)


def pings(sender):
    return [content for _, _, content in sender.sent if content["m.mentions"]]


async def test_a_short_success_pings_nobody_but_a_short_failure_does(store):
    sched, sender, clock = scheduler(store, rate=0)
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert pings(sender) == []
    await finish_quickly(sched, clock, Status.FAILED, job_id="j2")
    [ping] = pings(sender)
    assert ping["body"].startswith("@alice:x ❌ docs (j2) failed")


async def test_a_fix_pings_and_says_fixed(store):
    async def previous(subject: str) -> Status | None:
        return Status.FAILED if subject == "j2" else Status.COMPLETED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(previous=previous))
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert pings(sender) == []  # passed last time too
    await finish_quickly(sched, clock, Status.COMPLETED, job_id="j2")
    [ping] = pings(sender)
    assert ping["body"].startswith("@alice:x ✅ docs (j2) fixed, completed in 1s")


async def test_the_store_is_not_asked_about_the_last_run_when_fixed_pings_are_off(store):
    asked: list[str] = []

    async def previous(subject: str) -> Status | None:
        asked.append(subject)
        return Status.FAILED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(on=(PING_FAILED,),
                                                                previous=previous))
    await finish_quickly(sched, clock, Status.COMPLETED)
    assert asked == [] and pings(sender) == []


async def test_pings_can_be_turned_off(store):
    async def previous(subject: str) -> Status | None:
        return Status.FAILED

    sched, sender, clock = scheduler(store, rate=0, pings=Pings(on=(), long_s=0,
                                                                previous=previous))
    await finish_quickly(sched, clock, Status.FAILED)
    await finish_quickly(sched, clock, Status.COMPLETED, job_id="j2")
    assert pings(sender) == [] and len(sender.sent) == 4
