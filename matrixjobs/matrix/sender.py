"""Sending to the homeserver through matrix-nio: its error responses become exceptions
here, once (the edit scheduler only knows `SendFailedError` and `RateLimitedError`)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import ClientError
from nio import (
    AsyncClient,
    EncryptionError,
    ErrorResponse,
    GroupEncryptionError,
    LocalProtocolError,
    OlmTrustError,
    RoomSendResponse,
    UploadResponse,
)

from matrixjobs.matrix.crypto import Crypto
from matrixjobs.matrix.edits import RateLimitedError, SendFailedError

PERMANENT_ERRORS = frozenset({"M_FORBIDDEN", "M_NOT_FOUND", "M_TOO_LARGE", "M_BAD_JSON"})
NETWORK_ERRORS = (ClientError, TimeoutError, OSError)
# Raised by nio while encrypting (a device not yet judged, members not loaded): try again.
CRYPTO_ERRORS = (LocalProtocolError, EncryptionError, GroupEncryptionError, OlmTrustError)


class NioSender:
    """Sends through matrix-nio, turning its error responses into exceptions once."""

    def __init__(self, client: AsyncClient, crypto: Crypto) -> None:
        self.client = client
        self.crypto = crypto

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str) -> str:
        # In an encrypted room nio encrypts (each attempt differently) and copies
        # m.relates_to to the cleartext; the homeserver still dedupes on the txn id.
        if room_id not in self.client.rooms:
            # Left (e.g. kicked while we were down): nio refuses locally, and retrying
            # would hold back every other room's messages.
            raise SendFailedError(f"not in room {room_id}", permanent=True)
        try:
            await self.crypto.prepare_room(room_id)
            response = await self.client.room_send(
                room_id, "m.room.message", content, tx_id=txn_id,
                ignore_unverified_devices=self.crypto.ignore_unverified_devices)
        except (*NETWORK_ERRORS, *CRYPTO_ERRORS) as exc:
            raise SendFailedError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(response, RoomSendResponse):
            return str(response.event_id)
        assert isinstance(response, ErrorResponse)
        if response.status_code == "M_LIMIT_EXCEEDED" or _http_status(response) == 429:
            raise RateLimitedError(_retry_after_s(response))
        raise SendFailedError(str(response), permanent=response.status_code in PERMANENT_ERRORS)

    async def upload(self, room_id: str, data: bytes, filename: str,
                     content_type: str) -> dict[str, Any]:
        room = self.client.rooms.get(room_id)
        if room is None:
            raise SendFailedError(f"not in room {room_id}", permanent=True)
        try:
            response, keys = await self.client.upload(
                lambda *_: data, content_type=content_type, filename=filename,
                encrypt=room.encrypted, filesize=len(data))
        except NETWORK_ERRORS as exc:
            raise SendFailedError(f"{type(exc).__name__}: {exc}") from None
        if isinstance(response, UploadResponse):
            if keys is None:
                return {"url": response.content_uri}
            return {"file": {"url": response.content_uri, "mimetype": content_type, **keys}}
        assert isinstance(response, ErrorResponse)
        if response.status_code == "M_LIMIT_EXCEEDED" or _http_status(response) == 429:
            raise RateLimitedError(_retry_after_s(response))
        raise SendFailedError(str(response), permanent=response.status_code in PERMANENT_ERRORS)


def server_time_ms(response: Any) -> int:
    """The homeserver's clock from a response's Date header (1 s resolution), minus 1 s."""
    transport = getattr(response, "transport_response", None)
    header = transport.headers.get("Date") if transport is not None else None
    try:
        return int(parsedate_to_datetime(header).timestamp() * 1000) - 1000 if header else 0
    except (TypeError, ValueError):
        return 0


def _http_status(response: ErrorResponse) -> int | None:
    transport = getattr(response, "transport_response", None)
    return getattr(transport, "status", None)


def _retry_after_s(response: ErrorResponse) -> float:
    """`retry_after_ms` in the body, else the `Retry-After` header (spec v1.10+), else 5 s."""
    if response.retry_after_ms:
        return response.retry_after_ms / 1000
    transport = getattr(response, "transport_response", None)
    header = transport.headers.get("Retry-After") if transport is not None else None
    try:
        return float(header) if header else 5.0
    except ValueError:
        return 5.0
