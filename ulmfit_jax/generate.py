"""Sampling from a language model with the hidden state carried: O(n) for n generated tokens.

fastai's `LMLearner.predict` reruns the model over the whole prefix for every new token (O(n^2)
in the generated length). Here the prompt goes through the model once, in windows of `window`
tokens, and then the new tokens come from one compiled loop of a single-token step that carries
the state from token to token, the way training carries it between BPTT windows, and samples on
the device. In eval mode the two give the same next-token distributions (tests/test_generate.py
checks it).

Sampling options, as fastai's `predict` applies them to the next-token probabilities p
(`Sampling`): `no_unk` sets p[xxunk] = 0; `min_p` zeroes every p < min_p (skipped, as in fastai,
when no token reaches min_p); `temperature` T samples from p ** (1 / T); `top_k` (not in fastai)
keeps the k most probable tokens; `top_k=1` is greedy decoding. Done in log space
(log p / T), which is the same distribution without underflow at small T.

Compiles: one for a [B, window] prompt window and one of the generation loop per (B, window,
number of new tokens); the prompt tokens left over after the whole windows run in that loop too,
so the prompt's length compiles nothing new.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import encoder, models
from ulmfit_jax.config import LanguageModelConfig
from ulmfit_jax.text.rules import BOS, UNK_ID


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn (hashable: a static argument of the jitted step).

    temperature: > 0; sample from p ** (1 / temperature) (fastai's `temperature`).
    top_k: keep only the k most probable tokens (ties: lower id first); 1 = greedy; None = all.
    min_p: zero every probability below it unless none reaches it (fastai's `min_p`).
    no_unk: never produce `unk_id` (fastai's `no_unk`, on by default there too).
    """
    temperature: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    no_unk: bool = True
    unk_id: int = UNK_ID

    def __post_init__(self):
        if not (self.temperature > 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for all tokens), got {self.top_k}")
        if self.min_p is not None and not 0.0 < self.min_p <= 1.0:
            raise ValueError(f"min_p must be in (0, 1], got {self.min_p}")


def sampling_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Next-token logits f32[B, V] -> the log-weights f32[B, V] that `sample` draws from.

    log softmax, then (fastai's order) no_unk -> -inf, min_p -> -inf below it, / temperature, and
    top_k -> -inf outside the k largest. exp(result) is fastai's `res` after `pow_(1 / T)`, up to
    normalisation.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if sampling.no_unk:
        log_probs = log_probs.at[:, sampling.unk_id].set(-jnp.inf)
    if sampling.min_p is not None:
        below = jnp.exp(log_probs) < sampling.min_p
        any_kept = jnp.any(~below, axis=-1, keepdims=True)
        log_probs = jnp.where(below & any_kept, -jnp.inf, log_probs)
    log_weights = log_probs / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < log_weights.shape[-1]:
        _, kept = jax.lax.top_k(log_weights, sampling.top_k)
        keep = jnp.zeros(log_weights.shape, bool).at[jnp.arange(log_weights.shape[0])[:, None], kept].set(True)
        log_weights = jnp.where(keep, log_weights, -jnp.inf)
    return log_weights


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Draw one token per row: logits f32[B, V] -> int32[B]."""
    return jax.random.categorical(key, sampling_logits(logits, sampling), axis=-1).astype(jnp.int32)


_sample = jax.jit(sample, static_argnames="sampling")


@functools.partial(jax.jit, static_argnames=("config",))
def _feed(params, state, tokens, *, config: LanguageModelConfig):
    """A prompt window int32[B, W] through the model in eval mode -> new state."""
    return models.language_model_apply(params, tokens, state, config=config)[1]


@functools.partial(jax.jit, static_argnames=("config", "sampling", "n_tokens"))
def _continue(params, state, rest, n_rest, last, key, *, config: LanguageModelConfig, sampling: Sampling,
              n_tokens: int):
    """The prompt's leftover tokens, then `n_tokens` sampled ones, in one program.

    rest: int32[B, R] whose first `n_rest` (int32[], traced) columns are the prompt tokens after
    its whole windows and before its last token (the other columns are ignored); last: int32[B],
    the prompt's last token. The leftover tokens go through the single-token model in a
    `lax.fori_loop` with a traced trip count (so any n_rest <= R shares the program); then a
    `lax.scan` of length `n_tokens` feeds each token, samples the next with
    `fold_in(key, i)` and carries (state, token). Returns int32[B, n_tokens].
    """
    def one_token(state, tokens):   # int32[B] -> (logits f32[B, V], new state)
        logits, state, _ = models.language_model_apply(params, tokens[:, None], state, config=config)
        return logits[:, -1], state

    state = jax.lax.fori_loop(0, n_rest, lambda i, s: one_token(s, rest[:, i])[1], state)

    def new_token(carry, i):
        state, tokens = carry
        logits, state = one_token(state, tokens)
        tokens = sample(logits, jax.random.fold_in(key, i), sampling)
        return (state, tokens), tokens

    _, tokens = jax.lax.scan(new_token, (state, last), jnp.arange(n_tokens, dtype=jnp.uint32))
    return tokens.T


@functools.partial(jax.jit, static_argnames=("config",))
def _all_logits(params, state, tokens, *, config: LanguageModelConfig):
    """tokens int32[B, T] in eval mode from `state` -> logits f32[B, T, V]."""
    return models.language_model_apply(params, tokens, state, config=config)[0]


def _check_request(prompt, n_tokens: int, config: LanguageModelConfig, sampling: Sampling) -> np.ndarray:
    """The prompt as int32[B, T] after checking it and the request; ValueError naming what is wrong."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    if config.encoder.bidirectional:
        raise ValueError("a bidirectional language model sees the tokens it predicts: it cannot generate text")
    if sampling.top_k is not None and sampling.top_k > config.encoder.vocab_size:
        raise ValueError(f"top_k ({sampling.top_k}) exceeds the vocabulary ({config.encoder.vocab_size})")
    if sampling.no_unk and not 0 <= sampling.unk_id < config.encoder.vocab_size:
        raise ValueError(f"unk_id {sampling.unk_id} is outside the vocabulary of {config.encoder.vocab_size}")
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"the prompt must be int[B, T] with T >= 1, got {prompt.dtype} of shape {prompt.shape}")
    encoder.check_token_ids(prompt, config.encoder.vocab_size)
    return prompt.astype(np.int32)


def generate(params, prompt: np.ndarray, n_tokens: int, key: jax.Array, *, config: LanguageModelConfig,
             sampling: Sampling = Sampling(), window: int = 70) -> np.ndarray:
    """Continue each row of the prompt int[B, T] by `n_tokens` sampled tokens -> int32[B, n_tokens].

    The prompt runs once from a reset state: its first T - 1 tokens in whole windows of `window`
    tokens (fastai's bptt is a good size; one call each) and the T - 1 mod `window` left over
    one at a time, then its last token samples the first new token. The leftover tokens and all
    n_tokens new ones are one compiled loop with the state carried and the sampling on the device
    (`_continue`): one dispatch and one read of int32[B, n_tokens], not one per token.
    `n_tokens` is static: each new value compiles that loop once (as does a new B or `window`);
    the prompt's length T does not. Token i is drawn with `fold_in(key, i)`: a key fixes the output.
    """
    prompt = _check_request(prompt, n_tokens, config, sampling)
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    state = encoder.initial_state(config.encoder, prompt.shape[0])
    n_windowed = (prompt.shape[1] - 1) // window * window
    for start in range(0, n_windowed, window):
        state = _feed(params, state, jnp.asarray(prompt[:, start:start + window]), config=config)
    # the leftover, in a buffer of one width for every T (at least 1 column, for window = 1)
    rest = np.full((prompt.shape[0], max(window - 1, 1)), config.encoder.pad_token, np.int32)
    n_rest = prompt.shape[1] - 1 - n_windowed
    rest[:, :n_rest] = prompt[:, n_windowed:-1]
    tokens = _continue(params, state, rest, np.int32(n_rest), prompt[:, -1], key, config=config,
                       sampling=sampling, n_tokens=int(n_tokens))
    return np.asarray(tokens)


def generate_by_rerunning(params, prompt: np.ndarray, n_tokens: int, key: jax.Array, *,
                          config: LanguageModelConfig, sampling: Sampling = Sampling()) -> np.ndarray:
    """fastai's way, O(n^2): reset and rerun the whole prefix for every new token.

    Same interface and key use as `generate` (int[B, T] -> int32[B, n_tokens]); a reference for
    tests and benchmarks. The prefix lives in a buffer int32[B, T + n_tokens] padded on the right,
    and token i is read from the logits at position T + i - 1: the model is causal, so the padding
    after it changes nothing, and one shape compiles once.
    """
    prompt = _check_request(prompt, n_tokens, config, sampling)
    length = prompt.shape[1]
    buffer = np.full((prompt.shape[0], length + n_tokens), config.encoder.pad_token, np.int32)
    buffer[:, :length] = prompt
    for i in range(n_tokens):
        state = encoder.initial_state(config.encoder, prompt.shape[0])
        logits = _all_logits(params, state, jnp.asarray(buffer), config=config)
        buffer[:, length + i] = np.asarray(_sample(logits[:, length + i - 1], jax.random.fold_in(key, i), sampling))
    return buffer[:, length:]


def prompt_tokens(text: str, tokenizer, backwards: bool = False) -> list[str]:
    """A prompt's tokens as the model saw text in training (fastai's `test_dl`: rules, tokenizer,
    so `xxbos` first). A backwards LM continues to the left: its prompt is the tokens reversed,
    without `xxbos` (the reversed stream has it after a document, not before the text that
    precedes it). Raises ValueError for a prompt with no tokens."""
    if not text.strip():
        raise ValueError("the prompt is empty")
    tokens = tokenizer(text)
    if backwards:
        tokens = [t for t in tokens if t not in (BOS, "\u2581" + BOS)][::-1]     # a SentencePiece piece: '▁xxbos'
    if not tokens:
        raise ValueError(f"the prompt {text!r} has no tokens")
    return tokens
