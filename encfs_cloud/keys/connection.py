"""Remember how a SOURCE's store is reached (endpoint, region, AWS profile) per device."""

from __future__ import annotations

import dataclasses
import os

from encfs_cloud.errors import EncfsCloudError
from encfs_cloud.keys.device import STATE_FILE, DeviceState, DeviceStore
from encfs_cloud.store.base import StoreOptions

# Each remembered setting and the environment variables that, when set, take precedence.
SETTINGS: dict[str, tuple[str, ...]] = {
    "endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "profile": ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"),
}


def _key(source: str) -> str:
    return source.rstrip("/")


def _from_env(setting: str) -> str | None:
    for var in SETTINGS[setting]:
        if os.environ.get(var):
            return os.environ[var]
    return None


def told(options: StoreOptions) -> dict[str, str]:
    """The settings the user gave, by option or environment (what is worth remembering)."""
    found: dict[str, str] = {}
    for setting in SETTINGS:
        value = getattr(options, setting) or _from_env(setting)
        if value:
            found[setting] = value
    return found


def remember_connection(
    devices: DeviceStore, fs_id: bytes, source: str, options: StoreOptions
) -> None:
    """Record `options` (with the environment's part) for `source`; s3:// only, enrolled only."""
    if not source.startswith("s3://") or not devices.has(fs_id):
        return
    wanted = {"source": _key(source), **told(options)}
    if devices.load_state(fs_id).connection == wanted:
        return  # nothing new: no write

    def change(state: DeviceState) -> None:
        state.connection = wanted

    devices.update_state(fs_id, change)


def remembered_connection(devices: DeviceStore, source: str) -> dict[str, str]:
    """What this device recorded for `source` (the newest if several filesystems match)."""
    if not source.startswith("s3://") or not devices.root.is_dir():
        return {}
    best: tuple[float, dict[str, str]] = (-1.0, {})
    for folder in devices.root.iterdir():
        path = folder / STATE_FILE
        try:
            fs_id = bytes.fromhex(folder.name)
            if not path.is_file():
                continue
            when = path.stat().st_mtime
            connection = devices.load_state(fs_id).connection
        except (ValueError, OSError, EncfsCloudError):
            continue  # not a filesystem folder, or one we cannot read: not ours to judge here
        if connection.get("source") == _key(source) and when > best[0]:
            best = (when, connection)
    return best[1]


def with_remembered(devices: DeviceStore, source: str, options: StoreOptions) -> StoreOptions:
    """`options`, with each setting that neither they nor the environment give taken from
    what this device remembered for `source`."""
    saved = remembered_connection(devices, source)
    fill: dict[str, str | None] = {
        setting: saved[setting]
        for setting in SETTINGS
        if setting in saved and not getattr(options, setting) and not _from_env(setting)
    }
    if not fill:
        return options
    return dataclasses.replace(
        options,
        endpoint_url=fill.get("endpoint_url", options.endpoint_url),
        region=fill.get("region", options.region),
        profile=fill.get("profile", options.profile),
    )
