"""`make demo`: create (once) and mount a demo filesystem kept in a local folder (file://)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, text=True, capture_output=True, check=False)


def fail(step: str, done: subprocess.CompletedProcess[str]) -> None:
    sys.stderr.write(done.stdout + done.stderr)
    sys.exit(f"demo: {step} failed (exit {done.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo"))
    parser.add_argument("--stop", action="store_true", help="unmount the demo filesystem")
    args = parser.parse_args()
    base = args.dir.absolute()
    bucket, mountpoint = base / "bucket", base / "mnt"
    source = f"file://{bucket}"
    if args.stop:
        if os.path.ismount(mountpoint):
            done = run(str(BIN / "encfs-cloud"), "umount", str(mountpoint))
            if done.returncode:
                fail("umount", done)
        print(f"demo: unmounted {mountpoint}; the encrypted bucket stays in {bucket}")
        return
    if not Path("/dev/fuse").exists():
        sys.exit("demo: /dev/fuse is missing: load the fuse module (modprobe fuse) first")
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(mountpoint):
        print(f"demo: already mounted at {mountpoint}")
        return
    first = not (bucket / "encfs-cloud").exists()
    if first:
        bucket.mkdir(parents=True, exist_ok=True)
        done = run(
            str(BIN / "encfs-cloud"), "init", source, "--no-passphrase", "--device-name", "demo"
        )
        if done.returncode:
            fail("init", done)
        print(done.stdout)
    done = run(str(BIN / "mount.encfs-cloud"), source, str(mountpoint))
    if done.returncode:
        fail("mount", done)
    if first:
        (mountpoint / "hello.txt").write_text(
            "This file is encrypted before it reaches the bucket folder.\n"
        )
        (mountpoint / "photos").mkdir()
    print(f"demo: mounted {source}")
    print(f"demo:      at {mountpoint}")
    print(f"demo: the bucket (only ciphertext) is {bucket}")
    print(f"demo: unmount with: make demo-stop   (or {BIN}/encfs-cloud umount {mountpoint})")


if __name__ == "__main__":
    main()
