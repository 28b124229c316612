"""Cryptographic primitives: AEAD, key derivation, printed codes; no I/O, FUSE, trio or boto3."""
