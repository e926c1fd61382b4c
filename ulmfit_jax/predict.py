"""Classifier inference: batches of documents -> class probabilities, in the documents' order.

Inference imports no training code. Batches are laid out as in training
(`classifier_batch_settings`: windows of the config's bptt, lengths bucketed to few shapes), so the
compiled forward pass is shared across calls of the same shapes.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from ulmfit_jax import models
from ulmfit_jax.compile_ahead import quick_compile_options
from ulmfit_jax.config import ClassifierConfig


def classifier_predictor(config: ClassifierConfig, compute_dtype=None):
    """-> predict(params, batch_stats, tokens int32[B, S]) -> probabilities f32[B, C], eval mode. One
    jitted function per (config, compute_dtype), so that every caller shares its compiled programs;
    on CPU compiled with XLA's quick settings (`compile_ahead.quick_compile_options`), with which a
    forward pass runs as fast and compiles in half the time. Building one asks JAX for its default
    backend (which makes it: call `cli.keep_freed_memory` or `jax.distributed.initialize` first)."""
    return _predictor(config, compute_dtype)


@functools.lru_cache(maxsize=8)
def _predictor(config: ClassifierConfig, compute_dtype):
    @functools.partial(jax.jit, compiler_options=quick_compile_options())
    def predict(params, batch_stats, tokens):
        logits, _, _ = models.classifier_apply(params, batch_stats, tokens, config=config,
                                               compute_dtype=compute_dtype)
        return jax.nn.softmax(logits, axis=-1)

    return predict

def classifier_batch_settings(config: ClassifierConfig, batch_size: int, backwards: bool = False,
                              lengths: tuple[int, ...] | None = None):
    """Batches for `config`: windows of its bptt, lengths bucketed to multiples of bptt (few shapes),
    or of 8 for batches shorter than one window; `lengths`: the padded lengths batches may take
    (`text.batches.bucket_lengths`).

    Multiples of bptt keep fastai's last-state index (`masked_concat_pool`) on the last real token;
    within one window there is no front padding, so any length does. The regulariser's mask
    (`fastai_mask`) covers only the windows BPT3C keeps (`config.max_len`)."""
    from ulmfit_jax.text.batches import ClassifierBatchSettings
    return ClassifierBatchSettings(batch_size=batch_size, seq_len=config.bptt, max_len=None,
                                   bucket_multiple=config.bptt, short_bucket_multiple=min(8, config.bptt),
                                   backwards=backwards, lengths=lengths, bpt3c_max_len=config.max_len)


def predict_classifier(predict, params, batch_stats, documents, settings) -> np.ndarray:
    """Class probabilities f32[N, C] in the documents' order; every batch is dispatched before any
    result is read (asynchronous dispatch then overlaps the host's batching with the computations)."""
    from ulmfit_jax.text.batches import classifier_batches
    probabilities = None
    outputs = []
    for batch in classifier_batches(documents, None, settings, train=False):
        outputs.append((batch, predict(params, batch_stats, batch.tokens)))
    for batch, out in outputs:
        out = np.asarray(jax.device_get(out))
        if probabilities is None:
            probabilities = np.zeros((len(documents), out.shape[1]), np.float32)
        probabilities[batch.indices[batch.row_mask]] = out[batch.row_mask]
    return probabilities
