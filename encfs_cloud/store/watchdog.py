"""Whole-request deadlines for the S3 client: a watchdog thread that aborts overdue sockets."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import Any

from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)

from encfs_cloud.store.budget import aborted_before, wait_reporter

log = logging.getLogger(__name__)
# Headers cut by the watchdog make urllib3 log a warning with a traceback; the failure itself
# reaches our retry loop, which reports it in one line, so that warning is noise on a terminal.
logging.getLogger("urllib3.connection").setLevel(logging.ERROR)

# The slowest transfer rate an attempt is granted on top of its fixed allowance: a pack of
# 8 MiB gets 128 s more. Slower than this, the store is treated as failing, not slow.
MIN_RATE = 64 * 1024
# How long a command waits in silence before it says what it is waiting for.
WAIT_REPORT_AFTER = 5.0
_TICK = 0.2

_local = threading.local()


class Operation:
    """One store call as the user sees it: every attempt, with one deadline over them all.

    `begin`/`finish` bracket an attempt; while one runs, the connections its thread takes
    from the pool are tracked, and once the attempt or the operation is overdue the
    watchdog shuts their sockets down, which ends any blocked send or receive at once.
    botocore's own read timeout cannot do that: it restarts with every byte received.
    """

    def __init__(self, label: str, max_attempts: int, seconds: float, cap: float | None) -> None:
        now = time.monotonic()
        self.label = label
        self.max_attempts = max_attempts
        self.began = now
        self.cap = float("inf") if cap is None else cap
        self.deadline = min(self.cap, now + seconds)
        self.attempt = 0
        self.attempt_deadline = self.deadline
        self.answered = False  # any attempt got an HTTP answer (even an error)
        self.overdue = False  # the watchdog aborted the current attempt
        self._conns: list[Any] = []
        self._silent_since = now
        self._reported = now
        self._lock = threading.Lock()

    def __enter__(self) -> Operation:
        _WATCHDOG.add(self)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        _WATCHDOG.remove(self)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def begin(self, attempt: int, seconds: float) -> None:
        with self._lock:
            self.attempt = attempt
            self.overdue = False
            self.attempt_deadline = min(self.deadline, time.monotonic() + seconds)
            self._conns = []
        _local.operation = self

    def finish(self) -> None:
        _local.operation = None
        with self._lock:
            self._conns = []

    def heard(self) -> None:
        """The store answered (headers or an error): it is reachable."""
        self.answered = True
        self._silent_since = time.monotonic()

    def allow(self, nbytes: int) -> None:
        """Grant the running attempt and the operation time for `nbytes` more of transfer."""
        extra = nbytes / MIN_RATE
        with self._lock:
            self.deadline = min(self.cap, self.deadline + extra)
            self.attempt_deadline = min(self.deadline, self.attempt_deadline + extra)

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)

    def check(self, now: float, reporter: Callable[[str], None] | None) -> None:
        """Called by the watchdog thread on every tick."""
        aborted = self.began < aborted_before()
        with self._lock:
            if aborted:
                self.deadline = self.attempt_deadline = min(self.deadline, now)
            conns = list(self._conns) if now >= self.attempt_deadline else []
            if conns:
                self.overdue = True
        for conn in conns:
            sock = getattr(conn, "kept_sock", None) or getattr(conn, "sock", None)
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if (
            reporter is not None
            and now - self._silent_since >= WAIT_REPORT_AFTER
            and now - self._reported >= WAIT_REPORT_AFTER
        ):
            self._reported = now
            reporter(
                f"waiting for {self.label} (no answer for {int(now - self._silent_since)} s,"
                f" attempt {self.attempt} of {self.max_attempts})"
            )


class _Watchdog:
    """One daemon thread per process, running only while some operation is in flight."""

    def __init__(self) -> None:
        self._ops: set[Operation] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, op: Operation) -> None:
        with self._lock:
            self._ops.add(op)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="encfs-store-watchdog", daemon=True
                )
                self._thread.start()

    def remove(self, op: Operation) -> None:
        with self._lock:
            self._ops.discard(op)

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            with self._lock:
                ops = list(self._ops)
                if not ops:
                    self._thread = None
                    return
            now = time.monotonic()
            for op in ops:
                op.check(now, wait_reporter())


_WATCHDOG = _Watchdog()


def _track(conn: Any) -> Any:
    op: Operation | None = getattr(_local, "operation", None)
    if op is not None:
        op.track(conn)
    return conn


# http.client drops `conn.sock` when a response says "Connection: close" while the
# response still reads from it, so each connection keeps its own reference for the watchdog.
class _KeptSockHTTP(AWSHTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.kept_sock = self.sock


class _KeptSockHTTPS(AWSHTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.kept_sock = self.sock


class _TrackedPool(AWSHTTPConnectionPool):
    ConnectionCls = _KeptSockHTTP

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _track(super()._get_conn(timeout))


class _TrackedHTTPSPool(AWSHTTPSConnectionPool):
    ConnectionCls = _KeptSockHTTPS

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _track(super()._get_conn(timeout))


def install(client: Any) -> bool:
    """Make `client`'s connection pools report their connections to the running operation.

    botocore offers no public hook for the socket a request uses, so this swaps the pool
    classes of its urllib3 session (read once per new pool). If a botocore release moves
    them, requests are still bounded between attempts, and the log says so once.
    """
    classes = getattr(
        getattr(client._endpoint, "http_session", None), "_pool_classes_by_scheme", None
    )
    if not isinstance(classes, dict) or set(classes) != {"http", "https"}:
        log.warning("this botocore cannot abort overdue requests; deadlines apply between tries")
        return False
    classes["http"] = _TrackedPool
    classes["https"] = _TrackedHTTPSPool
    return True


def current() -> Operation | None:
    """The operation whose attempt runs on this thread, if any."""
    op: Operation | None = getattr(_local, "operation", None)
    return op
