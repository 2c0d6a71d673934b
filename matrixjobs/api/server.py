"""The HTTP server component: uvicorn serving one Starlette app inside the service's loop.

The service owns the process: its event loop, SIGTERM/SIGINT and logging.
uvicorn only serves connections on a socket bound here (so a busy port is a
clean error, never uvicorn's `sys.exit`), and the Starlette app's lifespan
runs in the server's task, around uvicorn, so later additions (the MCP session
manager under /mcp) start and stop with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from matrixjobs.api.auth import BearerAuth, LoopbackGuard, host_name
from matrixjobs.api.dashboard import Dashboard
from matrixjobs.api.errors import (
    ApiError,
    on_api_error,
    on_core_error,
    on_disconnect,
    on_http_error,
    on_unexpected_error,
)
from matrixjobs.api.hooks import HookEndpoint
from matrixjobs.api.openapi import openapi_route
from matrixjobs.api.routes import Endpoints
from matrixjobs.api.session import LoginThrottle
from matrixjobs.api.stream import OpenStreams
from matrixjobs.app import App
from matrixjobs.config import ApiConfig, TcpAddress, UnixAddress
from matrixjobs.errors import MatrixJobsError
from matrixjobs.webhooks.receiver import WebhookReceiver

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BACKLOG = 2048
# Requests still running after this are cancelled. Streams end cleanly before it
# (NDJSON streams are closed, MCP watches answer via their stop hook); what remains
# is idle long-polls, which need no more than a moment.
SHUTDOWN_GRACE_S = 1.0
ANSWER_WRITE_S = 0.2
SOCKET_MODE = 0o660  # the service's user and group may connect to a unix socket

Lifespan = Callable[[], AbstractAsyncContextManager[object]]


def build_asgi_app(
    app: App,
    *,
    token: SecretStr | None = None,
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
    streams: OpenStreams | None = None,
    mounts: Sequence[BaseRoute] = (),
    lifespans: Sequence[Lifespan] = (),
) -> Starlette:
    """The API as a Starlette app; `mounts` (e.g. MCP at /mcp) share its auth and lifespan.

    With a token every request needs it; without one, `allowed_hosts` (None: any)
    limits the Host header and cross-origin requests are refused.
    """
    middleware = []
    throttle = LoginThrottle()  # wrong tokens counted alike from headers and the login form
    if token is not None:
        middleware.append(Middleware(BearerAuth, token=token.get_secret_value(),
                                     throttle=throttle, people=app.token_owner))
    elif allowed_hosts is not None:
        middleware.append(Middleware(LoopbackGuard, allowed_hosts=allowed_hosts))

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for enter in lifespans:
                await stack.enter_async_context(enter())
            yield

    streams = OpenStreams() if streams is None else streams
    secret = None if token is None else token.get_secret_value()
    dashboard = Dashboard(app, streams, secret, throttle)
    hooks = HookEndpoint(WebhookReceiver(app))
    routes = [*Endpoints(app, streams).routes(), *dashboard.api_routes(), *hooks.routes()]
    return Starlette(
        routes=[*routes, openapi_route(routes), *dashboard.pages(), *mounts],
        middleware=middleware,
        exception_handlers={
            ApiError: on_api_error,
            MatrixJobsError: on_core_error,
            HTTPException: on_http_error,
            ClientDisconnect: on_disconnect,
            Exception: on_unexpected_error,
        },
        lifespan=lifespan,
    )


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling, telling us when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # SIGTERM/SIGINT belong to the service (App.run_until_signal)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class ApiServer:
    """The HTTP API as a service component (`start()`/`stop()`)."""

    def __init__(self, app: App, config: ApiConfig, token: SecretStr | None) -> None:
        config.check_exposure(token)
        self.app = app
        self.config = config
        self.token = token
        self.streams = OpenStreams()
        self.address: TcpAddress | UnixAddress = config.address  # the bound one once started
        self._mounts: list[BaseRoute] = []
        self._lifespans: list[Lifespan] = []
        self._stop_hooks: list[Callable[[], None]] = []
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    def mount(self, path: str, asgi: ASGIApp, lifespan: Lifespan | None = None,
              on_stop: Callable[[], None] | None = None) -> None:
        """Serve another ASGI app at `path` and under it (before start), e.g. MCP at /mcp.

        `path` itself is routed too (Starlette's Mount alone would redirect /mcp to
        /mcp/, and MCP clients don't follow redirects).
        """
        if self._task is not None:
            raise RuntimeError("mount before the server starts")
        self._mounts.extend([Route(path, asgi), Mount(path, asgi)])
        if lifespan is not None:
            self._lifespans.append(lifespan)
        if on_stop is not None:
            self._stop_hooks.append(on_stop)

    @property
    def url(self) -> str:
        """Base URL for clients; for a unix socket, http://localhost (connect via the path)."""
        if isinstance(self.address, UnixAddress):
            return "http://localhost"
        return f"http://{self.address}"

    async def start(self) -> None:
        self.streams = OpenStreams()
        sock = await bind(self.config.address)
        self.address = bound_address(sock, self.config.address)
        allowed = None
        if isinstance(self.address, TcpAddress):
            allowed = LOOPBACK_NAMES | {host_name(self.address.host)}
        asgi = build_asgi_app(
            self.app, token=self.token, allowed_hosts=allowed, streams=self.streams,
            mounts=self._mounts, lifespans=self._lifespans,
        )
        server = EmbeddedServer(uvicorn.Config(
            asgi, lifespan="off", log_config=None, access_log=False, proxy_headers=False,
            server_header=False, ws="none", backlog=BACKLOG,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        ))
        self._server = server
        self._task = asyncio.create_task(self._serve(server, sock, asgi), name="api-server")
        ready = asyncio.create_task(server.ready.wait())
        try:
            await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()  # if start() itself is cancelled, stop() still ends the server
        if not server.ready.is_set():
            task, self._task = self._task, None
            sock.close()
            self._remove_socket_file()
            error = task.exception() if not task.cancelled() else None
            raise MatrixJobsError(f"the API server could not start: {error}") from error
        auth = "token required" if self.token is not None else "no token"
        log.info("API listening on %s (%s)", describe(self.address), auth)

    async def ready(self) -> None:
        """Nothing to wait for: `start()` returns once the socket listens."""

    async def _serve(self, server: EmbeddedServer, sock: socket.socket, asgi: Starlette) -> None:
        try:
            async with asgi.router.lifespan_context(asgi):
                await server.serve(sockets=[sock])
        finally:
            sock.close()

    async def stop(self) -> None:
        task, server = self._task, self._server
        if task is None or server is None:
            return
        self._task = None
        self.streams.close_all()  # streams end with a complete response, not a cut connection
        for hook in self._stop_hooks:
            hook()
        if self._stop_hooks:
            await asyncio.sleep(ANSWER_WRITE_S)  # let the answers they caused go out
        server.should_exit = True
        try:
            await task
        except Exception:
            log.exception("the API server failed while stopping")
        finally:
            self._remove_socket_file()
        log.info("API stopped")

    def _remove_socket_file(self) -> None:
        if isinstance(self.address, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                self.address.path.unlink()


async def bind(address: TcpAddress | UnixAddress) -> socket.socket:
    try:
        if isinstance(address, UnixAddress):
            sock = bind_unix(address)
        else:
            # A host name may take DNS seconds to resolve: not on the event loop.
            sock = await asyncio.to_thread(bind_tcp, address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MatrixJobsError(f"the API cannot listen on {address}: {reason}") from None
    sock.setblocking(False)
    return sock


def bind_tcp(address: TcpAddress) -> socket.socket:
    try:
        found = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve '{address.host}' ({exc.strerror})") from None
    family, kind, proto, _, sockaddr = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(address: UnixAddress) -> socket.socket:
    path = address.path
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(0, f"{path} exists and is not a socket")
        if socket_in_use(path):
            raise OSError(0, "another process is listening on it")
        path.unlink()  # left behind by a service that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_in_use(path: os.PathLike[str]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def bound_address(
    sock: socket.socket, wanted: TcpAddress | UnixAddress
) -> TcpAddress | UnixAddress:
    if isinstance(wanted, UnixAddress):
        return wanted
    return TcpAddress(wanted.host, sock.getsockname()[1])  # the real port when asked for 0


def describe(address: TcpAddress | UnixAddress) -> str:
    return str(address) if isinstance(address, UnixAddress) else f"http://{address}"
