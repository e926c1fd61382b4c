"""The tokenizers against fastai 2.8.12 on real IMDb reviews, and `fast` against `spacy` on hard strings."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
from hypothesis import given, settings, strategies as st

from ulmfit_jax.text import rules
from ulmfit_jax.text.datasets import data_dir
from ulmfit_jax.text.tokenizers import (FastWordTokenizer, SentencePieceWordTokenizer, SpacyWordTokenizer,
                                        TextTokenizer, TokenizerSettings, sentencepiece_vocab_size,
                                        train_sentencepiece)

pytest.importorskip("spacy", reason="the reference tokenizer needs spaCy")
IMDB = data_dir() / "imdb"


def imdb_sample(split: str, every: int, limit: int) -> list[str]:
    path = IMDB / f"{split}.jsonl.gz"
    if not path.exists():
        pytest.skip(f"IMDb data not found at {path} (set ULMFIT_DATA_DIR)")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = itertools.islice(handle, 0, None, every)
        return [json.loads(line)["text"] for line in itertools.islice(lines, limit)]


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    # 400 reviews spread over neg and pos of train and over unsup.
    return imdb_sample("train", 125, 200) + imdb_sample("unsup", 250, 200)


@pytest.fixture(scope="module")
def fastai_tokens(reviews):
    """fastai's dataset path (`tokenize_texts` -> `TokenizeWithRules`, post-rule included)."""
    fastai_core = pytest.importorskip("fastai.text.core", reason="fastai 2.8.12 is the reference")
    return [list(tokens) for tokens in fastai_core.tokenize_texts(
        reviews, n_workers=0, tok=fastai_core.SpacyTokenizer())]


def test_spacy_equals_fastai_on_imdb(reviews, fastai_tokens):
    ours = TextTokenizer(TokenizerSettings("spacy"))
    assert [ours(text) for text in reviews] == fastai_tokens


def test_spacy_without_post_rules_equals_fastai_tokenizer_transform(reviews):
    """fastai's `Tokenizer(SpacyTokenizer())(text)` (its `encodes`) skips the post-rule replace_space."""
    fastai_core = pytest.importorskip("fastai.text.core")
    theirs = fastai_core.Tokenizer(fastai_core.SpacyTokenizer())
    ours = TextTokenizer(TokenizerSettings("spacy", post_rules=()))
    for text in reviews[:100]:
        assert ours(text) == list(theirs(text))


def test_fast_agrees_with_fastai_on_imdb(reviews, fastai_tokens):
    fast = TextTokenizer(TokenizerSettings("fast"))
    agreeing = sum(fast(text) == expected for text, expected in zip(reviews, fastai_tokens))
    rate = agreeing / len(reviews)
    print(f"fast tokenizer: {agreeing}/{len(reviews)} IMDb reviews token-for-token equal to fastai ({rate:.2%})")
    assert rate >= 0.99
    # Measured on 400 reviews here: all equal.
    assert agreeing == len(reviews)


HARD_STRINGS = [
    "xxbos a \n b  c\n\n d  ",
    " \n leading whitespace",
    "shape:) ). i rarely",  # a matcher span across chunks blocks ':)' in spaCy (IMDb test review)
    "written:) and :) (:",
    "it's don't can't won't y'all gonna i'm we're they'll he'd",
    "e.g. i.e. a.m. p.m. u.s. vs. mr. dr. etc. 10a.m. 9p.m.",
    "see http://www.imdb.com/title/tt0000001/ or www.example.org. e-mail me@x.com!",
    "5$ $5 £10 10km 3.5 1,000,000 50% #1 3-d 1990's '90s",
    "\"quoted\" 'single' (paren) [brack] {brace} ... …  --  — –",
    "o_o ^_^ <3 :-) ;-) :( :'( xD =) 8) ಠ_ಠ (╯°□°）╯︵ ┻━┻",
    "xxbos xxmaj xxup xxrep 3 ! xxwrep 4 good xxunk xxfld 1 xxeos",
    "and/or he/she a\\b c#d",
    "naïve café résumé über straße ΑΒΓ αβγ кириллица 日本語",
    "''sea 'vanilla' `gummo' whos. id.",
    "\t tab \xa0 nbsp \u2009 thin \r\n crlf",
]


@pytest.fixture(scope="module")
def word_tokenizers():
    return FastWordTokenizer(), SpacyWordTokenizer()


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_fast_equals_spacy_on_hard_strings(word_tokenizers, text):
    fast, spacy_tokenizer = word_tokenizers
    assert fast(text) == spacy_tokenizer(text)
    processed = rules.apply_rules(text)
    assert fast(processed) == spacy_tokenizer(processed)


_ALPHABET = st.sampled_from(
    list("aAbeglmsxz.,:;!?'\"()[]-_/#$%&*@=+<>^`~0123 ") + ["\n", " \n", "  ", ":)", "(:", "'s", "n't", "e.g.",
                                                         "http://a.com", "xxbos", "xxmaj", "…", "é", "—"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=25).map("".join))
def test_fast_equals_spacy_on_random_strings(word_tokenizers, text):
    fast, spacy_tokenizer = word_tokenizers
    assert fast(text) == spacy_tokenizer(text)


def test_fast_cache_gives_same_tokens_twice(word_tokenizers):
    fast, _ = word_tokenizers
    text = "xxbos xxmaj it's a test:) ). again, again!"
    assert fast(text) == fast(text)


def test_settings_reject_unknown_names():
    with pytest.raises(ValueError, match="tokenizer kind"):
        TokenizerSettings("bpe")
    with pytest.raises(ValueError, match="unknown rule"):
        TokenizerSettings(pre_rules=("fix_html", "nope"))


def test_add_eos():
    tokens = TextTokenizer(TokenizerSettings(add_eos=True))("Hi there.")
    assert tokens[0] == "xxbos" and tokens[-1] == "xxeos"


def test_sentencepiece_keeps_special_tokens_whole(tmp_path, reviews):
    sentencepiece = pytest.importorskip("sentencepiece")
    processed = [rules.apply_rules(text) for text in reviews]
    vocab_size = sentencepiece_vocab_size(processed)
    assert vocab_size % 8 == 0 and 29 <= vocab_size <= 30000
    model = train_sentencepiece(processed, str(tmp_path / "spm"))
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    assert processor.get_piece_size() >= vocab_size - 8  # hard_vocab_limit=false may give a little less
    assert processor.id_to_piece(len(rules.SPECIAL_TOKENS)) == "<unk>"  # unk after the special pieces
    tokenizer = TextTokenizer(TokenizerSettings("sentencepiece", sentencepiece_model=model))
    pieces = tokenizer("Hello WORLD, this is sooooo good good good good.")
    for special in ("▁xxbos", "▁xxmaj", "▁xxup", "▁xxrep", "▁xxwrep"):
        assert special in pieces
    assert "".join(pieces).replace("▁", " ").strip() == rules.apply_rules(
        "Hello WORLD, this is sooooo good good good good.")
    assert isinstance(SentencePieceWordTokenizer(model)("a b"), list)


def test_sentencepiece_equals_fastai(tmp_path, reviews):
    """Same training text and settings as fastai's SentencePieceTokenizer -> the same pieces."""
    pytest.importorskip("sentencepiece")
    fastai_core = pytest.importorskip("fastai.text.core")
    texts = reviews[:150]
    theirs = fastai_core.SentencePieceTokenizer(cache_dir=tmp_path / "fastai")
    fastai_pieces = [list(t) for t in fastai_core.tokenize_texts(texts, n_workers=0, tok=theirs)]
    model = train_sentencepiece([rules.apply_rules(t) for t in texts], str(tmp_path / "ours"))
    ours = TextTokenizer(TokenizerSettings("sentencepiece", sentencepiece_model=model))
    assert [ours(t) for t in texts] == fastai_pieces


@pytest.mark.parametrize("text", HARD_STRINGS + ["", " ", "  two leading", "trailing  "])
def test_token_ids_number_the_tokens(word_tokenizers, text):
    fast, _ = word_tokenizers
    vocabulary = {"xxbos": 0}
    for repeat in range(2):  # the second time from the id cache
        ids = fast.token_ids(text, vocabulary)
        inverse = {i: token for token, i in vocabulary.items()}
        assert len(inverse) == len(vocabulary) == len(set(vocabulary.values()))
        assert [inverse[i] for i in ids] == fast(text)
