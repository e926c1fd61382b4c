"""Readers on the real data sets (published counts) and on small made-up files for the bad-input cases."""

from __future__ import annotations

import collections
import gzip
import json

import pytest

from ulmfit_jax.text.datasets import (DataFormatError, decode, read_csv, read_dataset, read_generic, read_imdb,
                                      read_jsonl, read_jsonl_prefix, read_mr, read_sst, read_text_folder, read_trec,
                                      read_wikitext, data_dir, split_wikitext_articles)

DATA = data_dir()


def need(path):
    if not path.exists():
        pytest.skip(f"data not found at {path} (set ULMFIT_DATA_DIR)")
    return path


def test_imdb_jsonl_counts():
    dataset = read_imdb(need(DATA / "imdb"), splits=("train",))
    train = dataset.splits["train"]
    assert len(train.texts) == 25000
    assert collections.Counter(train.labels) == {"neg": 12500, "pos": 12500}
    assert "<br />" in "".join(train.texts[:200])  # raw text, the rules handle the tags
    assert dataset.decode_replacements == 0


def test_imdb_acl_tree_equals_jsonl(tmp_path):
    """The aclImdb/ tree of the original tarball gives the same texts in the same order as the JSON lines."""
    records = [json.loads(line) for line in gzip.open(need(DATA / "imdb" / "test.jsonl.gz"), "rt")][:3]
    records += [json.loads(line) for line in gzip.open(DATA / "imdb" / "test.jsonl.gz", "rt")][-3:]
    expected = sorted(records, key=lambda r: (r["label"], r["id"]))
    for record in records:
        folder = tmp_path / "aclImdb" / "test" / record["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{record['id']}_{record['rating']}.txt").write_text(record["text"], encoding="utf-8")
    split = read_imdb(tmp_path, splits=("test",)).splits["test"]
    assert split.texts == [r["text"] for r in expected]
    assert split.labels == [r["label"] for r in expected]


def test_imdb_unsup_has_no_labels(tmp_path):
    (tmp_path / "unsup.jsonl").write_text(json.dumps({"text": "hello", "label": "unsup"}) + "\n")
    assert read_imdb(tmp_path, splits=("unsup",)).splits["unsup"].labels is None


def test_trec():
    coarse = read_trec(need(DATA / "trec"))
    assert [len(s.texts) for s in coarse.splits.values()] == [5452, 500]
    assert collections.Counter(coarse.splits["train"].labels) == {
        "ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
    fine = read_trec(DATA / "trec", fine=True)
    assert len(set(fine.splits["train"].labels)) == 50
    assert fine.splits["train"].texts[0] == "How did serfdom develop in and then leave Russia ?"
    # The one non-ASCII byte of the ISO-8859-1 train file decodes to a letter, not to U+FFFD.
    assert coarse.decode_replacements == 0
    assert any(not text.isascii() for text in coarse.splits["train"].texts)


@pytest.mark.parametrize("fine,counts,n_classes", [(False, [6920, 872, 1821], 2), (True, [8544, 1101, 2210], 5)])
def test_sst(fine, counts, n_classes):
    dataset = read_sst(need(DATA / "sst"), fine=fine)
    assert list(dataset.splits) == ["train", "dev", "test"]
    assert [len(s.texts) for s in dataset.splits.values()] == counts
    assert len(set(dataset.splits["train"].labels)) == n_classes


def test_mr_windows_1252():
    dataset = read_mr(need(DATA / "mr"))
    split = dataset.splits["train"]
    assert collections.Counter(split.labels) == {"neg": 5331, "pos": 5331}
    assert dataset.decode_replacements == 0
    assert any("é" in text for text in split.texts)  # e.g. 'café', a 0xE9 byte in Windows-1252


def test_wikitext_articles_keep_every_token():
    path = need(DATA / "wikitext2" / "wiki.valid.tokens")
    dataset = read_wikitext(path.parent)
    assert set(dataset.splits) == {"valid", "test"}
    raw = path.read_text(encoding="utf-8")
    # published count: 217,646 tokens, one <eos> a line counted
    assert sum(len(line.split()) + 1 for line in raw.split("\n")[:-1]) == 217646
    articles = dataset.splits["valid"].texts
    assert len(articles) == 60
    assert sum(len(a.split()) for a in articles) == len(raw.split())
    assert articles[0].startswith("= Homarus gammarus =")
    assert split_wikitext_articles(" = A = \n x \n = = B = = \n y \n = C = \n z") == [
        "= A = \n x \n = = B = = \n y", "= C = \n z"]


def test_enwiki_jsonl():
    split, replaced = read_jsonl(need(DATA / "enwiki" / "AA.jsonl.gz"), label_field=None, limit=5)
    assert len(split.texts) == 5 and split.labels is None and split.texts[0].startswith("Anarchism")


def test_generic_jsonl_csv_tsv_and_folders(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"body": "good", "y": "pos"}\n\n{"body": "bad", "y": 0}\n')
    (tmp_path / "test.jsonl").write_text('{"body": "fine", "y": "pos"}\n')
    dataset = read_generic(tmp_path, "jsonl", text_field="body", label_field="y")
    assert list(dataset.splits) == ["train", "test"]
    assert dataset.splits["train"].texts == ["good", "bad"] and dataset.splits["train"].labels == ["pos", "0"]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('text,label\n"hello, ""world""",a\n"two\nlines",b\n', encoding="utf-8")
    split, _ = read_csv(csv_path)
    assert split.texts == ['hello, "world"', "two\nlines"] and split.labels == ["a", "b"]
    tsv_path = tmp_path / "data.tsv"
    tsv_path.write_text("label\ttext\nx\tsome text\n", encoding="utf-8")
    assert read_csv(tsv_path)[0].texts == ["some text"]
    folder = tmp_path / "texts"
    for split_name, label, name in [("train", "pos", "a"), ("train", "neg", "b"), ("test", "pos", "c")]:
        (folder / split_name / label).mkdir(parents=True, exist_ok=True)
        (folder / split_name / label / f"{name}.txt").write_text(f"text {name}")
    dataset = read_text_folder(folder)
    assert dataset.splits["train"].labels == ["neg", "pos"] and dataset.splits["test"].texts == ["text c"]
    assert read_dataset("text", folder / "train" / "pos").splits["train"].labels is None


def test_missing_fields_and_columns_are_clear_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"txt": "x"}\n')
    with pytest.raises(DataFormatError, match=r"no field 'text' \(fields: \['txt'\]\)"):
        read_jsonl(path)
    path.write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    with pytest.raises(DataFormatError, match=r"a.jsonl:2: no label field 'label'"):
        read_jsonl(path)
    path.write_text('{"text": "x"\n')
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_jsonl(path)
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataFormatError, match="is int, not text"):
        read_jsonl(path)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("review,label\nx,a\n")
    with pytest.raises(DataFormatError, match=r"no column 'text' \(columns: \['review', 'label'\]\)"):
        read_csv(csv_path)
    csv_path.write_text("text,label\nx,a,extra\n")
    with pytest.raises(DataFormatError, match="row 2 has 3 fields"):
        read_csv(csv_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dataset("trec6", tmp_path / "nowhere")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataFormatError, match="no split files"):
        read_generic(tmp_path / "empty_folder", "jsonl")


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    assert decode(b"caf\xc3\xa9") == ("café", 0)
    assert decode(b"bad \xff\xfe bytes \xc3") == ("bad \ufffd\ufffd bytes \ufffd", 3)
    assert decode("already \ufffd".encode()) == ("already \ufffd", 0)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok \xff", "label": "a"}\n')
    dataset = read_generic(path, "jsonl")
    assert dataset.splits["train"].texts == ["ok \ufffd"] and dataset.decode_replacements == 1


def test_jsonl_prefix_stops_once_it_has_the_words(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(5):
            handle.write(json.dumps({"text": " ".join(["w"] * 10) + f" {i}"}) + "\n")
    assert len(read_jsonl_prefix(path, 20)) == 2          # 11 + 11 words >= 20
    assert len(read_jsonl_prefix(path, 1000)) == 5        # the whole file when it is shorter
    with gzip.open(path, "at", encoding="utf-8") as handle:
        handle.write(json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataFormatError, match=r"corpus.jsonl.gz:6: the record has no 'text' field"):
        read_jsonl_prefix(path, 1000)
