"""The file tree: the metadata database, POSIX namespace rules and the commit journal."""
