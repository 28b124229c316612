"""A fault-injecting HTTP/1.1 proxy for S3 tests, doubling as a round-trip-time emulator."""

from __future__ import annotations

import enum
import re
import select
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO
from urllib.parse import urlsplit

_MAX_LINE = 65536
_UPSTREAM_TIMEOUT = 120.0


class Fault(enum.Enum):
    HTTP_400 = "http400"  # an InvalidRequest answer; the request never reaches the server
    HTTP_500 = "http500"  # an InternalError answer; the request never reaches the server
    SLOW_DOWN = "slowdown"  # 503 SlowDown with Retry-After; the request never reaches it
    RESET_BEFORE = "reset_before"  # the server applies the request, the client gets an RST
    RESET_DURING = "reset_during"  # headers and half the body, then an RST
    RESET_AFTER = "reset_after"  # the whole answer, then an RST on the kept-alive connection
    TRUNCATE = "truncate"  # Content-Length promises N bytes, N/2 come, then a clean close
    HANG = "hang"  # the request is swallowed; silence until the client gives up
    DELAY = "delay"  # the answer comes `delay` seconds late
    TRICKLE = "trickle"  # the whole answer, one byte every `delay` seconds
    TRICKLE_BODY = "trickle_body"  # headers at once, then the body one byte per `delay` s
    OPAQUE_ETAG = "opaque_etag"  # the ETag is not an MD5, as with SSE-KMS or SSE-C


@dataclass
class Rule:
    """Inject `fault` into the next `remaining` requests that match; `hits` counts them."""

    fault: Fault
    remaining: int
    method: str | None = None
    path: re.Pattern[str] | None = None
    delay: float = 1.0
    retry_after: float = 0.1
    hits: int = 0
    aborted: int = 0  # trickled answers the client gave up on before the end

    def matches(self, method: str, target: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path is None or self.path.search(target) is not None)
        )


@dataclass
class _Message:
    start_line: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def head_bytes(self) -> bytes:
        lines = [self.start_line, *(f"{k}: {v}" for k, v in self.headers), "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def wants_close(self) -> bool:
        return (self.header("connection") or "").lower() == "close"


def _read_head(rfile: BinaryIO) -> _Message | None:
    line = rfile.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):  # tolerated stray CRLF between messages
        line = rfile.readline(_MAX_LINE)
    if not line:
        return None
    headers = []
    while True:
        raw = rfile.readline(_MAX_LINE)
        if not raw:
            raise ConnectionError("connection closed inside a header block")
        if raw in (b"\r\n", b"\n"):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return _Message(line.decode("latin-1").rstrip("\r\n"), headers)


def _read_exact(rfile: BinaryIO, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        raise ConnectionError(f"connection closed after {len(data)} of {n} body bytes")
    return data


def _read_chunked(rfile: BinaryIO) -> bytes:
    """The raw chunked encoding, trailers included, so it can be relayed byte for byte."""
    out = bytearray()
    while True:
        size_line = rfile.readline(_MAX_LINE)
        out += size_line
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = rfile.readline(_MAX_LINE)
                out += trailer
                if trailer in (b"\r\n", b"\n", b""):
                    return bytes(out)
        out += _read_exact(rfile, size + 2)


def _read_body(rfile: BinaryIO, msg: _Message, *, no_body: bool, is_response: bool) -> bool:
    """Fill msg.body; True if the body ran to the end of the connection."""
    if no_body:
        return False
    if (msg.header("transfer-encoding") or "").lower().endswith("chunked"):
        msg.body = _read_chunked(rfile)
    elif (length := msg.header("content-length")) is not None:
        msg.body = _read_exact(rfile, int(length))
    elif is_response:
        msg.body = rfile.read()
        msg.headers.append(("Content-Length", str(len(msg.body))))
        return True
    return False


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, as a crashed middlebox or server would."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _s3_error(status: int, code: str, method: str, extra: list[tuple[str, str]]) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by faultproxy</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    if method == "HEAD":
        body = b""
    reason = {400: "Bad Request", 500: "Internal Server Error", 503: "Slow Down"}[status]
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))), *extra]
    return _Message(f"HTTP/1.1 {status} {reason}", headers).head_bytes() + body


@dataclass
class _Conn:
    client: socket.socket
    rfile: BinaryIO
    upstream: socket.socket | None = None
    up_rfile: BinaryIO | None = None


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (an http:// URL).

    Every request/response exchange is held back `rtt` seconds before the answer goes out,
    which makes the proxy a round-trip-time emulator (TCP handshakes are not delayed).
    `inject()` adds a fault for the next N matching requests; after that, traffic passes.
    """

    def __init__(self, upstream: str, *, rtt: float = 0.0, port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self.rtt = rtt
        self.requests = 0
        self.seen: list[tuple[str, str, dict[str, str]]] = []  # method, target, headers
        self._port = port
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()

    @property
    def endpoint_url(self) -> str:
        assert self._listener is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._port))
        listener.listen(128)
        listener.settimeout(0.1)  # so the accept loop notices stop() promptly
        self._listener = listener
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # wake threads blocked in recv
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def inject(
        self,
        fault: Fault,
        *,
        count: int = 1,
        method: str | None = None,
        path: str | None = None,
        delay: float = 1.0,
        retry_after: float = 0.1,
    ) -> Rule:
        """Apply `fault` to the next `count` requests whose method and target match.

        `path` is a regular expression searched in the request target ("/bucket/key?query").
        """
        rule = Rule(fault, count, method, re.compile(path) if path else None, delay, retry_after)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _take(self, method: str, target: str, headers: dict[str, str]) -> Rule | None:
        with self._lock:
            self.requests += 1
            self.seen.append((method, target, headers))
            for rule in self._rules:
                if rule.matches(method, target):
                    rule.remaining -= 1
                    rule.hits += 1
                    return rule
        return None

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.add(sock)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock, sock.makefile("rb"))
        try:
            while not self._stopping.is_set() and self._exchange(conn):
                pass
        except (OSError, ValueError):
            pass  # a client that vanished, or garbage on the wire: drop the connection
        finally:
            self._close(conn)

    def _close(self, conn: _Conn, *, rst: bool = False) -> None:
        with self._lock:
            self._sockets.discard(conn.client)
            if conn.upstream is not None:
                self._sockets.discard(conn.upstream)
        # makefile() objects keep the socket open, so they must go first.
        for f in (conn.rfile, conn.up_rfile):
            if f is not None:
                with suppress(OSError):
                    f.close()
        if conn.upstream is not None:
            conn.upstream.close()
            conn.upstream = conn.up_rfile = None
        if rst:
            _reset(conn.client)
        else:
            conn.client.close()

    def _exchange(self, conn: _Conn) -> bool:
        """Relay one request and its answer; False once the client connection is done."""
        request = _read_head(conn.rfile)
        if request is None:
            return False
        method, target = [*request.start_line.split(" "), "", ""][:2]
        if (request.header("expect") or "").lower() == "100-continue":
            conn.client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.headers = [(k, v) for k, v in request.headers if k.lower() != "expect"]
        _read_body(conn.rfile, request, no_body=False, is_response=False)
        rule = self._take(method, target, {k.lower(): v for k, v in request.headers})
        fault = rule.fault if rule else None

        if fault is Fault.HANG:
            self._hang(conn.client)
            return False
        delay = self.rtt + (rule.delay if rule and fault is Fault.DELAY else 0.0)
        if fault in (Fault.HTTP_400, Fault.HTTP_500, Fault.SLOW_DOWN):
            assert rule is not None
            self._stopping.wait(delay)
            if fault is Fault.HTTP_400:
                answer = _s3_error(400, "InvalidRequest", method, [])
            elif fault is Fault.HTTP_500:
                answer = _s3_error(500, "InternalError", method, [])
            else:
                answer = _s3_error(
                    503, "SlowDown", method, [("Retry-After", f"{rule.retry_after:g}")]
                )
            conn.client.sendall(answer)
            return not request.wants_close()

        response, upstream_closed = self._forward(conn, request, method)
        self._stopping.wait(delay)
        if fault is Fault.OPAQUE_ETAG:
            response.headers = [
                (k, '"opaque-sse-kms-etag"' if k.lower() == "etag" else v)
                for k, v in response.headers
            ]
        head, body = response.head_bytes(), response.body
        if fault in (Fault.TRICKLE, Fault.TRICKLE_BODY):
            assert rule is not None
            if fault is Fault.TRICKLE_BODY:
                conn.client.sendall(head)
            self._trickle(conn.client, body if fault is Fault.TRICKLE_BODY else head + body, rule)
            self._close(conn)
            return False
        if fault is Fault.RESET_BEFORE:
            self._close(conn, rst=True)
            return False
        if fault in (Fault.RESET_DURING, Fault.TRUNCATE):
            conn.client.sendall(head + body[: len(body) // 2])
            self._close(conn, rst=fault is Fault.RESET_DURING)
            return False
        conn.client.sendall(head + body)
        if fault is Fault.RESET_AFTER:
            self._close(conn, rst=True)
            return False
        return not (upstream_closed or request.wants_close() or response.wants_close())

    def _forward(self, conn: _Conn, request: _Message, method: str) -> tuple[_Message, bool]:
        raw = request.head_bytes() + request.body
        for attempt in (1, 2):
            if conn.upstream is None:
                conn.upstream = socket.create_connection(self._upstream, _UPSTREAM_TIMEOUT)
                conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.up_rfile = conn.upstream.makefile("rb")
                with self._lock:
                    self._sockets.add(conn.upstream)
            assert conn.up_rfile is not None
            try:
                conn.upstream.sendall(raw)
                response = _read_head(conn.up_rfile)
                while response is not None and response.start_line.split(" ")[1].startswith("1"):
                    response = _read_head(conn.up_rfile)  # 100 Continue and friends
                if response is None:
                    raise ConnectionError("upstream closed the connection")
            except OSError:
                # A kept-alive upstream connection the server had already dropped: once
                # more on a fresh one. Nothing was answered, so the client sees nothing.
                self._drop_upstream(conn)
                if attempt == 2 or self._stopping.is_set():
                    raise
                continue
            status = int(response.start_line.split(" ")[1])
            no_body = method == "HEAD" or status in (204, 304)
            closed = _read_body(conn.up_rfile, response, no_body=no_body, is_response=True)
            if closed or response.wants_close():
                self._drop_upstream(conn)
            return response, closed
        raise AssertionError("unreachable")

    def _drop_upstream(self, conn: _Conn) -> None:
        if conn.upstream is None:
            return
        with self._lock:
            self._sockets.discard(conn.upstream)
        if conn.up_rfile is not None:
            with suppress(OSError):
                conn.up_rfile.close()
        conn.upstream.close()
        conn.upstream = conn.up_rfile = None

    def _trickle(self, sock: socket.socket, data: bytes, rule: Rule) -> None:
        """One byte per `rule.delay` seconds until done, the client leaves or the proxy stops.

        Each byte resets a per-read timeout, so only a whole-request deadline ends this.
        """
        for i in range(len(data)):
            try:
                sock.sendall(data[i : i + 1])
                readable, _, _ = select.select([sock], [], [], rule.delay)
                gone = bool(readable) and not sock.recv(1, socket.MSG_PEEK)
            except OSError:
                gone = True
            if self._stopping.is_set():
                return
            if gone:
                rule.aborted += 1  # the client closed its end: it gave up on us
                return

    def _hang(self, sock: socket.socket) -> None:
        """Say nothing until the client closes the connection or the proxy stops."""
        while not self._stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                return  # EOF (the client gave up) or new bytes we will not answer
