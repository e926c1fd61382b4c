"""Pretrained word vectors (GloVe / word2vec text) as the embedding: `--embeddings FILE`."""

import numpy as np
import pytest

from ulmfit_jax.embeddings import load_word_vectors

VOCAB = ["xxunk", "xxpad", "the", "cat", "sat"]


def initial():
    return np.arange(15, dtype=np.float32).reshape(5, 3) / 10


@pytest.mark.parametrize("header", ["", "3 3\n"], ids=["glove", "word2vec"])
def test_found_tokens_get_their_vectors_and_the_others_keep_their_rows(tmp_path, header):
    path = tmp_path / "vectors.txt"
    path.write_text(header + "cat 1 2 3\ndog 9 9 9\nthe -1 0.5 0\n", encoding="utf-8")
    embed = load_word_vectors(path, VOCAB, initial())
    expected = initial()
    expected[3], expected[2] = [1, 2, 3], [-1, 0.5, 0]
    np.testing.assert_array_equal(embed, expected)
    assert embed.dtype == np.float32


def test_the_input_is_not_modified(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("cat 1 2 3\n")
    start = initial()
    load_word_vectors(path, VOCAB, start)
    np.testing.assert_array_equal(start, initial())


def test_vectors_of_another_width_are_an_error_naming_the_line(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("cat 1 2 3\nsat 1 2\n")
    with pytest.raises(ValueError, match=r"vectors.txt:2: 2 values, the embedding has 3"):
        load_word_vectors(path, VOCAB, initial())


def test_no_word_in_the_vocabulary_is_an_error(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("dog 1 2 3\n")
    with pytest.raises(ValueError, match="none of its words"):
        load_word_vectors(path, VOCAB, initial())
