"""Where log lines go: syslog/journald, else a rotated file in the device folder; stderr with -f."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import logging.handlers
import os
import socket
import stat
import sys
from pathlib import Path

from encfs_cloud.errors import UsageError

# Tests point this at a datagram socket of their own; a real system has /dev/log or nothing.
ENV_SYSLOG_SOCKET = "ENCFS_CLOUD_SYSLOG_SOCKET"
DAEMON_LOG = "daemon.log"
ROTATE_BYTES = 1 << 20
ROTATE_KEEP = 3
# botocore at debug level logs request headers and bodies: never below WARNING, even with -v.
NOISY = ("botocore", "boto3", "urllib3", "s3transfer")
LINE = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def open_private_log(path: str) -> io.TextIOWrapper:
    """Open a log file for appending: created 0600, never through a symbolic link.

    A symlink planted where the log goes would make us append to (or create) a file of the
    attacker's choosing; refuse it with a one-line error instead.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"log file {path} is a symbolic link; refusing to follow it") from None
        raise UsageError(f"cannot open log file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"log file {path} is not a regular file")
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


class PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are 0600 and never opened through a symlink."""

    def _open(self) -> io.TextIOWrapper:
        return open_private_log(self.baseFilename)


def _syslog_handler() -> logging.Handler | None:
    """syslog/journald through /dev/log, or None if no logger listens there."""
    address = os.environ.get(ENV_SYSLOG_SOCKET) or "/dev/log"
    if not Path(address).exists():
        return None
    try:
        handler = logging.handlers.SysLogHandler(address=address, socktype=socket.SOCK_DGRAM)
    except OSError:  # a stale socket (the syslog daemon stopped) must not lose the lines
        return None
    handler.ident = "encfs-cloud: "
    # syslog and journald stamp the time and map the priority to the level themselves.
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def _state_file_handler(folder: Path) -> logging.Handler | None:
    with contextlib.suppress(OSError, UsageError):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = PrivateRotatingHandler(
            str(folder / DAEMON_LOG), maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP
        )
        handler.setFormatter(logging.Formatter(LINE))
        return handler
    return None


def setup_logging(
    log_file: str | None,
    debug: bool,
    *,
    foreground: bool,
    state_folder: Path | None = None,
    stderr_level: int = logging.NOTSET,
) -> None:
    """Send the daemon's lines somewhere they survive.

    `-o log=FILE` wins; otherwise syslog/journald, and where there is none (containers,
    minimal systems) a rotated file in the device's state folder. In the foreground every
    line at `stderr_level` or above also goes to stderr.
    """
    handlers: list[logging.Handler] = []
    if log_file:
        handlers.append(logging.StreamHandler(open_private_log(log_file)))
    elif not foreground:
        chosen = _syslog_handler()
        if chosen is None and state_folder is not None:
            chosen = _state_file_handler(state_folder)
        if chosen is not None:
            handlers.append(chosen)
    if foreground:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(stderr_level)
        handlers.append(stderr)
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(logging.Formatter(LINE))
    root = logging.getLogger()
    for old in root.handlers:
        if old not in handlers:
            with contextlib.suppress(Exception):
                old.close()
    root.handlers[:] = handlers or [logging.NullHandler()]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("encfs_cloud").setLevel(logging.NOTSET)  # the command's -v setting
    quiet_libraries()


def quiet_libraries() -> None:
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_command_logging(verbose: bool) -> None:
    """A command's lines on stderr: warnings, or with -v our debug lines (not botocore's)."""
    # With -v the logger's name shows where a line comes from.
    form = "%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=form)
    logging.getLogger("encfs_cloud").setLevel(logging.DEBUG if verbose else logging.WARNING)
    quiet_libraries()
