"""Fetching a data file from its canonical URL, kept only when its sha256 matches."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import urllib.request


class ChecksumError(ValueError):
    """A download whose sha256 is not the expected one (it was not kept)."""


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url: str, destination: str | os.PathLike, sha256: str, timeout: float = 60.0) -> pathlib.Path:
    """Download `url` to `destination` through a temporary file in the same folder; it is renamed
    into place only when its sha256 equals `sha256`, so a failed or corrupt download never leaves
    a file that looks like the data. An existing `destination` is not touched."""
    destination = pathlib.Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists; not downloading over it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        actual = sha256_of(temporary)
        if actual != sha256:
            raise ChecksumError(f"{url}: sha256 {actual}, expected {sha256}; the download was discarded")
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination
