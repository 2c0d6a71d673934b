"""A client that goes away in the middle of its request's body (a forge's delivery timing
out, a dropped connection, anyone on the open /hooks/ path) is no bug of ours: no 500, no
traceback in the log (twice: ours and uvicorn's), and the service goes on."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from matrixjobs.api.server import ApiServer


async def test_a_body_cut_short_by_the_client_logs_no_error(api_service, caplog):
    app, client = await api_service()
    [server] = [c for c in app.components if isinstance(c, ApiServer)]
    address = urlsplit(server.url)
    caplog.set_level(logging.INFO)
    # POST /v1/jobs reads its body as POST /hooks/NAME does; the handler serves both.
    _reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: 1000\r\n\r\n{\"tar")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert (await client.get("/healthz")).status_code == 200
