"""Tiny asyncio TCP proxy adding a fixed round-trip delay, standing in for netem on 127.0.0.1.

The model, and how it approximates a real link:
- Every chunk read from either side is forwarded RTT/2 after it arrived, in order. A request
  followed by its response therefore costs one full RTT per turn, while a long body streams
  through at full speed after a single RTT/2 head start (a delay-only link: bandwidth and TCP
  slow start/window limits are not modelled, so bulk transfers are *kinder* than a real WAN).
- A new connection pays one extra RTT before its first bytes move (the TCP handshake); TLS is
  not modelled (the S3 server speaks plain HTTP).
- Bytes in flight per direction are bounded (a crude receive window) so memory stays flat.
- With --rtt-ms 0 the proxy only relays, which measures the proxy's own cost.
- --rate-mbps caps each direction of the whole link (all connections together), as a slow
  uplink would: the disk-cache benchmark copies onto a store throttled to 20 MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections import deque

CHUNK = 1024 * 1024
WINDOW = 32 * 1024 * 1024


class Link:
    """One direction of a link of fixed bandwidth shared by every connection."""

    def __init__(self, rate_bps: float) -> None:
        self.rate = rate_bps
        self.free_at = 0.0

    async def take(self, nbytes: int) -> None:
        """Wait until nbytes have gone through the link after everything queued before."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.free_at = max(now, self.free_at) + nbytes / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


class Pipe:
    """One direction of a proxied connection with a constant one-way delay."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        ready_at: float,
        link: Link | None = None,
    ) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.ready_at = ready_at
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.wakeup = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.eof = False

    async def pump_in(self) -> None:
        """Read chunks and stamp each with the time it may leave."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    break
                release = max(loop.time(), self.ready_at) + self.delay
                self.queue.append((release, data))
                self.queued += len(data)
                if self.queued >= WINDOW:
                    self.room.clear()
                self.wakeup.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.wakeup.set()

    async def pump_out(self) -> None:
        """Write each chunk once its release time has come; half-close at the end."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                release, data = self.queue[0]
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                self.queued -= len(data)
                if self.queued < WINDOW:
                    self.room.set()
                if self.link is not None:
                    await self.link.take(len(data))
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass


class DelayProxy:
    """Accepts on a local port and relays to one upstream with the configured delay."""

    def __init__(
        self, upstream_host: str, upstream_port: int, rtt_ms: float, rate_mbps: float = 0.0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links = (Link(rate_mbps * 1e6), Link(rate_mbps * 1e6)) if rate_mbps else (None, None)
        self.one_way = rtt_ms / 2000.0
        self.rtt = rtt_ms / 1000.0
        self.connections = 0

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        ready_at = loop.time() + self.rtt  # the handshake round trip a real link would cost
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        up = Pipe(c_reader, u_writer, self.one_way, ready_at, self.links[0])
        down = Pipe(u_reader, c_writer, self.one_way, ready_at, self.links[1])
        try:
            await asyncio.gather(up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
        finally:
            for w in (u_writer, c_writer):
                with contextlib.suppress(Exception):
                    w.close()


async def serve(listen_host: str, listen_port: int, proxy: DelayProxy) -> None:
    """Run until SIGTERM/SIGINT; print the bound port first so a parent can read it."""
    server = await asyncio.start_server(proxy.handle, listen_host, listen_port, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the proxy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--rate-mbps", type=float, default=0.0, help="MB/s each way (0 = no cap)")
    args = parser.parse_args(argv)
    lhost, lport = args.listen.rsplit(":", 1)
    uhost, uport = args.upstream.rsplit(":", 1)
    proxy = DelayProxy(uhost, int(uport), args.rtt_ms, args.rate_mbps)
    started = time.monotonic()
    asyncio.run(serve(lhost, int(lport), proxy))
    print(
        f"proxy: {proxy.connections} connections in {time.monotonic() - started:.0f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
