"""A store's probed profile (conditional writes, ranges, checksums, versions, clock), explained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ENFORCED = "enforced"
IGNORED = "ignored"
HONOURED = "honoured"
NOT_APPLICABLE = "n/a"

# Beyond this the lease's expiry arithmetic (daemon/lease.py CLOCK_SKEW) and SigV4's
# 15-minute window start to matter; NTP keeps clocks far closer.
SKEW_WARN_SECONDS = 5.0
_OPTIONAL = ("endpoint", "clock_skew")


@dataclass(frozen=True)
class StoreProfile:
    """What probing a store found; every field is a short word or phrase a person can read."""

    store: str  # the SOURCE's store URL (s3://bucket/prefix/, file:///dir)
    endpoint: str | None  # the S3 endpoint probed; None for file:// and memory://
    probed_at: str  # ISO 8601, UTC
    if_none_match: str  # ENFORCED, IGNORED or "error: ..."
    if_match: str  # ENFORCED, IGNORED or "error: ..."
    ranged_get: str  # HONOURED, "whole object returned", "wrong bytes" or "error: ..."
    checksums: str  # how the store treats flexible checksums (see `findings`)
    versioning: str  # "enabled", "suspended", "off", "unknown (...)" or NOT_APPLICABLE
    clock_skew: float | None  # the store's clock minus ours in seconds; None if unknown

    @property
    def conditional_writes(self) -> bool:
        """Both If-None-Match and If-Match are enforced: commits and the lease are safe."""
        return self.if_none_match == ENFORCED and self.if_match == ENFORCED

    @property
    def fit(self) -> bool:
        """encfs-cloud can write here safely (warnings aside)."""
        return self.conditional_writes and self.ranged_get in (HONOURED, "whole object returned")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: object) -> StoreProfile | None:
        """The profile stored in `doc`, or None if it is missing or from another version."""
        if not isinstance(doc, dict):
            return None
        try:
            values = {f.name: doc[f.name] for f in fields(cls)}
        except KeyError:
            return None
        skew = values["clock_skew"]
        if skew is not None and not isinstance(skew, int | float):
            return None
        if values["endpoint"] is not None and not isinstance(values["endpoint"], str):
            return None
        if not all(isinstance(v, str) for k, v in values.items() if k not in _OPTIONAL):
            return None
        return cls(**values)

    def summary(self) -> str:
        """One line for `status`."""
        writes = "conditional writes " + ("enforced" if self.conditional_writes else "NOT ENFORCED")
        skew = "unknown" if self.clock_skew is None else f"{round(self.clock_skew):+d}s"
        return (
            f"{writes}; ranged GET {self.ranged_get}; checksums {self.checksums};"
            f" versioning {self.versioning}; clock skew {skew} (probed {self.probed_at})"
        )


@dataclass(frozen=True)
class Finding:
    """One line of `doctor`: what was checked, what was found, whether it is fine, what to do."""

    check: str
    found: str
    level: str  # "ok", "warn" or "FAIL"
    explain: str


def findings(p: StoreProfile) -> list[Finding]:
    """Each probed property, judged and explained for `encfs-cloud doctor`."""
    out = [
        _conditional(
            "If-None-Match: *",
            p.if_none_match,
            "a second commit with the same number, a second init or a second lease holder",
        ),
        _conditional(
            "If-Match: ETAG",
            p.if_match,
            "a lease renewal or takeover that overwrites another device's",
        ),
    ]
    if p.ranged_get == HONOURED:
        out.append(Finding("ranged GET", p.ranged_get, "ok", "reads fetch only the chunk needed"))
    elif p.ranged_get == "whole object returned":
        out.append(
            Finding(
                "ranged GET",
                p.ranged_get,
                "warn",
                "the store ignores Range:"
                " every read downloads a whole pack (up to 16 MiB); correct but slow",
            )
        )
    else:
        out.append(
            Finding(
                "ranged GET",
                p.ranged_get,
                "FAIL",
                "reads of file data would fail"
                " or return the wrong bytes; use another store or gateway",
            )
        )
    out.append(_checksums(p.checksums))
    out.append(_versioning(p.versioning))
    out.append(_skew(p.clock_skew))
    return out


def _conditional(header: str, found: str, risk: str) -> Finding:
    if found == ENFORCED:
        return Finding(header, found, "ok", "concurrent writers cannot overwrite each other")
    return Finding(
        header,
        found,
        "FAIL",
        f"the store does not refuse {risk}, so two devices (or a device and fsck) could fork"
        " the filesystem and lose changes. Use a store that enforces conditional writes"
        " (AWS S3, MinIO, SeaweedFS, Ceph RGW, Cloudflare R2); to write anyway from a single"
        " device, pass --unsafe-no-conditional-writes (mount: -o unsafe_no_conditional_writes)",
    )


def _checksums(found: str) -> Finding:
    if found in (NOT_APPLICABLE, "validated", "not returned", "not stored"):
        return Finding("checksums", found, "ok", "AEAD authenticates every byte either way")
    return Finding(
        "checksums",
        found,
        "warn",
        "this store's checksum handling breaks a client that sends or validates checksums by"
        " default (recent botocore does); encfs-cloud needs none, its AEAD authenticates"
        " every byte, so botocore must compute and check them only where an operation"
        " requires them (when_required)",
    )


def _versioning(found: str) -> Finding:
    if found in ("enabled", "suspended"):
        return Finding(
            "versioning",
            found,
            "warn",
            "deleted and overwritten objects stay as old versions: they cost storage until"
            " a lifecycle rule expires noncurrent versions (they stay sealed; old versions"
            " are also what a bucket owner could replay, which rollback checks catch)",
        )
    if found.startswith("unknown"):
        return Finding("versioning", found, "warn", "could not ask; check the bucket's settings")
    return Finding("versioning", found, "ok", "deleted objects are really gone")


def _skew(skew: float | None) -> Finding:
    if skew is None:
        return Finding("clock", "unknown", "ok", "no Date header to compare (local store)")
    found = f"{round(skew):+d} s"
    if abs(skew) <= SKEW_WARN_SECONDS:
        return Finding("clock", found, "ok", "this machine's clock agrees with the store's")
    return Finding(
        "clock",
        found,
        "warn",
        "this machine's clock is off from the store's; lease expiry assumes devices agree"
        f" within {SKEW_WARN_SECONDS:.0f} s and S3 refuses requests over 15 min off: run NTP"
        " (timedatectl set-ntp true)",
    )
