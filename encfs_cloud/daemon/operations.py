"""The pyfuse3 Operations: a thin adapter from kernel requests to the namespace and file data."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any

import pyfuse3
import trio

from encfs_cloud.daemon.caller import in_group
from encfs_cloud.daemon.fuse_glue import handler, invalidate_kernel_caches
from encfs_cloud.daemon.stale import StaleCaches
from encfs_cloud.data.committer import Committer
from encfs_cloud.data.filedata import FileData
from encfs_cloud.errors import FsError
from encfs_cloud.tree import acl
from encfs_cloud.tree.metadata import ROOT_INODE, Inode, Metadata
from encfs_cloud.tree.namespace import Namespace, now_ns

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 30.0
BLOCK = 4096
TOTAL_BLOCKS = 1 << 38  # 1 PiB of 4 KiB blocks always free: a bucket has no fixed size
TOTAL_INODES = 1 << 32
# The kernel asks for one page (4 KiB) of readdirplus entries per call, about 25 of them
# (~150 bytes each with a short name): reading more rows than fit is work thrown away and
# read again on the next call (128 per call made listing 100,000 entries about twice as slow).
READDIR_ROWS = 32


class Operations(pyfuse3.Operations):  # type: ignore[misc]
    enable_writeback_cache = True
    enable_acl = True  # FUSE_POSIX_ACL: the kernel checks ACLs; we store them (namespace.py)

    def __init__(
        self,
        md: Metadata,
        data: FileData,
        committer: Committer,
        *,
        read_only: bool = False,
    ) -> None:
        super().__init__()
        self.md = md
        self.ns = Namespace(md)
        self.data = data
        self.committer = committer
        self.read_only = read_only
        self.lookups: dict[int, int] = {}
        self.open_files: dict[int, int] = {}  # inode → open handles
        self.handles: dict[int, int] = {}  # fh → inode
        self._next_fh = 1
        self.stale = StaleCaches(md)  # what other devices changed, for the kernel's caches
        self.locks: dict[int, trio.Lock] = {}
        self.after_init: Callable[[], None] | None = None  # mount settings INIT would undo

    def init(self) -> None:
        # pyfuse3 calls this while answering the kernel's INIT, which the kernel applies only
        # once the reply is written: run the hook after that, at the next trio tick.
        if self.after_init is not None:
            trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)

    # --- helpers ---------------------------------------------------------------------

    def changed_elsewhere(self, inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
        """Another device's commit was applied: queue what the kernel may hold stale."""
        self.stale.note(inodes, entries, self.lookups.keys() | {ROOT_INODE})

    async def run_invalidations(self) -> None:
        """Tell the kernel, from a worker thread: invalidating pages may make the kernel
        write dirty pages back to us first, which needs this (the trio) thread free."""
        while True:
            inodes, entries = await self.stale.next_batch()
            await trio.to_thread.run_sync(invalidate_kernel_caches, inodes, entries)

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def attrs(self, inode: Inode, stored: int | None = None) -> pyfuse3.EntryAttributes:
        """`stored`: blocks of its committed chunks, if already known (readdir batches it)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.id
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = inode.mode
        entry.st_nlink = inode.nlink
        entry.st_uid = inode.uid
        entry.st_gid = inode.gid
        entry.st_rdev = inode.rdev
        entry.st_size = BLOCK if inode.is_dir else inode.size
        entry.st_blksize = BLOCK
        # What the chunks hold, not the size: holes take no space (du, sparseness probes).
        if inode.is_dir:
            blocks = 1
        elif inode.is_reg:
            blocks = self.data.allocated_blocks(inode.id, inode.size, BLOCK, stored)
        else:
            blocks = 0  # symlink targets and device numbers live in the metadata
        entry.st_blocks = blocks * (BLOCK // 512)
        entry.st_atime_ns = inode.atime_ns
        entry.st_mtime_ns = inode.mtime_ns
        entry.st_ctime_ns = inode.ctime_ns
        return entry

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self.lookups[inode.id] = self.lookups.get(inode.id, 0) + 1
        return self.attrs(inode)

    def _maybe_delete(self, ino: int) -> None:
        inode = self.md.get_inode(ino)
        if inode is None or inode.nlink > 0:
            return
        if self.lookups.get(ino, 0) > 0 or self.open_files.get(ino, 0) > 0:
            return
        self.md.delete_inode(ino)
        self.data.forget(ino)

    async def _truncate(self, ino: int, size: int, when: int | None) -> None:
        """Cut or extend a regular file; `when` stamps mtime and ctime (None: leave them)."""
        async with self._lock(ino):
            node = self.ns.inode(ino)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not node.is_reg:
                raise FsError(errno.EINVAL)
            await self.data.truncate(ino, node.size, size)
            node = self.ns.inode(ino)
            node.size = size
            if when is not None:
                node.mtime_ns = node.ctime_ns = when
            self.md.put_inode(node)

    def _lock(self, ino: int) -> trio.Lock:
        lock = self.locks.get(ino)
        if lock is None:
            lock = self.locks[ino] = trio.Lock()
        return lock

    # --- lookups and attributes ---------------------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.ns.lookup(parent_inode, name))

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                self._maybe_delete(ino)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.ns.inode(inode))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        when = now_ns()
        if fields.update_size:
            await self._truncate(inode, attr.st_size, when)
        node = self.ns.inode(inode)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            self.ns.chmod_acl(node)  # FUSE leaves posix_acl_chmod to us
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else when
        self.md.put_inode(node)
        return self.attrs(node)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.ns.inode(inode)
        if not stat.S_ISLNK(node.mode) or node.target is None:
            raise FsError(errno.EINVAL)
        return node.target

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        used_bytes, inodes = self.md.usage()
        used = (used_bytes + BLOCK - 1) // BLOCK
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLOCK
        out.f_frsize = BLOCK
        # Sizes count holes, so a sparse file can claim more than any fixed total: what is
        # used comes on top of what is free, and the counts never go negative (an EIO for df).
        out.f_blocks = TOTAL_BLOCKS + used
        out.f_bfree = out.f_bavail = TOTAL_BLOCKS
        out.f_files = TOTAL_INODES + inodes
        out.f_ffree = out.f_favail = TOTAL_INODES
        out.f_namemax = 255
        return out

    # --- creating and removing -------------------------------------------------------------

    def _new(
        self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, **kw: Any
    ) -> Inode:
        self._writable()
        return self.ns.create(parent, name, mode, ctx.uid, ctx.gid, **kw)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = (mode & ~ctx.umask) | stat.S_IFMT(mode)
        return self._entry(self._new(parent_inode, name, mode, ctx, rdev=rdev))

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~ctx.umask)
        return self._entry(self._new(parent_inode, name, mode, ctx))

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        mode = stat.S_IFLNK | 0o777
        return self._entry(self._new(parent_inode, name, mode, ctx, target=target))

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        return self._entry(self.ns.link(inode, new_parent_inode, new_name))

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        node = self.ns.unlink(parent_inode, name)
        self._maybe_delete(node.id)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        node = self.ns.rmdir(parent_inode, name)
        self._maybe_delete(node.id)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        replaced = self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        if replaced is not None:
            self._maybe_delete(replaced.id)

    # --- files ---------------------------------------------------------------------------

    def _open_handle(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = ino
        self.open_files[ino] = self.open_files.get(ino, 0) + 1
        return fh

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.ns.inode(inode)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        if flags & os.O_TRUNC:
            # libfuse asks for atomic O_TRUNC, so no setattr comes for it: truncating is ours
            # (the kernel's cached size of 0 would hide a miss until the next mount). With the
            # writeback cache the kernel stamps the times itself, as for write().
            await self._truncate(inode, 0, None if self.enable_writeback_cache else now_ns())
        return pyfuse3.FileInfo(fh=self._open_handle(inode), keep_cache=True)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        node = self._new(parent_inode, name, mode, ctx)
        return pyfuse3.FileInfo(fh=self._open_handle(node.id)), self._entry(node)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        ino = self.handles[fh]
        node = self.ns.inode(ino)
        return await self.data.read(ino, node.size, off, size)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._writable()
        ino = self.handles[fh]
        async with self._lock(ino):
            node = self.ns.inode(ino)
            size = await self.data.write(ino, node.size, off, buf)
            node = self.ns.inode(ino)
            node.size = max(size, node.size)
            if not self.enable_writeback_cache:
                # With the writeback cache the kernel stamps mtime/ctime at write(2) time and
                # sends them by setattr, which may reach us before these pages do: stamping
                # here would replace its times with a later one, seen after a remount.
                node.mtime_ns = node.ctime_ns = now_ns()
            self.md.put_inode(node)
        return len(buf)

    @handler
    async def flush(self, fh: int) -> None:
        return None

    @handler
    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh)
        left = self.open_files.get(ino, 0) - 1
        if left > 0:
            self.open_files[ino] = left
        else:
            self.open_files.pop(ino, None)
            self.locks.pop(ino, None)
            self._maybe_delete(ino)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.read_only:
            await self.committer.sync()

    # --- directories -----------------------------------------------------------------------

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.ns.directory(inode)
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets 1 and 2 are "." and ".."; entry ids are shifted past them. The kernel
        # takes no lookup reference for those two.
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self.attrs(self.ns.inode(fh)), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = self.ns.lookup(fh, b"..")
            if not pyfuse3.readdir_reply(token, b"..", self.attrs(parent), 2):
                return
            start_id = 2
        after = start_id - 2
        while True:
            rows = self.md.list_entries(fh, after, READDIR_ROWS)
            if not rows:
                return
            stored = self.md.stored_blocks([node.id for _, _, node in rows if node.is_reg], BLOCK)
            for entry_id, name, node in rows:
                after = entry_id
                attrs = self.attrs(node, stored.get(node.id, 0))
                if not pyfuse3.readdir_reply(token, name, attrs, entry_id + 2):
                    return
                self.lookups[node.id] = self.lookups.get(node.id, 0) + 1

    @handler
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if not self.read_only:
            await self.committer.sync()

    # --- xattrs --------------------------------------------------------------------------

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._writable()
        kill_sgid = name == acl.ACCESS and not in_group(
            ctx.uid, ctx.gid, ctx.pid, self.ns.inode(inode).gid
        )
        self.ns.setxattr(inode, name, value, 0, kill_sgid=kill_sgid)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.ns.getxattr(inode, name)

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.ns.inode(inode)
        return self.md.list_xattrs(inode)

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        self.ns.removexattr(inode, name)
