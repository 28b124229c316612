"""Run the same file operations on a mount and on a local directory and compare the outcomes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.fixtures_mount import Device, is_mounted, unmount

T = TypeVar("T")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
# Far enough in the past that "did the timestamp move" never depends on the clock.
OLD_NS = 1_000_000_000_123_456_789
# Local filesystems stamp times from a coarse clock (one jiffy, up to 10 ms here): wait longer
# than that between setting a baseline and the operation, so a change always shows.
TICK = 0.03

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """rename(2) with flags, which the os module does not offer."""
    done = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if done != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src))


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create or truncate `path` with `mode` (before umask) and write all of `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class R(str):
    """A path relative to the side's root, as an argument of Twin.call / Twin.refuses."""

    __slots__ = ()


@dataclass(frozen=True)
class Outcome:
    """What an operation did: its value, or the errno it failed with."""

    value: Any = None
    errno: int | None = None

    def __str__(self) -> str:
        if self.errno is not None:
            return f"errno {errno.errorcode.get(self.errno, self.errno)}"
        return repr(self.value)


def attempt(op: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=op())
    except OSError as exc:
        return Outcome(errno=exc.errno)


def stat_view(st: os.stat_result) -> dict[str, int]:
    """The stat fields a mount must report exactly as a local filesystem does."""
    view = {
        "type": stat.S_IFMT(st.st_mode),
        "mode": stat.S_IMODE(st.st_mode),
        "nlink": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if not stat.S_ISDIR(st.st_mode):  # a directory's st_size is the filesystem's own business
        view["size"] = st.st_size
    return view


def lstat_view(path: Path) -> dict[str, int]:
    return stat_view(os.lstat(path))


def tree_view(root: Path) -> dict[str, Any]:
    """Everything visible about a tree: per path its stat view, content or target, xattrs."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            entry: dict[str, Any] = {"stat": stat_view(st)}
            if stat.S_ISREG(st.st_mode):
                entry["data"] = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                entry["xattrs"] = {
                    n: os.getxattr(path, n)
                    for n in sorted(os.listxattr(path))
                    if n.startswith("user.")
                }
            out[rel] = entry
    return out


def _rooted(root: Path, args: tuple[Any, ...]) -> list[Any]:
    return [root / a if isinstance(a, R) else a for a in args]


def _label(func: Callable[..., Any], args: tuple[Any, ...]) -> str:
    return f"{getattr(func, '__name__', 'op')}({', '.join(map(repr, args))})"


def identities(root: Path) -> dict[str, tuple[int, int, int]]:
    """Inode number, mtime and ctime (ns) of every path below root: fixed across remounts."""
    return {
        str(p.relative_to(root)): (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        for p in sorted(root.rglob("*"))
        for st in (os.lstat(p),)
    }


class TwinFd:
    """One file opened on both sides; operations on it are compared like any other."""

    def __init__(self, twin: Twin, fds: tuple[int, int]) -> None:
        self.twin = twin
        self.fds = fds

    def do(self, op: Callable[[int], T], what: str = "") -> T:
        mine = attempt(lambda: op(self.fds[0]))
        self.twin.check(mine, attempt(lambda: op(self.fds[1])), what or "fd op")
        value: T = mine.value
        return value

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class Twin:
    """A directory on the mount and a local reference directory, driven in lockstep.

    Every operation runs on both; its value (or errno) must be the same on both sides. A
    test then reads like a POSIX script, and any divergence names the step that diverged.
    """

    def __init__(self, mine: Path, ref: Path) -> None:
        self.mine = mine
        self.ref = ref
        self.steps = 0

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.mine, self.ref

    def check(self, mine: Outcome, ref: Outcome, what: str) -> None:
        self.steps += 1
        assert mine == ref, f"step {self.steps} ({what}): mount gave {mine}, local gave {ref}"

    def do(self, op: Callable[[Path], T], what: str = "") -> T:
        """Run op(root) on both sides; same value or same errno, else the test fails."""
        mine = attempt(lambda: op(self.mine))
        self.check(mine, attempt(lambda: op(self.ref)), what or "op")
        value: T = mine.value
        return value

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """do() for func(*args, **kwargs), each R argument taken under the side's root."""
        return self.do(lambda root: func(*_rooted(root, args), **kwargs), _label(func, args))

    def refuses(self, code: int, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """fails() for func(*args, **kwargs), each R argument taken under the side's root."""
        self.fails(lambda root: func(*_rooted(root, args), **kwargs), code, _label(func, args))

    def fails(self, op: Callable[[Path], Any], code: int, what: str = "") -> None:
        """Like do(), and the operation must fail with `code` (a comparison alone could pass
        with both sides succeeding where POSIX wants an error)."""
        outcome = attempt(lambda: op(self.mine))
        assert outcome.errno == code, (
            f"{what or 'op'}: mount gave {outcome}, POSIX says {errno.errorcode[code]}"
        )
        self.check(outcome, attempt(lambda: op(self.ref)), what)

    def open(self, rel: str, flags: int, mode: int = 0o644) -> TwinFd:
        fds = tuple(os.open(root / rel, flags, mode) for root in self.roots)
        return TwinFd(self, (fds[0], fds[1]))

    def stat(self, rel: str) -> dict[str, int]:
        return self.do(lambda r: lstat_view(r / rel), f"lstat {rel}")

    def same_tree(self) -> dict[str, Any]:
        mine, ref = tree_view(self.mine), tree_view(self.ref)
        assert mine.keys() == ref.keys(), "the trees hold different names"
        for rel in mine:
            assert mine[rel] == ref[rel], f"{rel} differs: mount {mine[rel]!r} local {ref[rel]!r}"
        return mine

    def stamps(
        self,
        op: Callable[[Path], Any],
        before: Iterable[str],
        after: Iterable[str] | None = None,
        what: str = "",
    ) -> dict[str, tuple[bool, bool]]:
        """Which of mtime and ctime an operation moved, per path; must match on both sides.

        `before` names the inodes whose times are reset to a baseline; `after` names them
        again once the operation ran (a rename moves a path).
        """
        before = list(before)
        after = list(after) if after is not None else before
        assert len(after) == len(before)
        for root in self.roots:
            for rel in before:
                os.utime(root / rel, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
        base = {
            (root, rel): (os.lstat(root / rel).st_mtime_ns, os.lstat(root / rel).st_ctime_ns)
            for root in self.roots
            for rel in before
        }
        time.sleep(TICK)
        self.do(op, what)
        moved: list[dict[str, tuple[bool, bool]]] = []
        for root in self.roots:
            side = {}
            for old, new in zip(before, after, strict=True):
                st = os.lstat(root / new)
                m0, c0 = base[(root, old)]
                side[new] = (st.st_mtime_ns != m0, st.st_ctime_ns != c0)
            moved.append(side)
        assert moved[0] == moved[1], (
            f"{what}: (mtime moved, ctime moved) mount {moved[0]} local {moved[1]}"
        )
        return moved[0]


@dataclass
class MountedFs:
    """One filesystem over file:// shared by a module's tests, each in its own folder."""

    device: Device
    source: str
    mnt: Path
    twins: list[Twin] = field(default_factory=list)
    options: tuple[str, ...] = ()

    def mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        done = self.device.mount(self.source, self.mnt, *self.options)
        assert done.returncode == 0, f"mount failed: {done.stderr.strip()}"

    def remount(self) -> None:
        unmount(self.device, self.mnt)
        assert not is_mounted(self.mnt)
        self.mount()

    def twin(self, name: str, ref: Path) -> Twin:
        """A fresh folder on the mount for one test, and its local reference folder."""
        mine = self.mnt / name.replace("[", "-").replace("]", "")
        mine.mkdir()
        ref.mkdir()
        made = Twin(mine, ref)
        self.twins.append(made)
        return made


@contextlib.contextmanager
def shared_mount(base: Path, *options: str) -> Iterator[MountedFs]:
    """A new filesystem in `base`, mounted until the block ends (unmounted even on failure)."""
    (base / "bucket").mkdir()
    mounted = MountedFs(
        Device(base / "device"), f"file://{base / 'bucket'}", base / "mnt", options=options
    )
    mounted.device.init(mounted.source)
    mounted.mount()
    try:
        yield mounted
    finally:
        unmount(mounted.device, mounted.mnt)
