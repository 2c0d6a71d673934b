"""What each forge sends with a delivery, as its documentation describes it.

Header names are lowercase: pass a case-insensitive mapping (Starlette's `Headers`).
Signatures are compared in constant time over the exact bytes received, before the body
is parsed. Payload fields (docs/webhooks.md lists them for each forge):

* GitHub `push`: ref, after, deleted, repository.full_name, pusher.name.
* Forgejo and Gitea `push`: ref, after, repository.full_name, pusher.login (or username).
* GitLab `Push Hook` / `Tag Push Hook`: object_kind, ref, after, checkout_sha (the commit a
  tag points to; null when the ref was deleted), project.path_with_namespace,
  user_username.
* generic: ref, sha, repo, pusher (ours: what a script can send).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from matrixjobs.config import Provider
from matrixjobs.errors import echo

Headers = Mapping[str, str]
BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"
# A commit id: SHA-1, or SHA-256 in a repository that uses it.
SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
# Longer values are no names a forge gives: refused rather than carried into jobs.
MAX_FIELD = 1024
MAX_DELIVERY_ID = 200


class BadPayload(Exception):
    """A signed delivery that is not what its forge sends; the message says why."""


@dataclass(frozen=True, slots=True)
class Push:
    """What a push delivery says happened."""

    event: str  # the forge's name for it, for the trigger ("push", GitLab's "tag_push")
    ref: str
    sha: str | None  # the commit now at `ref`; None when the push deleted it
    repo: str | None = None
    pusher: str | None = None

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix(BRANCH_PREFIX) if self.ref.startswith(BRANCH_PREFIX) else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix(TAG_PREFIX) if self.ref.startswith(TAG_PREFIX) else None


@dataclass(frozen=True, slots=True)
class Forge:
    """How one provider's deliveries look."""

    event_header: str
    signature_header: str
    signed: Callable[[str, bytes, bytes], bool]  # (the header's value, body, secret)
    push: Callable[[dict[str, Any], str], Push]  # (payload, event header's value)
    delivery: Callable[[Headers, Push], str | None]
    pings: frozenset[str] = frozenset()
    default_event: str | None = None  # when the event header is missing

    def event(self, headers: Headers) -> str | None:
        return headers.get(self.event_header) or self.default_event

    def check(self, headers: Headers, body: bytes, secret: bytes) -> bool:
        """Whether the delivery carries the signature (or token) of `secret`."""
        return self.signed(headers.get(self.signature_header, ""), body, secret)


def hmac_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _same(expected: str, given: str) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters, which a header can hold.
    return hmac.compare_digest(expected.encode(), given.encode())


def _prefixed_hex(given: str, body: bytes, secret: bytes) -> bool:
    """GitHub's: "sha256=" and the hex HMAC-SHA256 of the body."""
    return _same("sha256=" + hmac_hex(secret, body), given)


def _bare_hex(given: str, body: bytes, secret: bytes) -> bool:
    """Forgejo's and Gitea's: the hex HMAC-SHA256 of the body."""
    return _same(hmac_hex(secret, body), given)


def _token(given: str, body: bytes, secret: bytes) -> bool:
    """GitLab's: it signs nothing, it sends the secret token itself."""
    return _same(secret.decode(), given)


def _either_hex(given: str, body: bytes, secret: bytes) -> bool:
    """The generic one: the hex HMAC-SHA256 of the body, "sha256=" before it or not."""
    return _same(hmac_hex(secret, body), given.strip().removeprefix("sha256=").lower())


def _header(name: str) -> Callable[[Headers, Push], str | None]:
    def delivery(headers: Headers, push: Push) -> str | None:
        return headers.get(name) or None

    return delivery


def _gitlab_delivery(headers: Headers, push: Push) -> str | None:
    """Idempotency-Key (GitLab 17.4 on) is one delivery's, the same when it is sent again.
    Before it, X-Gitlab-Event-UUID names the request that caused the hook, which one push
    of several branches shares: with the ref it names one branch's delivery."""
    if key := headers.get("idempotency-key"):
        return key
    uuid = headers.get("x-gitlab-event-uuid")
    return f"{uuid}:{push.ref}" if uuid else None


def _github_push(data: dict[str, Any], event: str) -> Push:
    # head_commit is the commit itself where `after` may be an annotated tag's object.
    return _push(event, data, after=text(data, "after"), sha=text(data, "head_commit", "id"),
                 repo=text(data, "repository", "full_name"), pusher=text(data, "pusher", "name"))


def _gitea_push(data: dict[str, Any], event: str) -> Push:
    pusher = text(data, "pusher", "login") or text(data, "pusher", "username")
    return _push(event, data, after=text(data, "after"), sha=text(data, "head_commit", "id"),
                 repo=text(data, "repository", "full_name"), pusher=pusher)


def _gitlab_push(data: dict[str, Any], event: str) -> Push:
    # checkout_sha is the commit itself where `after` may be an annotated tag's object.
    return _push(text(data, "object_kind") or event, data, after=text(data, "after"),
                 sha=text(data, "checkout_sha"),
                 repo=text(data, "project", "path_with_namespace"),
                 pusher=text(data, "user_username"))


def _generic_push(data: dict[str, Any], event: str) -> Push:
    return _push(event, data, after=text(data, "sha"), repo=text(data, "repo"),
                 pusher=text(data, "pusher"))


def _push(event: str, data: dict[str, Any], after: str | None, repo: str | None,
          pusher: str | None, sha: str | None = None) -> Push:
    ref = text(data, "ref")
    if ref is None:
        raise BadPayload("the payload has no 'ref'")
    if after is not None and set(after) == {"0"}:  # the ref was deleted
        return Push(event, ref, None, repo, pusher)
    sha = sha or after
    if sha is None or not SHA_RE.match(sha):
        raise BadPayload(f"the payload's commit id is missing or no commit id: "
                         f"{echo(sha or '')!r}")
    return Push(event, ref, sha, repo, pusher)


def text(data: dict[str, Any], *path: str) -> str | None:
    """The string at `path` (None where the payload has none); BadPayload if it is no name."""
    value: Any = data
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    if value is None:
        return None
    where = ".".join(path)
    if not isinstance(value, str):
        raise BadPayload(f"the payload's {where} is not a string")
    if len(value) > MAX_FIELD or not value.isprintable():
        raise BadPayload(f"the payload's {where} is too long or holds control characters")
    return value


def payload(body: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadPayload("the payload is not JSON: set the webhook's content type to "
                         "application/json") from None
    if not isinstance(data, dict):
        raise BadPayload("the payload is not a JSON object")
    return data


def delivery_id(forge: Forge, headers: Headers, push: Push) -> str | None:
    found = forge.delivery(headers, push)
    if found is not None and (len(found) > MAX_DELIVERY_ID or not found.isprintable()):
        raise BadPayload(f"the delivery id is longer than {MAX_DELIVERY_ID} characters or "
                         "holds control characters")
    return found


FORGES: dict[Provider, Forge] = {
    Provider.GITHUB: Forge("x-github-event", "x-hub-signature-256", _prefixed_hex,
                           _github_push, _header("x-github-delivery"),
                           pings=frozenset({"ping"})),
    Provider.FORGEJO: Forge("x-forgejo-event", "x-forgejo-signature", _bare_hex, _gitea_push,
                            _header("x-forgejo-delivery")),
    Provider.GITEA: Forge("x-gitea-event", "x-gitea-signature", _bare_hex, _gitea_push,
                          _header("x-gitea-delivery")),
    Provider.GITLAB: Forge("x-gitlab-event", "x-gitlab-token", _token, _gitlab_push,
                           _gitlab_delivery),
    Provider.GENERIC: Forge("x-event", "x-signature-256", _either_hex, _generic_push,
                            _header("x-delivery-id"), pings=frozenset({"ping"}),
                            default_event="push"),
}
