"""The single-writer lease: a sealed `lease` object taken and renewed with conditional writes.

Clock assumptions. A lease says when it was last renewed (the holder's wall clock) and how
long it stays valid. Another machine treats it as expired only once its own wall clock is past
`renewed_at + validity + CLOCK_SKEW`, so clocks must agree within CLOCK_SKEW seconds (NTP does
far better). The holder measures with its monotonic clock and stops writing once 3/4 of the
validity has passed since the start of its last successful renewal, well before anyone may
take over; a writer paused for longer (suspended laptop, SIGSTOP) finds on waking that it may
no longer write, and on its next renewal that it lost the lease.

On the same machine (same host name and boot id) a holder whose process is gone is known to be
dead, so its lease is taken at once, without `takeover` (like a lock file naming a dead pid;
containers sharing the host name and kernel but not the pid namespace must not share a
filesystem this way). Conditional commits (`IfNoneMatch` on
`meta/<seq>`) remain the last line of defence: two writers can never both write one sequence.
The bucket owner can always delete or replay the lease (liveness is theirs to break); it cannot
read who holds it nor forge a lease, which is sealed with the filesystem's keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from encfs_cloud import layout
from encfs_cloud.daemon.runtime import pid_alive
from encfs_cloud.errors import (
    IntegrityError,
    LeaseHeldError,
    ObjectMissingError,
    PreconditionFailedError,
    StoreError,
    TransientStoreError,
    UsageError,
)
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

LEASE_KIND = "lease"
DEFAULT_VALIDITY = 60.0
VALIDITY_ENV = "ENCFS_CLOUD_LEASE_SECONDS"  # tuning and tests: a shorter lease
CLOCK_SKEW = 5.0
ACQUIRE_ATTEMPTS = 4
RELEASE_BUDGET = 5.0  # seconds an unmount spends on releasing the lease, at most


def default_validity() -> float:
    text = os.environ.get(VALIDITY_ENV, "").strip()
    if not text:
        return DEFAULT_VALIDITY
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{VALIDITY_ENV}={text!r} is not a number of seconds") from None
    if value < 1.0:
        raise UsageError(f"{VALIDITY_ENV} must be at least 1 second")
    return value


def boot_id() -> str:
    """Tells this boot of this machine from any other (pids are reused across boots)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def boottime() -> float:
    """A clock that, unlike time.monotonic on Linux, keeps counting while suspended.

    A laptop that sleeps with the filesystem mounted must see, on waking, that its lease
    may have expired meanwhile, and stop writing until it renews.
    """
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class LeaseInfo:
    """What the sealed lease object says."""

    session: str
    device_id: str
    device_name: str
    hostname: str
    boot_id: str
    pid: int
    acquired_at: float
    renewed_at: float
    validity: float
    released: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LeaseInfo:
        # Authenticated, so written by a holder of the keys: only its shape needs checking.
        try:
            data = json.loads(raw)
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"the lease is malformed: {exc}") from None

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.validity

    def expired(self, now: float) -> bool:
        return self.released or now > self.expires_at + CLOCK_SKEW

    def gone_from_here(self) -> bool:
        """The holder ran on this very machine and its process is gone (it crashed)."""
        here = self.hostname == socket.gethostname() and self.boot_id == boot_id()
        return here and bool(self.boot_id) and not pid_alive(self.pid)

    def holder(self) -> str:
        return (
            f"device '{self.device_name}' on host {self.hostname} (pid {self.pid}) "
            f"since {_when(self.acquired_at)}"
        )


class Lease:
    """One would-be writer's handle on the lease; its blocking calls run in worker threads."""

    def __init__(
        self,
        store: ObjectStore,
        sealer: Sealer,
        device_id: str,
        device_name: str,
        *,
        validity: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = boottime,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.device_id = device_id
        self.device_name = device_name
        self.validity = default_validity() if validity is None else validity
        self.clock = clock
        self.monotonic = monotonic
        self.session = layout.random_id()
        self.info: LeaseInfo | None = None
        self.etag: str | None = None
        self.lost = False
        self.lost_to: LeaseInfo | None = None
        self.unreadable = ""  # why the lease object last read does not open, if it does not
        self._renew_started = 0.0  # monotonic time of the last successful renewal's start
        self._lock = threading.Lock()

    # --- reading and writing the object --------------------------------------------------

    def seal(self, info: LeaseInfo) -> bytes:
        return self.sealer.seal_object(layout.LEASE_NAME, LEASE_KIND, info.encode())

    def read(self) -> tuple[LeaseInfo | None, str | None]:
        """The lease and its etag: (None, None) if absent, (None, etag) if it does not open."""
        try:
            blob, etag = self.store.get_with_etag(layout.LEASE_NAME, layout.LEASE_CAP + 1)
        except ObjectMissingError:
            return None, None
        self.unreadable = ""
        if len(blob) > layout.LEASE_CAP:  # refused like any lease that does not open
            self.unreadable = f"is larger than the {layout.LEASE_CAP} bytes its format allows"
            return None, etag
        try:
            raw = self.sealer.open_object(layout.LEASE_NAME, LEASE_KIND, blob)
            return LeaseInfo.decode(raw), etag
        except (IntegrityError, ValueError) as exc:
            log.debug("the lease object does not open: %s", exc)  # the refusal says it
            self.unreadable = "does not authenticate (tampered, or left by another filesystem)"
            return None, etag

    def _mine(self, now: float) -> LeaseInfo:
        host, boot, pid = socket.gethostname(), boot_id(), os.getpid()
        ids = (self.session, self.device_id, self.device_name, host, boot, pid)
        return LeaseInfo(*ids, acquired_at=now, renewed_at=now, validity=self.validity)

    # --- taking, renewing, releasing -----------------------------------------------------

    @property
    def held(self) -> bool:
        return self.etag is not None and not self.lost

    def acquire(self, takeover: bool = False, how: str = "-o takeover") -> LeaseInfo:
        """Take the lease, or raise LeaseHeldError naming who holds it (and how to proceed)."""
        for _ in range(ACQUIRE_ATTEMPTS):
            current, etag = self.read()
            now = self.clock()
            if etag is not None:
                self._check_free(current, now, takeover, how)
            mine = self._mine(now)
            started = self.monotonic()
            try:
                if etag is None:
                    new = self.store.put(layout.LEASE_NAME, self.seal(mine), if_none_match=True)
                else:
                    new = self.store.put(layout.LEASE_NAME, self.seal(mine), if_match=etag)
            except PreconditionFailedError:
                continue  # someone else moved first: look again at who holds it now
            with self._lock:
                self.info, self.etag, self.lost = mine, new, False
                self._renew_started = started
            if current is not None and not current.released:
                log.warning("took over the lease of %s", current.holder())
            return mine
        raise LeaseHeldError("the lease changed hands while we tried to take it; try again")

    def _check_free(self, current: LeaseInfo | None, now: float, takeover: bool, how: str) -> None:
        if current is None:
            if takeover:
                return
            why = self.unreadable or "does not authenticate"
            raise LeaseHeldError(
                f"the lease object {why}; if no mount or other exclusive operation is "
                f"running, retry with {how}"
            )
        # A holder on this machine whose process is gone cannot write any more: its lease is
        # stale for sure (a crash, or an unmount that could not reach the store to release).
        if current.released or current.session == self.session or current.gone_from_here():
            return
        expired = current.expired(now)
        if takeover and expired:
            return
        prefix = f"the filesystem is mounted read-write by {current.holder()}"
        if expired:
            raise LeaseHeldError(
                f"{prefix}; its lease expired at {_when(current.expires_at)} "
                f"(crashed?): if that mount is gone, retry with {how}"
            )
        ago = max(0.0, now - current.renewed_at)
        if takeover:
            raise LeaseHeldError(
                f"{prefix} and is alive (lease renewed {ago:.0f}s ago); {how} only takes "
                f"over an expired lease (after {_when(current.expires_at + CLOCK_SKEW)})"
            )
        raise LeaseHeldError(
            f"{prefix} (renewed {ago:.0f}s ago); mount with -o ro alongside it, or if that "
            f"mount crashed, retry with {how} after {_when(current.expires_at + CLOCK_SKEW)}"
        )

    def renew(self) -> bool:
        """Extend the lease; False if someone else took it (then we must never write again)."""
        with self._lock:
            if self.lost:
                return False
            if self.info is None or self.etag is None:
                raise RuntimeError("renew() before acquire()")
            info, etag = self.info, self.etag
        now = self.clock()
        mine = replace(info, renewed_at=now, pid=os.getpid(), validity=self.validity)
        started = self.monotonic()
        try:
            new = self.store.put(layout.LEASE_NAME, self.seal(mine), if_match=etag)
        except PreconditionFailedError:
            self._mark_lost()
            return False
        with self._lock:
            self.info, self.etag = mine, new
            self._renew_started = started
        return True

    def _mark_lost(self) -> None:
        with self._lock:
            self.lost = True
        with contextlib.suppress(StoreError):
            self.lost_to, _ = self.read()

    def release(self) -> None:
        """Leave a released lease behind (conditionally: never clobber a new holder's)."""
        with self._lock:
            if self.info is None or self.etag is None or self.lost:
                return
            info, etag = self.info, self.etag
            self.etag = None
        gone = replace(info, renewed_at=self.clock(), released=True)
        try:
            self.store.put(layout.LEASE_NAME, self.seal(gone), if_match=etag)
        except PreconditionFailedError:
            log.warning("the lease had already passed to another writer at release")
        except StoreError as exc:
            log.warning("could not release the lease (%s); it expires on its own", exc)

    def may_write(self) -> bool:
        """Whether a write now is covered: held, not lost, and renewed recently enough."""
        with self._lock:
            if self.lost or self.etag is None:
                return False
            return self.monotonic() < self._renew_started + self.validity * 0.75

    def lost_holder(self) -> str:
        return self.lost_to.holder() if self.lost_to else "another writer"

    @contextlib.contextmanager
    def renewed_in_background(self) -> Iterator[None]:
        """Keep the lease renewed from a thread for the body of a with-block (CLI commands)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.validity / 4):
                try:
                    if not self.renew():
                        log.error("lost the lease to %s", self.lost_holder())
                        return
                except StoreError as exc:
                    log.warning("could not renew the lease (%s); retrying", exc)

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


class FencedStore:
    """A store that refuses every write the lease does not cover; reads pass through.

    A lost lease gives `PreconditionFailedError` (the uploader never retries a commit that
    got it); a lease not renewed lately gives `TransientStoreError`, retried until renewal
    succeeds again.
    """

    def __init__(self, inner: ObjectStore, lease: Lease) -> None:
        self.inner = inner
        self.lease = lease
        self.url = inner.url

    def _check(self, name: str) -> None:
        if self.lease.may_write():
            return
        if self.lease.lost:
            raise PreconditionFailedError(
                f"not writing {name}: this mount lost the single-writer lease"
            )
        raise TransientStoreError(f"not writing {name}: the lease could not be renewed lately")

    def get(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(name, start, length)

    def get_with_etag(self, name: str, limit: int | None = None) -> tuple[bytes, str]:
        return self.inner.get_with_etag(name, limit)

    def put(
        self,
        name: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self._check(name)
        return self.inner.put(name, data, if_none_match=if_none_match, if_match=if_match)

    def delete(self, name: str) -> None:
        self._check(name)
        self.inner.delete(name)

    def head(self, name: str) -> ObjectInfo | None:
        return self.inner.head(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()
