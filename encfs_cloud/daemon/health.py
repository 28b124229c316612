"""Whether the store answers: a store wrapper that remembers its last success and failure."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

from encfs_cloud.errors import ObjectMissingError, PreconditionFailedError, StoreError
from encfs_cloud.store.base import ObjectInfo, ObjectStore

# Answers that prove the store is there, even though the operation failed.
ANSWERED = (ObjectMissingError, PreconditionFailedError)
# A request unanswered this long makes the store count as unreachable before the store
# layer's retries give up (they may take minutes); a slow but working upload rarely waits so.
STALL_SECONDS = 30.0


def iso(epoch: float | None) -> str | None:
    """An ISO 8601 UTC time for programs (status --json), or None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


class WatchedStore:
    """Passes every call through and notes when the store last answered and last failed.

    `status` reads it from memory, so it can say that the store is unreachable without
    asking the store.
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, tuple[str, float]] = {}  # requests under way, for `oldest`

    @contextlib.contextmanager
    def _request(self, what: str) -> Iterator[None]:
        key = next(self._ids)
        with self._lock:
            self._pending[key] = (what, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                del self._pending[key]

    def oldest(self) -> tuple[str, float] | None:
        """The request waiting longest for an answer and for how many seconds, if any."""
        with self._lock:
            if not self._pending:
                return None
            what, since = min(self._pending.values(), key=lambda p: p[1])
        return what, time.monotonic() - since

    def _ok(self) -> None:
        self.last_success = time.time()
        self.failing_since = None

    def _failed(self, exc: StoreError) -> None:
        if isinstance(exc, ANSWERED):
            self._ok()
            return
        now = time.time()
        self.last_failure = now
        self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if self.failing_since is None:
            self.failing_since = now

    def report(self) -> dict[str, Any]:
        """Plain values for `status`: reachable is None until the store was asked once."""
        reachable = None
        if self.last_success is not None or self.last_failure is not None:
            reachable = self.failing_since is None
        failing_since, error = self.failing_since, self.last_error
        oldest = self.oldest()
        if oldest is not None and oldest[1] > STALL_SECONDS and reachable is not False:
            # Retries inside the store layer hide failures until they give up: a request
            # that stays unanswered says as much.
            reachable = False
            failing_since = time.time() - oldest[1]
            error = f"no answer for {oldest[1]:.0f} s ({oldest[0]})"
        return {
            "reachable": reachable,
            "last_success": iso(self.last_success),
            "last_failure": iso(self.last_failure),
            "failing_since": iso(failing_since),
            "last_error": None if reachable else error,
            "oldest_request": None
            if oldest is None
            else {"request": oldest[0], "seconds": round(oldest[1], 1)},
        }

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            with self._request(f"GET {name}"):
                data = self.inner.get(name, start, length)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()
        return data

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        try:
            with self._request(f"GET {name}"):
                found = self.inner.get_with_etag(name, limit)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()
        return found

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        try:
            with self._request(f"PUT {name}"):
                etag = self.inner.put(name, data, if_none_match=if_none_match, if_match=if_match)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()
        return etag

    def delete(self, name: str) -> None:
        try:
            with self._request(f"DELETE {name}"):
                self.inner.delete(name)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()

    def head(self, name: str) -> ObjectInfo | None:
        try:
            with self._request(f"HEAD {name}"):
                info = self.inner.head(name)
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            pages = iter(self.inner.list(prefix))
            while True:  # only the waits for the store count, not the caller's work in between
                with self._request(f"LIST {prefix or '/'}"):
                    item = next(pages, None)
                if item is None:
                    break
                yield item
        except StoreError as exc:
            self._failed(exc)
            raise
        self._ok()

    def close(self) -> None:
        self.inner.close()


def find_watch(store: object) -> WatchedStore | None:
    """The WatchedStore somewhere inside a chain of wrappers (each keeps its `inner`)."""
    while store is not None:
        if isinstance(store, WatchedStore):
            return store
        store = getattr(store, "inner", None)
    return None
