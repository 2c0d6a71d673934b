"""The pure parts of webhooks, table-driven: each forge's signature, what a push starts,
args templates, the rate window, and the config's refusals."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers
from webhook_deliveries import SHA, fixture

from matrixjobs.config import Config, Provider, WebhookConfig, webhook_secret_env
from matrixjobs.errors import BadArgumentsError
from matrixjobs.webhooks.forges import FORGES, BadPayload, Push, delivery_id, hmac_hex
from matrixjobs.webhooks.matching import arguments, event_ignored, push_ignored
from matrixjobs.webhooks.receiver import Window

# GitHub's documented example ("Validating webhook deliveries").
GITHUB_SECRET = b"It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
HEX = GITHUB_SIGNATURE.removeprefix("sha256=")


def hook(**keys: Any) -> WebhookConfig:
    return WebhookConfig.model_validate({"provider": "github", "target": "deploy", **keys})


@pytest.mark.parametrize(("provider", "sent", "valid"), [
    ("github", {"X-Hub-Signature-256": GITHUB_SIGNATURE}, True),
    ("github", {"X-Hub-Signature-256": HEX}, False),  # GitHub always sends the prefix
    ("github", {"X-Hub-Signature": "sha1=" + HEX}, False),  # the old SHA-1 one is not taken
    ("forgejo", {"X-Forgejo-Signature": HEX}, True),
    ("forgejo", {"X-Gitea-Signature": HEX}, False),  # a Forgejo webhook: Forgejo's header
    ("gitea", {"X-Gitea-Signature": HEX}, True),
    ("gitea", {"X-Gitea-Signature": "sha256=" + HEX}, False),
    ("gitlab", {"X-Gitlab-Token": GITHUB_SECRET.decode()}, True),
    ("gitlab", {"X-Gitlab-Token": GITHUB_SECRET.decode() + " "}, False),
    ("generic", {"X-Signature-256": GITHUB_SIGNATURE}, True),
    ("generic", {"X-Signature-256": HEX.upper()}, True),
    ("generic", {"X-Signature-256": "sha256=" + "0" * 64}, False),
    ("generic", {"X-Signature-256": "sha256=ünïcode"}, False),  # no TypeError either
    ("github", {}, False),
])
def test_each_forges_signature(provider: str, sent: dict[str, str], valid: bool) -> None:
    assert FORGES[Provider(provider)].check(Headers(sent), GITHUB_BODY, GITHUB_SECRET) is valid


def test_the_generic_signature_is_the_hex_hmac_sha256_of_the_body() -> None:
    assert "sha256=" + hmac_hex(GITHUB_SECRET, GITHUB_BODY) == GITHUB_SIGNATURE


@pytest.mark.parametrize(("name", "provider", "event", "expected"), [
    ("github_push", "github", "push", ("refs/heads/main", SHA, "example/site", "alice")),
    ("github_tag_push", "github", "push", ("refs/tags/v1.2", SHA, "example/site", "alice")),
    ("github_delete", "github", "push", ("refs/heads/old", None, "example/site", "alice")),
    ("forgejo_push", "forgejo", "push", ("refs/heads/main", SHA, "example/site", "alice")),
    ("gitlab_push", "gitlab", "Push Hook", ("refs/heads/main", SHA, "example/site", "alice")),
    ("gitlab_tag_push", "gitlab", "Tag Push Hook",
     ("refs/tags/v1.2", SHA, "example/site", "alice")),
    ("generic_push", "generic", "push", ("refs/heads/main", SHA, "example/site", "alice")),
])
def test_each_forges_push_payload(name: str, provider: str, event: str,
                                  expected: tuple[str, str | None, str, str]) -> None:
    push = FORGES[Provider(provider)].push(fixture(name), event)
    assert (push.ref, push.sha, push.repo, push.pusher) == expected


def test_gitlab_names_its_events_in_the_payload() -> None:
    forge = FORGES[Provider.GITLAB]
    assert forge.push(fixture("gitlab_tag_push"), "Tag Push Hook").event == "tag_push"


@pytest.mark.parametrize(("change", "problem"), [
    ({"ref": None}, "no 'ref'"),
    ({"after": "not-a-sha", "head_commit": None}, "no commit id"),
    ({"pusher": {"name": 7}}, "pusher.name is not a string"),
    ({"pusher": {"name": "al\nice"}}, "control characters"),
])
def test_a_payload_that_is_not_what_the_forge_sends_says_why(change: dict[str, Any],
                                                              problem: str) -> None:
    data = {**fixture("github_push"), **change}
    with pytest.raises(BadPayload, match=problem):
        FORGES[Provider.GITHUB].push(data, "push")


@pytest.mark.parametrize(("sent", "ref", "expected"), [
    ({"Idempotency-Key": "k1", "X-Gitlab-Event-UUID": "u1"}, "refs/heads/a", "k1"),
    # Before GitLab 17.4: one request's pushes of several branches share the event UUID.
    ({"X-Gitlab-Event-UUID": "u1"}, "refs/heads/a", "u1:refs/heads/a"),
    ({}, "refs/heads/a", None),
])
def test_gitlabs_delivery_id(sent: dict[str, str], ref: str, expected: str | None) -> None:
    push = Push("push", ref, SHA)
    assert delivery_id(FORGES[Provider.GITLAB], Headers(sent), push) == expected


def test_a_delivery_id_too_long_to_be_one_is_refused() -> None:
    with pytest.raises(BadPayload):
        delivery_id(FORGES[Provider.GITHUB], Headers({"X-GitHub-Delivery": "d" * 201}),
                    Push("push", "refs/heads/main", SHA))


BRANCHES = {"branches": ["main", "release/*"]}
TAGS = {"tags": ["v*"]}


@pytest.mark.parametrize(("keys", "ref", "sha", "reason"), [
    ({}, "refs/heads/anything", SHA, None),
    ({}, "refs/tags/anything", SHA, None),
    (BRANCHES, "refs/heads/main", SHA, None),
    (BRANCHES, "refs/heads/release/1.2/hotfix", SHA, None),  # '*' crosses '/'
    (BRANCHES, "refs/heads/Main", SHA, "ignored: branch 'Main' matches none of main, release/*"),
    (BRANCHES, "refs/tags/v1", SHA, "ignored: tag 'v1': this webhook takes branches only"),
    (TAGS, "refs/tags/v1.2", SHA, None),
    (TAGS, "refs/heads/main", SHA, "ignored: branch 'main': this webhook takes tags only"),
    (BRANCHES | TAGS, "refs/tags/v2", SHA, None),
    (BRANCHES | TAGS, "refs/tags/nightly", SHA, "ignored: tag 'nightly' matches none of v*"),
    (BRANCHES, "refs/heads/main", None, "ignored: the push deleted branch 'main'"),
    ({}, "refs/notes/commits", SHA, "ignored: ref 'refs/notes/commits' is neither a branch "
                                    "nor a tag"),
    ({}, "", SHA, "ignored: ref '' is neither a branch nor a tag"),
    (BRANCHES, "refs/heads/", SHA, "ignored: branch '' matches none of main, release/*"),
])
def test_what_a_push_starts(keys: dict[str, Any], ref: str, sha: str | None,
                            reason: str | None) -> None:
    assert push_ignored(hook(**keys), Push("push", ref, sha)) == reason


@pytest.mark.parametrize(("keys", "event", "reason"), [
    ({}, "push", None),
    ({}, "issues", "ignored: event 'issues' is not in events (push)"),
    ({"provider": "generic", "events": ["push", "release"]}, "release", None),
    ({"provider": "gitlab"}, "Tag Push Hook", None),
    ({"provider": "gitlab"}, "Note Hook",
     "ignored: event 'Note Hook' is not in events (Push Hook, Tag Push Hook)"),
])
def test_which_events_a_webhook_takes(keys: dict[str, Any], event: str,
                                      reason: str | None) -> None:
    assert event_ignored(hook(**keys), event) == reason


def test_args_templates_expand_and_refuse_what_the_push_lacks() -> None:
    push = Push("push", "refs/heads/main", SHA, "team/site", "alice")
    templates = ["{branch}", "{short_sha}", "{sha}", "{repo}@{ref}", "{pusher}", "{{x}}"]
    assert arguments(hook(args=templates), push) == [
        "main", SHA[:7], SHA, "team/site@refs/heads/main", "alice", "{x}"]
    with pytest.raises(BadArgumentsError, match=r"\{tag\}"):
        arguments(hook(args=["{tag}"]), push)


def test_the_rate_window_takes_max_per_minute_in_any_minute() -> None:
    now = [0.0]
    window = Window(2, clock=lambda: now[0])
    assert (window.take(), window.take()) == (0.0, 0.0)
    now[0] = 59.0
    assert window.take() == pytest.approx(1.0)
    now[0] = 60.0
    assert window.take() == 0.0


@pytest.mark.parametrize(("keys", "problem"), [
    ({"batch": ["deploy"]}, "exactly one of 'target'"),
    ({"target": None}, "exactly one of 'target'"),
    ({"args": ["{sha.__class__}"]}, "a template may name"),
    ({"args": ["{0}"]}, "a template may name"),
    ({"args": ["{sha:.7}"]}, "a template may name"),
    ({"args": ["{"]}, "is not a template"),
    ({"provider": "gitlab", "events": ["push"]}, "name 'Push Hook' or 'Tag Push Hook'"),
    ({"events": ["Push Hook"]}, "name 'push'"),
    # a forge's other events have payloads nothing reads: every delivery would answer 400
    ({"events": ["push", "pull_request"]}, "'pull_request' is not a github push"),
    ({"provider": "generic", "events": ["Push Hook"]}, "like 'push'"),
    ({"provider": "bitbucket"}, "provider"),
    ({"room": "ci"}, "not a room id"),
    ({"max_per_minute": 0}, "max_per_minute"),
])
def test_webhook_config_refusals(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        hook(**keys)


def test_the_config_checks_what_webhooks_start() -> None:
    targets = {"deploy": {"command": ["true"]}}
    with pytest.raises(ValidationError, match=r"webhooks.site.target: 'nope'"):
        Config.model_validate({"targets": targets, "webhooks": {
            "site": {"provider": "github", "target": "nope"}}})
    with pytest.raises(ValidationError, match="takes no arguments"):
        Config.model_validate({"targets": targets, "webhooks": {
            "site": {"provider": "github", "target": "deploy", "args": ["{branch}"]}}})
    with pytest.raises(ValidationError, match="MATRIXJOBS_WEBHOOK_A_B_SECRET"):
        Config.model_validate({"targets": targets, "webhooks": {
            "a-b": {"provider": "github", "target": "deploy"},
            "a.b": {"provider": "github", "target": "deploy"}}})


def test_the_secrets_variable_is_named_after_the_webhook() -> None:
    assert webhook_secret_env("site") == "MATRIXJOBS_WEBHOOK_SITE_SECRET"
    assert webhook_secret_env("my-site.prod") == "MATRIXJOBS_WEBHOOK_MY_SITE_PROD_SECRET"


def test_webhooks_without_the_api_are_a_warning() -> None:
    config = Config.model_validate({
        "api": {"enabled": False}, "targets": {"deploy": {"command": ["true"]}},
        "webhooks": {"site": {"provider": "github", "target": "deploy"}}})
    assert "webhooks: [api] enabled = false, so no forge can reach POST /hooks/NAME" in (
        config.warnings())
