"""What a delivery starts, decided from the webhook's config alone (pure functions).

Branches and tags are fnmatch globs, case-sensitive as Git's refs are; `*` crosses `/`
("release/*" takes "release/1.2/hotfix"). With only `branches` set, tag pushes are ignored,
and the other way round; with both, each kind is matched against its own list; with
neither, every branch and tag runs.
"""

from __future__ import annotations

import string
from fnmatch import fnmatchcase

from matrixjobs.config import WebhookConfig
from matrixjobs.errors import BadArgumentsError, echo
from matrixjobs.progress import wording
from matrixjobs.webhooks.forges import Push

SHORT_SHA = 7


def event_ignored(hook: WebhookConfig, event: str) -> str | None:
    """Why deliveries of `event` start nothing (None: they may)."""
    return None if event in hook.takes else wording.hook_ignored_event(event, hook.takes)


def push_ignored(hook: WebhookConfig, push: Push) -> str | None:
    """Why this push starts nothing (None: it starts what the webhook names)."""
    branch, tag = push.branch, push.tag
    if branch is not None:
        kind, name, patterns = "branch", branch, hook.branches
    elif tag is not None:
        kind, name, patterns = "tag", tag, hook.tags
    else:
        return wording.hook_ignored_other_ref(push.ref)
    if push.sha is None:
        return wording.hook_ignored_deletion(kind, name)
    if not (hook.branches or hook.tags) or any(fnmatchcase(name, p) for p in patterns):
        return None
    return wording.hook_ignored_ref(kind, name, patterns)


def fields(push: Push) -> dict[str, str]:
    """What args templates may name; "" where this push has no such thing."""
    sha = push.sha or ""
    return {"branch": push.branch or "", "tag": push.tag or "", "ref": push.ref, "sha": sha,
            "short_sha": sha[:SHORT_SHA], "repo": push.repo or "", "pusher": push.pusher or ""}


def arguments(hook: WebhookConfig, push: Push) -> list[str]:
    """The args templates expanded; BadArgumentsError if one names what this push lacks
    (a {tag} for a branch's push): an empty argument would run the target for nothing."""
    values = fields(push)
    expanded = []
    for template in hook.args:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None and not values[field]:
                raise BadArgumentsError(f"args: '{echo(template)}' names {{{field}}}, which "
                                        f"this push of {echo(push.ref)} does not have")
        expanded.append(template.format_map(values))
    return expanded
