"""Minimal pyfuse3 passthrough filesystem with the kernel writeback cache: the Python ceiling."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("passthrough")

T = TypeVar("T")

# Long kernel caching: this filesystem is the only writer of its source directory.
TIMEOUT = 60.0


def _oserror(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn, turning OSError into the FUSEError pyfuse3 expects."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


class Passthrough(pyfuse3.Operations):
    """Mirror a source directory; inodes are the source's st_ino (its root maps to ROOT_INODE).

    Each known inode remembers one (parent inode, name) pair rather than a full path, so
    renaming a directory is O(1) and its descendants stay reachable. With hard links only
    the most recently seen name is kept: enough for a benchmark ceiling.
    """

    enable_writeback_cache = True

    def __init__(self, source: str) -> None:
        super().__init__()
        self._source = os.path.abspath(source)
        self._root_ino = os.lstat(self._source).st_ino
        self._names: dict[int, tuple[int, bytes]] = {}
        self._lookups: dict[int, int] = {}
        self._dirs: dict[int, tuple[int, bytes, list[bytes]]] = {}
        self._next_dir_fh = 1

    # -- inode bookkeeping ------------------------------------------------------------
    def _path(self, inode: int) -> bytes:
        parts: list[bytes] = []
        while inode != pyfuse3.ROOT_INODE:
            entry = self._names.get(inode)
            if entry is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            inode, name = entry
            parts.append(name)
        parts.append(os.fsencode(self._source))
        return b"/".join(reversed(parts))

    def _child(self, parent: int, name: bytes) -> bytes:
        return self._path(parent) + b"/" + name

    def _attr(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        ino = pyfuse3.ROOT_INODE if st.st_ino == self._root_ino else st.st_ino
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _remember(self, parent: int, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = self._attr(st)
        if attr.st_ino != pyfuse3.ROOT_INODE:
            self._names[attr.st_ino] = (parent, name)
            self._lookups[attr.st_ino] = self._lookups.get(attr.st_ino, 0) + 1
        return attr

    # -- metadata ---------------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            path = self._path(parent_inode)
        elif name == b"..":
            path = self._path(parent_inode) + b"/.."
        else:
            st = _oserror(os.lstat, self._child(parent_inode, name))
            return self._remember(parent_inode, name, st)
        return self._attr(_oserror(os.lstat, path))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
            else:
                self._lookups.pop(inode, None)
                self._names.pop(inode, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(_oserror(os.lstat, self._path(inode)))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            if fh is not None:
                _oserror(os.ftruncate, fh, attr.st_size)
            else:
                _oserror(os.truncate, path, attr.st_size)
        if fields.update_mode:
            _oserror(os.chmod, path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _oserror(os.lchown, path, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = _oserror(os.lstat, path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _oserror(os.utime, path, ns=(atime, mtime), follow_symlinks=False)
        return self._attr(_oserror(os.lstat, path))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target: bytes = _oserror(os.readlink, self._path(inode))
        return target

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = _oserror(os.statvfs, self._source)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, field, getattr(sv, field))
        for field in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    # -- directories ------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = (inode, path, names)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, path, names = self._dirs[fh]
        for index in range(start_id, len(names)):
            name = names[index]
            try:
                st = os.lstat(path + b"/" + name)
            except OSError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(st), index + 1):
                return
            self._remember(inode, name, st)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        _oserror(os.mkdir, path, mode & ~ctx.umask)
        _oserror(os.lchown, path, ctx.uid, ctx.gid)
        return self._remember(parent_inode, name, _oserror(os.lstat, path))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _oserror(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _oserror(os.unlink, self._child(parent_inode, name))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        _oserror(os.symlink, target, path)
        _oserror(os.lchown, path, ctx.uid, ctx.gid)
        return self._remember(parent_inode, name, _oserror(os.lstat, path))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        _oserror(os.mknod, path, mode & ~ctx.umask, rdev)
        _oserror(os.lchown, path, ctx.uid, ctx.gid)
        return self._remember(parent_inode, name, _oserror(os.lstat, path))

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        _oserror(os.link, self._path(inode), path)
        return self._remember(new_parent_inode, new_name, _oserror(os.lstat, path))

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        ino = _oserror(os.lstat, old).st_ino
        _oserror(os.rename, old, new)
        if ino in self._names:
            self._names[ino] = (parent_inode_new, name_new)

    # -- files ------------------------------------------------------------------------
    @staticmethod
    def _open_flags(flags: int) -> int:
        # The writeback cache makes the kernel read pages of write-only files and handle
        # O_APPEND itself; O_DIRECT would need aligned buffers on the source filesystem.
        flags &= ~(os.O_APPEND | getattr(os, "O_DIRECT", 0))
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = _oserror(os.open, self._path(inode), self._open_flags(flags))
        return pyfuse3.FileInfo(fh=fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = _oserror(os.open, path, self._open_flags(flags) | os.O_CREAT, mode & ~ctx.umask)
        try:
            os.fchown(fd, ctx.uid, ctx.gid)
            attr = self._remember(parent_inode, name, os.fstat(fd))
        except OSError as exc:
            os.close(fd)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return _oserror(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return _oserror(os.pwrite, fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        _oserror(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        _oserror(os.close, fh)


def main(argv: list[str] | None = None) -> int:
    """Mount SOURCE on MOUNTPOINT in the foreground until unmounted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    ops = Passthrough(args.source)
    options = set(pyfuse3.default_options)
    options.add("fsname=passthrough")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
