"""Evaluation of a language model over a token stream, in eval mode with the state carried."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import encoder, models
from ulmfit_jax.config import LanguageModelConfig


def stream_rows(ids: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """fastai's LMDataLoader layout of one stream: `batch_size` contiguous rows.

    ids: int[N] -> (inputs int32[bs, L], targets int32[bs, L]) with L = (N - 1) // bs; row j reads
    ids[j L : (j + 1) L] and predicts the token after each.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"expected a 1-D stream of token ids, got shape {ids.shape}")
    row_length = (len(ids) - 1) // batch_size
    if row_length < 1:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for {batch_size} rows")
    inputs = ids[:batch_size * row_length].reshape(batch_size, row_length)
    targets = ids[1:batch_size * row_length + 1].reshape(batch_size, row_length)
    return inputs.astype(np.int32), targets.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _window_loss(params, tokens, targets, weights, state, config: LanguageModelConfig):
    """Summed cross-entropy over the weighted positions of one window; f32[] and the new state."""
    logits, new_state, _ = models.language_model_apply(params, tokens, state, config=config)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets)
    return jnp.sum(nll * weights), jnp.sum(correct * weights), new_state


def evaluate_language_model(params, config: LanguageModelConfig, ids: np.ndarray, *, batch_size: int = 1,
                            bptt: int = 70) -> dict:
    """Mean next-token cross-entropy over a stream, windows of `bptt`, state carried between them.

    The last, shorter window is padded to `bptt` and masked, so every window has one shape (one
    compile). Returns {"loss", "perplexity", "accuracy", "tokens"}.
    """
    encoder.check_token_ids(ids, config.encoder.vocab_size)
    inputs, targets = stream_rows(ids, batch_size)
    length = inputs.shape[1]
    n_windows = -(-length // bptt)
    padding = n_windows * bptt - length
    pad = lambda a: np.pad(a, ((0, 0), (0, padding)), constant_values=config.encoder.pad_token)
    inputs, targets = pad(inputs), pad(targets)
    weights = pad(np.ones((batch_size, length), np.float32))
    weights[:, length:] = 0.0
    state = encoder.initial_state(config.encoder, batch_size)
    total_loss = total_correct = 0.0
    for window in range(n_windows):
        columns = slice(window * bptt, (window + 1) * bptt)
        loss, correct, state = _window_loss(params, inputs[:, columns], targets[:, columns],
                                            weights[:, columns], state, config)
        total_loss += float(loss)
        total_correct += float(correct)
    n_tokens = batch_size * length
    mean_loss = total_loss / n_tokens
    return {"loss": mean_loss, "perplexity": math.exp(mean_loss), "accuracy": total_correct / n_tokens,
            "tokens": n_tokens}
