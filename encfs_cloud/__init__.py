"""encfs-cloud: an end-to-end encrypted FUSE filesystem stored in an S3-compatible bucket."""

__version__ = "0.1.0"
