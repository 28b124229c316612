"""Offline tools over a bucket: fsck, salvage and re-encryption."""
