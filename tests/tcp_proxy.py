"""A TCP proxy that fails on command: the network faults of fault tests, without root or iptables.

In a test (its own event loop serves the proxy):

    async with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://127.0.0.1:{proxy.port}/test"
        proxy.cut()        # the server is gone: every connection is reset, new ones at once
        proxy.blackhole()  # a silent path: connections stay open (new ones are accepted) but
                           # nothing is forwarded, like a partition with no RST
        proxy.restore()    # forwarding again; what a black hole held back is delivered now,
                           # as TCP's retransmissions would after a partition heals

As a process of its own, for code under test that runs in other processes (`matrixjobs
worker`) or tests whose event loop is busy:

    python tests/tcp_proxy.py --target 127.0.0.1:5432 [--port N]

prints `listening on 127.0.0.1:PORT` once it accepts (`--port 0`, the default, picks a free
port), then obeys signals: SIGUSR1 cut, SIGUSR2 blackhole, SIGHUP restore, SIGTERM/SIGINT stop.
It prints the new mode (`cut`, `blackhole`, `open`) on a line of its own once it is in force.
`ProxyProcess` runs it for a test and waits for that line, so `proxy.cut()` returns only once
the cut is real.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import signal
import socket
import struct
import subprocess
import sys
from types import TracebackType

CHUNK = 65536


class Mode(enum.Enum):
    OPEN = "open"
    CUT = "cut"
    BLACKHOLE = "blackhole"


class _Link:
    """One client connection and, once made, its connection to the target."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task = asyncio.current_task()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    # Linger 0: close() sends RST, as a host that lost the connection's state would.
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode = Mode.OPEN
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        tasks = [link.task for link in self._links if link.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def cut(self) -> None:
        self.mode = Mode.CUT
        self._flowing.clear()
        for link in list(self._links):
            link.reset()
            if link.task is not None:
                link.task.cancel()

    def blackhole(self) -> None:
        self.mode = Mode.BLACKHOLE
        self._flowing.clear()

    def restore(self) -> None:
        self.mode = Mode.OPEN
        self._flowing.set()

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        link = _Link(client_w)
        self._links.add(link)
        try:
            if self.mode is not Mode.CUT:
                # In a black hole the target never hears of the connection until restore().
                await self._flowing.wait()
                upstream_r, link.upstream = await asyncio.open_connection(*self.target)
                await self._relay(client_r, link.upstream, upstream_r, client_w)
        except (OSError, asyncio.CancelledError):
            pass  # the target refused, or cut() ended the link: the client sees a reset
        finally:
            self._links.discard(link)
            link.reset()

    async def _relay(self, client_r: asyncio.StreamReader, upstream_w: asyncio.StreamWriter,
                     upstream_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        pumps = [asyncio.create_task(self._pump(client_r, upstream_w)),
                 asyncio.create_task(self._pump(upstream_r, client_w))]
        try:
            # PostgreSQL never half-closes: when one side is done, the link is.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


class ProxyProcess:
    """The proxy's CLI as a child process: `with ProxyProcess("127.0.0.1", 5432) as proxy:`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.args = [sys.executable, __file__, "--target", f"{target_host}:{target_port}"]
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ProxyProcess:
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        self.port = int(self._line().rsplit(":", 1)[1])
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def cut(self) -> None:
        self._switch(signal.SIGUSR1, Mode.CUT)

    def blackhole(self) -> None:
        self._switch(signal.SIGUSR2, Mode.BLACKHOLE)

    def restore(self) -> None:
        self._switch(signal.SIGHUP, Mode.OPEN)

    def _switch(self, signum: signal.Signals, mode: Mode) -> None:
        assert self._proc is not None, "use ProxyProcess as a context manager"
        self._proc.send_signal(signum)
        if (line := self._line()) != mode.value:
            raise RuntimeError(f"tcp_proxy answered {line!r} to {signum.name}")

    def _line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"tcp_proxy exited with code {self._proc.wait(timeout=10)}")
        return line


async def _main(target: tuple[str, int], port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with TcpProxy(*target, port=port) as proxy:

        def switch(action: str) -> None:
            getattr(proxy, action)()
            print(proxy.mode.value, flush=True)

        for signum, action in ((signal.SIGUSR1, "cut"), (signal.SIGUSR2, "blackhole"),
                               (signal.SIGHUP, "restore")):
            loop.add_signal_handler(signum, switch, action)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"listening on {proxy.host}:{proxy.port}", flush=True)
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    options = parser.parse_args()
    asyncio.run(_main(options.target, options.port))
