"""The one progress line of every long command: done/total, rate and ETA, on terminals only."""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from encfs_cloud.daemon import controlclient
from encfs_cloud.errors import MountpointError

RATE_WINDOW = 5.0  # seconds of samples behind the rate
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """One self-overwriting line on a terminal: "LABEL DONE of TOTAL (P%), RATE, ETA left".

    `unit` "B" shows sizes, anything else counts ("12 of 40 packs"). Silent when the stream
    is not a terminal, and for the first `quiet_for` seconds (a quick command prints nothing).
    """

    EVERY = 0.2

    def __init__(
        self,
        label: str,
        unit: str = "B",
        *,
        stream: TextIO | None = None,
        quiet_for: float = 0.0,
    ) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.quiet_until = self.started + quiet_for
        self.next_at = 0.0
        self.samples: deque[tuple[float, float]] = deque()
        self.shown = 0

    def _amount(self, n: float) -> str:
        return size(n) if self.unit == "B" else f"{n:.0f}"

    def _rate(self, now: float, done: float) -> float:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 - t0 > 0.5 else 0.0

    def line(self, done: float, total: float | None, rate: float) -> str:
        unit = f" {self.unit}" if self.unit and self.unit != "B" else ""
        if not done and not total:
            return self.label  # a stage that counts nothing yet
        text = f"{self.label} {self._amount(done)}"
        if total:
            text += f" of {self._amount(total)}{unit} ({min(done / total, 1.0):.0%})"
        else:
            text += unit
        if rate > 0:
            text += f", {self._amount(rate)}{unit}/s"
            if total and total > done:
                text += f", {duration((total - done) / rate)} left"
        return text

    def update(self, done: float, total: float | None = None, label: str | None = None) -> None:
        now = time.monotonic()
        if label is not None and label != self.label:
            self.label = label
            self.samples.clear()  # a new stage: its own rate
        rate = self._rate(now, done)
        last = bool(total) and done >= (total or 0)  # the end is always drawn once
        if not self.enabled or now < self.quiet_until or (now < self.next_at and not last):
            return
        self.next_at = now + self.EVERY
        text = self.line(done, total, rate)
        self.stream.write("\r" + text.ljust(self.shown))
        self.stream.flush()
        self.shown = max(self.shown, len(text))

    def close(self) -> None:
        """Wipe the line, leaving the terminal as it was."""
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0


class FlushView:
    """umount's line while the daemon uploads: bytes uploaded since the wait began, of those
    plus what is still pending, asked over the control socket twice a second."""

    QUIET_FOR = 1.0  # a quick unmount prints nothing at all
    ASK_EVERY = 0.5

    def __init__(self, mountpoint: Path, stream: TextIO | None = None) -> None:
        self.mountpoint = mountpoint
        self.progress = Progress("encfs-cloud: uploading", stream=stream, quiet_for=self.QUIET_FOR)
        self.first: int | None = None
        self.next_ask = time.monotonic() + self.QUIET_FOR

    def tick(self) -> None:
        now = time.monotonic()
        if not self.progress.enabled or now < self.next_ask:
            return
        self.next_ask = now + self.ASK_EVERY
        try:
            report = controlclient.query(self.mountpoint, timeout=1.0)
        except MountpointError:
            return  # the daemon is closing its socket: it is about to exit
        uploaded = int(report["transfers"]["bytes_uploaded"])
        if self.first is None:
            self.first = uploaded
        pending = int(report["dirty"]["dirty_bytes"]) + int(report["dirty"]["uploading_bytes"])
        done = uploaded - self.first
        label = "encfs-cloud: uploading" if pending else "encfs-cloud: writing the last commit;"
        self.progress.update(done, done + pending, label=label)

    def close(self) -> None:
        self.progress.close()
