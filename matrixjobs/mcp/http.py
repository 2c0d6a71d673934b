"""MCP over streamable HTTP, mounted in the service's API server at /mcp (same auth)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from matrixjobs.api.auth import MCP_PATH
from matrixjobs.api.errors import error_response
from matrixjobs.api.server import ApiServer
from matrixjobs.app import App
from matrixjobs.mcp.backend import AppBackend
from matrixjobs.mcp.server import build_mcp_server


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
        await manager.handle_request(scope, receive, send)

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
    endpoint = McpHttp(build_mcp_server(AppBackend(app), stopping=stopping), stopping)
    api.mount(path, endpoint, endpoint.lifespan, on_stop=endpoint.stop)
    return endpoint
