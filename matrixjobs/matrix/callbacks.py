"""Events in: a room message or reaction becomes a command (or nothing), after the
checks every event passes: new, trusted, allowed by the policy."""

from __future__ import annotations

import logging
import time

from nio import ReactionEvent, RoomMessageText

from matrixjobs.app import App
from matrixjobs.config import MatrixConfig
from matrixjobs.errors import (
    AlreadyFinishedError,
    AlreadySubmittedError,
    ForbiddenError,
    MatrixJobsError,
    NotAwaitingApprovalError,
)
from matrixjobs.matrix import render
from matrixjobs.matrix.commands import CommandSyntaxError, parse
from matrixjobs.matrix.crypto import Crypto, Trust, Undecryptable
from matrixjobs.matrix.edits import EditScheduler
from matrixjobs.matrix.places import Places
from matrixjobs.matrix.room_commands import COMMANDS, Context, show
from matrixjobs.matrix.session import Session
from matrixjobs.models import ProgressMessage
from matrixjobs.policy import Action

log = logging.getLogger(__name__)

DENIED_REPLY_EVERY_S = 300.0
# Reactions on a progress message that act on its job or batch. Clients send the emoji
# with or without the emoji presentation selector (U+FE0F); both count.
CANCEL_KEY, RERUN_KEY, APPROVE_KEY, DENY_KEY = "❌", "🔁", "✅", "👎"
REACTIONS = frozenset({CANCEL_KEY, RERUN_KEY, APPROVE_KEY, DENY_KEY})
# The emoji presentation selector, and skin tones (👎🏽 is 👎).
MODIFIERS = dict.fromkeys(map(ord, "\ufe0f\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"))


class Callbacks:
    def __init__(self, app: App, config: MatrixConfig, session: Session, crypto: Crypto,
                 scheduler: EditScheduler) -> None:
        self.app = app
        self.config = config
        self.session = session
        self.crypto = crypto
        self.scheduler = scheduler
        self.places = Places(session.client, app.config.targets)
        self._denied_at: dict[str, float] = {}
        self._undecryptable_at: dict[str, float] = {}
        self._untrusted_at: dict[str, float] = {}

    async def on_event(self, room_id: str, event: RoomMessageText | ReactionEvent) -> None:
        """Handle one event; a failure is logged and answered, never raised."""
        try:
            if isinstance(event, ReactionEvent):
                await self._on_reaction(room_id, event)
            else:
                await self._on_message(room_id, event)
        except Exception:
            log.exception("matrix: handling %s in %s failed", event.event_id, room_id)
            # A reaction cannot be shown as a reply's target; the message it is on can.
            answer = event.reacts_to if isinstance(event, ReactionEvent) else event.event_id
            self.scheduler.reply(room_id, answer,
                                 render.render_error("internal error; see the log"))

    async def _on_message(self, room_id: str, event: RoomMessageText) -> None:
        if not self.session.is_new(event):
            return
        if not await self.crypto.accepts(room_id, event):
            self._untrusted(room_id, event)
            return
        relation = event.source.get("content", {}).get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            return  # an edited command must not run twice
        context = Context(self.app, self.scheduler, self.places, self.config.command_prefix,
                          room_id, event)
        try:
            command = parse(event.body, self.config.command_prefix)
        except CommandSyntaxError as exc:
            context.reply(render.render_error(str(exc)))
            return
        if command is None:
            return
        room_command = COMMANDS.get(command.name)
        if room_command is None:
            context.reply(render.render_unknown_command(command.name,
                                                        self.config.command_prefix))
            return
        if room_command.action is not Action.READ and not self.app.policy.known(event.sender):
            log.info("matrix: denied %s to %s in %s", command.name, event.sender, room_id)
            # One ⛔ and one audit record per person now and then: a stranger must not
            # drain the send budget or fill the store.
            if _now_and_then(self._denied_at, event.sender):
                await self.app.refused_stranger(context.stranger(), command.name)
                if self.app.config.access.reply_to_denied:
                    context.reply(render.render_denied())
            return
        try:
            await room_command.run(context, command)
        except AlreadySubmittedError:
            return  # a replayed event: its job already exists
        except ForbiddenError as exc:
            log.info("matrix: refused %s to %s in %s: %s", command.name, event.sender,
                     room_id, exc)
            if self.app.config.access.reply_to_denied:
                context.reply(render.render_denied(str(exc)))
        except MatrixJobsError as exc:
            context.reply(render.render_error(str(exc)))

    async def _on_reaction(self, room_id: str, event: ReactionEvent) -> None:
        """❌ 🔁 ✅ 👎 from an allowed user on a progress message: cancel, rerun, approve or
        deny its job or batch. Anything else (other keys, people, messages; old or
        untrusted reactions; ❌ on finished work) is ignored without a word: a reaction asks
        for no answer (the message's edit is the answer)."""
        key = event.key.translate(MODIFIERS)
        try:
            subject = await self._reacted_on(room_id, event, key)
            if subject is None:
                return
            log.info("matrix: %s reacted %s on %s", event.sender, key, subject)
            caller = self.places.caller(room_id, event.sender, event.event_id)
            if key == CANCEL_KEY:
                await self.app.cancel(subject, caller)  # the edit to 🚫 is the answer
                return
            if key == APPROVE_KEY:
                await self.app.approve(subject, caller)
                return
            if key == DENY_KEY:
                await self.app.deny(subject, caller)
                return
            # The new message answers the old progress message: clients show that one as
            # the quote (a reaction cannot be shown as a reply's target).
            where = ProgressMessage("", room_id, None, event.sender, event.reacts_to)
            await show(self.app, self.scheduler, where,
                       await self.app.rerun(subject, caller, event.event_id, where))
        except (AlreadySubmittedError, AlreadyFinishedError, NotAwaitingApprovalError):
            return  # a replayed reaction, or ❌ ✅ 👎 on work that is over or needs none
        except ForbiddenError as exc:
            log.info("matrix: ignoring %s's %s on %s: %s", event.sender, key, subject, exc)
        except MatrixJobsError as exc:
            self.scheduler.reply(room_id, event.reacts_to, render.render_error(str(exc)))

    async def _reacted_on(self, room_id: str, event: ReactionEvent, key: str) -> str | None:
        """The job or batch whose progress message a reaction to act on is on, else None."""
        if (key not in REACTIONS or not self.session.is_new(event)
                or not self.app.policy.known(event.sender)):
            return None
        if not await self.crypto.accepts(room_id, event):
            log.warning("matrix: ignoring reaction %s from %s in %s: sent in clear into an "
                        "encrypted room, or from a session not trusted", event.event_id,
                        event.sender, room_id)
            return None
        return await self.app.shown_by(room_id, event.reacts_to)

    async def answer_undecryptable(self) -> None:
        """Tell an allowed sender (now and then) that their message stayed unreadable."""
        while True:
            for item in await self.crypto.expired():
                self._undecryptable(item)

    def _untrusted(self, room_id: str, event: RoomMessageText) -> None:
        """Log a refused message, and tell an allowed sender (now and then) why their
        command did nothing. An untrusted session cannot read the notice (it gets no room
        keys); their trusted ones can. Chatter gets no notice."""
        cleartext = not event.decrypted
        log.warning("matrix: ignoring %s from %s in %s: %s", event.event_id, event.sender,
                    room_id, "sent unencrypted into an encrypted room" if cleartext else
                    f"its device is not trusted (trust = {self.crypto.trust})")
        if not event.body.startswith(self.config.command_prefix) or not self._notice_due(
                self._untrusted_at, event.sender):
            return
        if cleartext:
            self.scheduler.reply(room_id, event.event_id, render.render_cleartext())
            return
        device = self.crypto.device_of(event)
        self.scheduler.reply(room_id, event.event_id, render.render_untrusted_session(
            device.id if device is not None else None, self.crypto.trust is Trust.VERIFIED))

    def _notice_due(self, last: dict[str, float], sender: str) -> bool:
        """May `sender` get a notice now? Strangers never make the bot talk; allowed users
        get one every DENIED_REPLY_EVERY_S at most."""
        return self.app.policy.known(sender) and _now_and_then(last, sender)

    def _undecryptable(self, item: Undecryptable) -> None:
        event = item.event
        log.warning("matrix: gave up decrypting %s from %s (device %s) in %s: its room key "
                    "never came", event.event_id, event.sender, event.device_id, item.room_id)
        if not self._notice_due(self._undecryptable_at, event.sender):
            return
        self.scheduler.reply(item.room_id, event.event_id,
                             render.render_undecryptable(str(self.session.client.device_id)))


def _now_and_then(last: dict[str, float], sender: str) -> bool:
    """True at most once every DENIED_REPLY_EVERY_S per sender (and notes the time)."""
    now = time.monotonic()
    if now - last.get(sender, -DENIED_REPLY_EVERY_S) < DENIED_REPLY_EVERY_S:
        return False
    last[sender] = now
    return True
