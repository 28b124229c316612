"""I/O steps run in a child process (killable on a hung mount); prints timings as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BLOCK = 1 << 20


def write(path: str, size: int, sync: bool = True) -> dict[str, float]:
    """Write size bytes of incompressible data in 1 MiB writes, then fsync (unless not sync,
    like cp) and close."""
    pattern = memoryview(os.urandom(8 * BLOCK))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            start = done % (len(pattern) - BLOCK + 1)
            done += os.write(fd, pattern[start : start + n])
        t_written = time.perf_counter()
        if sync:
            os.fsync(fd)
        t_fsync = time.perf_counter()
    finally:
        os.close(fd)
    t_closed = time.perf_counter()
    return {"write_s": t_written - t0, "fsync_s": t_fsync - t0, "close_s": t_closed - t0}


def read(path: str) -> dict[str, float]:
    """Read a whole file sequentially in 1 MiB reads."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            total += n
    return {"bytes": total, "s": time.perf_counter() - t0}


def mkfiles(directory: str, count: int, size: int) -> dict[str, float]:
    """Create a directory holding count small files."""
    t0 = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    body = os.urandom(size)
    for i in range(count):
        with open(os.path.join(directory, f"file-{i:05d}.dat"), "wb") as f:
            f.write(body)
    return {"s": time.perf_counter() - t0, "files": count}


def rename(src: str, dst: str) -> dict[str, float]:
    """Time one rename(2) of a directory whose lookup is already cached."""
    os.stat(src)
    os.stat(os.path.dirname(dst) or ".")
    t0 = time.perf_counter()
    os.rename(src, dst)
    elapsed = time.perf_counter() - t0
    return {"s": elapsed, "entries": len(os.listdir(dst))}


def main(argv: list[str] | None = None) -> int:
    """Dispatch one step and print its timings."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("write")
    p.add_argument("path")
    p.add_argument("size", type=int)
    p.add_argument("--no-fsync", action="store_true", help="close without fsync, like cp")
    p = sub.add_parser("read")
    p.add_argument("path")
    p = sub.add_parser("mkfiles")
    p.add_argument("directory")
    p.add_argument("count", type=int)
    p.add_argument("size", type=int)
    p = sub.add_parser("rename")
    p.add_argument("src")
    p.add_argument("dst")
    args = parser.parse_args(argv)
    if args.cmd == "write":
        out = write(args.path, args.size, sync=not args.no_fsync)
    elif args.cmd == "read":
        out = read(args.path)
    elif args.cmd == "mkfiles":
        out = mkfiles(args.directory, args.count, args.size)
    else:
        out = rename(args.src, args.dst)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
