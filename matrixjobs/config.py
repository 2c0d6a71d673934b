"""Configuration: a TOML file validated by pydantic, secrets from the environment or `.env`.

Relative paths in the file (store path, target cwd) are resolved against the
directory of the config file, so a config works no matter where the service is
started from.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
import json
import os
import re
import shutil
import socket
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from matrixjobs.cron import Cron, zone
from matrixjobs.errors import BadArgumentsError, ConfigError, echo

SECRET_ENV = ("MATRIXJOBS_PASSWORD", "MATRIXJOBS_ACCESS_TOKEN", "MATRIXJOBS_API_TOKEN",
              "MATRIXJOBS_PICKLE_KEY", "MATRIXJOBS_DATABASE_URL")
# Pickle keys and API tokens shorter than this are guessable (a throttle slows one address,
# not a guesser with many); `matrixjobs init` and the bot write 43 random characters.
MIN_SECRET_LEN = 16
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_APPROVALS = 10
USER_RE = re.compile(r"^@[^:\s]+:[^\s]+$")
# Room ids are opaque (`!abc:server`, or `!abc` from room version 12); aliases `#x:server`.
ROOM_RE = re.compile(r"^(![^\s]+|#[^:\s]+:[^\s]+)$")
HANDLER_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# A host name once IDNA-encoded: dot-separated labels (the codec rejects empty or long ones).
HOST_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?$")
URL_HELP = "expected a URL like https://matrix.example.org"
# Values under these keys are never echoed in errors (target env values often hold tokens).
SECRET_KEYS = frozenset({"password", "access_token", "token", "env", "secret"})

# Strict numbers: TOML has real numbers, so `workers = true` or `"4"` is a mistake to report.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


def homeserver_url(value: str) -> str:
    """The URL without trailing '/'; ValueError unless an HTTP client can connect to it."""
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"'{value}' is not an http(s) URL; {URL_HELP}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        host = parts.hostname or ""
        if ":" in host:
            ipaddress.IPv6Address(host)
        elif not HOST_RE.match(host.encode("idna").decode("ascii")):
            raise ValueError(host)
    except ValueError:  # UnicodeError too: the idna codec's complaint about a label
        raise ValueError(f"'{value}' is not a valid URL; {URL_HELP}") from None
    return value.rstrip("/")


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also escapes DEL."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(toml_string(v) for v in values) + "]"

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _room_ids(value: list[str]) -> list[str]:
    for room in value:
        if not ROOM_RE.match(room):
            raise ValueError(f"'{room}' is not a room id (!x:server) or alias (#x:server)")
    return value


def _user_globs(value: list[str] | None) -> list[str] | None:
    for pattern in value or ():
        if not USER_RE.match(pattern):
            raise ValueError(f"'{pattern}' is not a Matrix user id or glob like @*:example.org")
    return value


def user_matches(patterns: Iterable[str], user_id: str) -> bool:
    """Is `user_id` one of `patterns` (user ids or globs like @*:example.org)?"""
    # Match localpart and server separately so '*' cannot reach across the ':'.
    local, _, server = user_id.partition(":")
    for pattern in patterns:
        local_glob, _, server_glob = pattern.partition(":")
        if fnmatch.fnmatchcase(local, local_glob) and fnmatch.fnmatchcase(server, server_glob):
            return True
    return False


class MatrixConfig(Section):
    homeserver: str
    user_id: str
    password: SecretStr | None = None
    access_token: SecretStr | None = None
    device_name: str = "matrixjobs"
    command_prefix: str = Field(default="!", min_length=1, max_length=8)
    rooms: list[str] = Field(default_factory=list)
    notify_after_s: Float = Field(default=30.0, ge=0)
    # When a finished job pings its requester: it failed, it fixed what failed the last
    # time, it ran notify_after_s or longer.
    ping: list[Literal["failed", "fixed", "long"]] = Field(
        default_factory=lambda: ["failed", "fixed", "long"])
    # The homeserver's message rate limit as the bot should assume it (Synapse's
    # rc_message defaults); rate_per_s = 0 when an admin has exempted the bot.
    rate_per_s: Float = Field(default=0.2, ge=0)
    rate_burst: Int = Field(default=10, ge=1)
    max_edits_per_message: Int = Field(default=200, ge=2, le=10_000)
    # End-to-end encryption: the crypto store (keys of the bot's device; default: a
    # directory next to the SQLite store), whose devices get room keys, and how long an
    # undecryptable command waits for its key before the sender is told.
    store_dir: Path | None = None
    trust: Literal["tofu", "all", "verified"] = "tofu"
    decrypt_timeout_s: Float = Field(default=60.0, gt=0)
    # Devices verified by configuration: user id → ["DEVICEID:SESSIONKEY", …] as Element
    # shows them (Session ID, Session key); stored without the key's spaces.
    verified_devices: dict[str, list[str]] = Field(default_factory=dict)

    # MATRIXJOBS_PICKLE_KEY, from the environment only: never in the (shareable) TOML.
    _pickle_key: SecretStr | None = PrivateAttr(default=None)

    @property
    def pickle_key(self) -> SecretStr | None:
        """The key the crypto store is pickled with; None: the key file's (pickle_key_file)."""
        return self._pickle_key

    def crypto_store_dir(self, db_path: Path) -> Path:
        """`store_dir`, or `NAME-crypto/` beside the SQLite store `NAME.db`."""
        return self.store_dir or db_path.with_name(f"{db_path.stem}-crypto")

    def pickle_key_file(self, db_path: Path) -> Path:
        """Where the bot keeps the pickle key it made when MATRIXJOBS_PICKLE_KEY is not set:
        `NAME.pickle-key` beside the SQLite store `NAME.db`."""
        return db_path.with_name(f"{db_path.stem}.pickle-key")

    @field_validator("homeserver")
    @classmethod
    def _homeserver(cls, value: str) -> str:
        return homeserver_url(value)

    _check_rooms = field_validator("rooms")(_room_ids)

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, value: str) -> str:
        if not USER_RE.match(value):
            raise ValueError("expected a Matrix user id like @bot:example.org")
        return value

    @field_validator("verified_devices")
    @classmethod
    def _verified_devices(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        pinned: dict[str, list[str]] = {}
        for user, entries in value.items():
            if not USER_RE.match(user) or any(c in user for c in "*?["):
                raise ValueError(f"'{user}' is not a Matrix user id like @alice:example.org")
            keys: dict[str, str] = {}
            for entry in entries:
                device, key = _pinned_device(user, entry)
                if keys.setdefault(device, key) != key:
                    raise ValueError(f"{user}: device {device} is listed with two keys")
            pinned[user] = [f"{device}:{key}" for device, key in keys.items()]
        return pinned

    def pinned_devices(self) -> dict[str, dict[str, str]]:
        """`verified_devices` as user id → device id → Ed25519 key."""
        return {user: dict(entry.rsplit(":", 1) for entry in entries)
                for user, entries in self.verified_devices.items()}


def _pinned_device(user: str, entry: str) -> tuple[str, str]:
    """("DEVICEID", "key") from "DEVICEID:key", the key as Element groups it or not."""
    device, colon, grouped = entry.rpartition(":")
    key = "".join(grouped.split())
    if not colon or not device or any(c.isspace() for c in device):
        raise ValueError(f"{user}: '{entry}' is not \"DEVICEID:SESSIONKEY\" (Element: "
                         "Settings → Sessions, the session's ID and key)")
    try:
        valid = len(key) == 43 and len(base64.b64decode(key + "=", validate=True)) == 32
    except binascii.Error:
        valid = False
    if not valid:
        raise ValueError(f"{user}: the key of device {device} is not a session key "
                         "(43 base64 characters, spaces allowed)")
    return device, key


class AccessConfig(Section):
    allowed_users: list[str] = Field(default_factory=list)
    reply_to_denied: bool = True

    _check_allowed_users = field_validator("allowed_users")(_user_globs)

    def allows(self, user_id: str) -> bool:
        return user_matches(self.allowed_users, user_id)


class StoreConfig(Section):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # SQLite's file; with either backend the bot's crypto store and pickle key sit beside it.
    path: Path = Path("matrixjobs.db")
    # FULL fsyncs every commit: a finished job survives power loss, not only a crash.
    synchronous: Literal["full", "normal"] = "full"
    # At start, how long to wait for another process's write lock on the SQLite store (a
    # sqlite3 shell in a transaction, a backup tool) before giving up.
    lock_wait_s: Float = Field(default=30.0, ge=0)
    # SQLite: below this much free space where the store is, new jobs are refused and job
    # logs are kept only in part, before the disk is actually full.
    min_free_mb: Float = Field(default=100.0, ge=0)
    retention_days: Float = Field(default=7.0, gt=0)
    # PostgreSQL without its password: the file is shareable. MATRIXJOBS_DATABASE_URL (the
    # whole URL, password included) wins over it.
    url: str | None = None

    _database_url: SecretStr | None = PrivateAttr(default=None)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and (problem := _database_url_problem(value, from_env=False)):
            raise ValueError(problem)
        return value

    @property
    def database_url(self) -> SecretStr | None:
        """Where the PostgreSQL store is: MATRIXJOBS_DATABASE_URL, else `url`."""
        if self._database_url is not None:
            return self._database_url
        return None if self.url is None else SecretStr(self.url)

    def database_password(self) -> SecretStr | None:
        url = self.database_url
        password = urlsplit(url.get_secret_value()).password if url is not None else None
        return SecretStr(unquote(password)) if password else None


SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
SIZE_HELP = 'expected bytes as a number or with a unit, like "512M" or "2G" (units of 1024)'


def parse_size(value: int | str) -> int:
    """Bytes from 1073741824, "1G", "1GiB" or "1024M": units are powers of 1024, as
    systemd's MemoryMax= and ulimit read them."""
    if isinstance(value, bool):
        raise ValueError(SIZE_HELP)
    if isinstance(value, int):
        number = value
    else:
        match = SIZE_RE.match(value)
        if match is None:
            raise ValueError(SIZE_HELP)
        number = int(match[1]) * SIZE_UNITS[match[2].upper()]
    if number <= 0:
        raise ValueError("must be more than 0")
    return number


def size_words(size: int) -> str:
    """512 MiB, 1 GiB, 1536 KiB: the largest unit that divides it whole."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


Size = Annotated[int, BeforeValidator(parse_size)]


class LimitsConfig(Section):
    """What one job may use (docs/guarantees.md says what enforces each on a host)."""

    memory: Size | None = None  # bytes for the whole job (a cgroup) or each process (rlimit)
    cpu_s: Int | None = Field(default=None, gt=0, le=2**31)  # CPU seconds of each process
    # Processes and threads of the job; the kernel allows no more than 4194304 in all.
    processes: Int | None = Field(default=None, ge=2, le=4_194_304)
    file_size: Size | None = None  # the largest file a job may write
    # Descriptors of each process; the kernel's ceiling is fs.nr_open (1048576 by default).
    open_files: Int | None = Field(default=None, ge=16, le=1_048_576)

    def over(self, defaults: LimitsConfig) -> LimitsConfig:
        """These limits, with `defaults` wherever these set none."""
        mine = self.model_dump(exclude_none=True)
        return defaults.model_copy(update=mine)

    @property
    def any(self) -> bool:
        return any(value is not None for value in self.model_dump().values())


class QueueConfig(Section):
    # 0: this node runs no jobs (it serves the bot, API and MCP; `matrixjobs worker`s run them)
    workers: Int = Field(default=4, ge=0, le=256)
    max_retries: Int = Field(default=2, ge=0, le=100)
    retry_backoff_s: Float = Field(default=5.0, ge=0)
    default_timeout_s: Float = Field(default=3600.0, gt=0)
    lease_s: Float = Field(default=60.0, ge=1)
    kill_grace_s: Float = Field(default=10.0, ge=0)
    shutdown_grace_s: Float = Field(default=30.0, ge=0)
    max_batch_size: Int = Field(default=50, ge=1, le=10_000)
    # How a job's processes are kept together (docs/guarantees.md): "auto" uses bubblewrap
    # (a PID, mount and user namespace per job) where it works here and says loudly when
    # it falls back to process groups; "bubblewrap" refuses to start without it; "none"
    # runs jobs in process groups only (what escapes them: see doctor).
    containment: Literal["auto", "bubblewrap", "none"] = "auto"
    limits: LimitsConfig = LimitsConfig()  # every target's, unless it sets its own


def _labels(value: list[str]) -> list[str]:
    for label in value:
        if not NAME_RE.match(label):
            raise ValueError(f"label '{echo(label)}' must be letters, digits, '_', '.', '-' "
                             "(at most 64)")
    return sorted(set(value))


class WorkerConfig(Section):
    """Who this process is among the workers sharing a PostgreSQL store."""

    # Unique per process in a fleet: it names the worker in events, `!workers` and logs.
    name: str = Field(default_factory=lambda: socket.gethostname()[:64] or "worker")
    # A job whose target says `runs_on = [...]` runs only on a worker with all of them.
    labels: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"'{echo(value)}' must be letters, digits, '_', '.', '-' "
                             "(at most 64)")
        return value

    _check_labels = field_validator("labels")(_labels)


class ProgressConfig(Section):
    interval_ms: Int = Field(default=500, ge=10, le=600_000)


# Below this a log could not hold a head and a tail of a few cut pieces of a long line.
MIN_LOG_BYTES = 65536


class LogsConfig(Section):
    """The whole output of each job (docs/logs.md)."""

    max_bytes: Int = Field(default=1024 * 1024, ge=0, le=1024**3)

    @field_validator("max_bytes")
    @classmethod
    def _max_bytes(cls, value: int) -> int:
        if 0 < value < MIN_LOG_BYTES:
            raise ValueError(f"must be 0 (keep no logs) or at least {MIN_LOG_BYTES}")
        return value


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may well resolve to a public address

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: Path

    @property
    def loopback(self) -> bool:
        return True  # only local processes can connect; file permissions guard it

    def __str__(self) -> str:
        return f"{UNIX_PREFIX}{self.path}"


UNIX_PREFIX = "unix:"
LISTEN_HELP = "expected HOST:PORT (like 127.0.0.1:8765 or [::1]:8765) or unix:/path/to/api.sock"


def parse_listen(value: str) -> TcpAddress | UnixAddress:
    """'127.0.0.1:8765', '[::1]:8765', 'localhost:0' or 'unix:/run/matrixjobs/api.sock'."""
    if value.startswith(UNIX_PREFIX):
        path = value.removeprefix(UNIX_PREFIX)
        if not path or "\x00" in path:
            raise ValueError(LISTEN_HELP)
        return UnixAddress(Path(path))
    if "/" in value:
        raise ValueError(LISTEN_HELP)  # a URL, or a path without "unix:"
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(LISTEN_HELP)
    elif ":" in host:
        raise ValueError("put an IPv6 address in brackets, like [::1]:8765")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535 or any(
        c.isspace() or c in "[]" for c in host
    ):
        raise ValueError(LISTEN_HELP)
    return TcpAddress(host, int(port))


class ApiConfig(Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8765"
    token: SecretStr | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (leave the key out for no token)")
        return value

    @property
    def address(self) -> TcpAddress | UnixAddress:
        return parse_listen(self.listen)

    def check_exposure(self, token: SecretStr | None) -> None:
        """Refuse to serve beyond this machine without a token."""
        if self.enabled and token is None and not self.address.loopback:
            raise ConfigError(
                f"api.listen: {self.listen} is not a loopback address, and the API has no "
                "token; set MATRIXJOBS_API_TOKEN (or [api] token) so every request needs "
                "one, or listen on 127.0.0.1"
            )


class McpConfig(Section):
    """The MCP server (streamable HTTP at /mcp on the API's port, same auth)."""

    enabled: bool = True  # only takes effect when [api] is enabled


class TargetConfig(Section):
    description: str = ""
    command: list[str] | None = None
    handler: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: Float | None = Field(default=None, gt=0)
    max_retries: Int | None = Field(default=None, ge=0, le=100)
    priority: Int = 0
    progress_regex: str | None = None
    args_pattern: str | None = None
    # Labels a worker must all have to run this target (e.g. ["gpu"]).
    runs_on: list[str] = Field(default_factory=list)
    # Over [queue] limits key by key.
    limits: LimitsConfig = LimitsConfig()
    # false: the job gets a network namespace of its own with only its own loopback.
    network: bool = True
    # Who may run it (user ids or globs); None: [access] allowed_users.
    allowed_users: list[str] | None = None
    # Room commands only from these rooms (ids or aliases); with rooms or power_level the
    # target can only be started from a room.
    rooms: list[str] = Field(default_factory=list)
    # The sender's power level in the command's room must be at least this.
    power_level: Int | None = None
    # How many people other than the requester must approve a job before it runs.
    approvals: Int = Field(default=0, ge=0, le=MAX_APPROVALS)
    # Who may approve or deny (user ids or globs); None: anyone allowed to run it.
    approvers: list[str] | None = None
    # Unapproved this long: cancelled ("approval expired").
    approval_timeout_s: Float = Field(default=3600.0, gt=0)
    # A concurrency group ("deploy-{0}": {0}, {1}… are the job's arguments): at most one job
    # of a group runs at a time, across every node sharing the store.
    concurrency: str | None = Field(default=None, min_length=1, max_length=100)
    # A new job whose group has work: "queue" waits its turn, "cancel-older" cancels the
    # group's running and queued jobs, "skip" refuses the new one.
    on_busy: Literal["queue", "cancel-older", "skip"] = "queue"

    _check_runs_on = field_validator("runs_on")(_labels)
    _check_allowed_users = field_validator("allowed_users")(_user_globs)
    _check_approvers = field_validator("approvers")(_user_globs)
    _check_rooms = field_validator("rooms")(_room_ids)

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0]):
            raise ValueError("must be a non-empty list of strings, the program first")
        return value

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                fields = [(name, spec, conversion) for _, name, spec, conversion
                          in string.Formatter().parse(value) if name is not None]
            except ValueError as exc:
                raise ValueError(f"is not a group name template: {exc}") from None
            # No format spec or conversion: "{0:d}" fails on every submit, and "{0:>{1}}"
            # would let an argument choose how long the name grows.
            if any(not name.isdigit() or spec or conversion for name, spec, conversion in fields):
                raise ValueError("may name only the job's arguments, as {0}, {1}…")
        return value

    @field_validator("progress_regex")
    @classmethod
    def _progress_regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        compiled = _compile(value)
        missing = {"current", "total"} - set(compiled.groupindex)
        if missing:
            raise ValueError(f"needs named groups (?P<current>…) and (?P<total>…); "
                             f"missing: {', '.join(sorted(missing))}")
        return value

    @field_validator("args_pattern")
    @classmethod
    def _args_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            _compile(value)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> TargetConfig:
        if (self.command is None) == (self.handler is None):
            raise ValueError("set exactly one of 'command' (argv list) or 'handler' (name)")
        return self

    @model_validator(mode="after")
    def _power_in_named_rooms(self) -> TargetConfig:
        # Anyone allowed may create a room, where they outrank everyone, and invite the bot.
        if self.power_level is not None and not self.rooms:
            raise ValueError("power_level needs rooms: anyone may make a room where they "
                             "outrank everyone, so a level means something only in the rooms "
                             "you name")
        return self

    @model_validator(mode="after")
    def _busy_needs_group(self) -> TargetConfig:
        if self.on_busy != "queue" and self.concurrency is None:
            raise ValueError(f'on_busy = "{self.on_busy}" needs concurrency (a group name)')
        return self

    def resolve_executable(self) -> str:
        """The program a command target starts, found as the queue's exec will find it:
        argv[0] with a '/' relative to the target's cwd, else on PATH (the target's own
        `env` PATH if it sets one). Raise TargetProblem when the command cannot start."""
        assert self.command is not None
        cwd = self.cwd or Path.cwd()
        program = self.command[0]
        try:
            if not cwd.is_dir():
                raise TargetProblem(f"cwd '{cwd}' is not a directory")
            if os.sep not in program:
                search = self.env.get("PATH", os.environ.get("PATH", os.defpath))
                found = shutil.which(program, path=search)
                if found is None:
                    raise TargetProblem(f"executable '{program}' not found on PATH")
                return found
            path = cwd / program  # an absolute program stays as it is
            if not path.is_file():
                raise TargetProblem(f"executable '{path}' not found")
        except OSError as exc:  # a directory on the way that this user may not search
            raise TargetProblem(f"cannot look for '{program}': {exc.strerror or exc}") from None
        if not os.access(path, os.X_OK):
            raise TargetProblem(f"'{path}' is not executable")
        return str(path)


class TargetProblem(Exception):
    """Why a command target cannot start; the message says it for people."""


@dataclass(frozen=True, slots=True)
class PrivatePaths:
    """See Config.private_paths."""

    state: Path  # hidden whole while it holds nothing but what the other two name
    dirs: list[Path]  # hidden whole
    files: list[Path]  # each masked


class WarningTopic(StrEnum):
    CREDENTIALS = "credentials"
    TARGET = "target"
    API = "api"
    ROUTING = "routing"


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    topic: WarningTopic
    text: str

    def __str__(self) -> str:
        return self.text


APPROVERS_DIFFER = "its targets ask different people for approval"


def approvers_differ(targets: Mapping[str, TargetConfig], names: Sequence[str]) -> bool:
    """A batch is approved as a whole: do its targets that ask for approval ask different
    people (so that nobody could approve it)?"""
    approvers = {tuple(config.approvers) if config.approvers is not None else None
                 for name in set(names)
                 if (config := targets.get(name)) is not None and config.approvals}
    return len(approvers) > 1


class Starter(Section):
    """What a trigger (a schedule, a webhook) starts: one target with args, or a batch."""

    target: str | None = None
    batch: list[str] | None = None
    args: list[str] = Field(default_factory=list)  # the target's, checked by its args_pattern
    room: str | None = None  # where its progress message goes

    @field_validator("room")
    @classmethod
    def _room(cls, value: str | None) -> str | None:
        return None if value is None else _room_ids([value])[0]

    @model_validator(mode="after")
    def _one_kind(self) -> Starter:
        if (self.target is None) == (self.batch is None):
            raise ValueError("set exactly one of 'target' (a name) or 'batch' (a list of "
                             "target names)")
        if self.batch is not None and not self.batch:
            raise ValueError("batch: must name at least one target")
        if self.batch is not None and self.args:
            raise ValueError("args go with 'target': a batch's targets take no arguments")
        return self

    def starts(self) -> list[str]:
        """The targets it starts."""
        return [self.target] if self.target is not None else list(self.batch or ())

    def unknown_target(self, key: str, targets: Mapping[str, TargetConfig]) -> str | None:
        """What is wrong with the targets it names, given the configured `targets`: one not
        configured, or a batch nobody could approve."""
        kind = "target" if self.target is not None else "batch"
        for target in self.starts():
            if target not in targets:
                known = ", ".join(sorted(targets)) or "none configured"
                return f"{key}.{kind}: '{echo(target)}' is not a configured target ({known})"
        if approvers_differ(targets, self.starts()):
            return f"{key}.{kind}: {APPROVERS_DIFFER}, so nobody could approve it"
        return None


class ScheduleConfig(Starter):
    """Work that starts itself at the times a cron expression names (docs/schedules.md)."""

    cron: str
    timezone: str = "UTC"  # an IANA name; the cron's times are this zone's wall clock
    # A slot that passed while no node ran (or the store was out): "latest" runs the latest
    # such slot once when a node can; "skip" waits for the next one.
    missed: Literal["latest", "skip"] = "latest"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        Cron.parse(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value

    @property
    def when(self) -> Cron:
        return Cron.parse(self.cron, self.timezone)


class Provider(StrEnum):
    FORGEJO = "forgejo"
    GITEA = "gitea"
    GITHUB = "github"
    GITLAB = "gitlab"
    GENERIC = "generic"


# The events a webhook takes when it names none: each forge's pushes (GitHub, Forgejo and
# Gitea send a tag's push as a push too; GitLab names it apart).
PUSH_EVENTS: dict[Provider, tuple[str, ...]] = {
    Provider.FORGEJO: ("push",), Provider.GITEA: ("push",), Provider.GITHUB: ("push",),
    Provider.GITLAB: ("Push Hook", "Tag Push Hook"), Provider.GENERIC: ("push",),
}
# What an args template may name: {branch}, {sha}…
ARG_FIELDS = frozenset({"branch", "tag", "ref", "sha", "short_sha", "repo", "pusher"})
WEBHOOK_SECRET_ENV = "MATRIXJOBS_WEBHOOK_{}_SECRET"
EVENT_RE = re.compile(r"^[a-z][a-z_]*$")


def webhook_secret_env(name: str) -> str:
    """MATRIXJOBS_WEBHOOK_SITE_SECRET for [webhooks.site] ('-' and '.' become '_')."""
    return WEBHOOK_SECRET_ENV.format(re.sub(r"[-.]", "_", name).upper())


def _arg_template(template: str) -> None:
    """Refuse what str.format would do beyond naming a field: "{repo.__class__}" reads
    attributes, "{0}" positions, "{sha!r}" and "{sha:.7}" change the value."""
    known = ", ".join("{" + field + "}" for field in sorted(ARG_FIELDS))
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"'{echo(template)}' is not a template ({exc}); use "
                         f"{known}, and {{{{ }}}} for a brace") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in ARG_FIELDS or spec or conversion:
            raise ValueError(f"'{echo(template)}' names '{{{echo(field)}}}'; a "
                             f"template may name {known}")


class WebhookConfig(Starter):
    """A forge's webhook at POST /hooks/NAME (docs/webhooks.md)."""

    provider: Provider
    # The forge's own names (GitHub's X-GitHub-Event, GitLab's X-Gitlab-Event…); None: pushes.
    events: list[str] | None = None
    # Globs (fnmatch, '*' crosses '/') on the pushed branch or tag; with only one of them
    # set, pushes of the other kind are ignored; with neither, every push runs.
    branches: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    max_per_minute: Int = Field(default=60, ge=1, le=100_000)

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        for template in value:
            _arg_template(template)
        return value

    @model_validator(mode="after")
    def _event_names(self) -> WebhookConfig:
        """A forge's events beyond its pushes have payloads nothing here reads (they would
        all answer 400): only a generic webhook, whose payload is ours, names its own."""
        pushes = PUSH_EVENTS[self.provider]
        for event in self.events or ():
            if self.provider is Provider.GENERIC and not EVENT_RE.match(event):
                raise ValueError(f"events: '{echo(event)}' is no event name; use lower-case "
                                 "letters and '_', like 'push'")
            if self.provider is not Provider.GENERIC and event not in pushes:
                names = " or ".join(f"'{push}'" for push in pushes)
                raise ValueError(f"events: '{echo(event)}' is not a {self.provider} push; "
                                 f"only pushes start work: name {names} (the names the forge "
                                 "sends)")
        return self

    @property
    def takes(self) -> tuple[str, ...]:
        """The events it acts on."""
        return tuple(self.events) if self.events is not None else PUSH_EVENTS[self.provider]


class AuditConfig(Section):
    # Audit records older than this are removed from the start of the chain (a record
    # says so, and `matrixjobs audit verify` still passes); separate from [store]'s.
    retention_days: Float = Field(default=400.0, gt=0)


class Config(Section):
    matrix: MatrixConfig | None = None
    access: AccessConfig = AccessConfig()
    audit: AuditConfig = AuditConfig()
    store: StoreConfig = StoreConfig()
    queue: QueueConfig = QueueConfig()
    worker: WorkerConfig = WorkerConfig()
    progress: ProgressConfig = ProgressConfig()
    logs: LogsConfig = LogsConfig()
    api: ApiConfig = ApiConfig()
    mcp: McpConfig = McpConfig()
    targets: dict[str, TargetConfig] = Field(default_factory=dict)
    handlers: dict[str, str] = Field(default_factory=dict)
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    webhooks: dict[str, WebhookConfig] = Field(default_factory=dict)

    _api_token: SecretStr | None = PrivateAttr(default=None)
    # Each webhook's secret, from MATRIXJOBS_WEBHOOK_<NAME>_SECRET: never in the TOML.
    _webhook_secrets: dict[str, SecretStr] = PrivateAttr(default_factory=dict)
    _source: Path | None = PrivateAttr(default=None)  # the file it was read from

    @field_validator("targets")
    @classmethod
    def _target_names(cls, value: dict[str, TargetConfig]) -> dict[str, TargetConfig]:
        for name in value:
            if not NAME_RE.match(name):
                raise ValueError(f"target name '{name}' must be letters, digits, '_', '.', '-'")
        return value

    @field_validator("schedules")
    @classmethod
    def _schedule_names(cls, value: dict[str, ScheduleConfig]) -> dict[str, ScheduleConfig]:
        for name in value:
            if not NAME_RE.match(name):
                raise ValueError(f"schedule name '{name}' must be letters, digits, '_', '.', "
                                 "'-'")
        return value

    @model_validator(mode="after")
    def _schedules_start_targets(self) -> Config:
        # Here, not at the first slot: a typo would otherwise show only in the log at 03:00.
        from matrixjobs.targets import Targets  # it imports this module

        targets = Targets(self.targets)
        for name, schedule in self.schedules.items():
            if problem := schedule.unknown_target(f"schedules.{name}", self.targets):
                raise ValueError(problem)
            if schedule.target is not None:
                try:
                    targets.check_args(schedule.target, schedule.args)
                except BadArgumentsError as exc:
                    raise ValueError(f"schedules.{name}.args: {exc}") from None
        return self

    @field_validator("handlers")
    @classmethod
    def _handler_refs(cls, value: dict[str, str]) -> dict[str, str]:
        for name, ref in value.items():
            if not HANDLER_REF_RE.match(ref):
                raise ValueError(f"handlers.{name}: expected 'package.module:Class', got '{ref}'")
        return value

    @field_validator("webhooks")
    @classmethod
    def _webhook_names(cls, value: dict[str, WebhookConfig]) -> dict[str, WebhookConfig]:
        variables: dict[str, str] = {}
        for name in value:
            if not NAME_RE.match(name):
                raise ValueError(f"webhook name '{echo(name)}' must be letters, digits, '_', "
                                 "'.', '-' (at most 64)")
            other = variables.setdefault(webhook_secret_env(name), name)
            if other != name:
                raise ValueError(f"webhooks '{other}' and '{name}' would both take their "
                                 f"secret from {webhook_secret_env(name)}: rename one")
        return value

    @model_validator(mode="after")
    def _webhook_targets(self) -> Config:
        for name, hook in self.webhooks.items():
            if problem := hook.unknown_target(f"webhooks.{name}", self.targets):
                raise ValueError(problem)
            if hook.args and hook.target and self.targets[hook.target].args_pattern is None:
                raise ValueError(f"webhooks.{name}.args: target '{hook.target}' takes no "
                                 "arguments; give it an args_pattern the expanded args match")
        return self

    @model_validator(mode="after")
    def _someone_runs_jobs(self) -> Config:
        if self.queue.workers == 0 and self.store.backend == "sqlite":
            raise ValueError("queue.workers = 0 runs no jobs here, and a SQLite store has no "
                             'other workers: use store.backend = "postgresql" with `matrixjobs '
                             "worker` processes, or workers >= 1")
        return self

    @property
    def api_token(self) -> SecretStr | None:
        """The token every API request must carry: MATRIXJOBS_API_TOKEN, else [api] token."""
        return self._api_token or self.api.token

    def webhook_secret(self, name: str) -> SecretStr | None:
        """The secret [webhooks.NAME] deliveries are signed with (None: not set)."""
        return self._webhook_secrets.get(name)

    def private_paths(self) -> PrivatePaths:
        """What no job may see: the store's directory where it holds nothing else, the
        crypto store, and the files holding secrets that may sit beside a job's own files
        (store, keys, `.env`, the config itself)."""
        db = self.store.path
        matrix = self.matrix or MatrixConfig.model_construct(store_dir=None)
        # SQLite puts the WAL beside the file a symlinked store path points to.
        files = [path.with_name(path.name + end) for path in dict.fromkeys([db, db.resolve()])
                 for end in ("", "-wal", "-shm", "-journal", ".lock")]
        files.append(matrix.pickle_key_file(db))
        if self._source is not None:
            files += [self._source, self._source.parent / ".env"]
        files.append(Path.cwd() / ".env")
        # libpq's password file: the shipped unit's home directory is the state directory.
        passfile = os.environ.get("PGPASSFILE")
        files += [db.parent / ".pgpass", Path.home() / ".pgpass",
                  *([Path(passfile)] if passfile else [])]
        return PrivatePaths(state=db.parent, dirs=[matrix.crypto_store_dir(db)],
                            files=list(dict.fromkeys(files)))

    def secrets(self) -> list[SecretStr]:
        """Every secret this config holds, for masking in logs."""
        found = [self.api_token, self.store.database_password(),
                 *self._webhook_secrets.values()]
        if self.matrix is not None:
            found += [self.matrix.password, self.matrix.access_token, self.matrix.pickle_key]
        return [secret for secret in found if secret is not None]

    def warnings(self) -> list[str]:
        """Problems that do not stop the service but will fail jobs or the bot."""
        return [str(warning) for warning in self.warning_items()]

    def warning_items(self) -> list[ConfigWarning]:
        """warnings(), each with its topic (the doctor checks some topics in more detail)."""
        found = []
        if self.matrix is not None and not (self.matrix.password or self.matrix.access_token):
            found.append(ConfigWarning(
                WarningTopic.CREDENTIALS, "matrix: no password or access token; the bot "
                "cannot log in (set MATRIXJOBS_PASSWORD or MATRIXJOBS_ACCESS_TOKEN)"))
        token = self.api_token
        if token is not None and len(token.get_secret_value()) < MIN_SECRET_LEN:
            found.append(ConfigWarning(
                WarningTopic.API, f"api: the token is shorter than {MIN_SECRET_LEN} "
                "characters and could be guessed; use a random one, e.g. python3 -c "
                "'import secrets; print(secrets.token_urlsafe(32))'"))
        for name, target in self.targets.items():
            if target.command is None:
                continue
            try:
                target.resolve_executable()
            except TargetProblem as exc:
                found.append(ConfigWarning(WarningTopic.TARGET, f"targets.{name}: {exc}"))
        found += self._room_only_warnings()
        found += self._routing_warnings()
        if self.webhooks and not self.api.enabled:
            found.append(ConfigWarning(WarningTopic.API, "webhooks: [api] enabled = false, so "
                                       "no forge can reach POST /hooks/NAME"))
        if self.matrix is None:
            found += [ConfigWarning(WarningTopic.TARGET, f"{key}.room: there is no [matrix] "
                                    "section, so no bot shows its work in a room")
                      for key, starter in self._starters() if starter.room is not None]
        return found

    def _starters(self) -> list[tuple[str, Starter]]:
        """Every schedule and webhook, by its config key."""
        return [*((f"schedules.{name}", item) for name, item in self.schedules.items()),
                *((f"webhooks.{name}", item) for name, item in self.webhooks.items())]

    def _room_only_warnings(self) -> list[ConfigWarning]:
        """Targets only a room may start, on a service without Matrix."""
        if self.matrix is not None:
            return []
        return [ConfigWarning(WarningTopic.TARGET, f"targets.{name}: with rooms or "
                              "power_level it starts only from a Matrix room, and [matrix] "
                              "is off: nothing can start it")
                for name, target in self.targets.items()
                if target.rooms or target.power_level is not None]

    def _routing_warnings(self) -> list[ConfigWarning]:
        """Targets whose `runs_on` labels this node's worker lacks."""
        if self.queue.workers == 0:  # runs no jobs: its labels say nothing about routing
            return []
        found = []
        labels = set(self.worker.labels)
        for name, target in self.targets.items():
            missing = [label for label in target.runs_on if label not in labels]
            if not missing:
                continue
            need = ", ".join(target.runs_on)
            if self.store.backend == "sqlite":
                text = (f"runs_on {need}, but this node's worker labels are "
                        f"{', '.join(self.worker.labels) or 'none'} and a SQLite store has no "
                        "other workers: its jobs would wait forever")
            else:
                lacks = ("has none of them" if len(missing) == len(target.runs_on)
                         else f"lacks {', '.join(missing)}")
                text = (f"runs only on workers labelled {need}; this node {lacks}, so "
                        "another worker must take its jobs")
            found.append(ConfigWarning(WarningTopic.ROUTING, f"targets.{name}: {text}"))
        return found


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and complete the config; raise ConfigError with a readable message."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    env = os.environ if environ is None else environ
    try:
        _refuse_webhook_secrets(raw)
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n{format_errors(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n  {exc}") from None
    wanted = [*SECRET_ENV, *map(webhook_secret_env, config.webhooks)]
    secrets = _secrets(path.parent, env, wanted)
    completed = _complete(config, path.parent.resolve(), secrets, env.get("STATE_DIRECTORY"))
    completed._source = path.resolve()
    try:
        completed.api.check_exposure(completed.api_token)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return completed


def _refuse_webhook_secrets(raw: dict[str, Any]) -> None:
    """A `secret` in [webhooks.NAME]: the file is meant to be shareable, so say where the
    secret goes instead (the model would only call it an unknown key)."""
    hooks = raw.get("webhooks")
    for name, hook in hooks.items() if isinstance(hooks, dict) else ():
        if isinstance(hook, dict) and "secret" in hook:
            raise ValueError(f"webhooks.{name}.secret: secrets do not belong in the config "
                             f"file (it is meant to be shareable): remove it and set "
                             f"{webhook_secret_env(name)} in the environment or in .env")


def _secrets(directory: Path, env: Mapping[str, str], wanted: list[str]) -> dict[str, str]:
    """The `wanted` secrets from `.env` beside the config (or in the cwd); real environment
    wins."""
    values: dict[str, str] = {}
    for dotenv in dict.fromkeys([Path.cwd() / ".env", directory / ".env"]):
        values.update(_read_dotenv(dotenv))
    values.update({k: env[k] for k in wanted if env.get(k)})
    return {k: v for k, v in values.items() if k in wanted}


def _read_dotenv(dotenv: Path) -> dict[str, str]:
    try:
        if not dotenv.is_file():
            return {}
        values = dotenv_values(dotenv, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{dotenv}: cannot read: {reason}") from None
    return {k: v for k, v in values.items() if v is not None}


def _complete(
    config: Config, base: Path, secrets: dict[str, str], state_dir: str | None
) -> Config:
    store_path = config.store.path
    if not store_path.is_absolute():
        # state_dir: systemd's StateDirectory= puts the service's state there.
        store_path = (Path(state_dir) if state_dir else base) / store_path
    # A target runs in the config file's directory unless it says otherwise.
    targets = {
        name: t.model_copy(update={"cwd": base / (t.cwd or ".")})
        for name, t in config.targets.items()
    }
    matrix = config.matrix
    if matrix is not None:
        overrides: dict[str, Any] = {}
        if "MATRIXJOBS_PASSWORD" in secrets:
            overrides["password"] = SecretStr(secrets["MATRIXJOBS_PASSWORD"])
        if "MATRIXJOBS_ACCESS_TOKEN" in secrets:
            overrides["access_token"] = SecretStr(secrets["MATRIXJOBS_ACCESS_TOKEN"])
        if matrix.store_dir is not None and not matrix.store_dir.is_absolute():
            overrides["store_dir"] = (Path(state_dir) if state_dir else base) / matrix.store_dir
        matrix = matrix.model_copy(update=overrides)
        matrix._pickle_key = _pickle_key(secrets)
    api = config.api
    address = api.address
    if isinstance(address, UnixAddress) and not address.path.is_absolute():
        api = api.model_copy(update={"listen": str(UnixAddress(base / address.path))})
    completed = config.model_copy(update={
        "store": _complete_store(config.store, store_path, secrets),
        "targets": targets,
        "matrix": matrix,
        "api": api,
    })
    if "MATRIXJOBS_API_TOKEN" in secrets:
        completed._api_token = SecretStr(secrets["MATRIXJOBS_API_TOKEN"])
    completed._webhook_secrets = {name: _webhook_secret(name, secrets)
                                  for name in config.webhooks}
    return completed


def _webhook_secret(name: str, secrets: dict[str, str]) -> SecretStr:
    variable = webhook_secret_env(name)
    secret = secrets.get(variable, "")
    if not secret:
        raise ConfigError(f"webhooks.{name}: its secret is not set: put it in {variable} "
                          "(in the environment, or in .env beside the config), the same "
                          "secret as in the forge's webhook settings")
    if len(secret) < MIN_SECRET_LEN or secret != secret.strip():
        raise ConfigError(f"{variable} must be at least {MIN_SECRET_LEN} characters without "
                          "surrounding spaces (shorter ones could be guessed, and the log "
                          "masks only longer ones); make one with python3 -c 'import "
                          "secrets; print(secrets.token_hex(32))'")
    return SecretStr(secret)


DATABASE_URL_HELP = "expected a URL like postgresql://matrixjobs@db.example.org:5432/matrixjobs"


def database_url_problem(value: str) -> str | None:
    """What is wrong with a whole PostgreSQL URL given outside the config (password allowed)."""
    return _database_url_problem(value, from_env=True)


def _database_url_problem(value: str, from_env: bool) -> str | None:
    try:
        parts = urlsplit(value)
        password = parts.password
        parts.port  # noqa: B018 - raises ValueError on a port that is no number
    except ValueError:
        return DATABASE_URL_HELP
    if parts.scheme not in ("postgresql", "postgres"):
        return DATABASE_URL_HELP
    if password is not None and not from_env:
        return ("must not hold a password (the config file is meant to be shareable): put "
                "the whole URL in MATRIXJOBS_DATABASE_URL instead")
    return _libpq_problem(value, password)


def _libpq_problem(value: str, password: str | None) -> str | None:
    """Why libpq cannot read `value`, its quotes masked: its parse errors quote the part
    they choke on (a password with a space in it) or the whole URL."""
    from psycopg import ProgrammingError  # only where a URL is given: the CLI's client
    from psycopg.conninfo import conninfo_to_dict  # reads configs without a database

    try:
        conninfo_to_dict(value)
    except ProgrammingError as exc:
        reason = re.sub(r'"[^"]*"', '"…"', " ".join(str(exc).split()))
        for secret in {password or "", unquote(password or "")} - {""}:
            reason = reason.replace(secret, "…")
        return f"libpq cannot read it ({reason}); {DATABASE_URL_HELP}"
    return None


def _complete_store(store: StoreConfig, path: Path, secrets: dict[str, str]) -> StoreConfig:
    completed = store.model_copy(update={"path": path})
    url = secrets.get("MATRIXJOBS_DATABASE_URL")
    if url:
        if problem := _database_url_problem(url, from_env=True):
            raise ConfigError(f"MATRIXJOBS_DATABASE_URL: {problem}")  # never echo the URL
        completed._database_url = SecretStr(url)
    if completed.backend == "postgresql" and completed.database_url is None:
        raise ConfigError('store.backend = "postgresql" needs store.url (without the password) '
                          "or MATRIXJOBS_DATABASE_URL")
    return completed


def _pickle_key(secrets: dict[str, str]) -> SecretStr | None:
    key = secrets.get("MATRIXJOBS_PICKLE_KEY")
    if not key:  # an empty line in an env file: unset, as systemd sees it
        return None
    if len(key) < MIN_SECRET_LEN or key != key.strip():
        raise ConfigError(f"MATRIXJOBS_PICKLE_KEY must be at least {MIN_SECRET_LEN} "
                          "characters without surrounding spaces (matrixjobs init writes a "
                          "random one)")
    return SecretStr(key)


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
}


def format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            text = "unknown key"
        elif kind == "missing":
            text = "missing required key"
        elif kind in _EXPECTED and SECRET_KEYS.intersection(map(str, error["loc"])):
            text = f"expected {_EXPECTED[kind]}"  # never echo a secret
        elif kind in _EXPECTED:
            text = f"expected {_EXPECTED[kind]}, got {error['input']!r}"
        else:
            text = error["msg"].removeprefix("Value error, ")
        # A check across sections names its keys in its message.
        lines.append(f"  {key}: {text}" if key else f"  {text}")
    return "\n".join(lines)
