"""POST /hooks/NAME against the real service over HTTP: signed deliveries of each forge,
payloads as the forges document them (tests/data/webhooks/), the secret from the
environment. Pushes start the target with the expanded args as `webhook:NAME`; everything
else answers with why nothing ran, and runs nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from helpers import final_state, python_target, state_dir
from matrix_people import Person, bot_messages
from service_process import Service
from webhook_deliveries import SECRET, SHA, fixture, headers, payload

from matrixjobs.app import App
from matrixjobs.audit import AuditQuery
from matrixjobs.config import load_config, toml_list, toml_string
from matrixjobs.errors import ConfigError
from matrixjobs.models import Status

ENV = {"MATRIXJOBS_WEBHOOK_SITE_SECRET": SECRET}
# The target prints its arguments: the test reads them back from the job's log.
ECHO = python_target("import sys; print('args:', sys.argv[1:])", args_pattern=r"[\w./-]+")
PUSH_FIXTURE = {"github": "github_push", "forgejo": "forgejo_push", "gitea": "gitea_push",
                "gitlab": "gitlab_push", "generic": "generic_push"}
PUSH_EVENT = {"github": "push", "forgejo": "push", "gitea": "push", "gitlab": "Push Hook",
              "generic": "push"}
REPO = {"github": "example/site", "forgejo": "example/site", "gitea": "example/site",
        "gitlab": "example/site", "generic": "example/site"}


def toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML of {"section.name": {key: str | int | list[str]}}."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        for key, value in keys.items():
            if isinstance(value, list):
                lines.append(f"{key} = {toml_list(value)}")
            elif isinstance(value, str):
                lines.append(f"{key} = {toml_string(value)}")
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, hook: dict[str, Any], targets: dict[str, Any] | None = None,
                 api: dict[str, Any] | None = None, **more: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "store": {"path": str(state_dir(tmp_path) / "matrixjobs.db")},
        "progress": {"interval_ms": 50}, "api": {"listen": "127.0.0.1:0", **(api or {})},
        **more}
    for name, target in (targets or {"deploy": ECHO}).items():
        sections[f"targets.{name}"] = target
    sections["webhooks.site"] = hook
    path = tmp_path / "config.toml"
    path.write_text(toml(sections), encoding="utf-8")
    return path


Start = Callable[..., Any]


@pytest.fixture
def hook_service(tmp_path: Path, api_service: Start) -> Start:
    """Factory: `app, client = await hook_service(hook={...}, targets=…, api=…)`: the
    service from a config file and ENV, and an HTTP client without any token."""
    count = itertools.count()

    async def start(hook: dict[str, Any], **more: Any) -> tuple[App, httpx2.AsyncClient]:
        directory = tmp_path / f"s{next(count)}"
        directory.mkdir()
        path = write_config(directory, hook, **more)
        return await api_service(config=load_config(path, ENV))

    return start


async def deliver(client: httpx2.AsyncClient, provider: str, name: str, event: str,
                  **extra: Any) -> httpx2.Response:
    body = payload(name)
    return await client.post("/hooks/site", content=body,
                             headers=headers(provider, event, body, **extra))


async def job_args(app: App, job_id: str) -> str:
    await final_state(app, job_id)
    log = await app.log(job_id)
    match = re.search(r"args: (.*)", log)
    assert match is not None, log
    return match[1]


@pytest.mark.parametrize("provider", list(PUSH_FIXTURE))
async def test_each_forges_push_runs_the_target_with_the_expanded_args(
        provider: str, hook_service: Start) -> None:
    app, client = await hook_service({
        "provider": provider, "target": "deploy", "branches": ["main", "release/*"],
        "args": ["{branch}", "{short_sha}", "{repo}", "{pusher}", "{ref}"]})
    answer = await deliver(client, provider, PUSH_FIXTURE[provider], PUSH_EVENT[provider])
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["requester"]) == ("pending", "webhook:site")
    # GitLab's event is its payload's object_kind, "push", as the others name it.
    assert job["trigger"] == {"webhook": "site", "event": "push", "ref": "refs/heads/main",
                              "branch": "main", "sha": SHA, "pusher": "alice",
                              "repo": REPO[provider]}
    assert await job_args(app, job["id"]) == str(
        ["main", SHA[:7], "example/site", "alice", "refs/heads/main"])
    assert (await final_state(app, job["id"])).status is Status.COMPLETED


async def test_the_audit_log_records_the_start_as_the_webhook(hook_service: Start) -> None:
    app, client = await hook_service({"provider": "github", "target": "deploy",
                                      "args": ["{branch}"]})
    job = (await deliver(client, "github", "github_push", "push")).json()
    [record] = await app.audit(AuditQuery(user="webhook:site"))
    assert (record.action, record.via, record.subject, record.target) == (
        "started", "webhook", job["id"], "deploy")
    assert json.loads(record.detail) == {"args": ["main"], "ref": "refs/heads/main",
                                         "sha": SHA}


async def test_a_batch_webhook_starts_the_batch(hook_service: Start) -> None:
    app, client = await hook_service(
        {"provider": "forgejo", "batch": ["lint", "deploy"]},
        targets={"lint": python_target("print('lint')"), "deploy": ECHO})
    answer = await deliver(client, "forgejo", "forgejo_push", "push")
    assert answer.status_code == 201, answer.text
    batch = answer.json()
    assert answer.headers["location"] == f"/v1/batches/{batch['id']}"
    assert (batch["type"], batch["requester"]) == ("batch", "webhook:site")
    assert (await final_state(app, batch["id"])).status is Status.COMPLETED


@pytest.mark.parametrize("provider", ["github", "forgejo", "gitea", "gitlab", "generic"])
async def test_a_wrong_or_missing_signature_is_refused_and_runs_nothing(
        provider: str, hook_service: Start) -> None:
    app, client = await hook_service({"provider": provider, "target": "deploy"})
    body = payload(PUSH_FIXTURE[provider])
    wrong = headers(provider, PUSH_EVENT[provider], body, secret="not-" + SECRET)
    unsigned = {k: v for k, v in headers(provider, PUSH_EVENT[provider], body).items()
                if "signature" not in k.lower() and "token" not in k.lower()}
    tried = [(wrong, body), (unsigned, body)]
    if provider != "gitlab":  # GitLab signs no body: its token only says who sent it
        tried.append((headers(provider, PUSH_EVENT[provider], body),
                      body.replace(b"alice", b"mallory")))
    for sent, content in tried:
        answer = await client.post("/hooks/site", content=content, headers=sent)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "bad_signature"
        assert "MATRIXJOBS_WEBHOOK_SITE_SECRET" in answer.json()["error"]["message"]
    assert await app.jobs(limit=10) == []


async def test_a_body_over_one_mib_is_refused_whatever_content_length_says(
        hook_service: Start) -> None:
    app, client = await hook_service({"provider": "github", "target": "deploy"})
    big = json.dumps({**fixture("github_push"), "padding": "x" * (1024 * 1024)}).encode()
    sent = headers("github", "push", big)
    answer = await client.post("/hooks/site", content=big, headers=sent)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    answer = await client.post("/hooks/site", content=chunks(), headers=sent)
    assert answer.status_code == 413
    assert await app.jobs(limit=10) == []


async def test_a_redelivery_answers_with_the_job_the_first_one_started(
        database_url: str | None, hook_service: Start) -> None:
    # database_url first: its database is dropped after the service has stopped.
    store = {} if database_url is None else {"store": {
        "backend": "postgresql", "url": database_url, "path": "matrixjobs.db"}}
    app, client = await hook_service({"provider": "github", "target": "deploy"}, **store)
    first = await deliver(client, "github", "github_push", "push", delivery="d-42")
    again = await deliver(client, "github", "github_push", "push", delivery="d-42")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = await deliver(client, "github", "github_push", "push", delivery="d-43")
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert len(await app.jobs(limit=10)) == 2


async def test_an_event_not_in_events_is_acknowledged_and_ignored(hook_service: Start) -> None:
    app, client = await hook_service({"provider": "github", "target": "deploy"})
    answer = await deliver(client, "github", "github_issues", "issues")
    assert answer.status_code == 202
    assert answer.json() == {"outcome": "ignored",
                             "message": "ignored: event 'issues' is not in events (push)"}
    assert await app.jobs(limit=10) == []


async def test_a_branch_matching_none_of_the_globs_is_ignored_with_the_reason(
        hook_service: Start) -> None:
    app, client = await hook_service({"provider": "github", "target": "deploy",
                                      "branches": ["main", "release/*"]})
    answer = await deliver(client, "github", "github_push_feature", "push")
    assert answer.status_code == 202
    assert answer.json()["message"] == ("ignored: branch 'feature/x' matches none of main, "
                                        "release/*")
    tag = await deliver(client, "github", "github_tag_push", "push")
    assert (tag.status_code, tag.json()["message"]) == (
        202, "ignored: tag 'v1.2': this webhook takes branches only")
    gone = await deliver(client, "github", "github_delete", "push")
    assert (gone.status_code, gone.json()["message"]) == (
        202, "ignored: the push deleted branch 'old'")
    assert await app.jobs(limit=10) == []


@pytest.mark.parametrize(("provider", "name", "event"), [
    ("github", "github_tag_push", "push"), ("gitlab", "gitlab_tag_push", "Tag Push Hook")])
async def test_a_tag_filter_runs_matching_tags_only(provider: str, name: str, event: str,
                                                    hook_service: Start) -> None:
    app, client = await hook_service({"provider": provider, "target": "deploy",
                                      "tags": ["v*"], "args": ["{tag}", "{sha}"]})
    answer = await deliver(client, provider, name, event)
    assert answer.status_code == 201, answer.text
    trigger = answer.json()["trigger"]
    # The commit the tag points to, not an annotated tag's own object.
    assert (trigger["tag"], trigger["sha"], trigger.get("branch")) == ("v1.2", SHA, None)
    assert await job_args(app, answer.json()["id"]) == str(["v1.2", SHA])
    branch = await deliver(client, provider, PUSH_FIXTURE[provider], PUSH_EVENT[provider])
    assert (branch.status_code, branch.json()["message"]) == (
        202, "ignored: branch 'main': this webhook takes tags only")


async def test_a_ping_is_answered_and_runs_nothing(hook_service: Start) -> None:
    app, client = await hook_service({"provider": "github", "target": "deploy"})
    answer = await deliver(client, "github", "github_ping", "ping")
    assert answer.status_code == 200
    assert answer.json() == {"outcome": "pong",
                             "message": "pong: webhook site is ready; on push it starts deploy"}
    assert await app.jobs(limit=10) == []


async def test_args_the_target_does_not_allow_run_nothing_and_say_why(
        hook_service: Start) -> None:
    app, client = await hook_service(
        {"provider": "github", "target": "deploy", "args": ["{pusher}"]},
        targets={"deploy": {**ECHO, "args_pattern": "[a-z]{1,3}"}})
    answer = await deliver(client, "github", "github_push", "push")
    assert (answer.status_code, answer.json()["error"]["code"]) == (422, "bad_arguments")
    assert await app.jobs(limit=10) == []


async def test_past_max_per_minute_deliveries_get_429_with_retry_after(
        hook_service: Start) -> None:
    _, client = await hook_service({"provider": "github", "target": "deploy",
                                    "max_per_minute": 2})
    answers = [await deliver(client, "github", "github_issues", "issues") for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 429]
    assert answers[2].json()["error"]["code"] == "rate_limited"
    assert 1 <= int(answers[2].headers["retry-after"]) <= 60
    # Unsigned requests count for nothing: they cannot use up the forge's rate.
    body = payload("github_issues")
    unsigned = await client.post("/hooks/site", content=body, headers={"X-GitHub-Event": "x"})
    assert unsigned.status_code == 401


async def test_an_unknown_webhook_is_404(hook_service: Start) -> None:
    _, client = await hook_service({"provider": "github", "target": "deploy"})
    body = payload("github_push")
    answer = await client.post("/hooks/nope", content=body,
                               headers=headers("github", "push", body))
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_webhook")


async def test_deliveries_need_no_token_and_may_come_through_a_proxy(
        hook_service: Start) -> None:
    """The API's token guards everything else; a forge holds none, and reaches the service
    under the proxy's public host name, which the loopback guard would refuse."""
    _, client = await hook_service({"provider": "github", "target": "deploy"},
                                   api={"token": "t" * 32})
    assert (await client.get("/v1/jobs")).status_code == 401
    body = payload("github_push")
    answer = await client.post("/hooks/site", content=body, headers={
        **headers("github", "push", body), "Host": "ci.example.org"})
    assert answer.status_code == 201, answer.text


async def test_metrics_count_deliveries_by_webhook_and_outcome(hook_service: Start) -> None:
    _, client = await hook_service({"provider": "github", "target": "deploy"})
    await deliver(client, "github", "github_push", "push")
    await deliver(client, "github", "github_issues", "issues")
    await deliver(client, "github", "github_push", "push", secret="wrong-" + SECRET)
    text = (await client.get("/metrics")).text
    for outcome, count in (("started", 1), ("ignored", 1), ("bad_signature", 1),
                           ("rate_limited", 0)):
        assert (f'matrixjobs_webhook_deliveries_total{{outcome="{outcome}",webhook="site"}} '
                f"{count}.0") in text


# -- the secret --------------------------------------------------------------------------------


def test_a_secret_in_the_config_file_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"provider": "github", "target": "deploy",
                                   "secret": SECRET})
    with pytest.raises(ConfigError) as refused:
        load_config(path, ENV)
    assert "webhooks.site.secret" in str(refused.value)
    assert "MATRIXJOBS_WEBHOOK_SITE_SECRET" in str(refused.value)
    assert SECRET not in str(refused.value)


def test_a_webhook_without_its_secret_in_the_environment_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"provider": "github", "target": "deploy"})
    with pytest.raises(ConfigError, match="MATRIXJOBS_WEBHOOK_SITE_SECRET"):
        load_config(path, {})
    (tmp_path / ".env").write_text(f"MATRIXJOBS_WEBHOOK_SITE_SECRET={SECRET}\n")
    assert load_config(path, {}).webhook_secret("site") is not None


def test_the_service_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"provider": "github", "target": "deploy"})
    service = Service(tmp_path, path)
    try:
        assert service.process.wait(timeout=30) != 0
        assert "MATRIXJOBS_WEBHOOK_SITE_SECRET" in service.log
    finally:
        service.stop()


def test_the_secret_never_reaches_the_log(tmp_path: Path) -> None:
    """GitLab sends the secret itself in X-Gitlab-Token: the hardest case for a log."""
    path = write_config(tmp_path, {"provider": "gitlab", "target": "deploy",
                                   "args": ["{branch}"]}, api={"listen": "127.0.0.1:0"})
    service = Service(tmp_path, path, env=ENV, extra=("--log-level", "debug"))
    try:
        service.wait_until_started()
        url = re.search(r"API listening on (http://\S+)", service.log)
        assert url is not None, service.log
        body = payload("gitlab_push")
        with httpx2.Client(base_url=url[1], timeout=20) as client:
            for secret in (SECRET, SECRET[:-1], SECRET + "x"):
                client.post("/hooks/site", content=body,
                            headers=headers("gitlab", "Push Hook", body, secret=secret))
            client.post("/hooks/site", content=b"{", headers=headers("gitlab", "Push Hook",
                                                                    b"{"))
            client.post("/hooks/site", content=body, headers=headers("gitlab", "Note Hook",
                                                                     body))
        service.wait_for_log("started j1")
        service.wait_for_log("DEBUG matrixjobs.webhooks.receiver: webhook site: ignored")
    finally:
        service.stop()
    assert SECRET not in service.log and SECRET[:-1] not in service.log


# -- in the room ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_push_posts_its_progress_message_in_the_configured_room(
        synapse: Any, tmp_path: Path, api_service: Start) -> None:
    """With a real Synapse: the bot posts the started job's progress message in the
    webhook's room, saying what started it, and keeps it current until it ends."""
    n = uuid.uuid4().hex[:8]
    bot = synapse.register(f"hookbot{n}", password="bot-password")
    alice = Person.register(synapse, f"hookalice{n}")
    room = await asyncio.to_thread(alice.create_room, [bot["user_id"]])
    path = write_config(
        tmp_path, {"provider": "github", "target": "deploy", "args": ["{branch}"],
                   "room": room},
        matrix={"homeserver": synapse.base_url, "user_id": bot["user_id"], "rate_per_s": 0.0},
        access={"allowed_users": [alice.user_id]})
    app, client = await api_service(config=load_config(
        path, {**ENV, "MATRIXJOBS_PASSWORD": "bot-password"}))
    await app.ready()
    answer = await deliver(client, "github", "github_push", "push")
    assert answer.status_code == 201, answer.text
    await final_state(app, answer.json()["id"])
    deadline = time.monotonic() + 60
    while True:
        events = await asyncio.to_thread(alice.timeline, room)
        messages, strays = bot_messages(events, bot["user_id"])
        assert strays == []
        done = [m for m in messages if m.current.startswith("✅")]
        if done:
            break
        assert time.monotonic() < deadline, [m.current for m in messages]
        await asyncio.sleep(0.3)
    [message] = messages
    assert "🪝 push to main by alice (3f2c1ab)" in message.current.splitlines()
    assert "deploy" in message.current.splitlines()[0]
