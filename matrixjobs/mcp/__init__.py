"""MCP server for matrixjobs: the same tools over streamable HTTP (/mcp) and stdio."""

from matrixjobs.mcp.backend import AppBackend, Backend, HttpBackend
from matrixjobs.mcp.server import HEARTBEAT_S, JobList, StatusResult, build_mcp_server

__all__ = [
    "HEARTBEAT_S", "AppBackend", "Backend", "HttpBackend", "JobList", "StatusResult",
    "build_mcp_server",
]
