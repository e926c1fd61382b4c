"""The two ULMFiT models, composed from the encoder and the heads.

Language model (fastai's `get_language_model`): `{"encoder": ..., "decoder": ...}`.
Classifier (fastai's `get_text_classifier`): `{"encoder": ..., "head": [...]}` with batch-norm
statistics in a second tree.
"""

from __future__ import annotations

import functools

import jax

from ulmfit_jax import dropout, encoder, heads
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig


# Initialisers are jitted: one compile for the whole tree instead of one per leaf shape and op.
@functools.partial(jax.jit, static_argnames="config")
def init_language_model(key: jax.Array, config: LanguageModelConfig) -> dict:
    encoder_key, decoder_key = jax.random.split(key)
    return {"encoder": encoder.init_encoder(encoder_key, config.encoder),
            "decoder": heads.init_lm_decoder(decoder_key, config)}


def language_model_hidden(params: dict, tokens: jax.Array, state: list, *, config: LanguageModelConfig,
                          train: bool = False, key: jax.Array | None = None, compute_dtype=None,
                          backward: jax.Array | None = None):
    """Everything up to the decoder. tokens: int32[B, T].

    Returns (dropped, new state, (raw, dropped)), as `language_model_apply` returns (logits, new
    state, (raw, dropped)): dropped f32[B, T, E] is the decoder's input after output dropout, raw
    f32[B, T, E] the last layer's output before it (for TAR). `backward`: `encoder.encoder_apply`'s.
    """
    if train and key is None:
        raise ValueError("train=True needs a PRNG key for the dropout masks")
    encoder_key, output_key = jax.random.split(key) if train else (None, None)
    raw, new_state = encoder.encoder_apply(params["encoder"], tokens, state, config=config.encoder,
                                           train=train, key=encoder_key, compute_dtype=compute_dtype,
                                           backward=backward)
    dropped = dropout.locked_dropout(output_key, raw, config.output_p, time_axis=1)
    return dropped, new_state, (raw, dropped)


def language_model_apply(params: dict, tokens: jax.Array, state: list, *, config: LanguageModelConfig,
                         train: bool = False, key: jax.Array | None = None, compute_dtype=None):
    """tokens: int32[B, T] -> (logits f32[B, T, V], new state, (raw, dropped) each f32[B, T, E]).

    fastai's LM returns the same triple (logits, raw output, dropped output) for AR / TAR.
    """
    dropped, new_state, hidden = language_model_hidden(params, tokens, state, config=config, train=train,
                                                       key=key, compute_dtype=compute_dtype)
    return heads.lm_logits(params, dropped, config, compute_dtype), new_state, hidden


@functools.partial(jax.jit, static_argnames="config")
def init_classifier(key: jax.Array, config: ClassifierConfig, encoder_params: dict | None = None) -> tuple[dict, list]:
    """Returns (params, batch_stats). `encoder_params`: a fine-tuned encoder to start from instead of
    a random one (the head is the same either way; the program then compiles no encoder init)."""
    encoder_key, head_key = jax.random.split(key)
    head_params, batch_stats = heads.init_classifier_head(head_key, config)
    if encoder_params is None:
        encoder_params = encoder.init_encoder(encoder_key, config.encoder)
    return {"encoder": encoder_params, "head": head_params}, batch_stats


def classifier_apply(params: dict, batch_stats: list, tokens: jax.Array, *, config: ClassifierConfig,
                     train: bool = False, key: jax.Array | None = None, compute_dtype=None,
                     backward: jax.Array | None = None):
    """tokens: int32[B, S] in pad_input_chunk layout -> (logits f32[B, C], new batch_stats, outputs).

    `outputs` (f32[B, S_kept, E], the encoder's kept outputs) is what fastai's RNNRegularizer sees.
    `backward`: `encoder.encoder_apply`'s.
    """
    if train and key is None:
        raise ValueError("train=True needs a PRNG key for the dropout masks")
    encoder_key, head_key = jax.random.split(key) if train else (None, None)
    outputs, is_pad = encoder.sentence_encoder(params["encoder"], tokens, config=config.encoder,
                                               bptt=config.bptt, max_len=config.max_len, train=train,
                                               key=encoder_key, compute_dtype=compute_dtype, backward=backward)
    pooled = heads.masked_concat_pool(outputs, is_pad, config.bptt)
    logits, new_stats = heads.classifier_head_apply(params["head"], batch_stats, pooled, config=config,
                                                    train=train, key=head_key)
    return logits, new_stats, outputs
