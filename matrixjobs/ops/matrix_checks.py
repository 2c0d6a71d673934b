"""The doctor's Matrix checks: homeserver reachable, login, rooms, rate-limit exemption.

Login prefers tokens (whoami) over the password, in the bot's own order, so checking
adds no device to the account; a password check logs its device out again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from matrixjobs.config import AccessConfig, MatrixConfig
from matrixjobs.ops.homeserver import Homeserver, MatrixError, Unreachable, quoted
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
        versions = answer.get("versions") or ["?"]
        self.report.ok("homeserver", f"{hs.url} answers (Matrix {versions[-1]}, "
                                     f"{time.monotonic() - started:.2f} s)")
        return True

    # -- login --------------------------------------------------------------------------------

    def _tokens(self) -> list[tuple[str, str]]:
        """The tokens the bot would try, in its order (matrix/bot.py `_login`)."""
        tokens = []
        if self.matrix.access_token is not None:
            tokens.append(("the configured access token",
                           self.matrix.access_token.get_secret_value()))
        store = self.store
        if store is not None and store.saved_token and store.saved_user == self.matrix.user_id:
            tokens.append(("the token the service saved in its store", store.saved_token))
        return tokens

    def _login(self, hs: Homeserver) -> Login | None:
        user = self.matrix.user_id
        refused = []
        for label, token in self._tokens():
            try:
                who = hs.call("GET", "/_matrix/client/v3/account/whoami", token)
            except MatrixError as exc:
                if exc.status != 401:
                    raise
                refused.append(label)
                continue
            if who.get("user_id") != user:
                self.report.fail("login", f"{label} belongs to {who.get('user_id')}, not {user}")
                return None
            text = f"{label} works for {user} (device {who.get('device_id', '?')})"
            if refused:
                self.report.warn("login", f"{text}; {refused[0]} was refused")
            else:
                self.report.ok("login", text)
            return Login(token, temporary=False)
        return self._password_login(hs, refused)

    def _password_login(self, hs: Homeserver, refused: list[str]) -> Login | None:
        user = self.matrix.user_id
        if self.matrix.password is None:
            if refused:
                self.report.fail("login", f"{' and '.join(refused)} was refused and there is no "
                                          "password to fall back on: set MATRIXJOBS_PASSWORD or "
                                          "a new MATRIXJOBS_ACCESS_TOKEN")
            else:
                self.report.fail("login", f"no password or access token for {user}: set "
                                          "MATRIXJOBS_PASSWORD (or MATRIXJOBS_ACCESS_TOKEN) in "
                                          "the .env beside the config")
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
        if refused:
            self.report.warn("login", f"{text}; {' and '.join(refused)} was refused, so the "
                                      "service will log in with the password")
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
        joined = set(hs.call("GET", "/_matrix/client/v3/joined_rooms", token)
                     .get("joined_rooms") or [])
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
        else:
            self.report.fail(check, "the bot is not in this room: invite it (on its own it "
                                    "can join only public rooms)")
        return room_id

    def _invites(self, hs: Homeserver, token: str) -> dict[str, str]:
        """Rooms the bot is invited to → who invited it."""
        answer = hs.call("GET", "/_matrix/client/v3/sync", token, params={
            "filter": INVITES_FILTER, "timeout": "0", "set_presence": "offline"})
        invites = {}
        for room_id, room in (answer.get("rooms") or {}).get("invite", {}).items():
            events = (room.get("invite_state") or {}).get("events") or []
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
