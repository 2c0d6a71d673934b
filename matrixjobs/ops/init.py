"""`matrixjobs init`: a starter config.toml (no secrets) and a .env holding the bot's secret.

Values come from flags; on a terminal the missing ones are asked for (secrets with
getpass). Every value is checked as it comes in, with the rules config.py applies.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from matrixjobs import config
from matrixjobs.config import ROOM_RE, USER_RE, toml_list, toml_string

PASSWORD_ENV = "MATRIXJOBS_PASSWORD"
TOKEN_ENV = "MATRIXJOBS_ACCESS_TOKEN"
PICKLE_KEY_ENV = "MATRIXJOBS_PICKLE_KEY"
PICKLE_KEY_BYTES = 32
# What `--password` / `--access-token` hold when given without a value: ask for it.
ASK = "\x00ask"
SECRET_FLAGS = {PASSWORD_ENV: "--password", TOKEN_ENV: "--access-token"}
SECRET_LABELS = {PASSWORD_ENV: "Password", TOKEN_ENV: "Access token"}


class InitUsageError(Exception):
    """A missing or malformed value (exit 2)."""


class FilesExistError(Exception):
    """init would overwrite a file and --force was not given (exit 1)."""


class WriteError(Exception):
    """A file could not be looked at or written (exit 1); nothing was written."""


# -- checks: each returns the value to use or raises ValueError with a message for people --


def text(value: str) -> str:
    """The value stripped; ValueError if it cannot be written as UTF-8 (undecodable bytes
    in a command-line argument or environment variable arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 text") from None
    return value.strip()


def homeserver_url(value: str) -> str:
    return config.homeserver_url(text(value))


def user_id(value: str) -> str:
    value = text(value)
    if not USER_RE.match(value):
        raise ValueError(f"'{value}' is not a Matrix user id like @jobs:example.org")
    return value


def allowed_user(value: str) -> str:
    value = text(value)
    if not USER_RE.match(value):
        raise ValueError(f"'{value}' is not a Matrix user id or glob like @*:example.org")
    return value


def room(value: str) -> str:
    value = text(value)
    if not ROOM_RE.match(value):
        raise ValueError(f"'{value}' is not a room id (!abc:example.org) "
                         "or alias (#ops:example.org)")
    return value


def secret(value: str) -> str:
    if not value or text(value) != value or any(c in value for c in "\r\n\x00"):
        raise ValueError("must be one line without surrounding spaces")
    return value


# -- collecting the answers ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What the command line gave; None / [] where it gave nothing."""

    homeserver: str | None = None
    user_id: str | None = None
    rooms: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    password: str | None = None
    access_token: str | None = None


@dataclass(frozen=True)
class Answers:
    homeserver: str
    user_id: str
    rooms: list[str]
    allowed_users: list[str]
    secrets: dict[str, str]  # env var name -> value


@dataclass(frozen=True)
class Prompts:
    """Where answers come from on a terminal (tests pass their own functions)."""

    ask: Callable[[str], str] = input
    ask_secret: Callable[[str], str] = getpass.getpass
    tell: Callable[[str], None] = lambda text: print(text, file=sys.stderr)


def collect(request: Request, prompts: Prompts | None, environ: Mapping[str, str]) -> Answers:
    """Check what was given and ask for the rest (`prompts` None: never ask)."""
    _check_given(request)  # a typo in a flag is reported before anything is asked
    asker = _Asker(prompts)
    homeserver = asker.one(request.homeserver, "--homeserver", homeserver_url,
                           "Homeserver URL (like https://matrix.example.org): ")
    bot = asker.one(request.user_id, "--user-id", user_id,
                    "The bot's Matrix user id (like @jobs:example.org): ")
    secrets = asker.secrets(request, bot, environ)
    rooms = asker.many(request.rooms, "--room", room, required=False, question=(
        "Rooms the bot joins at start, ids or aliases, space-separated (empty: none; "
        "you can invite it instead): "))
    allowed = asker.many(request.allowed_users, "--allowed-user", allowed_user, required=True,
                         question="Who may run jobs: user ids or globs like @*:example.org, "
                                  "space-separated: ")
    return Answers(homeserver, bot, rooms, allowed, secrets)


def _check_given(request: Request) -> None:
    singles = [(request.homeserver, "--homeserver", homeserver_url),
               (request.user_id, "--user-id", user_id)]
    for value, flag, check in singles:
        if value is not None:
            _checked(check, value, flag)
    for value in request.rooms:
        _checked(room, value, "--room")
    for value in request.allowed_users:
        _checked(allowed_user, value, "--allowed-user")


def _checked(check: Callable[[str], str], value: str, flag: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise InitUsageError(f"{flag}: {exc}") from None


class _Asker:
    def __init__(self, prompts: Prompts | None) -> None:
        self.prompts = prompts

    def _need(self, what: str) -> Prompts:
        if self.prompts is None:
            raise InitUsageError(f"missing {what} (or run on a terminal without --yes to be "
                                 "asked)")
        return self.prompts

    def _ask(self, question: str, check: Callable[[str], str],
             read: Callable[[str], str] | None = None) -> str:
        prompts = self.prompts
        assert prompts is not None
        while True:
            try:
                return check((read or prompts.ask)(question))
            except ValueError as exc:
                prompts.tell(f"  {exc}")

    def one(self, given: str | None, flag: str, check: Callable[[str], str],
            question: str) -> str:
        if given is not None:
            return _checked(check, given, flag)
        self._need(flag)
        return self._ask(question, check)

    def many(self, given: tuple[str, ...], flag: str, check: Callable[[str], str],
             required: bool, question: str) -> list[str]:
        if given:
            return [_checked(check, value, flag) for value in given]
        if self.prompts is None:
            if required:
                self._need(f"{flag} (at least one)")
            return []

        def check_all(answer: str) -> str:
            items = answer.replace(",", " ").split()
            if required and not items:
                raise ValueError("at least one, please")
            return " ".join(check(item) for item in items)

        return self._ask(question, check_all).split()

    def secrets(self, request: Request, bot: str, environ: Mapping[str, str]) -> dict[str, str]:
        if request.password is not None:
            name, given = PASSWORD_ENV, request.password
        elif request.access_token is not None:
            name, given = TOKEN_ENV, request.access_token
        else:
            exported = {n: environ[n] for n in (PASSWORD_ENV, TOKEN_ENV) if environ.get(n)}
            if exported:
                return {n: _checked(secret, v, f"${n}") for n, v in exported.items()}
            self._need("--password or --access-token (the value is asked for, or taken from "
                       f"${PASSWORD_ENV} / ${TOKEN_ENV})")
            kind = self._ask("Log in with a password or an access token? [password/token]: ",
                             _secret_kind)
            name, given = kind, ASK
        flag = SECRET_FLAGS[name]
        if given != ASK:
            return {name: _checked(secret, given, flag)}
        if environ.get(name):
            return {name: _checked(secret, environ[name], f"${name}")}
        prompts = self._need(f"the value of {flag} (asked on a terminal, or ${name})")
        return {name: self._ask(f"{SECRET_LABELS[name]} for {bot}: ", secret,
                                read=prompts.ask_secret)}


def _secret_kind(answer: str) -> str:
    answer = answer.strip().lower()
    if answer in ("", "p", "password"):
        return PASSWORD_ENV
    if answer in ("t", "token", "access token", "access-token"):
        return TOKEN_ENV
    raise ValueError("answer 'password' or 'token'")


def warnings(answers: Answers) -> list[str]:
    parts = urlsplit(answers.homeserver)
    host = parts.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parts.scheme == "http" and not local:
        return [f"{answers.homeserver} is plain http: the bot's password and messages travel "
                "unencrypted; use https://"]
    return []


# -- the files ------------------------------------------------------------------------------


COUNTDOWN = """\
import sys, time
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for step in range(1, steps + 1):
    time.sleep(1)
    print(f"::progress {step}/{steps} {step} s", flush=True)
"""


def render_config(answers: Answers, python: str = sys.executable) -> str:
    rooms = f"rooms = {toml_list(answers.rooms)}" if answers.rooms else "rooms = []"
    return f"""\
# matrixjobs configuration, written by `matrixjobs init`.
# Check everything a deployment needs:  matrixjobs doctor --config THIS_FILE
# config.example.toml in the matrixjobs sources lists every key with its default.
# Relative paths are resolved against the directory of this file.

[matrix]
homeserver = {toml_string(answers.homeserver)}
user_id = {toml_string(answers.user_id)}
# The password or access token is not here: it is in .env beside this file
# (MATRIXJOBS_PASSWORD / MATRIXJOBS_ACCESS_TOKEN); the environment wins over .env.
# Rooms to join at start (ids or aliases); invites from allowed users are accepted too.
{rooms}
# Synapse lets the bot send 0.2 messages/s (burst 10), edits included, so progress
# shows only every few seconds. Once an admin exempted the bot (deploy/README.md):
# rate_per_s = 0

[access]
# Who may start and cancel jobs: exact user ids or globs (like @*:example.org).
allowed_users = {toml_list(answers.allowed_users)}

[store]
# The job queue (SQLite), in a directory of its own: jobs run in this file's
# directory and would see whatever lies beside the store. Under systemd with
# StateDirectory=, a relative path lands in $STATE_DIRECTORY.
path = "state/matrixjobs.db"

[api]
# The HTTP API behind `matrixjobs status` and MCP clients. Any local account can
# reach a loopback port: on a shared machine set MATRIXJOBS_API_TOKEN in .env
# (and export it where you run the CLI).
listen = "127.0.0.1:8765"

# Targets: the only things anyone can run. `command` is an argv list, run without
# a shell, in this file's directory (or `cwd`). Replace these two examples with
# your own builds.
[targets.hello]
description = "Print a greeting: try !build hello"
command = ["echo", "hello from matrixjobs"]

[targets.countdown]
description = "Count N seconds (default 10) with live progress: !build countdown 30"
# A command shows progress by printing lines like "::progress 3/10 message".
command = [{toml_string(python)}, "-c", '''
{COUNTDOWN}''']
# Users may add arguments only where args_pattern allows; each must match it in full.
args_pattern = '[0-9]{{1,3}}'
timeout_s = 1200
"""


def pickle_key(env_file: Path) -> str:
    """The pickle key of the .env being replaced (another key could not open the crypto
    store it encrypts), else a new random one."""
    try:
        kept = dotenv_values(env_file).get(PICKLE_KEY_ENV) if env_file.is_file() else None
    except (OSError, UnicodeDecodeError):
        kept = None  # unreadable: the write fails with its own error
    return kept or secrets.token_urlsafe(PICKLE_KEY_BYTES)


def dotenv_value(value: str) -> str:
    """Single quotes: python-dotenv expands nothing inside them and unescapes only \\\\ and \\'."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_env(answers: Answers) -> str:
    lines = [
        "# Secrets of matrixjobs, written by `matrixjobs init`. Keep this file private (0600).",
        "# The service reads .env beside its config; the real environment wins over it.",
        f"# {PICKLE_KEY_ENV} encrypts the bot's crypto store (its device's keys): back it up",
        "# with the store; the store does not open with another key.",
    ]
    lines += [f"{name}={dotenv_value(value)}" for name, value in answers.secrets.items()]
    lines += [
        "# With a token every API request needs it (export it where you run the CLI too):",
        "# MATRIXJOBS_API_TOKEN='…'",
    ]
    return "\n".join(lines) + "\n"


def refuse_existing(paths: list[Path], force: bool) -> None:
    try:
        existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    except OSError as exc:  # a directory on the way that this user may not search
        raise WriteError(f"cannot look for {exc.filename}: {exc.strerror or exc}") from None
    if existing and not force:
        raise FilesExistError(f"{' and '.join(existing)} already exist"
                              f"{'s' if len(existing) == 1 else ''}; "
                              "use --force to overwrite")


def write_files(files: list[tuple[Path, str, int]]) -> None:
    """Write every (path, text, mode) or none: each goes to a temp file beside its path
    first (so no file appears half written, or with a wider mode), and only when all are
    written are they renamed into place. Raise WriteError naming the path that failed."""
    staged: list[tuple[str, Path]] = []
    path = files[0][0]
    try:
        for path, content, mode in files:
            staged.append((_stage(path, content, mode), path))
        for temp, path in staged:
            os.replace(temp, path)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise WriteError(f"cannot write {path}: {reason}") from None
    finally:
        for temp, _ in staged:
            Path(temp).unlink(missing_ok=True)


def _stage(path: Path, content: str, mode: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return temp


def next_steps(config: Path, env: Path, answers: Answers) -> str:
    secrets = ", ".join(answers.secrets)
    lines = [
        f"wrote {config} (no secrets) and {env} ({secrets}, mode 0600)",
        "next:",
        f"  matrixjobs doctor --config {config}   # homeserver, login, rooms, store, targets",
        f"  matrixjobs run --config {config}      # start the service",
        f"  then invite {answers.user_id} to a room from an allowed user and say !help",
    ]
    if env.resolve() != (config.parent / ".env").resolve():
        lines.insert(1, f"note: the service reads only the .env beside its config: load {env} "
                        "into its environment (systemd: EnvironmentFile=)")
    return "\n".join(lines)
