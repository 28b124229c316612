"""The mounted filesystem: pyfuse3 operations, volume, lease, lifecycle, control socket."""
