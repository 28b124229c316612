"""What every tree must satisfy: one name per directory, all reachable, right link counts."""

from __future__ import annotations

import stat
from collections import defaultdict

from encfs_cloud.tree.metadata import ROOT_INODE, Metadata


def tree_problems(md: Metadata, *, open_deleted: set[int] | None = None) -> list[str]:
    problems: list[str] = []
    modes = {i: (m, n) for i, m, n in md.db.execute("SELECT id, mode, nlink FROM main.inodes")}
    entries = md.db.execute("SELECT parent, name, inode FROM main.dentries").fetchall()
    children: dict[int, list[int]] = defaultdict(list)
    names: dict[int, int] = defaultdict(int)
    subdirs: dict[int, int] = defaultdict(int)
    for parent, name, ino in entries:
        if parent not in modes or not stat.S_ISDIR(modes[parent][0]):
            problems.append(f"entry {name!r} in {parent}, not a directory")
        if ino not in modes:
            problems.append(f"entry {name!r} points to missing {ino}")
            continue
        children[parent].append(ino)
        names[ino] += 1
        if stat.S_ISDIR(modes[ino][0]):
            subdirs[parent] += 1
    seen = {ROOT_INODE}
    stack = [ROOT_INODE]
    while stack:
        for child in children[stack.pop()]:
            if child not in seen:
                seen.add(child)
                stack.append(child)
    for ino, (mode, nlink) in modes.items():
        if stat.S_ISDIR(mode) and names[ino] > 1:
            problems.append(f"directory {ino} has {names[ino]} names")
        if ino not in seen and ino not in (open_deleted or set()) and nlink > 0:
            problems.append(f"inode {ino} unreachable")
        if ino in seen:
            want = 2 + subdirs[ino] if stat.S_ISDIR(mode) else names[ino]
            if nlink != want:
                problems.append(f"inode {ino} nlink {nlink}, should be {want}")
    for pack, live in md.db.execute("SELECT id, live FROM main.packs"):
        real = md.db.execute(
            "SELECT coalesce(sum(len), 0) FROM main.chunks WHERE pack=?", (pack,)
        ).fetchone()[0]
        if real != live:
            problems.append(f"pack {pack} live {live}, should be {real}")
    return problems
