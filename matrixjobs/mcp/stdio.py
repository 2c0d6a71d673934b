"""`matrixjobs mcp`: the MCP tools over stdio, backed by a running service's HTTP API."""

from __future__ import annotations

from matrixjobs.mcp.backend import HttpBackend
from matrixjobs.mcp.server import build_mcp_server


async def serve_stdio(api_url: str, token: str | None) -> None:
    """Serve MCP on stdin/stdout until the client closes them."""
    backend = HttpBackend(api_url, token)
    try:
        await build_mcp_server(backend).run_stdio_async()
    finally:
        await backend.aclose()
