"""fsck: prove every object authentic and every reference resolvable, and repair on request.

Repair policy. A file whose data fails authentication (or whose pack is gone) is removed from
the tree and listed: dropping only its bad chunks would turn them into holes that read as
zeros, i.e. wrong plaintext, which this filesystem never serves. Run `salvage` first to copy
out what is still readable. Orphans (unreferenced objects, nameless inodes, leftover commits)
are deleted; link counts and pack accounting are recomputed; a damaged newest commit is
replaced by a new snapshot of the newest state that replays. Every metadata change goes out
as one new snapshot commit chained to the state it was built from.
"""

from __future__ import annotations

import stat
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from encfs_cloud import layout
from encfs_cloud.data import compactor
from encfs_cloud.errors import IntegrityError, ObjectMissingError
from encfs_cloud.keys.sealed import Sealer
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.tools.salvage import Recovered, commit_seqs, display, recover_state
from encfs_cloud.tree.journal import (
    KIND_SNAPSHOT,
    CommitInfo,
    Head,
    commit_hash,
    export_snapshot,
    seal_commit,
)
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata

CHECK_THREADS = 8

Progress = Callable[[str, int, int], None]  # (stage, done, total); total 0: unknown
# inode, idx, off, len, plain_len, ver, gen, digest
ChunkRow = tuple[int, int, int, int, int, int, int, bytes]


@dataclass(frozen=True)
class Finding:
    kind: str
    text: str  # may name paths: printed for the user, never logged
    repairable: bool = True

    def line(self) -> str:
        return f"{self.kind}: {self.text}"


@dataclass
class Plan:
    """What --repair changes."""

    remove_inodes: set[int] = field(default_factory=set)  # with every entry to or in them
    remove_entries: set[tuple[int, bytes]] = field(default_factory=set)  # (parent, name)
    stray_chunks: set[int] = field(default_factory=set)  # inodes whose chunk rows go
    nlink: dict[int, int] = field(default_factory=dict)
    add_packs: set[str] = field(default_factory=set)  # pack rows the table lacks
    recount: bool = False  # pack accounting is wrong: recompute it
    delete_objects: list[str] = field(default_factory=list)  # referenced by nothing
    compact: list[str] = field(default_factory=list)  # mostly dead packs to rewrite
    reclaim: int = 0  # bytes compaction frees

    def changes_metadata(self) -> bool:
        return bool(
            self.compact
            or self.remove_inodes
            or self.remove_entries
            or self.stray_chunks
            or self.nlink
            or self.add_packs
            or self.recount
        )


@dataclass
class Report:
    state: Recovered
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)
    files: int = 0
    chunks: int = 0
    packs: int = 0

    @property
    def repairable(self) -> bool:
        return all(f.repairable for f in self.findings)

    def add(self, kind: str, text: str, *, repairable: bool = True) -> None:
        self.findings.append(Finding(kind, text, repairable))


def check(
    store: ObjectStore,
    sealer: Sealer,
    *,
    writer_active: bool,
    seen_seq: int | None = None,
    progress: Progress | None = None,
) -> Report:
    """Check everything. `writer_active`: a mount holds the lease, so unreferenced packs and
    nameless inodes may be its work in flight and are not counted as problems."""
    if progress:
        progress("reading metadata", 0, 0)
    report = Report(recover_state(store, sealer))
    state = report.state
    for problem in state.problems:
        report.add("commit", problem)
    if state.problems:
        report.notes.append(f"the newest state that replays is metadata commit {state.head.seq}")
    if seen_seq is not None and state.newest_seq < seen_seq:
        report.add(
            "rollback",
            f"the bucket's newest commit is {state.newest_seq} but this device has seen "
            f"{seen_seq}: it was rolled back (mount with -o allow_rollback to accept it)",
            repairable=False,
        )
    if state.newest_seq == 0:
        report.notes.append("no metadata commit yet: the filesystem was never written to")
        _check_objects(report, store, writer_active)
        return report
    paths, dir_entries = _paths(state.md)
    if _check_tree(report, paths, dir_entries, writer_active):
        _check_data(report, store, sealer, paths, progress)
        _check_objects(report, store, writer_active)
    return report


def _paths(md: Metadata) -> tuple[dict[int, list[bytes]], dict[int, tuple[int, bytes]]]:
    """Every name of each inode reachable from the root, and the one entry (parent, name)
    by which each directory was reached: any other entry for a directory is to go."""
    found: dict[int, list[bytes]] = {ROOT_INODE: [b"/"]}
    dir_entries: dict[int, tuple[int, bytes]] = {}
    stack = [ROOT_INODE]
    rows = md.db.execute(
        "SELECT d.parent, d.name, d.inode, i.mode FROM dentries d JOIN inodes i ON i.id=d.inode "
        "ORDER BY d.id"
    ).fetchall()
    children: dict[int, list[tuple[bytes, int, int]]] = defaultdict(list)
    for parent, name, ino, mode in rows:
        children[parent].append((bytes(name), ino, mode))
    while stack:
        parent = stack.pop()
        base = found[parent][0].rstrip(b"/")
        for name, ino, mode in children.get(parent, []):
            if stat.S_ISDIR(mode):
                if ino in found:
                    continue  # a second entry for a directory (reported by the tree check)
                stack.append(ino)
                dir_entries[ino] = (parent, name)
            found.setdefault(ino, []).append(base + b"/" + name)
    return found, dir_entries


def _name(paths: dict[int, list[bytes]], ino: int) -> str:
    names = paths.get(ino)
    return display(names[0]) if names else f"inode {ino} (no name)"


def _check_tree(
    report: Report,
    paths: dict[int, list[bytes]],
    dir_entries: dict[int, tuple[int, bytes]],
    writer_active: bool,
) -> bool:
    """Entries, orphans and link counts; False if there is no root to check from."""
    md, plan = report.state.md, report.plan
    inodes = {
        row[0]: (row[1], row[2], row[3])
        for row in md.db.execute("SELECT id, mode, nlink, target FROM inodes")
    }
    root = inodes.get(ROOT_INODE)
    if root is None or not stat.S_ISDIR(root[0]):
        report.add("tree", "the root directory is missing", repairable=False)
        return False
    entries = md.db.execute("SELECT parent, name, inode FROM dentries ORDER BY id").fetchall()
    for parent, raw_name, ino in entries:
        name = bytes(raw_name)
        where = f"{_name(paths, parent).rstrip('/')}/{display(name)}"
        up = inodes.get(parent)
        if up is None or not stat.S_ISDIR(up[0]):
            plan.remove_entries.add((parent, name))
            what = "does not exist" if up is None else "is not a directory"
            report.add("entry", f"an entry of inode {parent}, which {what}")
            continue
        node = inodes.get(ino)
        if node is None:
            plan.remove_entries.add((parent, name))
            report.add("entry", f"{where}: points to inode {ino}, which does not exist")
        elif stat.S_ISDIR(node[0]) and parent in paths and dir_entries.get(ino) != (parent, name):
            plan.remove_entries.add((parent, name))
            report.add("entry", f"{where}: a second name for a directory")
    open_deleted = 0
    for ino, (mode, nlink, target) in inodes.items():
        if ino not in paths:
            if writer_active and nlink <= 0:
                open_deleted += 1  # deleted while open in the running mount: its business
                continue
            plan.remove_inodes.add(ino)
            report.add("orphan", f"inode {ino} has no name (unreachable from the root)")
        elif stat.S_ISLNK(mode) and target is None:
            plan.remove_inodes.add(ino)
            report.add("damaged", f"{_name(paths, ino)}: symlink without a target")
    if open_deleted:
        report.notes.append(f"{open_deleted} deleted files are still open in the running mount")
    subdirs: dict[int, int] = defaultdict(int)
    links: dict[int, int] = defaultdict(int)
    for parent, raw_name, ino in entries:
        if (parent, bytes(raw_name)) in plan.remove_entries or ino not in inodes:
            continue
        if parent in plan.remove_inodes or ino in plan.remove_inodes:
            continue
        if stat.S_ISDIR(inodes[ino][0]):
            subdirs[parent] += 1
        else:
            links[ino] += 1
    for ino, (mode, nlink, _) in inodes.items():
        if ino not in paths or ino in plan.remove_inodes:
            continue
        want = 2 + subdirs[ino] if stat.S_ISDIR(mode) else links[ino]
        if nlink != want:
            plan.nlink[ino] = want
            report.add("nlink", f"{_name(paths, ino)}: link count {nlink}, should be {want}")
    report.files = sum(1 for ino, v in inodes.items() if stat.S_ISREG(v[0]) and ino in paths)
    return True


def _check_data(
    report: Report,
    store: ObjectStore,
    sealer: Sealer,
    paths: dict[int, list[bytes]],
    progress: Progress | None,
) -> None:
    """Every chunk row's pack exists and its sealed chunk opens with its associated data."""
    md, plan = report.state.md, report.plan
    objects = {o.name: o.size for o in store.list(layout.DATA_PREFIX)}
    table = {pid: live for pid, _, live in md.all_packs()}
    regular = {
        r[0]
        for r in md.db.execute(
            "SELECT id FROM inodes WHERE (mode & ?)=?", (stat.S_IFMT(0o177777), stat.S_IFREG)
        )
    }
    by_pack: dict[str, list[ChunkRow]] = defaultdict(list)
    live: dict[str, int] = defaultdict(int)
    for ino, idx, pack, off, length, plain, ver, gen, digest in md.db.execute(
        "SELECT inode, idx, pack, off, len, plain_len, version, gen, digest FROM chunks"
    ):
        live[pack] += length
        if ino not in regular:
            if ino not in plan.stray_chunks:
                plan.stray_chunks.add(ino)
                report.add("chunk", f"inode {ino} has data but is not a regular file")
            continue
        by_pack[pack].append((ino, idx, off, length, plain, ver, gen, digest))
        report.chunks += 1
    for pack in sorted(set(by_pack) - set(table)):
        if layout.pack_name(pack) in objects:
            plan.add_packs.add(pack)
        report.add("pack", f"data object {pack} is used but missing from the pack table")
    if any(table.get(p, 0) != live.get(p, 0) for p in set(table) | set(live)):
        plan.recount = True
        report.add("accounting", "the pack table's live byte counts disagree with the chunks")
    sizes = {p: objects.get(layout.pack_name(p), 0) for p in live}
    plan.compact = compactor.plan([(p, sizes[p], used) for p, used in live.items()], compactor.AIM)
    if plan.compact:
        plan.reclaim = sum(sizes[p] - live[p] for p in plan.compact)
        report.notes.append(
            f"{len(plan.compact)} data objects are mostly dead space "
            f"({plan.reclaim / (1 << 20):.1f} MiB to reclaim): fsck --repair compacts them"
        )
    bad: dict[int, list[str]] = defaultdict(list)
    report.packs = len(by_pack)
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="fsck") as pool:
        jobs = [
            pool.submit(
                _verify_pack, store, sealer, pack, objects.get(layout.pack_name(pack)), rows
            )
            for pack, rows in by_pack.items()
        ]
        for done, job in enumerate(as_completed(jobs), 1):
            for ino, idx, why in job.result():
                bad[ino].append(f"chunk {idx} {why}")
            if progress:
                progress("verifying data objects:", done, len(jobs))
    for ino, whys in sorted(bad.items()):
        if ino in plan.remove_inodes:
            continue
        plan.remove_inodes.add(ino)
        more = f" (and {len(whys) - 3} more)" if len(whys) > 3 else ""
        report.add("damaged", f"{_name(paths, ino)}: {', '.join(sorted(whys)[:3])}{more}")


def _verify_pack(
    store: ObjectStore, sealer: Sealer, pack: str, size: int | None, rows: list[ChunkRow]
) -> list[tuple[int, int, str]]:
    """(inode, idx, why) for every chunk of one pack that does not open."""
    if size is None:
        return [(r[0], r[1], "is in a data object that is missing") for r in rows]
    name = layout.pack_name(pack)
    blob: bytes | None = None
    if sum(r[3] for r in rows) * 2 > size:  # most of the pack: one GET beats many ranged ones
        try:
            blob = store.get(name)
        except ObjectMissingError:
            return [(r[0], r[1], "is in a data object that vanished") for r in rows]
    bad = []
    for ino, idx, off, length, plain, ver, gen, digest in rows:
        if off + length > size:
            bad.append((ino, idx, "lies beyond the end of its data object"))
            continue
        try:
            piece = blob[off : off + length] if blob is not None else store.get(name, off, length)
            sealer.open_chunk(ino, idx, ver, gen, plain, piece, digest, pack)
        except ObjectMissingError:
            bad.append((ino, idx, "is in a data object that vanished"))
        except IntegrityError:
            bad.append((ino, idx, "fails authentication"))
    return bad


def _check_objects(report: Report, store: ObjectStore, writer_active: bool) -> None:
    """Objects under data/ and meta/ that nothing references."""
    md, plan, state = report.state.md, report.plan, report.state
    known = {layout.pack_name(p) for p, _, _ in md.all_packs()}
    known |= {layout.pack_name(p) for p in plan.add_packs}
    unreferenced = [o.name for o in store.list(layout.DATA_PREFIX) if o.name not in known]
    leftovers, unknown = [], []
    for obj in store.list(layout.META_PREFIX):
        seq = layout.commit_seq(obj.name)
        if seq is None:
            unknown.append(obj.name)
        elif seq < state.head.snapshot_seq:
            leftovers.append(obj.name)
    for name in unknown:
        plan.delete_objects.append(name)
        report.add("unknown", f"{name} is not a metadata commit")
    if writer_active:
        if unreferenced or leftovers:
            report.notes.append(
                f"{len(unreferenced)} unreferenced data objects and {len(leftovers)} old "
                "commits not counted: a mount holds the lease (uploads may be in flight)"
            )
        return
    for name in unreferenced:
        plan.delete_objects.append(name)
        report.add("orphan", f"{name} is referenced by nothing")
    for name in leftovers:
        plan.delete_objects.append(name)
        report.add("leftover", f"{name} is older than the snapshot in use")


def repair(store: ObjectStore, sealer: Sealer, report: Report) -> Head | None:
    """Apply the plan; returns the new head if a snapshot commit was written.

    The caller holds the lease and passes a store fenced by it. Objects the old head still
    referenced are deleted only after the new snapshot is durable.
    """
    state, plan = report.state, report.plan
    md = state.md
    late: list[str] = []  # deletable only once the new snapshot is durable
    head: Head | None = None
    if plan.changes_metadata() or not state.complete:
        for parent, name in plan.remove_entries:
            md.remove_entry(parent, name)
        for ino in plan.remove_inodes:
            for parent, name in md.db.execute(
                "SELECT parent, name FROM dentries WHERE inode=? OR parent=?", (ino, ino)
            ).fetchall():
                md.remove_entry(parent, bytes(name))
            md.delete_inode(ino)
        for ino in plan.stray_chunks:
            md.drop_chunks(ino, 0)
        for ino, nlink in plan.nlink.items():
            inode = md.get_inode(ino)
            if inode is not None:
                inode.nlink = nlink
                md.put_inode(inode)
        for pack in plan.add_packs:
            md.add_pack(pack, 0)
        if plan.compact:  # the copies land before the snapshot that names them
            compactor.compact_now(md, store, sealer, plan.compact)
        dead = _recount_packs(md)
        md.forget_packs(dead)
        late += [layout.pack_name(p) for p in dead]
        seq = max([state.newest_seq, *commit_seqs(store)]) + 1
        info = CommitInfo(seq, KIND_SNAPSHOT, state.head.hash, seq, time.time_ns())
        sealed = seal_commit(sealer, info, export_snapshot(md))
        store.put(layout.commit_name(seq), sealed, if_none_match=True)
        head = Head(seq, commit_hash(sealed), seq, 0, 0)
        late += [layout.commit_name(s) for s in commit_seqs(store) if s < seq]
    for obj in dict.fromkeys(plan.delete_objects + late):
        store.delete(obj)
    return head


def _recount_packs(md: Metadata) -> list[str]:
    """Set every pack's live bytes from its chunks; returns the packs no chunk uses."""
    live = dict(md.db.execute("SELECT pack, sum(len) FROM chunks GROUP BY pack").fetchall())
    dead = []
    for pack, _, current in list(md.all_packs()):
        want = int(live.get(pack, 0))
        if want <= 0:
            dead.append(pack)
        elif current != want:
            md.db.execute("UPDATE packs SET live=? WHERE id=?", (want, pack))
            md.dirty["packs"].add((pack,))
    return dead
