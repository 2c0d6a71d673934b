"""`matrixjobs demo`: the real command (real Synapse, bot, jobs) run as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from matrixjobs.cli import main
from matrixjobs.demo.view import RoomView

pytestmark = pytest.mark.timeout(300)

DEMO = [sys.executable, "-m", "matrixjobs", "demo"]
DIRECTORY = re.compile(r"\(in (/\S+matrixjobs-demo-\w+)\)")


def processes_in(directory: str) -> list[str]:
    """Processes (other than us) whose command line or working directory is in `directory`:
    Synapse (its config is there) and the demo's jobs (they run there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone, or not ours to look at
        if directory in cmdline or cwd.startswith(directory):
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        output = path.read_text(encoding="utf-8", errors="replace")
        if text in output:
            return output
        assert proc.poll() is None, f"the demo exited ({proc.returncode}) early:\n{output}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{output}"
        time.sleep(0.2)


def demo_directory(output: str) -> str:
    found = DIRECTORY.search(output)
    assert found, output
    return found.group(1)


def assert_cleaned_up(directory: str) -> None:
    assert not Path(directory).exists()
    assert processes_in(directory) == []


@pytest.fixture
def run_demo(tmp_path):
    """Start `matrixjobs demo ARGS` with its output (stdout and stderr) in a file."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], Path]:
        output = tmp_path / f"demo{len(started)}.out"
        with output.open("wb") as sink:
            proc = subprocess.Popen([*DEMO, *args], stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=tmp_path)
        started.append(proc)
        return proc, output

    yield start
    for proc in started:  # a failed test must not leave a demo (and its Synapse) running
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_until_done_reaches_the_scripted_final_states_and_cleans_up(run_demo):
    proc, output_path = run_demo("--until-done", "--timeout", "200")
    assert proc.wait(240) == 0, output_path.read_text()
    output = output_path.read_text()
    # The room as shown, edits applied: the build's message ended ✅, the failing one ❌
    # with the tail of its output.
    assert re.search(r"matrixjobs +✎ ✅ docs \(j1\) — completed │ 🟩{10} 100%", output), output
    assert re.search(r"✎ ❌ lint \(j\d+\) — failed .*Failed: exit code 1 .*F401", output), output
    assert "!build docs: ✅ (expected ✅)" in output
    assert "!batch api site: ✅ (expected ✅)" in output
    assert "!build lint: ❌ (expected ❌)" in output
    assert "password" not in output  # nothing to log in to once it has exited
    assert_cleaned_up(demo_directory(output))


def test_ctrl_c_while_jobs_run_stops_everything(run_demo):
    signum = signal.SIGINT
    proc, output_path = run_demo()
    output = wait_for_text(output_path, "🔄 docs (j1) — running", proc, timeout=120)
    directory = demo_directory(output)
    assert any("synapse.app.homeserver" in p for p in processes_in(directory))
    proc.send_signal(signum)
    assert proc.wait(60) == 0, output_path.read_text()
    output = output_path.read_text()
    assert f"{signal.Signals(signum).name}: stopping the demo" in output
    assert f"removed {directory}" in output
    assert_cleaned_up(directory)


def test_interactive_demo_prints_how_to_log_in(run_demo):
    proc, output_path = run_demo()
    output = wait_for_text(output_path, "Ctrl-C stops the demo", proc, timeout=150)
    homeserver = re.search(r"homeserver +(http://127\.0\.0\.1:\d+)", output)
    password = re.search(r"password +(\S+)", output)
    api = re.search(r"matrixjobs status --watch --api (http://127\.0\.0\.1:\d+)", output)
    assert homeserver and password and api, output
    assert "user        demo   (@demo:localhost)" in output
    # The printed password logs in, and the printed API answers.
    login = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "demo"},
             "password": password.group(1)}
    request = urllib.request.Request(f"{homeserver.group(1)}/_matrix/client/v3/login",
                                     json.dumps(login).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["user_id"] == "@demo:localhost"
    status = subprocess.run([*DEMO[:-1], "jobs", "--api", api.group(1)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert status.returncode == 0 and "j1 job docs completed" in status.stdout, status
    proc.send_signal(signal.SIGTERM)  # as systemd or `kill` would
    assert proc.wait(60) == 0
    assert_cleaned_up(demo_directory(output))


def test_without_synapse_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr("matrixjobs.demo.synapse.synapse_installed", lambda: False)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == (
        'matrix-synapse is not installed: pip install "matrixjobs[demo]"\n')


def event(event_id, sender, body, **content):
    return {"type": "m.room.message", "event_id": event_id, "sender": sender,
            "origin_server_ts": 1, "content": {"msgtype": "m.notice", "body": body, **content}}


def edit(event_id, sender, target, body):
    return event(event_id, sender, f"* {body}", **{
        "m.new_content": {"msgtype": "m.notice", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target}})


def test_room_view_shows_the_newest_edit_of_the_original_sender_only():
    view = RoomView("!r")
    view.apply(event("$cmd", "@demo:x", "!build docs"))
    view.apply(event("$p", "@bot:x", "🔄 docs", **{
        "m.relates_to": {"m.in_reply_to": {"event_id": "$cmd"}}}))
    view.apply(edit("$e1", "@bot:x", "$p", "🔄 docs 50%"))
    assert view.apply(edit("$e2", "@demo:x", "$p", "hijacked")) is None  # not the sender
    changed = view.apply(edit("$e3", "@bot:x", "$p", "✅ docs"))
    assert changed is not None and changed.edits == 2
    reply = view.reply_to("$cmd")
    assert reply is not None and reply.body == "✅ docs"
    assert [m.event_id for m in view.messages.values()] == ["$cmd", "$p"]
    assert view.apply(event("$p", "@bot:x", "🔄 docs")) is None  # seen before: no reset


def test_room_view_shows_joins_but_not_invites_or_profile_changes():
    view = RoomView("!r")

    def member(event_id, sender, target, membership, before=None):
        return {"type": "m.room.member", "event_id": event_id, "sender": sender,
                "state_key": target, "content": {"membership": membership},
                "unsigned": {"prev_content": {"membership": before}} if before else {}}

    assert view.apply(member("$i", "@demo:x", "@bot:x", "invite")) is None
    assert view.apply(member("$j", "@bot:x", "@bot:x", "join", before="invite")) is not None
    assert view.apply(member("$n", "@bot:x", "@bot:x", "join", before="join")) is None
    assert view.joined("@bot:x") and not view.joined("@demo:x")
