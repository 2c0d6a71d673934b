"""What the bot makes of the homeserver's answer about its own device's keys (unit level:
odd answers are hard to get from a real Synapse; tests/test_matrix_e2ee.py covers the rest)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from matrixjobs.matrix.crypto import Crypto, ServerKeys

USER, DEVICE = "@bot:x", "DEV"
OURS = {"ed25519": "ED", "curve25519": "CURVE"}


class Answer:
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self._body = body

    async def json(self, content_type: object = None) -> object:
        return json.loads(self._body)


class Client:
    """Just what Crypto.server_keys uses of a nio AsyncClient."""

    def __init__(self, answer: Answer) -> None:
        self.user_id, self.device_id, self.access_token = USER, DEVICE, "token"
        self.olm = SimpleNamespace(account=SimpleNamespace(identity_keys=OURS))
        self.answer = answer

    async def send(self, method: str, path: str, data: object = None) -> Answer:
        return self.answer


def keys_of(device: object) -> bytes:
    return json.dumps({"device_keys": {USER: {DEVICE: device}}}).encode()


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, keys_of({"keys": {"ed25519:DEV": "ED", "curve25519:DEV": "CURVE"}}), ServerKeys.OURS),
    (200, keys_of({"keys": {"ed25519:DEV": "OTHER", "curve25519:DEV": "CURVE"}}),
     ServerKeys.OTHER),
    (200, json.dumps({"device_keys": {USER: {}}}).encode(), ServerKeys.NONE),
    (200, json.dumps({"device_keys": {}}).encode(), ServerKeys.NONE),
    # Odd answers: "don't know" (the login is retried), never an exception.
    (502, b"<html>Bad Gateway</html>", None),
    (200, b"<html>not json</html>", None),
    (200, b"\xff\xfe", None),
    (200, json.dumps({"device_keys": []}).encode(), None),
    (200, json.dumps({"device_keys": {USER: ["x"]}}).encode(), None),
    (200, keys_of({"keys": ["x"]}), None),
    (200, keys_of("x"), None),
    (200, b"[]", None),
])
async def test_server_keys_answers(status, body, expected):
    crypto = Crypto(Client(Answer(status, body)), "tofu", 60.0)  # type: ignore[arg-type]
    assert await crypto.server_keys() is expected
