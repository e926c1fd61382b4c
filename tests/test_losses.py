"""The fused, chunked tied-decoder + cross-entropy equals the plain `cross_entropy(lm_logits(...))`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import heads, losses
from ulmfit_jax.config import awd_lstm_lm_config


def _plain(hidden, weight, bias, targets, config):
    params = {"encoder": {"embed": weight}, "decoder": {} if bias is None else {"bias": bias}}
    return losses.cross_entropy(heads.lm_logits(params, hidden, config), targets)


@pytest.mark.parametrize("batch, bptt, vocab, emb, chunk_size, out_bias", [
    (4, 7, 53, 16, 5, True),       # 28 rows: padded last chunk
    (3, 10, 101, 8, 30, True),     # exactly one chunk
    (2, 9, 37, 12, 1000, False),   # chunk larger than the rows, no bias
    (8, 70, 500, 32, 256, True),   # realistic shape
])
def test_fused_linear_cross_entropy_matches_plain(key, batch, bptt, vocab, emb, chunk_size, out_bias):
    config = awd_lstm_lm_config(vocab, emb_size=emb, out_bias=out_bias)
    k_h, k_w, k_b, k_t = jax.random.split(key, 4)
    hidden = jax.random.normal(k_h, (batch, bptt, emb))
    weight = jax.random.uniform(k_w, (vocab, emb), minval=-0.5, maxval=0.5)
    bias = jax.random.normal(k_b, (vocab,)) if out_bias else None
    targets = jax.random.randint(k_t, (batch, bptt), 0, vocab)

    def fused(h, w, b):
        return losses.fused_linear_cross_entropy(h, w, b, targets, chunk_size=chunk_size)

    def plain(h, w, b):
        return _plain(h, w, b, targets, config)

    argnums = (0, 1, 2) if out_bias else (0, 1)
    value, grads = jax.value_and_grad(fused, argnums=argnums)(hidden, weight, bias)
    expected, expected_grads = jax.value_and_grad(plain, argnums=argnums)(hidden, weight, bias)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused(hidden, weight, bias), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_fused_linear_cross_entropy_scales_by_cotangent_and_jits(key):
    hidden = jax.random.normal(key, (2, 6, 8))
    weight = jax.random.normal(jax.random.fold_in(key, 1), (20, 8))
    bias = jnp.zeros((20,))
    targets = jnp.arange(12).reshape(2, 6) % 20

    def scaled(h, w, b):
        return 3.0 * losses.fused_linear_cross_entropy(h, w, b, targets, chunk_size=4)

    def plain(h, w, b):
        logits = h @ w.T + b
        return 3.0 * losses.cross_entropy(logits, targets)

    got = jax.jit(jax.grad(scaled, argnums=(0, 1, 2)))(hidden, weight, bias)
    want = jax.grad(plain, argnums=(0, 1, 2))(hidden, weight, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_fused_linear_cross_entropy_rejects_bad_shapes():
    hidden = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="leading shape"):
        losses.fused_linear_cross_entropy(hidden, jnp.zeros((5, 4)), None, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="weight"):
        losses.fused_linear_cross_entropy(hidden, jnp.zeros((5, 3)), None, jnp.zeros((2, 3), jnp.int32))


def test_fused_linear_cross_entropy_target_outside_vocab_is_nan():
    """A target id >= V is not clamped to the last class: the loss is NaN (the training loop stops on it)."""
    hidden = jnp.ones((1, 4, 8))
    weight = jnp.ones((5, 8))
    targets = jnp.array([[0, 1, 2, 5]])
    assert np.isnan(jax.value_and_grad(losses.fused_linear_cross_entropy)(hidden, weight, None, targets)[0])
    assert np.isnan(losses.fused_linear_cross_entropy(hidden, weight, None, targets))
    assert np.isfinite(losses.fused_linear_cross_entropy(hidden, weight, None, targets % 5))


def test_masked_regularizers_equal_the_plain_ones_on_the_masked_part(key):
    """AR / TAR with a mask of each row's first `n` positions equal the plain ones on outputs[:, :n];
    what lies outside the mask does not count."""
    outputs = jax.random.normal(key, (3, 9, 4))
    mask = jnp.arange(9)[None, :] < 6
    mask = jnp.broadcast_to(mask, (3, 9))
    garbage = outputs.at[:, 6:].set(1e3)
    np.testing.assert_allclose(losses.activation_regularization(garbage, 2.0, mask),
                               losses.activation_regularization(outputs[:, :6], 2.0), rtol=1e-6)
    np.testing.assert_allclose(losses.temporal_activation_regularization(garbage, 1.0, mask),
                               losses.temporal_activation_regularization(outputs[:, :6], 1.0), rtol=1e-6)
    assert losses.activation_regularization(garbage, 2.0) > 100 * losses.activation_regularization(outputs, 2.0)
