"""The data path: chunk cache, file contents, pack uploads, ordered commits and the spool."""
