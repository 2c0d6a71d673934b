"""MCP over streamable HTTP, mounted in the service's API server at /mcp (same auth).

Each request acts as whoever its token names, as on the API: the service token as the
operator (`admin`), a personal token as its Matrix user, with that user's rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from matrixjobs.api.auth import person_of
from matrixjobs.api.errors import error_response
from matrixjobs.api.server import ApiServer
from matrixjobs.app import App
from matrixjobs.mcp.backend import MCP_ADMIN, AppBackend
from matrixjobs.mcp.server import build_mcp_server
from matrixjobs.policy import Caller, Via

MCP_PATH = "/mcp"
# Who the HTTP request being served acts as. The SDK runs each message's handler in the
# context of the request that carried it (both protocol generations), so a tool call sees
# its own request's caller, never another session's or an earlier request's: a token
# revoked since the session began is refused by the auth layer at the next request.
# No default: a handler that somehow ran outside a request fails rather than act as admin.
_CALLER: ContextVar[Caller] = ContextVar("matrixjobs_mcp_caller")


class McpHttp:
    """ASGI app for the MCP endpoint; `lifespan()` runs the SDK's session manager.

    The SDK's session manager runs once per instance, so each lifespan (each
    start of the API server) makes a fresh one. The SDK's own DNS-rebinding
    check is off: the API server's middleware (token, or loopback Host/Origin
    guard) already stands in front of every path, /mcp included.
    """

    def __init__(self, server: MCPServer, stopping: asyncio.Event) -> None:
        self.server = server
        self.stopping = stopping
        self._manager: StreamableHTTPSessionManager | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager = self._manager
        if manager is None:
            await error_response(503, "unavailable", "the MCP server is not running")(
                scope, receive, send)
            return
        person = person_of(scope)
        reset = _CALLER.set(MCP_ADMIN if person is None else Caller(person, Via.MCP))
        try:
            await manager.handle_request(scope, receive, send)
        finally:
            _CALLER.reset(reset)

    def stop(self) -> None:
        """Streaming `status` calls answer now, so stopping never waits on them."""
        self.stopping.set()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.stopping.clear()
        self.server.streamable_http_app(transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=False))
        manager = self.server.session_manager
        try:
            async with manager.run():
                self._manager = manager
                try:
                    yield
                finally:
                    self._manager = None
        except BaseExceptionGroup as group:
            # The SDK's task group wraps what the host raised inside us (e.g. another
            # lifespan failing): hand the one real error on, so its message stays clear.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


def mount_mcp(api: ApiServer, app: App, path: str = MCP_PATH) -> McpHttp:
    """Serve the MCP tools for `app` at `path` of the API server."""
    stopping = asyncio.Event()
    backend = AppBackend(app, caller=_CALLER.get)
    endpoint = McpHttp(build_mcp_server(backend, stopping=stopping), stopping)
    api.mount(path, endpoint, endpoint.lifespan, on_stop=endpoint.stop)
    return endpoint
