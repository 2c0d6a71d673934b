"""A throwaway, real Synapse homeserver: for `matrixjobs demo`, end-to-end tests and benches.

Stdlib only (HTTP through urllib), no pytest: the demo, ``tests/`` and ``bench/`` all use it.
Needs ``matrix-synapse`` installed in the running interpreter's environment (Synapse is
started as ``sys.executable -m synapse.app.homeserver``).

Typical use::

    with SynapseServer() as hs:
        alice = hs.register("alice")                 # {"user_id", "access_token", ...}
        client = nio.AsyncClient(hs.base_url, alice["user_id"])

The pytest fixtures around it are in tests/synapse_fixtures.py.

Rate limits: with ``rate_limits=False`` (default) every ``rc_*`` limiter is raised so high
that tests never meet one.  With ``rate_limits=True`` only ``rc_message`` keeps Synapse's
default (0.2 events/s, burst 10; every non-membership event counts, edits included) and the
rest (login, registration, joins, invites, room creation, ...) stay relaxed so test setup is
not throttled.  Beware (measured on Synapse 1.163.2): ``createRoom``, each invite and each
join/leave ALSO take a token from the user's ``rc_message`` bucket (Synapse's generic request
limiter checks every client-sent event, membership included); typing and receipts do not.  So
in a rate-limited test do the setup as a user you exempted
(``hs.exempt_from_rate_limit(user_id)``) and expect a user who just joined to have burst - 1.

Other speed-ups baked in: ``bcrypt_rounds: 4`` (register/login ~0.3 s -> ~0.02 s each) and
the signing key generated once per process and reused by later servers.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "SynapseError",
    "SynapseHTTPError",
    "SynapseServer",
    "free_port",
    "synapse_installed",
]

# A limiter that is never reached in a test: per_second/burst_count far above any test load.
_UNLIMITED: dict[str, float] = {"per_second": 10_000.0, "burst_count": 100_000}

# Synapse's own default for rc_message (synapse/config/ratelimiting.py, checked on 1.163.2).
SYNAPSE_DEFAULT_RC_MESSAGE: dict[str, float] = {"per_second": 0.2, "burst_count": 10}

# The first --generate-keys in a process costs ~3 s (a whole Synapse import); later servers
# in the same process reuse that key.  Harmless: test homeservers never federate.
_SIGNING_KEY_CACHE: dict[str, bytes] = {}

# Processes still running at interpreter exit get killed (bench scripts that forget stop()).
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


class SynapseError(RuntimeError):
    """Synapse could not be set up, started or stopped."""


class SynapseHTTPError(SynapseError):
    """A request to the homeserver returned a non-2xx status."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def synapse_installed() -> bool:
    """True if ``matrix-synapse`` is importable by this interpreter (use for skip markers)."""
    import importlib.util

    return importlib.util.find_spec("synapse") is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rate_limit_config(rate_limits: bool) -> dict[str, Any]:
    """The ``rc_*`` part of homeserver.yaml for the two modes (see module docstring)."""
    unlimited = dict(_UNLIMITED)
    config: dict[str, Any] = {
        "rc_login": {
            "address": unlimited,
            "account": unlimited,
            "failed_attempts": unlimited,
        },
        "rc_registration": unlimited,
        "rc_registration_token_validity": unlimited,
        "rc_joins": {"local": unlimited, "remote": unlimited},
        "rc_joins_per_room": unlimited,
        "rc_invites": {"per_room": unlimited, "per_user": unlimited, "per_issuer": unlimited},
        "rc_third_party_invite": unlimited,
        "rc_room_creation": unlimited,
        "rc_presence": {"per_user": unlimited},
        "rc_key_requests": unlimited,
        "rc_media_create": unlimited,
        "rc_profile": unlimited,
        "rc_delayed_event_mgmt": unlimited,
        "rc_reports": unlimited,
        "rc_user_directory": unlimited,
        "rc_3pid_validation": unlimited,
        "rc_admin_redaction": unlimited,
    }
    config["rc_message"] = dict(SYNAPSE_DEFAULT_RC_MESSAGE) if rate_limits else unlimited
    return config


class SynapseServer:
    """One Synapse process on a loopback port with an SQLite DB in a temp dir.

    The temp dir, port, DB and signing key survive ``stop()``/``start()``/``restart()``, so a
    test can take the homeserver down and bring it back with the same state.  ``close()`` (or
    leaving the ``with`` block) stops it and removes the temp dir unless ``keep_dir=True``.
    """

    def __init__(
        self,
        *,
        rate_limits: bool = False,
        server_name: str = "localhost",
        port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        presence: bool = False,
        startup_timeout: float = 60.0,
        log_level: str = "INFO",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.rate_limits = rate_limits
        self.server_name = server_name
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self.startup_timeout = startup_timeout
        self._owns_dir = base_dir is None
        self.keep_dir = keep_dir
        self.directory = Path(
            tempfile.mkdtemp(prefix="synapse-") if base_dir is None else base_dir
        ).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "homeserver.yaml"
        self.log_config_path = self.directory / "log_config.yaml"
        self.log_path = self.directory / "homeserver.log"
        self.output_path = self.directory / "stdout_stderr.log"
        self.registration_shared_secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin: dict[str, Any] | None = None
        self._output: Any = None
        self.last_start_seconds: float | None = None
        self.keygen_seconds: float | None = None
        self._write_config(presence=presence, log_level=log_level, extra=extra_config or {})

    # ----------------------------------------------------------------- config
    def _write_config(self, *, presence: bool, log_level: str, extra: dict[str, Any]) -> None:
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "pid_file": str(self.directory / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": [self.host],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.directory / "homeserver.db")},
            },
            "log_config": str(self.log_config_path),
            "media_store_path": str(self.directory / "media_store"),
            "signing_key_path": str(self.directory / "signing.key"),
            "registration_shared_secret": self.registration_shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "enable_registration": False,
            # Synapse's default of 12 makes every register/login cost ~0.3 s of CPU here.
            "bcrypt_rounds": 4,
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "url_preview_enabled": False,
            "presence": {"enabled": presence},
            "federation_domain_whitelist": [],
            "allow_public_rooms_over_federation": False,
            "user_directory": {"enabled": True, "search_all_users": True},
            **rate_limit_config(self.rate_limits),
        }
        config.update(extra)
        log_config = {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {
                "synapse.storage.SQL": {"level": "WARNING"},
                "twisted": {"level": "WARNING"},
            },
            "root": {"level": log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        # JSON is valid YAML.
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_config_path.write_text(json.dumps(log_config, indent=2))

    def _cmd(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path), *extra]

    def _generate_keys(self) -> None:
        key_path = self.directory / "signing.key"
        cached = _SIGNING_KEY_CACHE.get(self.server_name)
        if cached is not None:
            key_path.write_bytes(cached)
            self.keygen_seconds = 0.0
            return
        t0 = time.monotonic()
        result = subprocess.run(
            self._cmd("--generate-keys"),
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=self.startup_timeout,
            check=False,
        )
        self.keygen_seconds = time.monotonic() - t0
        if result.returncode != 0 or not key_path.exists():
            raise SynapseError(
                f"synapse --generate-keys failed (rc={result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        _SIGNING_KEY_CACHE[self.server_name] = key_path.read_bytes()

    # ---------------------------------------------------------------- process
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start Synapse (generating the signing key on the first call) and wait until ready."""
        if self.running:
            return
        t0 = time.monotonic()
        if not (self.directory / "signing.key").exists():
            self._generate_keys()
        self._output = open(self.output_path, "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            self._cmd(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the test runner doesn't hit Synapse twice
        )
        self._proc = proc
        _LIVE.add(proc)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if proc.poll() is not None:
                self._discard_proc()
                raise SynapseError(
                    f"Synapse exited with code {proc.returncode} during startup\n" + self.log_tail()
                )
            if self._versions_ok():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise SynapseError(
                    f"Synapse did not answer /_matrix/client/versions on {self.base_url} "
                    f"within {self.startup_timeout:.0f}s\n" + self.log_tail()
                )
            time.sleep(0.05)
        self.last_start_seconds = time.monotonic() - t0

    def _versions_ok(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.base_url + "/_matrix/client/versions", timeout=2
            ) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Keeps the dir, port and DB."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        self._discard_proc()

    def _discard_proc(self) -> None:
        if self._proc is not None:
            _LIVE.discard(self._proc)
        self._proc = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def restart(self) -> None:
        """Stop and start again on the same port, config and DB."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the temp dir (unless ``keep_dir`` or a caller-supplied dir)."""
        self.stop()
        if self._owns_dir and not self.keep_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the Synapse log and of its stdout/stderr, for error messages."""
        parts = []
        for path in (self.log_path, self.output_path):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- tail of {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no Synapse log output)"

    # ------------------------------------------------------------------- HTTP
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """JSON request to the homeserver; returns the decoded JSON body.

        Raises ``SynapseHTTPError`` (with ``.status`` and ``.body``) on non-2xx.
        """
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            raise SynapseHTTPError(
                method, url, err.code, err.read().decode(errors="replace")
            ) from None
        return json.loads(raw) if raw else {}

    def register(
        self, username: str, password: str | None = None, admin: bool = False
    ) -> dict[str, Any]:
        """Create a user via the shared-secret admin API.

        ``username`` is the localpart.  Returns ``user_id``, ``access_token``, ``device_id``,
        ``password``, ``username``, ``home_server``.
        """
        if password is None:
            password = secrets.token_urlsafe(12)
        path = "/_synapse/admin/v1/register"
        nonce = self.request("GET", path)["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    username.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        resp = self.request(
            "POST",
            path,
            {
                "nonce": nonce,
                "username": username,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        return {
            "user_id": resp["user_id"],
            "access_token": resp["access_token"],
            "device_id": resp.get("device_id"),
            "home_server": resp.get("home_server", self.server_name),
            "username": username,
            "password": password,
        }

    def login(self, username: str, password: str, device_id: str | None = None) -> dict[str, Any]:
        """Password login (client API); returns Synapse's login response."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        result: dict[str, Any] = self.request("POST", "/_matrix/client/v3/login", body)
        return result

    @property
    def admin(self) -> dict[str, Any]:
        """A server admin (``@harness-admin``) registered on first use; same dict as register()."""
        if self._admin is None:
            self._admin = self.register("harness-admin", admin=True)
        return self._admin

    def exempt_from_rate_limit(self, user_id: str, admin_token: str | None = None) -> None:
        """Lift ``rc_message`` for one user, as an operator would for a bot.

        ``admin_token`` defaults to the token of :attr:`admin`.
        """
        self.request(
            "POST",
            self._override_path(user_id),
            {"messages_per_second": 0, "burst_count": 0},
            token=admin_token or self.admin["access_token"],
        )

    def get_rate_limit_override(
        self, user_id: str, admin_token: str | None = None
    ) -> dict[str, Any]:
        """The user's override (``{}`` when none)."""
        result: dict[str, Any] = self.request(
            "GET", self._override_path(user_id), token=admin_token or self.admin["access_token"]
        )
        return result

    def remove_rate_limit_override(self, user_id: str, admin_token: str | None = None) -> None:
        self.request(
            "DELETE",
            self._override_path(user_id),
            token=admin_token or self.admin["access_token"],
        )

    @staticmethod
    def _override_path(user_id: str) -> str:
        return (
            "/_synapse/admin/v1/users/"
            + urllib.parse.quote(user_id, safe="")
            + "/override_ratelimit"
        )
