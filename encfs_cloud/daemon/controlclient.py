"""The client side of a mount's control socket: `status` and `umount`'s progress ask here.

Kept apart from the daemon's side (control.py) so that a command pulls in neither trio nor
the data layer just to ask a running mount a question.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from encfs_cloud.daemon import runtime
from encfs_cloud.errors import MountpointError


def socket_path(mountpoint: Path) -> Path:
    """The socket sits next to the mount's registry entry, under the same key."""
    return runtime.registry_entry(mountpoint).with_suffix(".sock")


def query(mountpoint: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon serving `mountpoint` for its status (blocking; no bucket involved)."""
    path = socket_path(Path(os.path.abspath(mountpoint)))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            # No socket, or one left behind by a daemon that was killed.
            raise MountpointError(f"{mountpoint} is not mounted by encfs-cloud here") from None
        except OSError as exc:
            raise MountpointError(f"cannot reach the daemon of {mountpoint}: {exc}") from None
        try:
            sock.sendall(json.dumps({"op": "status"}).encode() + b"\n")
            raw = b""
            while not raw.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except OSError:  # timed out, or the daemon closed the socket while exiting
            raise MountpointError(f"the daemon of {mountpoint} did not answer") from None
    try:
        reply = json.loads(raw)
    except ValueError:
        raise MountpointError(f"the daemon of {mountpoint} sent a garbled answer") from None
    if not reply.get("ok"):
        raise MountpointError(f"the daemon of {mountpoint} refused: {reply.get('error')}")
    result: dict[str, Any] = reply["status"]
    return result
