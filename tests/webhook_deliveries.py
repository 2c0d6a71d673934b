"""Forge deliveries for tests and the bench (import as `from webhook_deliveries import …`):
payloads from tests/data/webhooks/ (shaped as each forge documents them), with the headers
and signature each forge sends."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "webhooks"
SECRET = "whsec-7c1d2e9f3a4b5c6d7e8f9a0b"
SHA = "3f2c1ab9d0e4c5b6a7f8e9d0c1b2a3f4e5d6c7b8"


def payload(name: str) -> bytes:
    """A fixture's bytes, as the forge would send them (signatures cover these bytes)."""
    return (DATA / f"{name}.json").read_bytes()


def fixture(name: str) -> dict[str, Any]:
    return json.loads(payload(name))


def hex_hmac(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def headers(provider: str, event: str, body: bytes, secret: str = SECRET,
            delivery: str | None = None) -> dict[str, str]:
    """What `provider` sends with `body`: its event, delivery id and signature headers."""
    delivery = delivery or str(uuid.uuid4())
    signature = hex_hmac(secret, body)
    sent = {"Content-Type": "application/json"}
    if provider == "github":
        sent |= {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
                 "X-GitHub-Hook-ID": "481432109", "User-Agent": "GitHub-Hookshot/044aadd",
                 "X-Hub-Signature-256": f"sha256={signature}"}
    elif provider in ("forgejo", "gitea"):
        # Forgejo sends its own headers and Gitea's (and GitHub's and Gogs') names too.
        for forge in ("Forgejo", "Gitea") if provider == "forgejo" else ("Gitea",):
            sent |= {f"X-{forge}-Event": event, f"X-{forge}-Delivery": delivery,
                     f"X-{forge}-Signature": signature}
        sent |= {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery}
    elif provider == "gitlab":
        sent |= {"X-Gitlab-Event": event, "X-Gitlab-Token": secret,
                 "X-Gitlab-Event-UUID": str(uuid.uuid4()), "Idempotency-Key": delivery,
                 "X-Gitlab-Webhook-UUID": "a7c2b9a3-2bd3-4a18-a2c2-8e1a0b6f1d2e",
                 "X-Gitlab-Instance": "https://gitlab.example.org",
                 "User-Agent": "GitLab/17.6.0"}
    else:
        sent |= {"X-Event": event, "X-Delivery-Id": delivery,
                 "X-Signature-256": f"sha256={signature}"}
    return sent
