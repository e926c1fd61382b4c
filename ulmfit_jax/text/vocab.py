"""Vocabulary as fastai's `make_vocab`, numericalization, `vocab.json` IO and a safe reader of fastai's vocab pickle.

A vocabulary is a list of token strings whose index is the id. fastai's rules (2.8.12 `text/data.py`):
the `max_vocab` most common tokens with count >= `min_freq` (ties in first-seen order, as
`Counter.most_common`), the special tokens moved to the front in fastai v2's order (ids 0..8: xxunk xxpad
xxbos xxeos xxfld xxrep xxwrep xxup xxmaj), truncated to `max_vocab`, then padded with 'xxfake' to a
multiple of 8 — fastai adds `8 - len % 8` entries, so a length already a multiple of 8 gets 8 more; kept
here for identical ids and embedding shapes. Unknown tokens map to id 0 ('xxunk'); 'xxfake' never
receives an id from text.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
from typing import Iterable, Mapping, Sequence

import numpy as np

from ulmfit_jax.text.rules import SPECIAL_TOKENS, UNK_ID

FAKE_TOKEN = "xxfake"


def count_tokens(documents: Iterable[Sequence[str]]) -> collections.Counter:
    """Token counts in first-seen order (what `make_vocab` breaks ties with)."""
    counter: collections.Counter = collections.Counter()
    for tokens in documents:
        counter.update(tokens)
    return counter


def make_vocab(counts: Mapping[str, int], min_freq: int = 3, max_vocab: int = 60000,
               special_tokens: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
    """fastai's `make_vocab`: list of tokens, index = id (see the module docstring for the rules).

    `counts` must iterate in first-seen order for ties to break as fastai's do (a `Counter` filled in
    document order does).
    """
    if min_freq < 1 or max_vocab < len(special_tokens):
        raise ValueError(f"need min_freq >= 1 and max_vocab >= {len(special_tokens)}, "
                         f"got min_freq={min_freq}, max_vocab={max_vocab}")
    # sorted() is stable, so equal counts keep first-seen order, as Counter.most_common does.
    ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:max_vocab]
    vocab = [token for token, count in ranked if count >= min_freq]
    special = set(special_tokens)
    vocab = list(special_tokens) + [token for token in vocab if token not in special]
    vocab = vocab[:max_vocab]
    return vocab + [FAKE_TOKEN] * (8 - len(vocab) % 8)


def token_to_id(vocab: Sequence[str]) -> dict[str, int]:
    """token -> id; 'xxfake' is left out (fastai's `Numericalize` leaves it out of `o2i` when it builds the
    vocab), and a duplicated token keeps its last id as fastai's dict comprehension does."""
    return {token: index for index, token in enumerate(vocab) if token != FAKE_TOKEN}


def numericalize(tokens: Sequence[str], index: Mapping[str, int]) -> np.ndarray:
    """tokens -> int32 ids of shape (len(tokens),); unknown tokens -> 0 (xxunk)."""
    get = index.get
    return np.fromiter((get(token, UNK_ID) for token in tokens), dtype=np.int32, count=len(tokens))


def denumericalize(ids: Iterable[int], vocab: Sequence[str]) -> list[str]:
    return [vocab[int(i)] for i in ids]


def validate_vocab(vocab: object, source: str = "vocab") -> list[str]:
    """Check a vocabulary read from outside: a non-empty list of str. Returns it as a list."""
    if not isinstance(vocab, list) or not vocab:
        raise ValueError(f"{source}: a vocabulary must be a non-empty list of token strings, "
                         f"got {type(vocab).__name__}")
    bad = [i for i, token in enumerate(vocab) if not isinstance(token, str)]
    if bad:
        raise ValueError(f"{source}: entries {bad[:5]} are not strings")
    return vocab


def save_vocab_json(vocab: Sequence[str], path: str | os.PathLike) -> None:
    """Write `vocab.json`: a JSON list of token strings, index = id (UTF-8, non-ASCII kept as is)."""
    validate_vocab(list(vocab), str(path))
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(list(vocab), handle, ensure_ascii=False)


def load_vocab_json(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        try:
            vocab = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a JSON vocabulary ({error})") from error
    return validate_vocab(vocab, str(path))


class _ListOfStringsUnpickler(pickle.Unpickler):
    """Unpickler that builds only built-in lists, tuples, dicts and strings: it refuses every global (class
    or function), so a malicious pickle cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a vocab pickle must hold only a list of strings")


def load_vocab_pickle(path: str | os.PathLike) -> list[str]:
    """Read fastai's vocab pickle (`learn.dls.vocab`, saved with `pickle.dump` / `save_pickle`, e.g.
    `itos.pkl` / `*_vocab.pkl`) safely: only a list of str (or a tuple of str) is accepted, nothing is
    imported or called. fastai's `L` or numpy objects are refused with a clear error; re-save them as a
    plain list (`pickle.dump(list(vocab), f)`) or as vocab.json.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        vocab = _ListOfStringsUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: unsafe or unsupported vocab pickle: {error}") from error
    except Exception as error:  # truncated / not a pickle at all
        raise ValueError(f"{path}: not a readable vocab pickle ({type(error).__name__}: {error})") from error
    if isinstance(vocab, tuple):
        vocab = list(vocab)
    return validate_vocab(vocab, str(path))


def load_vocab(path: str | os.PathLike) -> list[str]:
    """vocab.json (JSON list) or a fastai vocab pickle (.pkl / .pickle), chosen by extension."""
    if str(path).endswith((".pkl", ".pickle")):
        return load_vocab_pickle(path)
    return load_vocab_json(path)
