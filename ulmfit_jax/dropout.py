"""Dropout masks drawn from PRNG keys: the four kinds AWD-LSTM uses.

Every mask is inverted (kept units scaled by `1 / (1 - p)`), as fastai's `dropout_mask` does, and
is drawn once per call, before any `lax.scan`, so it is fixed across time steps by construction.
Eval mode never calls these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dropout_mask(key: jax.Array, shape: tuple[int, ...], p: float, dtype=jnp.float32) -> jax.Array:
    """Bernoulli(1 - p) mask scaled by 1 / (1 - p); all ones when p == 0.

    The bits come from XLA's own threefry generator (`lax.rng_bit_generator`), seeded from `key`,
    and a unit is kept where they fall below (1 - p) * 2^32: one XLA operation instead of the many
    small ones `jax.random.bernoulli`'s threefry is built of, several times cheaper on CPU, which
    matters for weight drop's mask over every recurrent weight in every step. Deterministic in
    `key`, as any other draw."""
    if p == 0.0:
        return jnp.ones(shape, dtype)
    seed = jax.random.bits(key, (4,), jnp.uint32)
    _, bits = jax.lax.rng_bit_generator(seed, shape, jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
    keep = bits < np.uint32(min(round((1.0 - p) * 2.0 ** 32), 2 ** 32 - 1))
    return keep.astype(dtype) / (1.0 - p)


def locked_dropout(key: jax.Array | None, x: jax.Array, p: float, *, time_axis: int) -> jax.Array:
    """Variational dropout (fastai's RNNDropout): one mask per sequence, shared by all time steps.

    x: float[..., T, ..., D] with time at `time_axis`; the mask has size 1 there.
    """
    if key is None or p == 0.0:
        return x
    shape = list(x.shape)
    shape[time_axis] = 1
    return x * dropout_mask(key, tuple(shape), p, x.dtype)


def embedding_row_mask(key: jax.Array, vocab_size: int, p: float) -> jax.Array:
    """Whole-word dropout (fastai's EmbeddingDropout): float[V, 1], a row is dropped for every use."""
    return dropout_mask(key, (vocab_size, 1), p)


def weight_drop(key: jax.Array | None, weight: jax.Array, p: float) -> jax.Array:
    """DropConnect (fastai's WeightDropout): an elementwise mask on a weight matrix, once per call.

    The raw weight is left unchanged; gradients reach it through the mask.
    """
    if key is None or p == 0.0:
        return weight
    return weight * dropout_mask(key, weight.shape, p, weight.dtype)
