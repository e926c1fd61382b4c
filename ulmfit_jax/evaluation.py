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
def _evaluate_windows(params, inputs, targets, length, state, config: LanguageModelConfig):
    """The whole stream in one program: a `lax.scan` over its windows, the state carried.

    inputs, targets: int32[n_windows, B, bptt]; length: int32[], the real columns per row (the
    columns at or past it, in the last window, are padding and weigh 0). Returns (summed
    cross-entropy f32[], number of correct argmax predictions int32[]) over the real positions.
    The window losses are added with Kahan's compensation: the error of the f32 total then does
    not grow with the number of windows, as a plain f32 running sum's does.
    """
    bptt = inputs.shape[-1]

    def window(carry, xs):
        state, total, compensation, correct = carry
        index, tokens, window_targets = xs
        logits, state, _ = models.language_model_apply(params, tokens, state, config=config)
        weights = (index * bptt + jnp.arange(bptt) < length)[None, :]            # [1, bptt]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, window_targets[..., None], axis=-1)[..., 0]
        loss = jnp.sum(jnp.where(weights, nll, 0.0))
        hits = jnp.sum((jnp.argmax(logits, axis=-1) == window_targets) & weights, dtype=jnp.int32)
        y = loss - compensation                                                  # Kahan summation
        new_total = total + y
        compensation = (new_total - total) - y
        return (state, new_total, compensation, correct + hits), None

    zero = jnp.zeros((), jnp.float32)
    carry = (state, zero, zero, jnp.zeros((), jnp.int32))
    xs = (jnp.arange(inputs.shape[0], dtype=jnp.int32), inputs, targets)
    (_, total, _, correct), _ = jax.lax.scan(window, carry, xs)
    return total, correct


def evaluate_language_model(params, config: LanguageModelConfig, ids: np.ndarray, *, batch_size: int = 1,
                            bptt: int = 70) -> dict:
    """Mean next-token cross-entropy over a stream, windows of `bptt`, state carried between them.

    The stream is laid out as `stream_rows` int32[B, L] and cut into n_windows = ceil(L / bptt)
    windows int32[n_windows, B, bptt]; the last, shorter window is padded to `bptt` and masked.
    All windows run in one compiled `lax.scan` with the state in its carry and the sums kept on
    the device, so the stream costs one dispatch and one read of the results, not one per window.
    The scan's length is part of the program's shape: one compile per (n_windows, B, bptt).
    Returns {"loss", "perplexity", "accuracy", "tokens"}.
    """
    encoder.check_token_ids(ids, config.encoder.vocab_size)
    inputs, targets = stream_rows(ids, batch_size)
    length = inputs.shape[1]
    n_windows = -(-length // bptt)
    padding = n_windows * bptt - length

    def windows(a):   # int32[B, L] -> int32[n_windows, B, bptt], padded on the right
        a = np.pad(a, ((0, 0), (0, padding)), constant_values=config.encoder.pad_token)
        return a.reshape(batch_size, n_windows, bptt).transpose(1, 0, 2)

    state = encoder.initial_state(config.encoder, batch_size)
    total_loss, total_correct = _evaluate_windows(params, windows(inputs), windows(targets),
                                                  np.int32(length), state, config)
    total_loss, total_correct = jax.device_get((total_loss, total_correct))
    n_tokens = batch_size * length
    mean_loss = float(total_loss) / n_tokens
    return {"loss": mean_loss, "perplexity": math.exp(mean_loss), "accuracy": int(total_correct) / n_tokens,
            "tokens": n_tokens}
