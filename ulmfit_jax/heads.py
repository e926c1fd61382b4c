"""Heads on top of the encoder: the tied LM decoder and fastai's pooling classifier.

LM decoder params: `{"bias": f32[V]}`, plus `{"weight": f32[V, E]}` when not tied to the embedding.
Classifier head params: one block per linear layer, fastai's LinBnDrop without bias,

    [{"bn_scale": f32[n_in], "bn_bias": f32[n_in], "weight": f32[n_out, n_in]}, ...]

and its batch-norm statistics, kept apart from the trainable parameters:

    [{"mean": f32[n_in], "var": f32[n_in]}, ...]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ulmfit_jax import dropout
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig


def init_lm_decoder(key: jax.Array, config: LanguageModelConfig) -> dict:
    """fastai's LinearDecoder: bias zeros, weight U(-0.1, 0.1) when untied."""
    encoder = config.encoder
    params = {"bias": jnp.zeros((encoder.vocab_size,))} if config.out_bias else {}
    if not config.tie_weights:
        params["weight"] = jax.random.uniform(key, (encoder.vocab_size, encoder.emb_size), minval=-0.1, maxval=0.1)
    return params


def decoder_weight(params: dict, config: LanguageModelConfig) -> jax.Array:
    """f32[V, E]: the embedding when tied."""
    return params["encoder"]["embed"] if config.tie_weights else params["decoder"]["weight"]


def lm_logits(params: dict, hidden: jax.Array, config: LanguageModelConfig, compute_dtype=None) -> jax.Array:
    """hidden: f32[..., E] (after output dropout) -> logits f32[..., V]."""
    weight = decoder_weight(params, config)
    if compute_dtype is not None:
        hidden, weight = hidden.astype(compute_dtype), weight.astype(compute_dtype)
    logits = jnp.einsum("...e,ve->...v", hidden, weight, preferred_element_type=jnp.float32)
    if config.out_bias:
        logits = logits + params["decoder"]["bias"]
    return logits


def masked_concat_pool(outputs: jax.Array, is_pad: jax.Array, bptt: int) -> jax.Array:
    """fastai's `masked_concat_pool`: `[last, max, mean]` over the non-padding positions.

    outputs: f32[B, S, E]; is_pad: bool[B, S]. Returns f32[B, 3E]. Max ignores padding (as -inf),
    mean divides by the number of real tokens. `last` is fastai's `outputs[b, -n - 1]` with `n` the
    padding count in the last `bptt` positions: the last real token in pad_input_chunk layout,
    except where the last window is shorter than `bptt` and the count also takes in front padding
    (a short document then pools an earlier position); kept as fastai computes it, for equal
    results with its weights.
    """
    real = ~is_pad
    lengths = real.sum(axis=1)
    mean = jnp.where(real[..., None], outputs, 0.0).sum(axis=1) / lengths[:, None]
    maximum = jnp.where(real[..., None], outputs, -jnp.inf).max(axis=1)
    last_index = outputs.shape[1] - 1 - is_pad[:, -bptt:].sum(axis=1)
    last = jnp.take_along_axis(outputs, last_index[:, None, None], axis=1)[:, 0]
    return jnp.concatenate([last, maximum, mean], axis=-1)


def init_classifier_head(key: jax.Array, config: ClassifierConfig) -> tuple[list, list]:
    """fastai's LinBnDrop blocks: BN weight 1, bias 1e-3 (fastai's `BatchNorm`), Linear PyTorch init."""
    params, stats = [], []
    sizes = config.head_sizes
    for block_key, n_in, n_out in zip(jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:]):
        bound = 1.0 / n_in ** 0.5
        params.append({"bn_scale": jnp.ones((n_in,)), "bn_bias": jnp.full((n_in,), 1e-3),
                       "weight": jax.random.uniform(block_key, (n_out, n_in), minval=-bound, maxval=bound)})
        stats.append({"mean": jnp.zeros((n_in,)), "var": jnp.ones((n_in,))})
    return params, stats


def classifier_head_apply(params: list, batch_stats: list, pooled: jax.Array, *, config: ClassifierConfig,
                          train: bool = False, key: jax.Array | None = None) -> tuple[jax.Array, list]:
    """BatchNorm -> Dropout -> Linear (no bias) blocks, ReLU between. pooled: f32[B, 3E] -> f32[B, C].

    Train mode normalises with the batch's statistics (biased variance) and moves the running
    ones by `bn_momentum` (running variance from the unbiased estimate, as PyTorch); eval mode uses
    the running statistics. Returns (logits, new batch statistics).
    """
    x = pooled
    new_stats = []
    n_blocks = len(params)
    keys = [None] * n_blocks if key is None else list(jax.random.split(key, n_blocks))
    for block, (block_params, stats, p, block_key) in enumerate(zip(params, batch_stats, config.head_ps, keys)):
        if train:
            mean = x.mean(axis=0)
            var = x.var(axis=0)
            n = x.shape[0]
            momentum = config.bn_momentum
            stats = {"mean": (1 - momentum) * stats["mean"] + momentum * mean,
                     "var": (1 - momentum) * stats["var"] + momentum * var * n / max(n - 1, 1)}
        else:
            mean, var = stats["mean"], stats["var"]
        new_stats.append(stats)
        x = (x - mean) * jax.lax.rsqrt(var + config.bn_eps) * block_params["bn_scale"] + block_params["bn_bias"]
        if train and p > 0.0:
            x = x * dropout.dropout_mask(block_key, x.shape, p)
        x = x @ block_params["weight"].T
        if block < n_blocks - 1:
            x = jax.nn.relu(x)
    return x, new_stats
