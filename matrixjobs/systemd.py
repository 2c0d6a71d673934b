"""systemd's notify protocol (what sd_notify(3) does), without linking libsystemd.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing, so the service runs the same
under a terminal, a container or `Type=notify`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._socket: socket.socket | None = None
        self._failed = False
        self.dropped = 0  # messages the socket's reader had no room for

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """Read systemd's variables and remove them from `environ`, as sd_notify's
        `unset_environment` does: job subprocesses must not report as the service."""
        address = environ.pop("NOTIFY_SOCKET", None) or None
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        watchdog_s = None
        if usec and usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(address, watchdog_s)

    def notify(self, *fields: str) -> None:
        """Send `KEY=value` fields in one datagram, never waiting: when the reader (PID 1)
        stops reading, its queue fills after a few messages and a blocking send would stop
        the whole event loop, signals included. What cannot go is dropped and counted;
        failures are logged once, never raised."""
        if self.address is None:
            return
        # "@name" means Linux's abstract namespace, spelled with a leading NUL byte.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(fields).encode(), target)
        except BlockingIOError:
            self.dropped += 1
            self._warn_once("%s is not reading; dropping what cannot be sent (%s)",
                            self.address, fields[0])
        except OSError as exc:
            self._warn_once("cannot notify %s: %s", self.address, exc)

    def _warn_once(self, message: str, *args: object) -> None:
        """Once: a reader that stalls for good would fill the log; close() says how many
        messages were lost."""
        if not self._failed:
            self._failed = True
            log.warning("systemd: " + message, *args)

    async def watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop: a stuck loop stops the pings and
        systemd restarts the service."""
        if self.watchdog_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self.dropped:
            log.warning("systemd: %d notify messages were dropped", self.dropped)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
