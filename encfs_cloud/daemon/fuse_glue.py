"""The one place exceptions become FUSE errors, and the kernel's caches told what changed."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from encfs_cloud.errors import EncfsCloudError, FsError, errno_of

log = logging.getLogger("encfs_cloud.daemon.operations")  # the handlers' own log name

P = ParamSpec("P")
R = TypeVar("R")


def handler(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every failure into a FUSEError; an unexpected one is logged and becomes EIO."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except EncfsCloudError as exc:
            # Ours, and already logged where it happened (with inode and object): no traceback.
            if exc.errno == errno.EIO:
                log.error("%s failed: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            code = errno_of(exc)
            if code == errno.EIO:
                log.exception("%s failed", func.__name__)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def invalidate_kernel_caches(inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        except OSError as exc:  # not cached by the kernel, or it went meanwhile
            log.debug("invalidate_entry(%d): %s", parent, exc)
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:
            log.debug("invalidate_inode(%d): %s", ino, exc)
