"""Object-store backends: the `ObjectStore` protocol, and `open_store` for a SOURCE URL."""

from encfs_cloud.store.base import ObjectInfo, ObjectStore, StoreOptions, check_name
from encfs_cloud.store.source import open_store

__all__ = ["ObjectInfo", "ObjectStore", "StoreOptions", "check_name", "open_store"]
