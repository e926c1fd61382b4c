"""Pretrained word vectors (GloVe / word2vec text format) as the embedding: the pre-ULMFiT transfer
baseline (`--embeddings FILE`)."""

from __future__ import annotations

import numpy as np


def load_word_vectors(path, vocab: list[str], embed) -> np.ndarray:
    """Rows of `embed` (f32[V, E]) for tokens found in the file replaced by their vectors.

    The file has one `token v_1 ... v_E` a line; a first line `count dim` (word2vec's header) is
    skipped. Vectors of another width are an error; tokens the file lacks keep their row.
    """
    embed = np.array(embed, dtype=np.float32)
    width = embed.shape[1]
    index = {token: i for i, token in enumerate(vocab)}
    found = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip().split(" ")
            if line_number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) != width + 1:
                raise ValueError(f"{path}:{line_number}: {len(parts) - 1} values, the embedding has {width}")
            row = index.get(parts[0])
            if row is not None:
                embed[row] = np.asarray(parts[1:], dtype=np.float32)
                found += 1
    if found == 0:
        raise ValueError(f"{path}: none of its words is in the vocabulary")
    return embed
