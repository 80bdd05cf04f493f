"""Deterministic pseudo-random payload files served by the test-bed targets."""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

BLOCK = 1 << 20
FILES_URL_PREFIX = "/files/"
CHUNKED_URL_PREFIX = "/chunked/"
"""The same files, sent chunked (arr/testbed/nginx.py): no Content-Length."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: Path
    size: int
    sha256: str
    url_path: str

    @property
    def chunked_url_path(self) -> str:
        """Where the targets send this file's bytes with ``Transfer-Encoding: chunked``."""
        return CHUNKED_URL_PREFIX + self.name


def _seed(name: str, size: int, block: int) -> int:
    digest = hashlib.sha256(f"arr-testbed:{name}:{size}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def content_blocks(name: str, size: int):
    """Yield the file's bytes in blocks of at most 1 MiB (same for same name+size)."""
    remaining, i = size, 0
    while remaining > 0:
        n = min(BLOCK, remaining)
        yield random.Random(_seed(name, size, i)).randbytes(n)
        remaining -= n
        i += 1


def write_file(directory: Path, name: str, size: int) -> FileInfo:
    """Write NAME of SIZE bytes into DIRECTORY; SHA-256 is computed while writing."""
    if not _NAME_RE.match(name):
        raise ValueError(f"bad file name {name!r}")
    if size < 0:
        raise ValueError(f"bad size {size} for {name!r}")
    path = directory / name
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for block in content_blocks(name, size):
            h.update(block)
            f.write(block)
    return FileInfo(name=name, path=path, size=size, sha256=h.hexdigest(), url_path=FILES_URL_PREFIX + name)


def write_files(directory: Path, files: Mapping[str, int]) -> dict[str, FileInfo]:
    directory.mkdir(parents=True, exist_ok=True)
    return {name: write_file(directory, name, size) for name, size in files.items()}


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(hex SHA-256, size) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(BLOCK)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size
