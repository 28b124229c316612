"""Probe a store once per device, remember its profile, refuse writes without conditional writes."""

from __future__ import annotations

import logging

from encfs_cloud.errors import StoreUnfitError
from encfs_cloud.keys.device import DeviceState, DeviceStore
from encfs_cloud.store.base import ObjectStore
from encfs_cloud.store.probe import probe_store
from encfs_cloud.store.profile import StoreProfile

log = logging.getLogger(__name__)

OPT_OUT_FLAG = "--unsafe-no-conditional-writes"
OPT_OUT_MOUNT = "-o unsafe_no_conditional_writes"


def _endpoint(store: ObjectStore) -> str | None:
    endpoint = getattr(store, "endpoint", None)
    return endpoint if isinstance(endpoint, str) else None


def remembered_profile(
    store: ObjectStore, devices: DeviceStore, fs_id: bytes
) -> StoreProfile | None:
    """The profile this device recorded for this very store (same URL and endpoint), if any."""
    if not devices.has(fs_id):
        return None
    profile = StoreProfile.from_json(devices.load_state(fs_id).store_profile)
    if profile is None or profile.store != store.url or profile.endpoint != _endpoint(store):
        return None
    return profile


def remember_profile(devices: DeviceStore, fs_id: bytes, profile: StoreProfile) -> None:
    def change(state: DeviceState) -> None:
        state.store_profile = profile.to_json()

    devices.update_state(fs_id, change)


def profile_for(store: ObjectStore, devices: DeviceStore, fs_id: bytes) -> StoreProfile:
    """The remembered profile; the store is probed only when there is none (once per store).

    A device not (yet) enrolled keeps nothing: its folder would otherwise appear before its key.
    """
    profile = remembered_profile(store, devices, fs_id)
    if profile is None:
        profile = probe_store(store)
        if devices.has(fs_id):
            remember_profile(devices, fs_id, profile)
    return profile


def require_conditional_writes(
    profile: StoreProfile, *, unsafe: bool, doing: str, opt_out: str = OPT_OUT_FLAG
) -> None:
    """Refuse to write (StoreUnfitError) where another writer could silently be overwritten."""
    if profile.conditional_writes:
        return
    found = f"If-None-Match {profile.if_none_match}, If-Match {profile.if_match}"
    if unsafe:
        log.warning(
            "%s does not enforce conditional writes (%s); writing anyway as asked (%s): "
            "only one device may write at a time",
            profile.store,
            found,
            opt_out,
        )
        return
    raise StoreUnfitError(
        f"refusing to {doing}: {profile.store} does not enforce conditional writes ({found}),"
        " so two writers could fork the filesystem and lose changes; see encfs-cloud doctor"
        f" SOURCE, or if only this device ever writes, pass {opt_out}"
    )


def check_writable(
    store: ObjectStore,
    devices: DeviceStore,
    fs_id: bytes,
    *,
    unsafe: bool,
    doing: str,
    opt_out: str = OPT_OUT_FLAG,
) -> StoreProfile:
    """`profile_for` and `require_conditional_writes` in one step, for every writing command."""
    profile = profile_for(store, devices, fs_id)
    require_conditional_writes(profile, unsafe=unsafe, doing=doing, opt_out=opt_out)
    return profile
