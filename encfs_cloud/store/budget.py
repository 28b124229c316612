"""One deadline per user-visible operation, shared by every store call made inside it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# An absolute time.monotonic() value. A ContextVar rather than an argument: the callers
# that own a budget (unmount, a command) are layers above the loops that call the store,
# and trio copies the context into its worker threads, so the store sees it unchanged.
_DEADLINE: ContextVar[float | None] = ContextVar("encfs_cloud_store_deadline", default=None)
_reporter: list[Callable[[str], None]] = []


_aborted_before = [float("-inf")]
STOPPING_READ_SECONDS = 10.0


def abort_in_flight() -> None:
    """End every store call already running, at once (SIGTERM: stop waiting for a slow store).

    Calls started afterwards run normally, except reads outside any budget: a process still
    reading the lazily detached mount gets at most STOPPING_READ_SECONDS per read, so it
    cannot hold the unmount (writes keep their full time: they carry the final flush).
    """
    _aborted_before[0] = time.monotonic()


def aborted_before() -> float:
    """Store calls that began before this time.monotonic() value are to be cut."""
    return _aborted_before[0]


def read_deadline() -> float | None:
    """The deadline of a read: its budget's, or a short one once in-flight calls were cut."""
    end = _DEADLINE.get()
    if end is None and _aborted_before[0] > float("-inf"):
        return time.monotonic() + STOPPING_READ_SECONDS
    return end


def set_wait_reporter(reporter: Callable[[str], None] | None) -> None:
    """Have `reporter` told, every 5 s, which store a silent request is waiting for.

    The command line installs one when stderr is a terminal; nothing else does. (Here rather
    than beside the S3 watchdog, so that setting it does not import botocore.)
    """
    _reporter[:] = [] if reporter is None else [reporter]


def wait_reporter() -> Callable[[str], None] | None:
    return _reporter[0] if _reporter else None


@contextmanager
def operation_budget(seconds: float) -> Iterator[float]:
    """Bound every store call made inside the block to end `seconds` from now.

    Budgets nest by taking the earlier end, so an inner retry loop can never extend what
    its caller promised the user. Yields the absolute deadline.
    """
    end = time.monotonic() + seconds
    outer = _DEADLINE.get()
    if outer is not None:
        end = min(end, outer)
    token = _DEADLINE.set(end)
    try:
        yield end
    finally:
        _DEADLINE.reset(token)


def budget_deadline() -> float | None:
    """The absolute deadline (time.monotonic()) of the enclosing budget, if any."""
    return _DEADLINE.get()


def budget_left() -> float | None:
    """Seconds left in the enclosing budget (never negative), or None when unbounded."""
    end = _DEADLINE.get()
    return None if end is None else max(0.0, end - time.monotonic())
