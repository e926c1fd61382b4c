"""Parallel cached tokenization, prepare() and the scripts/prepare_data.py contract."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from ulmfit_jax.text import pipeline
from ulmfit_jax.text.datasets import DataFormatError, data_dir, load_prepared, read_jsonl
from ulmfit_jax.text.pipeline import PrepareSettings, prepare, tokenize_corpus
from ulmfit_jax.text.tokenizers import TextTokenizer, TokenizerSettings
from ulmfit_jax.text.vocab import count_tokens, make_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def reviews():
    path = data_dir() / "imdb" / "train.jsonl.gz"
    if not path.exists():
        pytest.skip(f"IMDb data not found at {path}")
    return read_jsonl(path, every=100, limit=250)[0].texts


def test_parallel_equals_serial_equals_tokenizer(reviews):
    tokenizer = TextTokenizer()
    expected = [tokenizer(text) for text in reviews]
    serial = tokenize_corpus(reviews, n_workers=0, use_cache=False, progress=False)
    parallel = tokenize_corpus(reviews, n_workers=2, use_cache=False, progress=False, batch_documents=40)
    for corpus in (serial, parallel):
        assert [corpus.document_tokens(i) for i in range(len(reviews))] == expected
        # first-seen order, so make_vocab breaks ties as fastai does
        assert list(corpus.counts().items()) == list(count_tokens(expected).items())
    assert make_vocab(parallel.counts()) == make_vocab(count_tokens(expected))


def test_cache_hit_and_key(reviews, monkeypatch):
    first = tokenize_corpus(reviews, n_workers=0, progress=False)
    calls = []
    monkeypatch.setattr(pipeline, "_merge", lambda *a: calls.append(1))
    second = tokenize_corpus(reviews, n_workers=0, progress=False)
    assert not calls  # served from the cache
    assert second.tokens == first.tokens
    np.testing.assert_array_equal(second.ids, first.ids)
    keys = {pipeline.cache_key(reviews, TokenizerSettings()), pipeline.cache_key(reviews[1:], TokenizerSettings()),
            pipeline.cache_key(reviews, TokenizerSettings("spacy")),
            pipeline.cache_key(reviews, TokenizerSettings(add_eos=True))}
    assert len(keys) == 4


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_prepare_round_trip(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    train = [{"text": "Good movie. GREAT acting!", "label": "pos"}, {"text": "Bad movie...", "label": "neg"},
             {"text": "   ", "label": "neg"}, {"text": "good good good good", "label": "pos"}]
    write_jsonl(source / "train.jsonl", train)
    write_jsonl(source / "test.jsonl", [{"text": "unseen words here", "label": "neg"}])
    out = tmp_path / "out"
    summary = prepare(source, out, PrepareSettings("jsonl", min_freq=1, progress=False),
                      dump_tokens=tmp_path / "tokens.jsonl")
    assert summary["docs"] == 5 and summary["empty_documents"] == 1
    data = load_prepared(out)
    assert data.classes == ["neg", "pos"]
    np.testing.assert_array_equal(data.splits["train"].labels, [1, 0, 0, 1])
    dumped = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    tokenizer = TextTokenizer()
    assert dumped == [tokenizer(r["text"]) for r in train] + [tokenizer("unseen words here")]
    assert dumped[2] == ["xxbos"]  # the empty document is kept, aligned with its label
    for document, tokens in zip(data.splits["train"].documents, dumped):
        assert [data.vocab[i] for i in document] == tokens
    assert data.splits["test"].documents[0][1] == 0  # 'unseen' is xxunk: counted on train only
    assert data.meta["splits"]["train"]["empty_documents"] == 1
    assert sum(summary["splits"].values()) == summary["docs"]
    # stage 2/3 data with the vocabulary and classes of an earlier run
    out2 = tmp_path / "out2"
    prepare(source / "test.jsonl", out2, PrepareSettings("jsonl", progress=False), vocab_path=out / "vocab.json",
            classes_path=out / "classes.json")
    again = load_prepared(out2)
    assert again.vocab == data.vocab and again.classes == data.classes
    np.testing.assert_array_equal(again.splits["train"].documents[0], data.splits["test"].documents[0])


def test_test_labels_absent_from_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "b", "label": "neutral"}, {"text": "c", "label": "mixed"}])
    with pytest.raises(DataFormatError, match=r"split 'test' has labels .*: \['mixed', 'neutral'\]"):
        prepare(tmp_path, tmp_path / "out", PrepareSettings("jsonl", progress=False))


def run_script(*arguments, cache):
    env = {"ULMFIT_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, arguments)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_script_contract_on_trec(tmp_path):
    trec = data_dir() / "trec"
    if not trec.exists():
        pytest.skip(f"TREC data not found at {trec}")
    result = run_script("--input", trec, "--format", "trec6", "--out", tmp_path / "out", "--no-progress",
                        "--dump-tokens", tmp_path / "tokens.jsonl", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["docs"] == 5952 and summary["vocab"] % 8 == 0 and summary["tokens"] > 50000
    assert set(summary) >= {"docs", "tokens", "vocab", "seconds"}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == [
        "ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len((tmp_path / "tokens.jsonl").read_text().splitlines()) == 5952
    started = time.perf_counter()
    again = run_script("--input", trec, "--format", "trec6", "--out", tmp_path / "out2", "--no-progress",
                       cache=tmp_path / "cache")
    assert again.returncode == 0 and time.perf_counter() - started < 30
    missing = run_script("--input", tmp_path / "nowhere", "--format", "csv", "--out", tmp_path / "o3",
                         cache=tmp_path / "cache")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_script_missing_field_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"review": "x"}])
    result = run_script("--input", tmp_path / "d.jsonl", "--format", "jsonl", "--out", tmp_path / "o",
                        cache=tmp_path / "cache")
    assert result.returncode == 2 and "no field 'text'" in result.stderr


BIG_DOCUMENT_SCRIPT = """
import resource, sys
from ulmfit_jax.text import pipeline
from ulmfit_jax.text.tokenizers import TokenizerSettings
from ulmfit_jax.text.datasets import data_dir, read_jsonl
text = " ".join(read_jsonl(data_dir() / "imdb" / "train.jsonl.gz", every=100, limit=250)[0].texts)
text = (text * (3_000_000 // len(text) + 1))[:3_000_000]
pipeline._init_worker(TokenizerSettings())
pipeline._tokenize_batch(["warm up"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, _, ids, lengths = pipeline._tokenize_batch([text])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(len(text), int(lengths[0]), len(ids), grown)
"""


def test_a_document_of_millions_of_characters(reviews):
    """3 M characters in one document: the peak memory grows by a small constant times the text (measured:
    about 55 bytes a character: the pieces, the ids and a few copies of the text made by the rules)."""
    result = subprocess.run([sys.executable, "-c", BIG_DOCUMENT_SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    n_characters, n_tokens, n_ids, grown = map(int, result.stdout.split())
    assert n_characters == 3_000_000 and n_tokens > 600_000 and n_ids == n_tokens
    assert grown < 100 * n_characters
