"""POSIX semantics of the tree: entries, links, renames, attributes and xattrs, on Metadata."""

from __future__ import annotations

import errno
import stat
import time

from encfs_cloud.errors import FsError
from encfs_cloud.tree import acl
from encfs_cloud.tree.metadata import ROOT_INODE, Inode, Metadata

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
XATTR_CREATE = 1
SELINUX_LABEL = b"security.selinux"
XATTR_REPLACE = 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


class Namespace:
    """Every metadata-only operation; raises FsError with the errno POSIX asks for."""

    def __init__(self, md: Metadata) -> None:
        self.md = md

    def inode(self, ino: int) -> Inode:
        inode = self.md.get_inode(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def directory(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    def ensure_root(self, uid: int, gid: int, mode: int = 0o755) -> None:
        if self.md.get_inode(ROOT_INODE) is None:
            root = self.md.create_inode(stat.S_IFDIR | mode, uid, gid, now_ns(), ino=ROOT_INODE)
            root.nlink = 2
            self.md.put_inode(root)

    def lookup(self, parent: int, name: bytes) -> Inode:
        directory = self.directory(parent)
        if name == b".":
            return directory
        if name == b"..":
            up = self.md.parent_of(parent) if parent != ROOT_INODE else ROOT_INODE
            return self.inode(up or ROOT_INODE)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.md.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        found = self.inode(ino)
        if found.is_dir:  # its ".." is then a lookup by key (Metadata.parent_of)
            self.md.note_dir_entry(ino, parent, name)
        return found

    def _touch_dir(self, directory: Inode, when: int) -> None:
        directory.mtime_ns = directory.ctime_ns = when
        self.md.put_inode(directory)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        check_name(name)
        directory = self.directory(parent)
        if directory.nlink <= 0:
            raise FsError(errno.ENOENT)  # creating inside a removed directory
        if self.md.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        access, default = None, None
        inherited = self.md.get_xattr(parent, acl.DEFAULT) if acl.inherits_default(mode) else None
        if inherited is not None:
            # The kernel leaves default-ACL inheritance to us (FUSE_POSIX_ACL); it has already
            # applied the umask to `mode`, which POSIX would skip here (see docs/design.md).
            entries, mode = acl.inherit(acl.parse(inherited), mode)
            access = None if acl.is_minimal(entries) else acl.serialize(entries)
            default = inherited if stat.S_ISDIR(mode) else None
        when = now_ns()
        inode = self.md.create_inode(mode, uid, gid, when, rdev=rdev, target=target)
        inode.nlink = 2 if inode.is_dir else 1
        self.md.put_inode(inode)
        for acl_name, value in ((acl.ACCESS, access), (acl.DEFAULT, default)):
            if value is not None:
                self.md.set_xattr(inode.id, acl_name, value)
        self.md.add_entry(parent, name, inode.id)
        if inode.is_dir:
            directory.nlink += 1
        self._touch_dir(directory, when)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        check_name(name)
        inode = self.inode(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        directory = self.directory(parent)
        if self.md.lookup(parent, name) is not None:
            raise FsError(errno.EEXIST)
        when = now_ns()
        self.md.add_entry(parent, name, ino)
        inode.nlink += 1
        inode.ctime_ns = when
        self.md.put_inode(inode)
        self._touch_dir(directory, when)
        return inode

    def unlink(self, parent: int, name: bytes) -> Inode:
        """Remove a non-directory entry; returns the inode (nlink already decremented)."""
        inode = self.lookup(parent, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        return self._remove(parent, name, inode)

    def rmdir(self, parent: int, name: bytes) -> Inode:
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        inode = self.lookup(parent, name)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.md.has_entries(inode.id):
            raise FsError(errno.ENOTEMPTY)
        return self._remove(parent, name, inode)

    def _remove(self, parent: int, name: bytes, inode: Inode) -> Inode:
        when = now_ns()
        directory = self.inode(parent)
        self.md.remove_entry(parent, name)
        if inode.is_dir:
            inode.nlink = 0
            directory.nlink -= 1
        else:
            inode.nlink -= 1
        inode.ctime_ns = when
        self.md.put_inode(inode)
        self._touch_dir(directory, when)
        return inode

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        while ino != ROOT_INODE:
            if ino == ancestor:
                return True
            up = self.md.parent_of(ino)
            if up is None:
                return False
            ino = up
        return ancestor == ROOT_INODE

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> Inode | None:
        """Rename an entry; returns the inode that lost a link (a replaced target) if any."""
        check_name(new_name)
        src = self.lookup(old_parent, old_name)
        src_dir = self.directory(old_parent)
        dst_dir = self.directory(new_parent)
        if dst_dir.nlink <= 0:
            raise FsError(errno.ENOENT)
        if src.is_dir and self._is_ancestor(src.id, new_parent):
            raise FsError(errno.EINVAL)
        dst_ino = self.md.lookup(new_parent, new_name)
        if flags & RENAME_EXCHANGE:
            if dst_ino is None:
                raise FsError(errno.ENOENT)
            dst = self.inode(dst_ino)
            if dst.is_dir and self._is_ancestor(dst.id, old_parent):
                raise FsError(errno.EINVAL)
            self._exchange(src, src_dir, old_name, dst, dst_dir, new_name)
            return None
        if dst_ino is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        when = now_ns()
        replaced: Inode | None = None
        if dst_ino is not None:
            if dst_ino == src.id:
                return None  # both names link the same inode: POSIX says do nothing
            dst = self.inode(dst_ino)
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and self.md.has_entries(dst.id):
                raise FsError(errno.ENOTEMPTY)
            self.md.remove_entry(new_parent, new_name)
            if dst.is_dir:
                dst.nlink = 0
                self._adjust_nlink(new_parent, -1)
            else:
                dst.nlink -= 1
            dst.ctime_ns = when
            self.md.put_inode(dst)
            replaced = dst
        self.md.remove_entry(old_parent, old_name)
        self.md.add_entry(new_parent, new_name, src.id)
        if src.is_dir and old_parent != new_parent:
            self._adjust_nlink(old_parent, -1)
            self._adjust_nlink(new_parent, +1)
        src.ctime_ns = when
        self.md.put_inode(src)
        self._touch_dir(self.inode(old_parent), when)
        if new_parent != old_parent:
            self._touch_dir(self.inode(new_parent), when)
        return replaced

    def _adjust_nlink(self, ino: int, delta: int) -> None:
        inode = self.inode(ino)
        inode.nlink += delta
        self.md.put_inode(inode)

    def _exchange(
        self, a: Inode, a_dir: Inode, a_name: bytes, b: Inode, b_dir: Inode, b_name: bytes
    ) -> None:
        when = now_ns()
        self.md.replace_entry(a_dir.id, a_name, b.id)
        self.md.replace_entry(b_dir.id, b_name, a.id)
        if a_dir.id != b_dir.id and a.is_dir != b.is_dir:
            shift = 1 if a.is_dir else -1  # a moves into b_dir, b into a_dir
            b_dir.nlink += shift
            a_dir.nlink -= shift
        for inode in (a, b):
            inode.ctime_ns = when
            self.md.put_inode(inode)
        self._touch_dir(a_dir, when)
        if b_dir.id != a_dir.id:
            self._touch_dir(b_dir, when)

    # --- xattrs ------------------------------------------------------------------------

    def _xattr_allowed(self, inode: Inode, name: bytes) -> None:
        if not name or len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES) and name not in acl.NAMES:
            raise FsError(errno.EOPNOTSUPP)
        if name.startswith(b"user.") and not (inode.is_reg or inode.is_dir):
            raise FsError(errno.EPERM)  # as Linux: user.* only on files and directories

    def setxattr(
        self, ino: int, name: bytes, value: bytes, flags: int, *, kill_sgid: bool = False
    ) -> None:
        """Set an xattr; `kill_sgid`: an access ACL set by a caller who may not keep S_ISGID."""
        inode = self.inode(ino)
        self._xattr_allowed(inode, name)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if name in acl.NAMES:
            self._set_acl(inode, name, acl.parse(value), kill_sgid)
            return
        exists = self.md.get_xattr(ino, name) is not None
        if flags & XATTR_CREATE and exists:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and not exists:
            raise FsError(errno.ENODATA)
        self.md.set_xattr(ino, name, value)
        inode.ctime_ns = now_ns()
        self.md.put_inode(inode)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self.inode(ino)
        value = self.md.get_xattr(ino, name)
        if value is None:
            # "Labels not supported here" rather than "no label": ls -l, cp and tar then stop
            # asking for the rest of the filesystem (coreutils caches it per device), where
            # ENODATA cost one FUSE request per file listed: half of an `ls -l`'s requests.
            # A label someone did set is stored and returned like any xattr.
            raise FsError(errno.EOPNOTSUPP if name == SELINUX_LABEL else errno.ENODATA)
        return value

    def removexattr(self, ino: int, name: bytes) -> None:
        inode = self.inode(ino)
        if not self.md.remove_xattr(ino, name):
            raise FsError(errno.ENODATA)
        inode.ctime_ns = now_ns()
        self.md.put_inode(inode)

    # --- POSIX ACLs (the kernel enforces them; we store them and keep the mode in step) ---

    def _set_acl(
        self, inode: Inode, name: bytes, entries: list[acl.Entry], kill_sgid: bool
    ) -> None:
        if name == acl.DEFAULT:
            if not inode.is_dir:
                raise FsError(errno.EACCES)  # as Linux: only directories have a default ACL
            self.md.set_xattr(inode.id, name, acl.serialize(entries))
        else:
            # FUSE leaves the mode to us: setfacl's mask becomes the group bits.
            inode.mode = acl.mode_of(entries, inode.mode)
            if kill_sgid:
                inode.mode &= ~stat.S_ISGID
            if acl.is_minimal(entries):
                self.md.remove_xattr(inode.id, name)  # the mode says it all (as ext4)
            else:
                self.md.set_xattr(inode.id, name, acl.serialize(entries))
        inode.ctime_ns = now_ns()
        self.md.put_inode(inode)

    def chmod_acl(self, inode: Inode) -> None:
        """After a chmod: the access ACL's owner, mask (or group) and other follow the mode."""
        stored = self.md.get_xattr(inode.id, acl.ACCESS)
        if stored is not None:
            entries = acl.chmod(acl.parse(stored), inode.mode)
            self.md.set_xattr(inode.id, acl.ACCESS, acl.serialize(entries))
