"""Losses: cross-entropy (optionally label-smoothed) and fastai's AR / TAR regularisers."""

from __future__ import annotations

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


def activation_regularization(dropped: jax.Array, alpha: float) -> jax.Array:
    """AR: `alpha * mean(dropped ** 2)` on the last layer's output after dropout. f32[B, T, E] -> f32[]."""
    return alpha * jnp.mean(jnp.square(dropped.astype(jnp.float32)))


def temporal_activation_regularization(raw: jax.Array, beta: float) -> jax.Array:
    """TAR: `beta * mean((h_{t+1} - h_t) ** 2)` on the last layer's raw output. f32[B, T, E] -> f32[]."""
    raw = raw.astype(jnp.float32)
    return beta * jnp.mean(jnp.square(raw[:, 1:] - raw[:, :-1]))
