"""Losses: cross-entropy (optionally label-smoothed), the fused chunked decoder + cross-entropy, and
fastai's AR / TAR regularisers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy. logits: f32[..., C]; targets: int[...].

    With `label_smoothing = eps`, fastai's LabelSmoothingCrossEntropy:
    `(1 - eps) * nll + eps * mean_c(-log_softmax)`.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        return jnp.mean((1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1))
    return jnp.mean(nll)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of f32[B, T, E] over the positions where mask: bool[B, T] (None: all of them)."""
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(jnp.where(mask[..., None], values, 0.0)) / (jnp.sum(mask) * values.shape[-1])


def activation_regularization(dropped: jax.Array, alpha: float, mask: jax.Array | None = None) -> jax.Array:
    """AR: `alpha * mean(dropped ** 2)` on the last layer's output after dropout. f32[B, T, E] -> f32[].

    mask: bool[B, T], the positions averaged over (None: all; the classifier passes fastai's own
    padding layout, `text.batches.fastai_layout_mask`)."""
    return alpha * _masked_mean(jnp.square(dropped.astype(jnp.float32)), mask)


def temporal_activation_regularization(raw: jax.Array, beta: float, mask: jax.Array | None = None) -> jax.Array:
    """TAR: `beta * mean((h_{t+1} - h_t) ** 2)` on the last layer's raw output. f32[B, T, E] -> f32[].

    mask: bool[B, T] as for AR; a pair counts where both of its positions are in it."""
    raw = raw.astype(jnp.float32)
    pairs = None if mask is None else mask[:, 1:] & mask[:, :-1]
    return beta * _masked_mean(jnp.square(raw[:, 1:] - raw[:, :-1]), pairs)


def fused_linear_cross_entropy(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None,
                               targets: jax.Array, *, chunk_size: int = 256) -> jax.Array:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `targets`, never holding all logits.

    hidden: f32[..., E]; weight: f32[V, E] (the tied decoder: the embedding); bias: f32[V] or None;
    targets: int[...] (the leading shape of `hidden`). Equal to
    `cross_entropy(lm_logits(params, hidden, config), targets)`.

    The rows are processed `chunk_size` at a time in a `lax.scan`: each chunk's logits
    (chunk_size x V floats) live only inside the loop body. Under differentiation the forward pass
    also computes the gradients (softmax - one-hot, then `d_hidden = d_logits @ W` and
    `d_W += d_logits^T @ hidden`, `d_bias += sum d_logits`, chunk by chunk), so the backward pass
    only scales them by the incoming cotangent: three matmuls per chunk, as unfused autodiff
    does, but no [N, V] logits or softmax array in memory (for the CPU recipe, vocab 30k and
    batch 64 x 70, that array is 538 MB).

    The chunk's [chunk, V] arrays are what the time goes into besides the matmuls, so each is
    passed over as few times as possible: the bias enters the logits' matmul as one more column
    of the weight (against a column of ones), `exp` is computed once, and the one-hot target is
    subtracted by a scatter of `chunk` elements rather than a comparison over all V columns
    (`benchmarks/bench_lstm_layer.py` times it against torch; docs/benchmarks.md).
    """
    emb = hidden.shape[-1]
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {targets.shape} must have hidden's leading shape {hidden.shape[:-1]}")
    if weight.ndim != 2 or weight.shape[1] != emb:
        raise ValueError(f"weight must be [V, {emb}], got {weight.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if bias is None:
        bias = jnp.zeros((weight.shape[0],), weight.dtype)
    return _fused_lce(hidden.reshape(-1, emb), weight, bias, targets.reshape(-1).astype(jnp.int32),
                      chunk_size)


def _chunked(hidden, targets, chunk_size):
    """[N, E], [N] -> [C, chunk, E], [C, chunk], valid f32[C, chunk] (rows padded to whole chunks)."""
    n, emb = hidden.shape
    chunk_size = min(chunk_size, n)
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    valid = jnp.ones((n,), jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        valid = jnp.pad(valid, (0, pad))
    return (hidden.reshape(n_chunks, chunk_size, emb), targets.reshape(n_chunks, chunk_size),
            valid.reshape(n_chunks, chunk_size))


def _with_bias_column(weight, bias):
    """f32[V, E], f32[V] -> f32[V, E + 1]: the bias as the weight's last column."""
    return jnp.concatenate([weight, bias[:, None].astype(weight.dtype)], axis=1)


def _chunk_softmax(h, t, weight_and_bias):
    """One chunk, h: f32[c, E], t: int32[c] -> (exp(logits - max) f32[c, V], its row sums f32[c],
    per-row nll f32[c])."""
    ones = jnp.ones((h.shape[0], 1), h.dtype)
    logits = jnp.einsum("ne,ve->nv", jnp.concatenate([h, ones], axis=1), weight_and_bias,
                        preferred_element_type=jnp.float32)
    row_max = jnp.max(logits, axis=1)
    exp = jnp.exp(logits - row_max[:, None])
    sums = jnp.sum(exp, axis=1)
    # a target outside [0, V) gives NaN, not a clamped logit
    picked = jnp.take_along_axis(logits, t[:, None], axis=1, mode="fill", fill_value=jnp.nan)[:, 0]
    nll = row_max + jnp.log(sums) - picked
    return exp, sums, nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_lce(hidden, weight, bias, targets, chunk_size):
    n = hidden.shape[0]
    hs, ts, valid = _chunked(hidden, targets, chunk_size)
    weight_and_bias = _with_bias_column(weight, bias)

    def body(total, xs):
        h, t, m = xs
        _, _, nll = _chunk_softmax(h, t, weight_and_bias)
        return total + jnp.sum(nll * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, valid))
    return total / n


def _fused_lce_fwd(hidden, weight, bias, targets, chunk_size):
    n, emb = hidden.shape
    hs, ts, valid = _chunked(hidden, targets, chunk_size)
    vocab = weight.shape[0]
    weight_and_bias = _with_bias_column(weight, bias)

    def body(carry, xs):
        total, d_weight, d_bias = carry
        h, t, m = xs
        exp, sums, nll = _chunk_softmax(h, t, weight_and_bias)
        scale = m / n
        d_logits = (exp * (scale / sums)[:, None]).at[jnp.arange(h.shape[0]), t].add(-scale)
        d_h = jnp.einsum("nv,ve->ne", d_logits, weight, preferred_element_type=jnp.float32)
        d_weight = d_weight + jnp.einsum("nv,ne->ve", d_logits, h, preferred_element_type=jnp.float32)
        d_bias = d_bias + d_logits.sum(axis=0)
        return (total + jnp.sum(nll * m), d_weight, d_bias), d_h

    init = (jnp.zeros((), jnp.float32), jnp.zeros(weight.shape, jnp.float32), jnp.zeros((vocab,), jnp.float32))
    (total, d_weight, d_bias), d_hs = jax.lax.scan(body, init, (hs, ts, valid))
    d_hidden = d_hs.reshape(-1, emb)[:n]
    return total / n, (d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), d_bias.astype(bias.dtype))


def _fused_lce_bwd(chunk_size, residuals, g):
    d_hidden, d_weight, d_bias = residuals
    return g * d_hidden, g * d_weight, g * d_bias, None


_fused_lce.defvjp(_fused_lce_fwd, _fused_lce_bwd)
