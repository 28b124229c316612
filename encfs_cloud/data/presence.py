"""Each live mount's sealed `mounts/<id>` object, and when a freed pack may really go."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from encfs_cloud import layout
from encfs_cloud.errors import EncfsCloudError, StoreError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore

log = logging.getLogger(__name__)

KIND = "mount"
# A mount that has not renewed its object for this long is taken for gone: data it might
# still have needed may be deleted. It renews every HEARTBEAT while it runs.
STALE_AFTER = 600.0
HEARTBEAT = 60.0
DELETE_GRACE = STALE_AFTER / 10  # a freed pack waits this long after every mount passed it


@dataclass(frozen=True)
class MountSeen:
    name: str
    applied: int  # the newest commit this mount has applied
    time: float  # its wall clock when it said so


class Presence:
    """Advertises the newest commit this mount applied, sealed under the filesystem's keys.

    The payload is a random mount id, the commit number and the time: the bucket owner learns
    how many mounts are live and when they poll, nothing else.
    """

    def __init__(self, store: ObjectStore, sealer: Sealer) -> None:
        self.store = store
        self.sealer = sealer
        self.name = layout.MOUNTS_PREFIX + secrets.token_hex(16)
        self.published = -1
        self.published_at = 0.0

    def publish(self, applied: int) -> None:
        payload = json.dumps({"applied": applied, "time": time.time()}).encode()
        self.store.put(self.name, self.sealer.seal_object(self.name, KIND, payload))
        self.published, self.published_at = applied, time.monotonic()

    def due(self, applied: int) -> bool:
        return applied != self.published or time.monotonic() - self.published_at > HEARTBEAT

    def withdraw(self) -> None:
        self.store.delete(self.name)
        self.published = -1

    def live(self) -> list[MountSeen]:
        """Every mount that renewed its object within STALE_AFTER (ours included)."""
        now = time.time()
        found = []
        for obj in self.store.list(layout.MOUNTS_PREFIX):
            try:
                raw = self.sealer.open_object(obj.name, KIND, self.store.get(obj.name))
                fields = json.loads(raw)
                seen = MountSeen(obj.name, int(fields["applied"]), float(fields["time"]))
            except (EncfsCloudError, ValueError, KeyError, TypeError):
                # Gone meanwhile, or not sealed by a device: ignored, never trusted.
                continue
            if now - seen.time < STALE_AFTER:
                found.append(seen)
        return found


class Reaper:
    """Deletes objects our commits freed (packs, commits older than a snapshot) once every
    live mount has applied those commits.

    Kept in memory; if this mount stops first, the packs stay in the tree with no live bytes
    and the next commit of any mount schedules them again.
    """

    def __init__(self, presence: Presence, grace: float = DELETE_GRACE) -> None:
        self.presence = presence
        self.grace = grace
        # object name → (the commit that freed it, when we learnt so)
        self.waiting: dict[str, tuple[int, float]] = {}
        self.asked = -grace  # when live mounts were last listed (monotonic clock)

    def schedule(self, seq: int, names: list[str]) -> None:
        now = time.monotonic()
        for name in names:
            self.waiting.setdefault(name, (seq, now))

    def due(self) -> bool:
        """Whether an idle mount should look (a clock check, no request): some object's grace
        is over, and live mounts were not listed in the last half grace."""
        now = time.monotonic()
        if now - self.asked < self.grace / 2:
            return False
        return any(now - since >= self.grace for _, since in self.waiting.values())

    def ready(self, still_dead: Callable[[str], bool], *, leaving: bool = False) -> list[str]:
        """Objects every other live mount is past and still unreferenced here (blocking).

        `leaving`: this mount is unmounting and forgets what waits. If no other mount is
        live, nobody else can need them: they go now, without the grace (see design.md).
        """
        if not self.waiting:
            return []
        self.asked = time.monotonic()
        try:
            # Our own advertisement may lag our last commit; we know we are past it.
            others = [m for m in self.presence.live() if m.name != self.presence.name]
        except StoreError as exc:
            log.warning("could not list live mounts (%s); packs are deleted later", exc)
            return []
        oldest = min((m.applied for m in others), default=None)
        grace = 0.0 if leaving and not others else self.grace
        now = time.monotonic()
        ready = [
            pack
            for pack, (seq, since) in self.waiting.items()
            if (oldest is None or oldest >= seq) and now - since >= grace
        ]
        for name in ready:
            del self.waiting[name]
        return [n for n in ready if still_dead(n)]
