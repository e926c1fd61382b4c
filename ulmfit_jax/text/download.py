"""The data files the project reads, and fetching one from its canonical URL, kept only when its
sha256 matches."""

from __future__ import annotations

import dataclasses
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


# --------------------------------------------------------------------------- known data files


@dataclasses.dataclass(frozen=True)
class DataFile:
    """A data file the project reads: what it is, its sha256, and the canonical URL it is
    downloaded from where there is one."""
    description: str
    sha256: str
    url: str | None = None


# Paths relative to the data folder (`ulmfit_jax.text.datasets.data_dir()`).
DATA_FILES = {
    "trec/train_5500.label": DataFile(
        "TREC-6 training questions (Li & Roth 2002)",
        "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
        "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label"),
    "trec/TREC_10.label": DataFile(
        "TREC-6 test questions",
        "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
        "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label"),
    "enwiki/AA.jsonl.gz": DataFile(
        "English Wikipedia, 2015 dump, first shard as gzipped JSON lines {id, title, url, text}; no canonical "
        "file to download: extract one from a dump at https://dumps.wikimedia.org/ with WikiExtractor --json "
        "(any such shard works; the demo reads a prefix of its texts), or run --from-scratch",
        "25001822d64b5b602261141a4bf46b95d12c370ed81f27f90a9facf9cb1df2a5"),
}


class MissingData(FileNotFoundError):
    """Data files absent from the data folder that could not be downloaded; the message names
    each with what it is and where it comes from."""


def ensure_data(data_dir: str | os.PathLike, names, download: bool = True, files=None,
                log=None) -> None:
    """Make sure the files `names` (keys of `files`, default `DATA_FILES`) are in `data_dir`:
    one that is missing and has a canonical URL is downloaded and kept only if its sha256
    matches (`download_verified`); with `download=False` nothing is fetched. Files already there
    are not checked (reading a large corpus to hash it would cost more than the check is worth).
    `log(message)` hears of each download. Raises `MissingData` naming every file still missing,
    with its description, source and why its download failed."""
    data_dir = pathlib.Path(data_dir)
    files = DATA_FILES if files is None else files
    problems = []
    for name in names:
        path, source = data_dir / name, files[name]
        if path.is_file():
            continue
        where = f"\n    from {source.url} (sha256 {source.sha256})" if source.url else ""
        if download and source.url:
            if log is not None:
                log(f"downloading {source.url} -> {path}")
            try:
                download_verified(source.url, path, source.sha256)
                continue
            except (OSError, ChecksumError) as error:
                problems.append(f"  {path}: {source.description}{where}\n    download failed: {error}")
                continue
        problems.append(f"  {path}: {source.description}{where}")
    if problems:
        raise MissingData(f"data missing under {data_dir}:\n" + "\n".join(problems))
