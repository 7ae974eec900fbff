"""File hashing: the one place where the package computes the SHA-256 of a file (teacher and metric weights)."""

from __future__ import annotations

import hashlib
import os

_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    r"""
    SHA-256 of a file's bytes, read in 1 MiB chunks so that large weight files hash in bounded memory.

    Args:
        path (`str` or `os.PathLike`): the file.

    Returns:
        `str`: the 64-character lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["file_sha256"]
