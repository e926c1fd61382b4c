"""download_verified: a file is kept only when complete and its sha256 matches; nothing else is left behind."""

import hashlib

import pytest

from ulmfit_jax.text.download import ChecksumError, download_verified, sha256_of


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source" / "train.label"
    path.parent.mkdir()
    path.write_bytes(b"DESC:def What is a question ?\n" * 100)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_matching_download_is_kept(source, tmp_path):
    path, digest = source
    destination = download_verified(path.as_uri(), tmp_path / "data" / "trec" / "train.label", digest)
    assert destination.read_bytes() == path.read_bytes() and sha256_of(destination) == digest
    assert leftovers(destination.parent) == ["train.label"]


def test_a_wrong_checksum_is_refused_and_discarded(source, tmp_path):
    path, _ = source
    destination = tmp_path / "data" / "train.label"
    with pytest.raises(ChecksumError, match="expected 0000"):
        download_verified(path.as_uri(), destination, "0" * 64)
    assert leftovers(destination.parent) == []


def test_an_unreachable_url_leaves_nothing(tmp_path):
    destination = tmp_path / "data" / "train.label"
    with pytest.raises(OSError):
        download_verified((tmp_path / "absent").as_uri(), destination, "0" * 64)
    assert leftovers(destination.parent) == []


def test_an_existing_file_is_not_overwritten(source, tmp_path):
    path, digest = source
    destination = tmp_path / "train.label"
    destination.write_text("mine")
    with pytest.raises(FileExistsError):
        download_verified(path.as_uri(), destination, digest)
    assert destination.read_text() == "mine"
