"""`matrixjobs doctor` against a real Synapse, real files and a real running service."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from matrix_people import Person

from matrixjobs.config import load_config
from matrixjobs.demo.synapse import free_port
from matrixjobs.matrix.settings import SETTING_TOKEN, SETTING_USER
from matrixjobs.ops.doctor import doctor
from matrixjobs.service import build_service
from matrixjobs.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(120)

PASSWORD = "bot-password with 'quotes' and $dollars"
_names = iter(range(10_000))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MATRIXJOBS_") and k not in ("STATE_DIRECTORY", "JOURNAL_STREAM")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_doctor(config: Path, timeout: float = 60, user: str | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "matrixjobs", "doctor", "--config", str(config)],
        cwd=config.parent, env=child_env(**env), capture_output=True, text=True,
        timeout=timeout, check=False, user=user)


def doctor_lines(config: Path, **env: str) -> tuple[bool, list[str]]:
    """Run the doctor in-process; (failed, printed lines)."""
    out = io.StringIO()
    report = doctor(config, environ=env, out=out)
    return report.failed, out.getvalue().splitlines()


def line(lines: list[str], start: str) -> str:
    found = [text for text in lines if text[2:].startswith(start)]
    assert len(found) == 1, f"expected one line '{start}' in:\n" + "\n".join(lines)
    return found[0]


def quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class Deployment:
    """A bot account, a person allowed to use it, and a config directory for them."""

    def __init__(self, synapse, directory: Path) -> None:
        n = next(_names)
        self.synapse = synapse
        self.directory = directory
        self.bot_name = f"docbot{n}"
        bot = synapse.register(self.bot_name, password=PASSWORD)
        self.bot = Person(synapse, bot["user_id"], bot["access_token"])
        self.alice = Person.register(synapse, f"docalice{n}")

    def room_with_bot(self, joined: bool = True) -> str:
        room = self.alice.create_room([self.bot.user_id])
        if joined:
            self.bot.join(room)
        return room

    def write(self, rooms: list[str] = (), password: str | None = PASSWORD,
              homeserver: str | None = None, store: str = "state/matrixjobs.db",
              api: str = "127.0.0.1:0", matrix_extra: str = "") -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "config.toml"
        config.write_text(textwrap.dedent(f"""
            [matrix]
            homeserver = {json.dumps(homeserver or self.synapse.base_url)}
            user_id = {json.dumps(self.bot.user_id)}
            rooms = {json.dumps(list(rooms))}
            {matrix_extra}

            [access]
            allowed_users = [{json.dumps(self.alice.user_id)}]

            [store]
            path = {json.dumps(store)}

            [api]
            listen = {json.dumps(api)}

            [targets.hello]
            command = ["echo", "hello"]
        """), encoding="utf-8")
        env = self.directory / ".env"
        env.unlink(missing_ok=True)
        if password is not None:
            quoted = password.replace("\\", "\\\\").replace("'", "\\'")
            env.write_text(f"MATRIXJOBS_PASSWORD='{quoted}'\n", encoding="utf-8")
        return config

    def devices(self) -> list[str]:
        answer = self.bot.call("GET", "/_matrix/client/v3/devices")
        return sorted(device["device_id"] for device in answer["devices"])


@pytest.fixture
def deployment(synapse, tmp_path) -> Deployment:
    return Deployment(synapse, tmp_path / "deploy")


# -- the whole thing ------------------------------------------------------------------------


def test_good_deployment_passes_every_check(deployment, synapse):
    room = deployment.room_with_bot()
    alias = f"#doctor{next(_names)}:{synapse.server_name}"
    deployment.alice.call("PUT", f"/_matrix/client/v3/directory/room/{quote(alias)}",
                          {"room_id": room})
    synapse.exempt_from_rate_limit(deployment.bot.user_id)
    config = deployment.write(rooms=[room, alias], api=f"127.0.0.1:{free_port()}",
                              matrix_extra="rate_per_s = 0")

    result = run_doctor(config, MATRIXJOBS_ADMIN_TOKEN=synapse.admin["access_token"])

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not any(text.startswith("✗") for text in lines), result.stdout
    for check in ("config", "store", "target hello", "api", "homeserver", "login",
                  f"room {room}", f"room {alias} ({room})", "rate limit"):
        assert line(lines, check + ":").startswith("✓"), result.stdout
    assert "password works" in line(lines, "login:")
    assert "is free" in line(lines, "api:")
    assert "exempt" in line(lines, "rate limit:")
    assert PASSWORD not in result.stdout + result.stderr
    assert result.stderr == ""
    assert not (config.parent / "state").exists(), "the doctor must not create the store"


def test_rate_limit_without_exemption_says_what_it_means(deployment, synapse):
    config = deployment.write()
    failed, lines = doctor_lines(config)
    assert "exemption unknown" in line(lines, "rate limit:")
    assert "0.2 messages/s" in line(lines, "rate limit:")
    assert line(lines, "rate limit:").startswith("!")

    failed, lines = doctor_lines(config, MATRIXJOBS_ADMIN_TOKEN=synapse.admin["access_token"])
    text = line(lines, "rate limit:")
    assert text.startswith("!") and "not exempt" in text and "final states still arrive" in text

    failed, lines = doctor_lines(config, MATRIXJOBS_ADMIN_TOKEN=deployment.alice.token)
    text = line(lines, "rate limit:")
    assert text.startswith("!") and "unknown" in text and "refused" in text
    assert not failed, "\n".join(lines)


# -- what must fail ---------------------------------------------------------------------------


def test_wrong_password_fails_login(deployment):
    config = deployment.write(password="not the password")
    failed, lines = doctor_lines(config)
    assert failed
    text = line(lines, "login:")
    assert text.startswith("✗") and "M_FORBIDDEN" in text
    assert "not the password" not in "\n".join(lines)


def test_no_credentials_at_all_fails_login(deployment):
    config = deployment.write(password=None)
    failed, lines = doctor_lines(config)
    assert failed
    assert "MATRIXJOBS_PASSWORD" in line(lines, "login:")


def test_unreachable_homeserver_fails_quickly_without_a_traceback(deployment):
    config = deployment.write(homeserver=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = run_doctor(config)
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    text = line(result.stdout.splitlines(), "homeserver:")
    assert text.startswith("✗") and "cannot reach" in text
    assert "login" not in result.stdout.replace(text, "")
    assert "Traceback" not in result.stdout + result.stderr


def test_rooms_the_bot_is_not_in_fail_and_invites_are_shown(deployment):
    joined = deployment.room_with_bot()
    invited = deployment.room_with_bot(joined=False)
    elsewhere = deployment.alice.create_room([])
    missing_alias = f"#nowhere{next(_names)}:{deployment.synapse.server_name}"
    config = deployment.write(rooms=[joined, invited, elsewhere, missing_alias])

    failed, lines = doctor_lines(config)

    assert failed
    assert line(lines, f"room {joined}:").startswith("✓")
    text = line(lines, f"room {invited}:")
    assert text.startswith("!") and deployment.alice.user_id in text
    assert line(lines, f"room {elsewhere}:").startswith("✗")
    assert "no such alias" in line(lines, f"room {missing_alias}:")


def test_missing_executable_and_cwd_fail(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent("""
        [api]
        enabled = false
        [targets.ghost]
        command = ["no-such-program-anywhere", "x"]
        [targets.relative]
        command = ["./build.sh"]
        [targets.lost]
        command = ["echo"]
        cwd = "nowhere"
        [targets.fine]
        command = ["./build.sh"]
        cwd = "project"
    """), encoding="utf-8")
    (tmp_path / "project").mkdir()
    script = tmp_path / "project" / "build.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)

    failed, lines = doctor_lines(config)

    assert failed
    assert "not found on PATH" in line(lines, "target ghost:")
    assert line(lines, "target relative:").startswith("✗")
    assert "not a directory" in line(lines, "target lost:")
    assert line(lines, "target fine:") == f"✓ target fine: runs {script} in {script.parent}"
    assert line(lines, "matrix:").startswith("✓")  # off: no [matrix] section


def doctor_as_nobody(config: Path) -> tuple[bool, list[str]]:
    """The doctor in a forked child that runs as nobody (root could write anywhere)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            failed, lines = doctor_lines(config)
            os.write(write, "\n".join(lines).encode())
            code = int(failed)
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 1), output
    return os.waitstatus_to_exitcode(status) == 1, output.splitlines()


def test_store_in_a_read_only_directory_fails(tmp_path):
    as_root = os.geteuid() == 0
    # nobody must be able to reach the config: pytest's own tmp dirs are private to root.
    base = Path(tempfile.mkdtemp(prefix="doctor-ro-")) if as_root else tmp_path
    try:
        base.chmod(0o755)
        readonly = base / "readonly"
        readonly.mkdir()
        config = base / "config.toml"
        config.write_text('[store]\npath = "readonly/matrixjobs.db"\n[api]\nenabled = false\n',
                          encoding="utf-8")
        readonly.chmod(0o555)
        failed, lines = doctor_as_nobody(config) if as_root else doctor_lines(config)
        assert failed, "\n".join(lines)
        text = line(lines, "store:")
        assert text.startswith("✗") and f"cannot write in {readonly}" in text
    finally:
        if as_root:
            shutil.rmtree(base)


def test_unreadable_store_file_fails(tmp_path):
    (tmp_path / "matrixjobs.db").write_text("this is not a database")
    config = tmp_path / "config.toml"
    config.write_text('[api]\nenabled = false\n', encoding="utf-8")
    failed, lines = doctor_lines(config)
    assert failed
    assert "not a database" in line(lines, "store:")


def test_busy_api_port_fails(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\n', encoding="utf-8")
        # Something accepts connections but never answers HTTP.
        failed, lines = doctor_lines(config)
    assert failed
    assert line(lines, "api:").startswith("✗")


def test_bad_config_is_one_short_failure(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[queue]\nworkers = "four"\n', encoding="utf-8")
    result = run_doctor(config)
    assert result.returncode == 1
    assert result.stdout.startswith("✗ config:")
    assert "queue.workers" in result.stdout and "Traceback" not in result.stderr


# -- no side effects --------------------------------------------------------------------------


def test_password_check_leaves_no_device_behind(deployment):
    config = deployment.write()
    before = deployment.devices()
    failed, lines = doctor_lines(config)
    assert not failed, "\n".join(lines)
    assert "password works" in line(lines, "login:")
    assert deployment.devices() == before


async def test_doctor_works_while_the_service_holds_the_store(deployment):
    room = await asyncio.to_thread(deployment.room_with_bot)
    config_path = deployment.write(rooms=[room], api=f"127.0.0.1:{free_port()}")
    app = build_service(load_config(config_path, environ={}))
    await app.start()
    try:
        bot = app.components[0]
        await asyncio.wait_for(bot.synced.wait(), 30)
        devices = await asyncio.to_thread(deployment.devices)

        result = await asyncio.to_thread(run_doctor, config_path)

        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert f"pid {os.getpid()}" in line(lines, "store:")
        assert "saved in its store" in line(lines, "login:")
        assert "running matrixjobs service" in line(lines, "api:")
        assert line(lines, f"room {room}:").startswith("✓")
        assert await asyncio.to_thread(deployment.devices) == devices
        assert await app.store.get_setting("matrix.device_id")  # the store still works
    finally:
        await app.stop()
    _, lines = await asyncio.to_thread(doctor_lines, config_path)
    assert "pid" not in line(lines, "store:")  # the lock is free again
    assert "is free" in line(lines, "api:")


def test_refused_access_token_falls_back_to_the_password(deployment):
    config = deployment.write()
    failed, lines = doctor_lines(config, MATRIXJOBS_ACCESS_TOKEN="syt_revoked_long_ago")
    assert not failed, "\n".join(lines)
    text = line(lines, "login:")
    assert text.startswith("!") and "configured access token was refused" in text
    assert "syt_revoked_long_ago" not in "\n".join(lines)


def test_unix_socket_api_is_checked_without_creating_it(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[api]\nlisten = "unix:run/api.sock"\n', encoding="utf-8")
    (tmp_path / "run").mkdir()
    failed, lines = doctor_lines(config)
    assert not failed, "\n".join(lines)
    assert "creates the socket at start" in line(lines, "api:")
    assert list((tmp_path / "run").iterdir()) == []


# -- review findings --------------------------------------------------------------------------


async def save_token(store_path: Path, user_id: str, token: str) -> None:
    """Leave what the service leaves after a password login: its user and token."""
    store = SqliteStore(store_path)
    await store.open()
    try:
        await store.set_setting(SETTING_USER, user_id)
        await store.set_setting(SETTING_TOKEN, token)
    finally:
        await store.close()


def test_refused_configured_token_does_not_fall_back_on_the_saved_token(deployment):
    # The bot tries the token saved in its store only when no access token is configured:
    # with a refused configured token and no password it never logs in, whatever it saved.
    config = deployment.write(password=None)
    asyncio.run(save_token(config.parent / "state" / "matrixjobs.db", deployment.bot.user_id,
                           deployment.bot.token))

    failed, lines = doctor_lines(config, MATRIXJOBS_ACCESS_TOKEN="syt_revoked_long_ago")

    assert failed
    text = line(lines, "login:")
    assert text.startswith("✗") and "configured access token was refused" in text, text
    assert "no password" in text

    failed, lines = doctor_lines(config)  # no configured token: the saved one is used
    assert not failed, "\n".join(lines)
    assert "saved in its store" in line(lines, "login:")


def test_homeserver_url_an_http_client_refuses_is_one_short_failure(deployment):
    # Passes the config's check (IDNA 2003 drops the zero-width joiner); IDNA 2008 refuses.
    config = deployment.write(homeserver="https://matrix\u200d.example.org")
    result = run_doctor(config)
    assert result.returncode == 1
    text = line(result.stdout.splitlines(), "homeserver:")
    assert text.startswith("✗") and "not a valid URL" in text
    assert "Traceback" not in result.stdout + result.stderr


def test_homeserver_url_typo_is_a_config_error(deployment):
    config = deployment.write(homeserver="https://matrix..example.org")
    result = run_doctor(config)
    assert result.returncode == 1
    assert result.stdout.startswith("✗ config:") and "not a valid URL" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


class FakeServer:
    """An HTTP server on a free port answering each path with fixed bytes, for answers no
    real Synapse gives: not UTF-8, not the expected JSON shape."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        answers_by_path = answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = answers_by_path.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body or b'{"errcode": "M_UNRECOGNIZED"}')

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fake_homeserver_config(tmp_path: Path, homeserver: str, api: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [matrix]
        homeserver = "{homeserver}"
        user_id = "@bot:fake"
        rooms = ["!room:fake"]
        [api]
        {f'listen = "{api}"' if api else "enabled = false"}
    """), encoding="utf-8")
    return config


@pytest.mark.parametrize("versions", [b'{"versions": ["\xff"]}', b'{"versions": 5}',
                                      b'{"versions": [5]}'])
def test_odd_versions_answer_is_not_a_homeserver(tmp_path, versions):
    with FakeServer({"/_matrix/client/versions": versions}) as fake:
        config = fake_homeserver_config(tmp_path, fake.url)
        failed, lines = doctor_lines(config, MATRIXJOBS_ACCESS_TOKEN="t")
    assert failed
    assert "is not a Matrix client-server API" in line(lines, "homeserver:")


def test_odd_joined_rooms_answer_fails_the_rooms_check(tmp_path):
    with FakeServer({
        "/_matrix/client/versions": b'{"versions": ["v1.11"]}',
        "/_matrix/client/v3/account/whoami": b'{"user_id": "@bot:fake"}',
        "/_matrix/client/v3/joined_rooms": b'{"joined_rooms": [{"room": 1}]}',
    }) as fake:
        config = fake_homeserver_config(tmp_path, fake.url)
        failed, lines = doctor_lines(config, MATRIXJOBS_ACCESS_TOKEN="t")
    assert failed
    assert line(lines, "login:").startswith("✓")
    text = line(lines, "rooms:")
    assert text.startswith("✗") and "'joined_rooms' is not a list of strings" in text


def test_api_port_answering_with_non_utf8_is_another_program(tmp_path):
    with FakeServer({"/healthz": b'{"status": "ok\xff"}'}) as fake:
        config = tmp_path / "config.toml"
        config.write_text(f'[api]\nlisten = "{fake.address}"\n', encoding="utf-8")
        failed, lines = doctor_lines(config)
    assert failed
    assert "taken by another program" in line(lines, "api:")


def test_store_under_a_directory_nobody_may_search_fails(tmp_path):
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="doctor-nox-")) if as_root else tmp_path
    try:
        base.chmod(0o755)
        locked = base / "locked"
        (locked / "state").mkdir(parents=True)
        config = base / "config.toml"
        config.write_text('[store]\npath = "locked/state/matrixjobs.db"\n'
                          '[api]\nenabled = false\n', encoding="utf-8")
        locked.chmod(0o700 if as_root else 0o600)  # root's, or ours without search (x)
        failed, lines = doctor_as_nobody(config) if as_root else doctor_lines(config)
        assert failed, "\n".join(lines)
        text = line(lines, "store:")
        assert text.startswith("✗") and f"cannot look into {locked}" in text
    finally:
        locked.chmod(0o755)
        if as_root:
            shutil.rmtree(base)


def test_unix_socket_path_too_long_to_bind_fails(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    socket_path = deep / "api.sock"
    assert len(str(socket_path)) > 108
    config = tmp_path / "config.toml"
    config.write_text(f'[api]\nlisten = "unix:{socket_path}"\n', encoding="utf-8")
    failed, lines = doctor_lines(config)
    assert failed
    text = line(lines, "api:")
    assert text.startswith("✗") and "too long" in text
    assert list(deep.iterdir()) == []


def test_public_room_not_joined_yet_is_a_warning(deployment):
    public = deployment.alice.call("POST", "/_matrix/client/v3/createRoom",
                                   {"preset": "public_chat"})["room_id"]
    config = deployment.write(rooms=[public])
    failed, lines = doctor_lines(config)
    assert not failed, "\n".join(lines)
    text = line(lines, f"room {public}:")
    assert text.startswith("!") and "joins it at start" in text
    assert public not in deployment.bot.call("GET", "/_matrix/client/v3/joined_rooms")[
        "joined_rooms"], "the doctor must not join"


def test_unreachable_homeserver_still_reports_missing_credentials(deployment):
    config = deployment.write(homeserver=f"http://127.0.0.1:{free_port()}", password=None)
    failed, lines = doctor_lines(config)
    assert failed
    assert line(lines, "homeserver:").startswith("✗")
    text = line(lines, "login:")
    assert text.startswith("✗") and "no password or access token" in text


def test_non_executable_program_fails_like_the_config_warning(tmp_path):
    (tmp_path / "build.sh").write_text("#!/bin/sh\n")
    (tmp_path / "build.sh").chmod(0o644)
    config = tmp_path / "config.toml"
    config.write_text('[api]\nenabled = false\n[targets.build]\ncommand = ["./build.sh"]\n',
                      encoding="utf-8")
    failed, lines = doctor_lines(config)
    assert failed
    assert "is not executable" in line(lines, "target build:")
    assert not any(text.startswith("! config") for text in lines), "reported twice"
    assert load_config(config, environ={}).warnings() == [
        f"targets.build: '{tmp_path / 'build.sh'}' is not executable"]


# -- private files and the pickle key -----------------------------------------------------------


def unreachable_bot_config(directory: Path) -> Path:
    config = directory / "config.toml"
    config.write_text(textwrap.dedent(f"""
        [matrix]
        homeserver = "http://127.0.0.1:{free_port()}"
        user_id = "@bot:example.org"
        [api]
        enabled = false
    """), encoding="utf-8")
    return config


async def test_store_and_crypto_files_readable_by_others_are_a_warning(tmp_path):
    config = unreachable_bot_config(tmp_path)
    store = SqliteStore(tmp_path / "matrixjobs.db")
    await store.open()
    await store.close()
    crypto_dir = tmp_path / "matrixjobs-crypto"
    crypto_dir.mkdir(mode=0o700)
    (crypto_dir / "@bot:example.org_DEV.db").write_bytes(b"")
    (crypto_dir / "@bot:example.org_DEV.db").chmod(0o600)
    _, lines = doctor_lines(config)
    assert line(lines, "file modes:").startswith("✓"), "\n".join(lines)

    (tmp_path / "matrixjobs.db").chmod(0o644)
    (crypto_dir / "@bot:example.org_DEV.db").chmod(0o640)
    crypto_dir.chmod(0o755)
    _, lines = doctor_lines(config)
    text = line(lines, "file modes:")
    assert text.startswith("!")
    assert f"{tmp_path / 'matrixjobs.db'} (644)" in text and f"{crypto_dir} (755)" in text
    assert f"{crypto_dir / '@bot:example.org_DEV.db'} (640)" in text
    assert "matrixjobs.db.lock" not in text, "the lock file is private"


def test_pickle_key_says_where_it_comes_from(tmp_path):
    config = unreachable_bot_config(tmp_path)
    key_file = tmp_path / "matrixjobs.pickle-key"
    _, lines = doctor_lines(config)
    text = line(lines, "pickle key:")
    assert text.startswith("✓") and f"{key_file} (the bot creates it at its first start)" in text

    _, lines = doctor_lines(config, MATRIXJOBS_PICKLE_KEY="k" * 43)
    assert line(lines, "pickle key:") == ("✓ pickle key: MATRIXJOBS_PICKLE_KEY; back it up "
                                          "with the crypto store")
    key_file.write_text("x" * 43 + "\n")
    _, lines = doctor_lines(config, MATRIXJOBS_PICKLE_KEY="k" * 43)
    text = line(lines, "pickle key:")
    assert text.startswith("!") and f"{key_file} is not used" in text
    assert "k" * 43 not in "\n".join(lines)


def test_a_postgresql_store_is_named_without_its_password(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[store]\nbackend = "postgresql"\nurl = "postgresql://mj@127.0.0.1:1/j"\n'
                      '[api]\nenabled = false\n')
    failed, lines = doctor_lines(config, MATRIXJOBS_DATABASE_URL="postgresql://mj:pw-secret-1@"
                                         "127.0.0.1:1/j")
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/j" in line(lines, "store")
    assert failed and not any("pw-secret-1" in text for text in lines)
