"""Exception hierarchy, the one errno table and the one exit-code table of encfs-cloud."""

from __future__ import annotations

import errno


class EncfsCloudError(Exception):
    """Base of every error this package raises on purpose.

    `exit_code` is what the command line exits with; `errno` is what a FUSE handler returns.
    The message is one line a user can act on.
    """

    exit_code = 1
    errno = errno.EIO


# --- user-facing setup errors (each its own exit code, see docs and `--help`) ---------------


class UsageError(EncfsCloudError):
    exit_code = 2


class BadSourceError(EncfsCloudError):
    """SOURCE is not a URL we understand."""

    exit_code = 3


class NotEmptyError(EncfsCloudError):
    """init on a bucket or prefix that already holds objects."""

    exit_code = 4


class NoFilesystemError(EncfsCloudError):
    """mount of a bucket or prefix with no filesystem header."""

    exit_code = 5


class FormatError(EncfsCloudError):
    """A foreign or unknown format version, unknown feature flags or parameters below floors."""

    exit_code = 6


class WrongPassphraseError(EncfsCloudError):
    exit_code = 7


class DeviceKeyMissingError(EncfsCloudError):
    """This machine holds no device key for the filesystem (not enrolled, or wiped)."""

    exit_code = 8


class MountpointError(EncfsCloudError):
    """The mount point is missing, not a directory, not empty or already mounted."""

    exit_code = 11


class LeaseHeldError(EncfsCloudError):
    """Another writer holds the single-writer lease."""

    exit_code = 12


class RollbackError(EncfsCloudError):
    """The bucket holds an older state than this device has already seen."""

    exit_code = 13


class KeyFileModeError(EncfsCloudError):
    """The device key file or its folder is readable by others."""

    exit_code = 14


class DeviceRevokedError(EncfsCloudError):
    """This device's key record is gone: it was revoked."""

    exit_code = 15


class RecoveryKeyError(EncfsCloudError):
    """A malformed recovery key (bad checksum) or one that does not open the filesystem."""

    exit_code = 16


class AbortedError(EncfsCloudError):
    """The user declined a confirmation (for instance a verification code did not match)."""

    exit_code = 17


class ChangesSpooledError(EncfsCloudError):
    """An unmount kept changes sealed in the local spool: they are not in the bucket yet."""

    exit_code = 18


class Interrupted(EncfsCloudError):
    """Ctrl-C; the message says what was and was not done."""

    exit_code = 130


class StoreUnfitError(EncfsCloudError):
    """The store does not enforce conditional writes (or fails another check of `doctor`)."""

    exit_code = 19


# --- runtime errors ----------------------------------------------------------------------


class IntegrityError(EncfsCloudError):
    """A sealed object failed authentication: tampered, swapped, truncated or replayed."""

    exit_code = 20
    errno = errno.EIO


class StoreError(EncfsCloudError):
    """The object store failed in a way retries did not cure."""

    exit_code = 21
    errno = errno.EIO


class CredentialsError(StoreError):
    """The store refused our credentials, or none were found.

    A StoreError too, so a running mount whose credentials expire keeps its data queued and
    retries instead of dying.
    """

    exit_code = 9


class UnreachableError(StoreError):
    """The store's endpoint cannot be reached (a StoreError: a mount retries, never dies)."""

    exit_code = 10


class ObjectMissingError(StoreError):
    """An object the metadata refers to is not in the store."""


class PreconditionFailedError(StoreError):
    """A conditional write (IfNoneMatch / IfMatch) lost its race."""


class TransientStoreError(StoreError):
    """A retryable failure: 5xx, SlowDown, reset, timeout, truncated body."""


class ReadOnlyError(EncfsCloudError):
    errno = errno.EROFS


class FsError(EncfsCloudError):
    """A POSIX error with a specific errno, raised by the filesystem core."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


def errno_of(exc: BaseException) -> int:
    """The one errno table: what a FUSE handler returns for any exception."""
    if isinstance(exc, EncfsCloudError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


# Exit codes of the maintenance commands' outcomes (not errors): kept here, with the table
# below, so the command line can print them without importing the tools.
EXIT_CLEAN = 0  # fsck: nothing wrong
EXIT_REPAIRED = 30  # fsck: problems found and all repaired
EXIT_DAMAGED = 31  # fsck: problems found and not (all) repaired
EXIT_ALL_SAVED = 0  # salvage: everything saved
EXIT_SOME_LOST = 32  # salvage: something was not saved

EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        UsageError,
        BadSourceError,
        NotEmptyError,
        NoFilesystemError,
        FormatError,
        WrongPassphraseError,
        DeviceKeyMissingError,
        CredentialsError,
        UnreachableError,
        MountpointError,
        LeaseHeldError,
        RollbackError,
        KeyFileModeError,
        DeviceRevokedError,
        RecoveryKeyError,
        AbortedError,
        ChangesSpooledError,
        StoreUnfitError,
        IntegrityError,
        StoreError,
        Interrupted,
    )
}
