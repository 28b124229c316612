"""POSIX ACLs: the xattr codec and mode rules, then a real mount against a local directory.

The mount side runs setfacl/getfacl, creates files under default ACLs, chmods, and checks
access as another user (nobody), each step compared with the same step on ext4.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs_cloud.daemon.caller import in_group
from encfs_cloud.errors import FsError
from encfs_cloud.tree import acl
from encfs_cloud.tree.acl import GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, Entry
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace
from tests.fixtures_mount import Device, is_mounted, needs_fuse
from tests.posix_ops import MountedFs, Twin, shared_mount, write

NOBODY = 65534
NOGROUP = 65534

# --- the codec and the mode rules (no mount) -------------------------------------------------


def entries(*spec: tuple[int, int] | tuple[int, int, int]) -> list[Entry]:
    return [Entry(*item) for item in spec]


BASE = entries((USER_OBJ, 6), (GROUP_OBJ, 4), (OTHER, 4))
NAMED = entries((USER_OBJ, 6), (USER, 4, NOBODY), (GROUP_OBJ, 4), (MASK, 6), (OTHER, 0))


def test_codec_round_trip_and_refusals() -> None:
    for acl_entries in (BASE, NAMED):
        assert acl.parse(acl.serialize(acl_entries)) == acl_entries
    bad = [
        b"",
        acl.serialize(BASE)[:-1],  # not a whole entry
        b"\x01\x00\x00\x00" + acl.serialize(BASE)[4:],  # version 1
        acl.serialize(list(reversed(BASE))),  # out of order
        acl.serialize(entries((USER_OBJ, 6), (USER, 4, 7), (GROUP_OBJ, 4), (OTHER, 4))),  # no mask
        acl.serialize(entries((USER_OBJ, 6), (GROUP_OBJ, 4))),  # no other
        acl.serialize(entries((USER_OBJ, 8), (GROUP_OBJ, 4), (OTHER, 4))),  # unknown bit
        acl.serialize([*BASE[:1], Entry(0x40, 4), *BASE[1:]]),  # unknown tag
    ]
    for value in bad:
        with pytest.raises(FsError) as refused:
            acl.parse(value)
        assert refused.value.errno == errno.EINVAL, value


def test_mode_chmod_and_inheritance_rules() -> None:
    # setfacl: the mask stands for the group bits; without a mask the owning group does.
    assert acl.mode_of(NAMED, stat.S_IFREG | 0o4000) == stat.S_IFREG | 0o4660
    assert acl.mode_of(BASE, 0o777) == 0o644
    # chmod: owner, mask and other follow; the owning group's entry stays.
    after = acl.chmod(NAMED, 0o751)
    assert after == entries((USER_OBJ, 7), (USER, 4, NOBODY), (GROUP_OBJ, 4), (MASK, 5), (OTHER, 1))
    assert acl.chmod(BASE, 0o705) == entries((USER_OBJ, 7), (GROUP_OBJ, 0), (OTHER, 5))
    # create: the default ACL cut down to the create mode, the mode to what remains.
    default = entries((USER_OBJ, 7), (USER, 7, NOBODY), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 5))
    access, mode = acl.inherit(default, stat.S_IFREG | 0o640)
    assert mode == stat.S_IFREG | 0o640
    assert access == entries(
        (USER_OBJ, 6), (USER, 7, NOBODY), (GROUP_OBJ, 5), (MASK, 4), (OTHER, 0)
    )
    assert not acl.is_minimal(access) and acl.is_minimal(BASE)


def test_namespace_keeps_mode_and_acls_in_step() -> None:
    md = Metadata()
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    f = ns.create(ROOT_INODE, b"f", stat.S_IFREG | 0o644, 0, 0)
    ns.setxattr(f.id, acl.ACCESS, acl.serialize(NAMED), 0)
    assert ns.inode(f.id).mode == stat.S_IFREG | 0o660
    node = ns.inode(f.id)
    node.mode = stat.S_IFREG | 0o604
    ns.chmod_acl(node)
    assert acl.parse(ns.getxattr(f.id, acl.ACCESS))[3] == Entry(MASK, 0)
    # An ACL the mode can say alone is not kept (as ext4): no "+" in ls -l.
    ns.setxattr(f.id, acl.ACCESS, acl.serialize(BASE), 0)
    assert md.get_xattr(f.id, acl.ACCESS) is None and ns.inode(f.id).mode & 0o777 == 0o644
    with pytest.raises(FsError) as refused:
        ns.setxattr(f.id, acl.DEFAULT, acl.serialize(BASE), 0)
    assert refused.value.errno == errno.EACCES
    # A set-group-id bit goes when the caller may not keep it.
    ns.inode(f.id)
    node = ns.inode(f.id)
    node.mode |= stat.S_ISGID
    md.put_inode(node)
    ns.setxattr(f.id, acl.ACCESS, acl.serialize(NAMED), 0, kill_sgid=True)
    assert not ns.inode(f.id).mode & stat.S_ISGID
    # Default ACLs: files get an access ACL, directories both, symlinks nothing.
    d = ns.create(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
    default = entries((USER_OBJ, 7), (USER, 7, NOBODY), (GROUP_OBJ, 5), (MASK, 7), (OTHER, 0))
    ns.setxattr(d.id, acl.DEFAULT, acl.serialize(default), 0)
    sub = ns.create(d.id, b"sub", stat.S_IFDIR | 0o755, 0, 0)
    assert md.get_xattr(sub.id, acl.DEFAULT) == acl.serialize(default)
    assert sub.mode == stat.S_IFDIR | 0o750
    child = ns.create(d.id, b"child", stat.S_IFREG | 0o666, 0, 0)
    assert acl.parse(ns.getxattr(child.id, acl.ACCESS))[1] == Entry(USER, 7, NOBODY)
    assert md.get_xattr(child.id, acl.DEFAULT) is None and child.mode & 0o777 == 0o660
    link = ns.create(d.id, b"link", stat.S_IFLNK | 0o777, 0, 0, target=b"child")
    assert md.list_xattrs(link.id) == [] and link.mode & 0o777 == 0o777


def test_caller_groups_come_from_proc() -> None:
    me = os.getpid()
    assert in_group(0, 1, me, 4242), "root keeps set-group-id bits"
    assert in_group(1000, 4242, me, 4242), "the primary group"
    if os.geteuid() == 0:
        child = subprocess.Popen(
            ["sleep", "60"], user=NOBODY, group=NOGROUP, extra_groups=[4243, 4244]
        )
        try:
            assert in_group(NOBODY, NOGROUP, child.pid, 4244), "a supplementary group"
            assert not in_group(NOBODY, NOGROUP, child.pid, 4245)
        finally:
            child.kill()
            child.wait()
    assert not in_group(1000, 4242, me, 4243)
    assert not in_group(1000, 4242, 0, 4243), "a caller we cannot see"
    assert not in_group(1000, 4242, 2**22 + 12345, 4243), "a caller that is gone"


# --- a real mount, step by step against ext4 -------------------------------------------------

PROBE = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    tries = {
        "read": lambda: os.close(os.open(path, os.O_RDONLY)),
        "write": lambda: os.close(os.open(path, os.O_WRONLY)),
        "list": lambda: os.listdir(path),
        "exec": lambda: os.access(path, os.X_OK) or (_ for _ in ()).throw(PermissionError(13, "")),
    }
    result = {}
    for what, op in tries.items():
        try:
            op()
            result[what] = "ok"
        except OSError as exc:
            result[what] = exc.errno
    out[os.path.basename(path)] = result
print(json.dumps(out, sort_keys=True))
"""


def run(root: Path, *cmd: str) -> tuple[int, str]:
    """A command run in `root` (relative names, so both sides print the same)."""
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def getfacl(twin: Twin, *names: str) -> str:
    code, out = twin.do(lambda r: run(r, "getfacl", "-n", *names), f"getfacl {names}")
    assert code == 0, out
    return out


def setfacl(twin: Twin, *args: str) -> None:
    twin.do(lambda r: run(r, "setfacl", *args), f"setfacl {args}")


def by_file(getfacl_output: tuple[int, str]) -> dict[str, str]:
    """getfacl -R output per file (directories list in their own order on each side)."""
    code, text = getfacl_output
    assert code == 0, text
    blocks = [block for block in text.split("\n\n") if block.strip()]
    return {block.splitlines()[0].removeprefix("# file: "): block for block in blocks}


def as_nobody(root: Path, *names: str) -> dict[str, dict[str, object]]:
    """What nobody (no supplementary groups) may do with each path below `root`."""
    done = subprocess.run(
        ["/usr/bin/python3", "-c", PROBE, *(str(root / n) for n in names)],
        user=NOBODY,
        group=NOGROUP,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def fs() -> Iterator[MountedFs]:
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed: apt-get install acl (make test does)")
    # Outside pytest's private temp folder (0700), so nobody can reach the mount; 0711 lets
    # it pass through without listing anything.
    base = Path(tempfile.mkdtemp(prefix="encfs-acl-", dir="/tmp"))
    base.chmod(0o711)
    (base / "ref").mkdir(mode=0o755)
    try:
        with shared_mount(base, "allow_other") as mounted:
            yield mounted
    finally:
        if not is_mounted(base / "mnt"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def twin(fs: MountedFs, request: pytest.FixtureRequest) -> Twin:
    made = fs.twin(request.node.name, fs.mnt.parent / "ref" / request.node.name)
    for root in made.roots:
        root.chmod(0o755)
    return made


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@needs_fuse
@pytest.mark.fuse
def test_setfacl_getfacl_and_the_mode(twin: Twin) -> None:
    twin.do(lambda r: write(r / "f", b"data", 0o640))
    twin.do(lambda r: os.mkdir(r / "d", 0o750))
    steps = [
        ("-m", "u:nobody:r", "f"),
        ("-m", "g:nogroup:rw", "f"),  # the mask grows to rw-: so do the group bits
        ("-n", "-m", "u:nobody:rwx", "f"),  # no mask recalculation: nobody stays capped
        ("-m", "m::r", "f"),
        ("-x", "u:nobody", "f"),
        ("-m", "u::rwx,o::r", "d"),  # only base entries: no ACL is kept, the mode says it
        ("-m", "u:nobody:rx", "d"),
        ("-d", "-m", "u:nobody:r", "f"),  # a default ACL on a file: refused
        ("-b", "f"),
        ("-k", "d"),
    ]
    for step in steps:
        setfacl(twin, *step)
        getfacl(twin, "f", "d")
        twin.stat("f")
        twin.stat("d")
        twin.do(lambda r: (sorted(os.listxattr(r / "f")), sorted(os.listxattr(r / "d"))))
    twin.do(lambda r: os.getxattr(r / "d", acl.ACCESS.decode()), "the raw access ACL")
    twin.same_tree()


@needs_fuse
@pytest.mark.fuse
def test_chmod_moves_the_mask(twin: Twin) -> None:
    twin.do(lambda r: write(r / "f", b"", 0o644))
    twin.do(lambda r: os.mkdir(r / "d", 0o755))
    setfacl(twin, "-m", "u:nobody:rwx,g:nogroup:r", "f")
    setfacl(twin, "-m", "u:nobody:rwx", "-d", "-m", "u:nobody:rx", "d")
    for mode in (0o640, 0o604, 0o775, 0o2750, 0o700):
        twin.do(lambda r, mode=mode: (os.chmod(r / "f", mode), os.chmod(r / "d", mode)))
        assert "mask::" in getfacl(twin, "f", "d")
        twin.stat("f")
        twin.stat("d")
    # chown keeps the ACL; the named entries do not follow the owner.
    twin.do(lambda r: os.chown(r / "f", NOBODY, NOGROUP))
    getfacl(twin, "f")


@needs_fuse
@pytest.mark.fuse
def test_default_acls_are_inherited(twin: Twin, umask_zero: None) -> None:
    twin.do(lambda r: os.mkdir(r / "d", 0o755))
    setfacl(twin, "-d", "-m", "u:nobody:rwx,g:nogroup:rx,o::-", "d")
    twin.do(lambda r: os.mkdir(r / "plain", 0o755))
    setfacl(twin, "-d", "-m", "g::rwx", "plain")  # no named entries: no mask in the default

    def populate(root: Path) -> None:
        for top in (root / "d", root / "plain"):
            write(top / "f666", b"x", 0o666)
            write(top / "f640", b"x", 0o640)
            write(top / "f4755", b"x", 0o755)
            os.chmod(top / "f4755", 0o4755)
            os.mkdir(top / "s777", 0o777)
            os.mkdir(top / "s750", 0o750)
            os.mkfifo(top / "fifo", 0o622)
            os.symlink("f666", top / "link")
            write(top / "s777" / "nested", b"y", 0o666)
            os.mkdir(top / "s777" / "deeper", 0o700)

    twin.do(populate, "create under default ACLs")
    for top in ("d", "plain"):
        names = ["f666", "f640", "f4755", "s777", "s750", "fifo", "s777/nested", "s777/deeper"]
        getfacl(twin, *(f"{top}/{n}" for n in names))
        twin.do(lambda r, top=top: sorted(os.listxattr(r / top / "link", follow_symlinks=False)))
    twin.same_tree()


@needs_fuse
@pytest.mark.fuse
def test_umask_under_a_default_acl_is_applied_by_the_kernel_first(twin: Twin) -> None:
    """Known difference (docs/design.md): FUSE masks the create mode with the umask before we
    see it, where POSIX would let the default ACL replace the umask. The result is never more
    permissive than ext4's: the umask's bits are missing from the mask and the mode."""
    twin.do(lambda r: os.mkdir(r / "d", 0o755))
    setfacl(twin, "-d", "-m", "u:nobody:rwx", "d")
    old = os.umask(0o022)
    try:
        twin.do(lambda r: (write(r / "d" / "f", b"", 0o666), os.mkdir(r / "d" / "s", 0o777)))
    finally:
        os.umask(old)
    for name, asked in (("f", 0o666), ("s", 0o777)):
        mine, ref = (stat.S_IMODE(os.stat(root / "d" / name).st_mode) for root in twin.roots)
        assert ref == asked & 0o775  # ext4: the default mask rwx, the umask ignored
        assert mine == asked & ~0o022, f"{name}: {mine:o}"
        mask = [line for line in run(twin.mine / "d", "getfacl", "-n", name)[1].splitlines()]
        assert f"mask::{'r-x' if name == 's' else 'r--'}" in mask
    twin.do(lambda r: (os.unlink(r / "d" / "f"), os.rmdir(r / "d" / "s")), "the sides agree again")


@needs_fuse
@pytest.mark.fuse
def test_access_checks_as_another_user(twin: Twin) -> None:
    def setup(root: Path) -> None:
        for name in ("reader", "group_rw", "masked", "denied", "nobody_writes"):
            write(root / name, b"#!/bin/sh\n", 0o600)
        os.chmod(root / "denied", 0o644)
        os.mkdir(root / "pass_only", 0o700)
        write(root / "pass_only" / "inside", b"", 0o644)
        os.mkdir(root / "open_dir", 0o755)

    twin.do(setup)
    setfacl(twin, "-m", "u:nobody:r", "reader")
    setfacl(twin, "-m", "g:nogroup:rwx", "group_rw")
    setfacl(twin, "-m", "u:nobody:rw", "masked")
    twin.do(lambda r: os.chmod(r / "masked", 0o640), "chmod caps nobody at the mask")
    setfacl(twin, "-m", "u:nobody:---", "denied")  # the named entry beats "other"
    setfacl(twin, "-m", "u:nobody:x", "pass_only")
    setfacl(twin, "-m", "u:nobody:rwx", "open_dir")
    names = ("reader", "group_rw", "masked", "denied", "pass_only", "pass_only/inside")
    seen = twin.do(lambda r: as_nobody(r, *names), "nobody's access")
    assert seen["reader"]["read"] == "ok" and seen["reader"]["write"] == errno.EACCES
    assert seen["masked"]["write"] == errno.EACCES and seen["denied"]["read"] == errno.EACCES
    assert seen["inside"]["read"] == "ok" and seen["pass_only"]["list"] == errno.EACCES

    def nobody_creates(root: Path, name: str = "mine") -> int:
        script = f"open({str(root / 'open_dir' / name)!r}, 'w').write('n')"
        return subprocess.run(
            ["/usr/bin/python3", "-c", script],
            user=NOBODY,
            group=NOGROUP,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
        ).returncode

    assert twin.do(nobody_creates, "nobody writes into a directory its ACL opens") == 0
    twin.stat("open_dir/mine")
    twin.do(lambda r: os.chmod(r / "open_dir", 0o705), "the mask now shuts nobody out")
    assert twin.do(lambda r: nobody_creates(r, "refused")) != 0


@needs_fuse
@pytest.mark.fuse
def test_setfacl_by_an_owner_outside_the_group_drops_set_group_id(twin: Twin) -> None:
    def setup(root: Path) -> None:
        for name in ("by_owner", "by_root"):
            write(root / name, b"", 0o664)
            os.chown(root / name, NOBODY, 0)
            os.chmod(root / name, 0o2775)

    twin.do(setup)

    def owner_sets_acl(root: Path) -> int:
        return subprocess.run(
            ["setfacl", "-m", "u:nobody:rwx", str(root / "by_owner")],
            user=NOBODY,
            group=NOGROUP,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=60,
        ).returncode

    assert twin.do(owner_sets_acl, "nobody (not in group root) sets an ACL") == 0
    assert not twin.stat("by_owner")["mode"] & stat.S_ISGID
    setfacl(twin, "-m", "u:nobody:rwx", "by_root")
    assert twin.stat("by_root")["mode"] & stat.S_ISGID, "root may keep the bit"


@needs_fuse
@pytest.mark.fuse
def test_salvage_copies_acls_as_they_are(device: Device, local_source: str, tmp_path: Path) -> None:
    """Files salvaged into a copied directory with a default ACL keep their own ACL, not an
    inherited one (a file whose ACL was removed must not gain the default's entries)."""
    device.init(local_source)
    with device.mounted(local_source, tmp_path / "mnt") as root:
        (root / "d").mkdir()
        assert run(root, "setfacl", "-d", "-m", "u:nobody:rwx", "d")[0] == 0
        (root / "d" / "sub").mkdir()
        write(root / "d" / "inherited", b"i", 0o640)
        write(root / "d" / "bare", b"b", 0o640)
        write(root / "own", b"o", 0o600)
        assert run(root, "setfacl", "-b", "d/bare")[0] == 0
        assert run(root, "setfacl", "-m", "g:nogroup:r", "own")[0] == 0
        expected = by_file(run(root, "getfacl", "-R", "-n", "d", "own"))
        assert "user:65534:rwx" in expected["d/inherited"] and len(expected) == 5
    done = device.run("salvage", local_source, str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert by_file(run(tmp_path / "out", "getfacl", "-R", "-n", "d", "own")) == expected


@needs_fuse
@pytest.mark.fuse
def test_zz_acls_survive_remount(fs: MountedFs) -> None:
    assert fs.twins, "run with the rest of the module"

    def all_acls(twin: Twin) -> str:
        return getfacl(twin, *sorted(p.name for p in twin.mine.iterdir()))

    before = [all_acls(twin) for twin in fs.twins]
    fs.remount()
    assert [all_acls(twin) for twin in fs.twins] == before
    for twin in fs.twins:
        twin.same_tree()
