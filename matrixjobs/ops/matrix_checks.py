"""The doctor's Matrix checks: homeserver reachable, login, rooms, rate-limit exemption.

Login tries what the bot would try, in its order (matrix/session.py `Session.login`): a token
(whoami, which adds no device), then the password, whose check logs its device out again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from matrixjobs.config import AccessConfig, MatrixConfig
from matrixjobs.ops.homeserver import (
    Homeserver,
    MatrixError,
    Unreachable,
    quoted,
    strings,
    table,
)
from matrixjobs.ops.report import Report
from matrixjobs.ops.store_probe import StoreState

ADMIN_TOKEN_ENV = "MATRIXJOBS_ADMIN_TOKEN"
DOCTOR_DEVICE = "matrixjobs doctor"
NO_EXEMPTION = (
    "without an exemption Synapse allows the bot 0.2 messages/s (burst 10) and every "
    "progress edit counts: progress shows late or skips steps, final states still arrive "
    "(exempting the bot: deploy/README.md)"
)
# Invites only: no timelines, state or presence, so the answer stays small.
INVITES_FILTER = json.dumps({
    "room": {"timeline": {"limit": 0}, "state": {"types": []}, "ephemeral": {"types": []},
             "account_data": {"types": []}},
    "presence": {"types": []},
    "account_data": {"types": []},
})


@dataclass(frozen=True, slots=True)
class Login:
    token: str
    temporary: bool  # a device the doctor created: log it out at the end


class MatrixChecks:
    def __init__(self, matrix: MatrixConfig, access: AccessConfig, store: StoreState | None,
                 report: Report, environ: Mapping[str, str]) -> None:
        self.matrix = matrix
        self.access = access
        self.store = store
        self.report = report
        self.admin_token = environ.get(ADMIN_TOKEN_ENV) or None

    def run(self) -> None:
        with Homeserver(self.matrix.homeserver) as hs:
            if not self._reachable(hs):
                if self._token() is None and self.matrix.password is None:
                    self._no_credentials()  # known without asking the homeserver
                return
            login = self._step("login", lambda: self._login(hs))
            try:
                if login is not None:
                    self._step("rooms", lambda: self._rooms(hs, login.token))
                self._step("rate limit", lambda: self._rate_limit(hs))
            finally:
                if login is not None and login.temporary:
                    self._logout(hs, login.token)

    def _step(self, check: str, step: Callable[[], Any]) -> Any:
        try:
            return step()
        except Unreachable as exc:
            self.report.fail(check, f"lost the homeserver: {exc}")
        except MatrixError as exc:
            self.report.fail(check, f"the homeserver answered: {exc}")
        return None

    def _reachable(self, hs: Homeserver) -> bool:
        started = time.monotonic()
        try:
            answer = hs.call("GET", "/_matrix/client/versions")
        except Unreachable as exc:
            self.report.fail("homeserver", f"cannot reach {hs.url}: {exc} "
                                           "(login, rooms and rate limit not checked)")
            return False
        except MatrixError as exc:
            self.report.fail("homeserver", f"{hs.url} is not a Matrix client-server API "
                                           f"(/_matrix/client/versions: {exc})")
            return False
        try:
            versions = strings(answer, "versions", "/_matrix/client/versions") or ["?"]
        except MatrixError as exc:
            self.report.fail("homeserver", f"{hs.url} is not a Matrix client-server API ({exc})")
            return False
        self.report.ok("homeserver", f"{hs.url} answers (Matrix {versions[-1]}, "
                                     f"{time.monotonic() - started:.2f} s)")
        return True

    # -- login --------------------------------------------------------------------------------

    def _token(self) -> tuple[str, str] | None:
        """(label, token) the bot would try first: the configured access token, else the one
        it saved in its store for this user, never both (matrix/session.py `Session.login`)."""
        if self.matrix.access_token is not None:
            return "the configured access token", self.matrix.access_token.get_secret_value()
        store = self.store
        if store is not None and store.saved_token and store.saved_user == self.matrix.user_id:
            return "the token the service saved in its store", store.saved_token
        return None

    def _login(self, hs: Homeserver) -> Login | None:
        user = self.matrix.user_id
        token = self._token()
        if token is None:
            return self._password_login(hs, refused=None)
        label, secret = token
        try:
            who = hs.call("GET", "/_matrix/client/v3/account/whoami", secret)
        except MatrixError as exc:
            if exc.status != 401:
                raise
            return self._password_login(hs, refused=label)
        if who.get("user_id") != user:
            self.report.fail("login", f"{label} belongs to {who.get('user_id')}, not {user}")
            return None
        self.report.ok("login", f"{label} works for {user} (device {who.get('device_id', '?')})")
        return Login(secret, temporary=False)

    def _no_credentials(self) -> None:
        self.report.fail("login", f"no password or access token for {self.matrix.user_id}: "
                                  "set MATRIXJOBS_PASSWORD (or MATRIXJOBS_ACCESS_TOKEN) in the "
                                  ".env beside the config")

    def _password_login(self, hs: Homeserver, refused: str | None) -> Login | None:
        """Log in with the password; `refused`: the token the bot tries first was refused."""
        user = self.matrix.user_id
        if self.matrix.password is None:
            if refused is None:
                self._no_credentials()
            else:
                self.report.fail("login", f"{refused} was refused and there is no password to "
                                          "fall back on: set MATRIXJOBS_PASSWORD or a new "
                                          "MATRIXJOBS_ACCESS_TOKEN")
            return None
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": self.matrix.password.get_secret_value(),
            "initial_device_display_name": DOCTOR_DEVICE,
        }
        try:
            answer = hs.call("POST", "/_matrix/client/v3/login", body=body)
        except MatrixError as exc:
            self.report.fail("login", f"password login as {user} refused: {exc}")
            return None
        token = answer.get("access_token")
        if not isinstance(token, str):
            self.report.fail("login", "the homeserver accepted the password but sent no token")
            return None
        text = (f"the password works for {user} (checked with a temporary device, "
                "logged out again at the end)")
        if refused is not None:
            self.report.warn("login", f"{text}; {refused} was refused, so the service will "
                                      "log in with the password")
        else:
            self.report.ok("login", text)
        return Login(token, temporary=True)

    def _logout(self, hs: Homeserver, token: str) -> None:
        try:
            hs.call("POST", "/_matrix/client/v3/logout", token, body={})
        except (Unreachable, MatrixError) as exc:
            self.report.warn("login", f"could not log the doctor's device out again ({exc}); "
                                      f"remove the device '{DOCTOR_DEVICE}' in a client")

    # -- rooms --------------------------------------------------------------------------------

    def _rooms(self, hs: Homeserver, token: str) -> None:
        path = "/_matrix/client/v3/joined_rooms"
        joined = set(strings(hs.call("GET", path, token), "joined_rooms", path))
        invites = self._invites(hs, token)
        configured = {self._room(hs, token, room, joined, invites) for room in self.matrix.rooms}
        for room_id, inviter in sorted(invites.items()):
            if room_id in configured:
                continue
            if self.access.allows(inviter):
                self.report.warn("invite", f"{room_id} from {inviter}: pending; the service "
                                           "accepts it when it runs")
            else:
                self.report.warn("invite", f"{room_id} from {inviter}: ignored, {inviter} is "
                                           "not in [access] allowed_users")
        if not self.matrix.rooms:
            if joined:
                self.report.ok("rooms", f"none configured; the bot is in {len(joined)} "
                                        f"room{'s' if len(joined) != 1 else ''}")
            elif not invites:
                self.report.warn("rooms", "none configured and the bot is in no room yet: "
                                          "invite it from an allowed user")

    def _room(self, hs: Homeserver, token: str, room: str, joined: set[str],
              invites: dict[str, str]) -> str:
        """Check one configured room; return its id."""
        room_id = room
        if room.startswith("#"):
            try:
                room_id = str(hs.call("GET", f"/_matrix/client/v3/directory/room/{quoted(room)}",
                                      token).get("room_id", room))
            except MatrixError as exc:
                if exc.status != 404:
                    raise
                self.report.fail(f"room {room}", "no such alias")
                return room
        check = f"room {room}" + (f" ({room_id})" if room_id != room else "")
        if room_id in joined:
            self.report.ok(check, "joined")
        elif room_id in invites:
            self.report.warn(check, f"invited by {invites[room_id]}, not joined yet; the "
                                    "service joins it at start")
        elif self._join_rule(hs, token, room_id) == "public":
            self.report.warn(check, "public, not joined yet; the service joins it at start")
        else:
            self.report.fail(check, "the bot is not in this room: invite it (on its own it "
                                    "can join only public rooms)")
        return room_id

    def _join_rule(self, hs: Homeserver, token: str, room_id: str) -> str | None:
        """The room's join rule as the room summary (Matrix 1.15) tells it to a non-member;
        None when the homeserver does not say (no such room, not visible, older server)."""
        try:
            summary = hs.call("GET", f"/_matrix/client/v1/room_summary/{quoted(room_id)}", token)
        except MatrixError:
            return None
        rule = summary.get("join_rule")
        return rule if isinstance(rule, str) else None

    def _invites(self, hs: Homeserver, token: str) -> dict[str, str]:
        """Rooms the bot is invited to → who invited it."""
        answer = hs.call("GET", "/_matrix/client/v3/sync", token, params={
            "filter": INVITES_FILTER, "timeout": "0", "set_presence": "offline"})
        invites = {}
        for room_id, room in table(table(answer, "rooms", "/sync"), "invite", "/sync").items():
            # Who invited is a nicety: an odd invite_state only loses the name.
            state = room.get("invite_state") if isinstance(room, dict) else None
            events = state.get("events") if isinstance(state, dict) else None
            events = [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []
            invites[room_id] = next(
                (str(e.get("sender")) for e in events if e.get("type") == "m.room.member"
                 and e.get("state_key") == self.matrix.user_id), "someone")
        return invites

    # -- rate limit ---------------------------------------------------------------------------

    def _rate_limit(self, hs: Homeserver) -> None:
        if self.admin_token is None:
            self.report.warn("rate limit", f"exemption unknown (set {ADMIN_TOKEN_ENV} to a "
                                           f"homeserver admin's token to check); {NO_EXEMPTION}")
            return
        path = f"/_synapse/admin/v1/users/{quoted(self.matrix.user_id)}/override_ratelimit"
        try:
            override = hs.call("GET", path, self.admin_token)
        except MatrixError as exc:
            why = ("the homeserver refused it" if exc.status in (401, 403)
                   else "no Synapse admin API here")
            self.report.warn("rate limit", f"exemption unknown: {why} ({exc}); {NO_EXEMPTION}")
            return
        per_s = self.matrix.rate_per_s
        if not override:
            also = ("; [matrix] rate_per_s = 0 assumes one, so the bot will run into 429s"
                    if per_s == 0 else "")
            self.report.warn("rate limit", f"the bot is not exempt: {NO_EXEMPTION}{also}")
            return
        rate, burst = override.get("messages_per_second"), override.get("burst_count")
        if rate == 0 and burst == 0:
            if per_s == 0:
                self.report.ok("rate limit", "the bot is exempt and [matrix] rate_per_s = 0")
            else:
                self.report.warn("rate limit", f"the bot is exempt, but [matrix] rate_per_s = "
                                               f"{per_s:g} holds it back: set rate_per_s = 0")
            return
        if (rate, burst) == (per_s, self.matrix.rate_burst):
            self.report.ok("rate limit", f"the bot may send {rate}/s, burst {burst}, as "
                                         "configured")
        else:
            self.report.warn("rate limit", f"the bot may send {rate}/s, burst {burst}: set "
                                           f"[matrix] rate_per_s = {rate}, rate_burst = {burst}")
