"""scripts/demo.py's data step (`ulmfit_jax.text.download.ensure_data`): what is missing is
downloaded (sha256-checked) or named with its source."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from ulmfit_jax.text.datasets import data_dir
from ulmfit_jax.text.download import DATA_FILES, MissingData, ensure_data

ROOT = Path(__file__).resolve().parent.parent
TREC = data_dir() / "trec"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (TREC / "TREC_10.label").is_file(), reason=f"TREC-6 not found under {TREC}")
def test_missing_trec_files_are_downloaded_and_checked(tmp_path):
    """The canonical URLs are out of reach here, so they point at the shared copies (byte-identical
    to the official files): the download path and the sha256 check are what is tested."""
    files = {name: dataclasses.replace(source, url=(data_dir() / name).as_uri())
             for name, source in DATA_FILES.items() if name.startswith("trec/")}
    heard = []
    ensure_data(tmp_path, list(files), files=files, log=heard.append)
    for name in files:
        assert (tmp_path / name).read_bytes() == (data_dir() / name).read_bytes()
    assert len(heard) == 2 and all(message.startswith("downloading ") for message in heard)


def test_a_download_with_the_wrong_checksum_is_not_kept(tmp_path):
    source = tmp_path / "fake.label"
    source.write_text("NUM:date When ?\n")
    files = {"trec/TREC_10.label": dataclasses.replace(DATA_FILES["trec/TREC_10.label"], url=source.as_uri())}
    with pytest.raises(MissingData, match="download failed: .*sha256") as error:
        ensure_data(tmp_path / "data", ["trec/TREC_10.label"], files=files)
    assert "TREC_10.label" in str(error.value)
    assert not (tmp_path / "data" / "trec" / "TREC_10.label").exists()


def test_data_without_a_canonical_url_is_named_with_its_source(tmp_path):
    with pytest.raises(MissingData, match="enwiki/AA.jsonl.gz: English Wikipedia") as error:
        ensure_data(tmp_path, ["enwiki/AA.jsonl.gz", "trec/TREC_10.label"], download=False)
    assert "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label" in str(error.value)
    assert "--from-scratch" in str(error.value)


def test_present_files_are_left_alone(tmp_path):
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "TREC_10.label").write_text("not the real file")
    ensure_data(tmp_path, ["trec/TREC_10.label"], download=False)
    assert (tmp_path / "trec" / "TREC_10.label").read_text() == "not the real file"


def test_the_demo_stops_before_training_naming_what_is_missing(demo, tmp_path):
    with pytest.raises(SystemExit) as error:
        demo.main(["--data-dir", str(tmp_path), "--no-download", "--classifier-epochs", "1"])
    message = str(error.value)
    assert message.startswith("error: data missing under") and "--data-dir or ULMFIT_DATA_DIR" in message
    assert "trec/train_5500.label" in message and "enwiki/AA.jsonl.gz" in message
    with pytest.raises(SystemExit) as error:
        demo.main(["--data-dir", str(tmp_path), "--no-download", "--from-scratch"])
    assert "enwiki" not in str(error.value)
