"""scripts/demo.py's data step: what is missing is downloaded (sha256-checked) or named with its source."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from ulmfit_jax.text.datasets import data_dir

ROOT = Path(__file__).resolve().parent.parent
TREC = data_dir() / "trec"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (TREC / "TREC_10.label").is_file(), reason=f"TREC-6 not found under {TREC}")
def test_missing_trec_files_are_downloaded_and_checked(demo, tmp_path, monkeypatch):
    """The canonical URLs are out of reach here, so they point at the shared copies (byte-identical
    to the official files): the download path and the sha256 check are what is tested."""
    files = {name: dataclasses.replace(source, url=(data_dir() / name).as_uri())
             for name, source in demo.DATA_FILES.items() if name.startswith("trec/")}
    monkeypatch.setattr(demo, "DATA_FILES", files)
    demo.ensure_data(tmp_path, list(files))
    for name in files:
        assert (tmp_path / name).read_bytes() == (data_dir() / name).read_bytes()


def test_a_download_with_the_wrong_checksum_is_not_kept(demo, tmp_path, monkeypatch):
    source = tmp_path / "fake.label"
    source.write_text("NUM:date When ?\n")
    monkeypatch.setattr(demo, "DATA_FILES", {"trec/TREC_10.label": dataclasses.replace(
        demo.DATA_FILES["trec/TREC_10.label"], url=source.as_uri())})
    with pytest.raises(SystemExit, match="download failed: .*sha256") as error:
        demo.ensure_data(tmp_path / "data", ["trec/TREC_10.label"])
    assert "TREC_10.label" in str(error.value)
    assert not (tmp_path / "data" / "trec" / "TREC_10.label").exists()


def test_data_without_a_canonical_url_is_named_with_its_source(demo, tmp_path):
    with pytest.raises(SystemExit, match="enwiki/AA.jsonl.gz: English Wikipedia") as error:
        demo.ensure_data(tmp_path, ["enwiki/AA.jsonl.gz", "trec/TREC_10.label"], download=False)
    assert "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label" in str(error.value)
    assert "--from-scratch" in str(error.value)
