"""The one progress renderer: its line, and the real long commands drawing it on a terminal."""

from __future__ import annotations

import io
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from encfs_cloud.cli.progress import Progress, duration
from tests.fixtures_mount import ENCFS, Device, needs_fuse


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_shows_done_total_rate_and_eta() -> None:
    bar = Progress("salvage: copied", stream=Terminal())
    assert bar.line(3 << 20, 12 << 20, 1 << 20) == (
        "salvage: copied 3.0 MiB of 12.0 MiB (25%), 1.0 MiB/s, 9 s left"
    )
    packs = Progress("re-encrypting", "packs", stream=Terminal())
    assert packs.line(10, 40, 2.0) == "re-encrypting 10 of 40 packs (25%), 2 packs/s, 15 s left"
    assert packs.line(0, 0, 0.0) == "re-encrypting"
    assert duration(125) == "2 min 05 s" and duration(7300) == "2 h 01 min"


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("fsck:", "", stream=out)
    for n in range(5):
        bar.update(n, 5)
    bar.close()
    assert out.getvalue() == ""


def test_draws_over_itself_and_wipes_the_line() -> None:
    out = Terminal()
    bar = Progress("x", "items", stream=out)
    bar.update(1, 4)
    bar.close()
    assert out.getvalue().startswith("\rx 1 of 4 items (25%)")
    assert out.getvalue().endswith("\r")


def _on_terminal(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            output += data
    finally:
        os.close(master)
    return proc.wait(timeout=120), output.decode(errors="replace")


@needs_fuse
@pytest.mark.parametrize("command", ["salvage", "fsck"])
def test_long_commands_show_the_same_line_on_a_terminal(
    device: Device, local_source: str, tmp_path: Path, command: str
) -> None:
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as mnt:
        for n in range(30):
            (mnt / f"f{n}.bin").write_bytes(os.urandom(1 << 20))
    args = [ENCFS, command, local_source] + (
        [str(tmp_path / "out")] if command == "salvage" else []
    )
    code, shown = _on_terminal(args, device.env)
    assert code == 0, shown
    if command == "salvage":
        assert "\rsalvage: copied " in shown and " of 30.0 MiB (" in shown, repr(shown)
    else:
        assert "\rfsck: verifying data objects: " in shown and " of " in shown, repr(shown)
