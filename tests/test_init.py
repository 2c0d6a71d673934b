"""`matrixjobs init`: the files it writes, what it refuses, and how it asks."""

from __future__ import annotations

import argparse
import io
import os
import pty
import select
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from containment import needs_bwrap

from matrixjobs.cli import build_parser, main
from matrixjobs.config import load_config
from matrixjobs.ops import init
from matrixjobs.ops.commands import cmd_init
from matrixjobs.ops.doctor import check_containment
from matrixjobs.ops.report import Mark, Report

# Quotes, backslashes, '$' and '#' would each break a naive .env or TOML writer.
PASSWORD = "pa'ss\"wo\\rd $HOME #not-a-comment"
FLAGS = ["--homeserver", "https://matrix.example.org", "--user-id", "@jobs:example.org",
         "--room", "#ops:example.org", "--room", "!abc:example.org",
         "--allowed-user", "@alice:example.org", "--allowed-user", "@*:ops.example.org"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATRIXJOBS_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matrixjobs", *args], cwd=cwd,
                          env=child_env(**env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, check=False)


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["init", *args])


def test_writes_a_config_without_secrets_and_a_private_env(tmp_path):
    result = cli(tmp_path, "init", *FLAGS, "--password", PASSWORD)

    assert result.returncode == 0, result.stderr
    config, env = tmp_path / "config.toml", tmp_path / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert PASSWORD not in config.read_text() and "pa'ss" not in config.read_text()
    assert PASSWORD not in result.stdout + result.stderr
    assert "matrixjobs doctor --config config.toml" in result.stdout
    assert "matrixjobs run --config config.toml" in result.stdout

    loaded = load_config(config, environ={})
    assert loaded.matrix is not None
    assert loaded.matrix.password is not None
    assert loaded.matrix.password.get_secret_value() == PASSWORD  # read back from .env
    assert loaded.matrix.homeserver == "https://matrix.example.org"
    assert loaded.matrix.rooms == ["#ops:example.org", "!abc:example.org"]
    assert loaded.access.allowed_users == ["@alice:example.org", "@*:ops.example.org"]
    assert loaded.store.path == tmp_path / "state" / "matrixjobs.db"
    assert loaded.warnings() == []
    checked = cli(tmp_path, "check-config", "--config", "config.toml")
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_doctor_finds_nothing_to_warn_of_in_a_fresh_config(tmp_path):
    """The starter config's store has a directory of its own, so its targets' jobs (in
    the config's directory) see nothing beside the store, before its first start too."""
    needs_bwrap()  # without the sandbox nothing is hidden, and nothing is said of it
    assert cli(tmp_path, "init", *FLAGS, "--password", PASSWORD).returncode == 0
    report = Report(io.StringIO())
    check_containment(report, load_config(tmp_path / "config.toml", environ={}))
    warned = [f.text for f in report.findings if f.mark is not Mark.OK]
    assert not [text for text in warned if "store" in text], warned


def test_the_example_targets_run(tmp_path):
    assert cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x").returncode == 0
    targets = load_config(tmp_path / "config.toml", environ={}).targets
    hello = subprocess.run(targets["hello"].command, capture_output=True, text=True,
                           check=True, cwd=targets["hello"].cwd)
    assert hello.stdout.strip() == "hello from matrixjobs"
    countdown = subprocess.run([*targets["countdown"].command, "2"], capture_output=True,
                               text=True, check=True, cwd=targets["countdown"].cwd, timeout=30)
    assert countdown.stdout.splitlines() == ["::progress 1/2 1 s", "::progress 2/2 2 s"]


def test_secret_from_the_environment_and_an_env_file_elsewhere(tmp_path):
    result = cli(tmp_path, "init", "--yes", *FLAGS, "--env-file", "secrets/bot.env",
                 MATRIXJOBS_ACCESS_TOKEN="syt_secret_token")
    assert result.returncode == 0, result.stderr
    env = tmp_path / "secrets" / "bot.env"
    assert "MATRIXJOBS_ACCESS_TOKEN='syt_secret_token'" in env.read_text()
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert not (tmp_path / ".env").exists()
    assert "EnvironmentFile" in result.stdout  # the service would not find it on its own
    assert "syt_secret_token" not in (tmp_path / "config.toml").read_text() + result.stdout


def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "config.toml").write_text("# mine\n")
    (tmp_path / ".env").write_text("MINE=1\n")
    (tmp_path / ".env").chmod(0o644)

    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x")

    assert result.returncode == 1
    assert "already exist" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "config.toml").read_text() == "# mine\n"
    assert (tmp_path / ".env").read_text() == "MINE=1\n"

    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x", "--force")
    assert result.returncode == 0, result.stderr
    assert "[matrix]" in (tmp_path / "config.toml").read_text()
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600


def test_refuses_when_only_the_env_file_exists(tmp_path):
    (tmp_path / ".env").write_text("MINE=1\n")
    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x")
    assert result.returncode == 1
    assert not (tmp_path / "config.toml").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--user-id", "jobs@example.org"], "--user-id: 'jobs@example.org' is not a Matrix user id"),
    (["--homeserver", "matrix.example.org"], "--homeserver: 'matrix.example.org' is not a"),
    (["--room", "ops"], "--room: 'ops' is not a room id"),
    (["--allowed-user", "alice"], "--allowed-user: 'alice' is not a Matrix user id"),
])
def test_bad_values_are_a_short_usage_error(tmp_path, flags, message, capsys):
    config = str(tmp_path / "config.toml")
    assert main(["init", "--config", config, "--yes", *FLAGS, *flags, "--password", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "config.toml").exists() and not (tmp_path / ".env").exists()


def test_missing_values_without_a_terminal_are_a_usage_error(tmp_path):
    result = cli(tmp_path, "init", "--homeserver", "https://matrix.example.org")
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing --user-id")
    result = cli(tmp_path, "init", *FLAGS)
    assert result.returncode == 2 and "--password or --access-token" in result.stderr
    result = cli(tmp_path, "init", *FLAGS, "--password")  # asked for, but nobody to ask
    assert result.returncode == 2 and "MATRIXJOBS_PASSWORD" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_asks_for_what_is_missing_and_asks_again_after_a_bad_answer(tmp_path, capsys):
    answers = iter(["matrix.example.org", "https://matrix.example.org/", "jobs",
                    "@jobs:example.org", "", "#ops:example.org, ops", "#ops:example.org",
                    "", "@alice:example.org @*:example.org"])
    asked: list[str] = []
    secrets = iter(["", "hunter2"])

    def ask(question: str) -> str:
        asked.append(question)
        return next(answers)

    prompts = init.Prompts(ask=ask, ask_secret=lambda question: next(secrets))
    code = cmd_init(parse("--config", str(tmp_path / "config.toml")), prompts)

    assert code == 0, capsys.readouterr().err
    loaded = load_config(tmp_path / "config.toml", environ={})
    assert loaded.matrix is not None and loaded.matrix.password is not None
    assert loaded.matrix.password.get_secret_value() == "hunter2"
    assert loaded.matrix.homeserver == "https://matrix.example.org"
    assert loaded.matrix.rooms == ["#ops:example.org"]
    assert loaded.access.allowed_users == ["@alice:example.org", "@*:example.org"]
    err = capsys.readouterr().err
    assert "is not an http(s) URL" in err and "'jobs' is not a Matrix user id" in err
    assert "'ops' is not a room id" in err and "at least one" in err
    assert len(asked) == 9  # every bad answer was asked again


def test_flags_are_not_asked_again(tmp_path):
    def never(question: str) -> str:
        raise AssertionError(f"asked {question!r}")

    prompts = init.Prompts(ask=never, ask_secret=lambda question: "s3cret")
    code = cmd_init(parse("--config", str(tmp_path / "config.toml"), *FLAGS, "--password"),
                    prompts)
    assert code == 0
    assert "MATRIXJOBS_PASSWORD='s3cret'" in (tmp_path / ".env").read_text()


def test_values_in_toml_and_env_survive_odd_characters(tmp_path):
    answers = init.Answers(
        homeserver="https://matrix.example.org", user_id="@jobs\x7f\"\\:example.org",
        rooms=["#ops\u00e9\U0001f600:example.org"], allowed_users=["@a:example.org"],
        secrets={"MATRIXJOBS_PASSWORD": PASSWORD, "MATRIXJOBS_ACCESS_TOKEN": "t'\\'"})
    parsed = tomllib.loads(init.render_config(answers, python="/opt/py\"thon"))
    assert parsed["matrix"]["user_id"] == answers.user_id
    assert parsed["matrix"]["rooms"] == answers.rooms
    assert parsed["targets"]["countdown"]["command"][0] == "/opt/py\"thon"
    (tmp_path / ".env").write_text(init.render_env(answers))
    (tmp_path / "config.toml").write_text(init.render_config(answers))
    loaded = load_config(tmp_path / "config.toml", environ={})
    assert loaded.matrix is not None
    assert loaded.matrix.password.get_secret_value() == PASSWORD  # type: ignore[union-attr]
    assert loaded.matrix.access_token.get_secret_value() == "t'\\'"  # type: ignore[union-attr]


def test_interactive_run_on_a_real_terminal(tmp_path):
    """The CLI on a pty: it notices the terminal, asks, and reads the password without echo."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "matrixjobs", "init", "--allowed-user", "@alice:example.org"],
        cwd=tmp_path, env=child_env(), stdin=terminal, stdout=terminal, stderr=terminal,
        start_new_session=True, close_fds=True,
        # getpass reads /dev/tty: make the pty the child's controlling terminal.
        preexec_fn=lambda: __import__("fcntl").ioctl(0, __import__("termios").TIOCSCTTY, 0))
    os.close(terminal)
    screen = Screen(controller)
    try:
        screen.answer("Homeserver URL", "https://matrix.example.org")
        screen.answer("user id", "@jobs:example.org")
        screen.answer("password or an access token", "password")
        screen.answer("Password for @jobs:example.org", "typed-secret")
        screen.answer("Rooms the bot joins", "")
        assert process.wait(timeout=30) == 0, screen.transcript
        screen.drain()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    assert "https://matrix.example.org" in screen.transcript  # answers are echoed...
    assert "typed-secret" not in screen.transcript  # ...but not the password (getpass)
    assert "MATRIXJOBS_PASSWORD='typed-secret'" in (tmp_path / ".env").read_text()
    assert "matrixjobs doctor" in screen.transcript


class Screen:
    """A terminal's output: `transcript` all of it, `text` what came after the last prompt."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.transcript = ""
        self.text = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096).decode(errors="replace")
        except OSError:  # EIO: the child is gone
            return False
        self.transcript += chunk
        self.text += chunk
        return bool(chunk)

    def wait_for(self, prompt: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while prompt not in self.text:
            assert time.monotonic() < deadline, f"no prompt {prompt!r} in {self.transcript!r}"
            assert self._read(0.5), f"the child ended before asking {prompt!r}"

    def answer(self, prompt: str, text: str) -> None:
        self.wait_for(prompt)
        self.text = self.text.split(prompt, 1)[1]
        os.write(self.fd, text.encode() + b"\n")

    def drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass


# -- bad bytes and failed writes ------------------------------------------------------------


def cli_bytes(cwd: Path, *args: bytes, **env: bytes) -> subprocess.CompletedProcess[str]:
    """The CLI with raw argv bytes, as a shell passes $'\\xff' (not UTF-8)."""
    environ = {k.encode(): v.encode() for k, v in child_env().items()}
    environ.update({k.encode(): v for k, v in env.items()})
    return subprocess.run([sys.executable.encode(), b"-m", b"matrixjobs", *args], cwd=cwd,
                          env=environ, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "env", "message"), [
    ([b"--user-id", b"@b\xff:example.org", b"--password", b"x"], {}, "--user-id: not valid"),
    ([b"--user-id", b"@b:example.org", b"--password", b"p\xffw"], {}, "--password: not valid"),
    ([b"--user-id", b"@b:example.org"], {"MATRIXJOBS_PASSWORD": b"p\xffw"},
     "$MATRIXJOBS_PASSWORD: not valid"),
])
def test_values_that_are_not_utf8_are_a_usage_error(tmp_path, args, env, message):
    result = cli_bytes(tmp_path, b"init", b"--yes", b"--homeserver", b"https://example.org",
                       b"--allowed-user", b"@alice:example.org", *args, **env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {message} UTF-8 text"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_failed_config_write_leaves_no_env_behind(tmp_path):
    (tmp_path / "afile").write_text("in the way\n")
    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x",
                 "--config", "afile/config.toml", "--env-file", ".env")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot write afile/config.toml:"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_failed_write_names_the_file_not_its_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()
    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x", "--force",
                 "--config", "taken", "--env-file", "secrets.env")
    assert result.returncode == 1
    assert result.stderr == "error: cannot write taken: Is a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no .env, no temp files


def test_config_under_a_directory_nobody_may_search_is_a_short_error(tmp_path):
    as_root = os.geteuid() == 0
    locked = tmp_path / "locked"
    (locked / "conf").mkdir(parents=True)
    locked.chmod(0o700 if as_root else 0o600)  # root's, or ours without search (x)
    args = parse("--yes", *FLAGS, "--password", "x", "--config", str(locked / "conf/c.toml"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read)
            if as_root:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            sys.stderr = open(write, "w", encoding="utf-8")  # noqa: SIM115 - closed by _exit
            code = cmd_init(args)
            sys.stderr.flush()
        finally:
            os._exit(locals().get("code", 99))
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    locked.chmod(0o755)
    assert os.waitstatus_to_exitcode(status) == 1, err
    assert err == f"error: cannot look for {locked / 'conf/c.toml'}: Permission denied\n"


def test_the_env_gets_a_random_pickle_key_that_force_keeps(tmp_path):
    assert cli(tmp_path, "init", "--yes", *FLAGS, "--password", "x").returncode == 0
    key = load_config(tmp_path / "config.toml", environ={}).matrix.pickle_key
    assert key is not None and len(key.get_secret_value()) >= 40

    (tmp_path / "other").mkdir()
    assert cli(tmp_path / "other", "init", "--yes", *FLAGS, "--password", "x").returncode == 0
    other = load_config(tmp_path / "other" / "config.toml", environ={}).matrix.pickle_key
    assert other is not None and other.get_secret_value() != key.get_secret_value()

    result = cli(tmp_path, "init", "--yes", *FLAGS, "--password", "y", "--force")
    assert result.returncode == 0, result.stderr
    again = load_config(tmp_path / "config.toml", environ={}).matrix
    assert again.password.get_secret_value() == "y"
    assert again.pickle_key.get_secret_value() == key.get_secret_value(), "the store's key"
    assert key.get_secret_value() not in result.stdout + result.stderr
