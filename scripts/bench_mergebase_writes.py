"""Metadata cost of an untar's row changes with the merge base armed (3,000 creates, four
inode updates each; CPU only, no FUSE, no disk): median of 5 runs."""

import sqlite3
import stat
import statistics
import time

from encfs_cloud.tree.merge import Merger
from encfs_cloud.tree.metadata import ROOT_INODE, Metadata
from encfs_cloud.tree.namespace import Namespace


def run() -> float:
    md = Metadata(sqlite3.connect(":memory:", check_same_thread=False))
    Merger(md, "dev")
    ns = Namespace(md)
    ns.ensure_root(0, 0)
    t = time.perf_counter()
    for i in range(3000):
        node = ns.create(ROOT_INODE, b"f%d" % i, stat.S_IFREG | 0o644, 0, 0)
        for k in range(4):
            node.size = k * 100
            node.mtime_ns += 1
            md.put_inode(node)
    return time.perf_counter() - t


if __name__ == "__main__":
    print(__import__("encfs_cloud").__file__)
    print("median s:", statistics.median(run() for _ in range(5)))
