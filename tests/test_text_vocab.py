"""Vocabulary equal to fastai's make_vocab / Numericalize; vocab.json IO; the safe vocab-pickle reader."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ulmfit_jax.text.datasets import data_dir, read_jsonl
from ulmfit_jax.text.rules import SPECIAL_TOKENS
from ulmfit_jax.text.tokenizers import TextTokenizer
from ulmfit_jax.text.vocab import (count_tokens, load_vocab, load_vocab_json, load_vocab_pickle, make_vocab,
                                   numericalize, save_vocab_json, token_to_id)

fastai_data = pytest.importorskip("fastai.text.data", reason="fastai 2.8.12 is the reference")


@pytest.fixture(scope="module")
def imdb_counts():
    path = data_dir() / "imdb" / "test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"IMDb data not found at {path} (set ULMFIT_DATA_DIR)")
    tokenizer = TextTokenizer()
    split, _ = read_jsonl(path, every=50, limit=500)
    documents = [tokenizer(text) for text in split.texts]
    return documents, count_tokens(documents)


@pytest.mark.parametrize("min_freq,max_vocab", [(3, 60000), (2, 60000), (1, 60000), (3, 1000), (5, 3001),
                                                (3, 9), (1, 104)])
def test_make_vocab_equals_fastai_on_imdb(imdb_counts, min_freq, max_vocab):
    documents, counts = imdb_counts
    fastai_counter = collections.Counter(token for tokens in documents for token in tokens)
    expected = fastai_data.make_vocab(fastai_counter, min_freq=min_freq, max_vocab=max_vocab)
    vocab = make_vocab(counts, min_freq=min_freq, max_vocab=max_vocab)
    assert vocab == expected
    assert vocab[:9] == list(SPECIAL_TOKENS) and len(vocab) % 8 == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(list("abcdefgh") + ["xxbos", "xxmaj", "xxunk"]), max_size=30),
                max_size=20),
       st.integers(1, 4), st.integers(9, 30))
def test_make_vocab_equals_fastai_ties_and_padding(documents, min_freq, max_vocab):
    """Small vocabularies: ties at the cut, lengths already multiples of 8 (fastai then adds 8 'xxfake')."""
    counter = collections.Counter(token for tokens in documents for token in tokens)
    assert make_vocab(count_tokens(documents), min_freq, max_vocab) == fastai_data.make_vocab(
        counter, min_freq=min_freq, max_vocab=max_vocab)


def test_numericalize_equals_fastai(imdb_counts):
    documents, counts = imdb_counts
    numericalizer = fastai_data.Numericalize(min_freq=3, max_vocab=60000)
    numericalizer.setups(documents)
    vocab = make_vocab(counts)
    assert vocab == numericalizer.vocab
    index = token_to_id(vocab)
    for tokens in documents[:50] + [["never-seen-token", "xxfake", "the"]]:
        ids = numericalize(tokens, index)
        assert ids.dtype == np.int32 and ids.shape == (len(tokens),)
        np.testing.assert_array_equal(ids, numericalizer(tokens).numpy())
    assert numericalize(["never-seen-token"], index)[0] == 0


def test_vocab_json_round_trip(tmp_path):
    vocab = list(SPECIAL_TOKENS) + ["é", "日本", "\n▁", '"']
    save_vocab_json(vocab, tmp_path / "vocab.json")
    assert load_vocab_json(tmp_path / "vocab.json") == vocab
    assert load_vocab(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of token strings"):
        load_vocab_json(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('["a", 3]')
    with pytest.raises(ValueError, match="not strings"):
        load_vocab_json(tmp_path / "bad2.json")


def test_vocab_pickle_reads_fastai_vocab(tmp_path):
    vocab = fastai_data.make_vocab(collections.Counter("a a a b b b c".split()))
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"vocab{protocol}.pkl"
        with open(path, "wb") as handle:
            pickle.dump(vocab, handle, protocol=protocol)
        assert load_vocab_pickle(path) == vocab
    fastai_core = pytest.importorskip("fastai.torch_core")
    fastai_core.save_pickle(tmp_path / "saved.pkl", vocab)  # fastai's own writer
    assert load_vocab(tmp_path / "saved.pkl") == vocab


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload,message", [
    ([_Exploit()], "refusing to load posix.system"),
    (collections.OrderedDict(a=1), "refusing to load collections.OrderedDict"),
    (np.array(["a"]), "refusing to load numpy"),
    ({"a": 1}, "non-empty list of token strings"),
    (["a", 1], "not strings"),
])
def test_vocab_pickle_refuses_everything_else(tmp_path, payload, message):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    with pytest.raises(ValueError, match=message):
        load_vocab_pickle(path)


def test_vocab_pickle_refuses_fastai_L(tmp_path):
    fastcore = pytest.importorskip("fastcore.foundation")
    path = tmp_path / "L.pkl"
    with open(path, "wb") as handle:
        pickle.dump(fastcore.L(["xxunk", "xxpad"]), handle)
    with pytest.raises(ValueError, match="refusing to load fastcore"):
        load_vocab_pickle(path)


def test_vocab_pickle_garbage(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="vocab pickle"):
        load_vocab_pickle(path)
