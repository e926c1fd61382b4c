"""Dropout masks: the properties fastai's own notebook (32_text.models.awdlstm) checks."""

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import dropout


def test_locked_dropout_unit_is_zero_at_every_step_or_scaled(key):
    x = jnp.ones((8, 20, 30))
    p = 0.3
    y = np.asarray(dropout.locked_dropout(key, x, p, time_axis=1))
    per_unit = y[:, 0, :]
    np.testing.assert_allclose(per_unit[per_unit != 0], 1 / (1 - p), rtol=1e-6)
    np.testing.assert_array_equal(y, np.broadcast_to(per_unit[:, None, :], y.shape))
    assert abs((per_unit > 0).mean() - (1 - p)) < 0.05


def test_embedding_rows_are_zero_or_scaled(key):
    p = 0.2
    mask = np.asarray(dropout.embedding_row_mask(key, 5000, p))
    assert mask.shape == (5000, 1)
    np.testing.assert_allclose(mask[mask != 0], 1 / (1 - p), rtol=1e-6)
    assert abs((mask > 0).mean() - (1 - p)) < 0.02


def test_weight_drop_keeps_raw_weight_and_its_gradient(key):
    weight = jax.random.normal(key, (40, 10))
    p = 0.5
    dropped = dropout.weight_drop(jax.random.PRNGKey(1), weight, p)
    kept = np.asarray(dropped) != 0
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(weight)[kept] / (1 - p), rtol=1e-6)
    assert abs(kept.mean() - (1 - p)) < 0.06
    gradient = jax.grad(lambda w: jnp.sum(dropout.weight_drop(jax.random.PRNGKey(1), w, p)))(weight)
    np.testing.assert_allclose(np.asarray(gradient), kept / (1 - p), rtol=1e-6)


def test_no_key_or_zero_probability_is_identity(key):
    x = jnp.arange(12.0).reshape(2, 3, 2)
    assert dropout.locked_dropout(None, x, 0.5, time_axis=1) is x
    np.testing.assert_array_equal(dropout.locked_dropout(key, x, 0.0, time_axis=1), x)
    np.testing.assert_array_equal(dropout.weight_drop(key, x, 0.0), x)


def test_mask_is_a_function_of_its_key_with_the_keep_rate(key):
    """The same key draws the same mask, another key another one, each keeping 1 - p of the units."""
    p = 0.1
    first, again = (np.asarray(dropout.dropout_mask(key, (300, 400), p)) for _ in range(2))
    other = np.asarray(dropout.dropout_mask(jax.random.fold_in(key, 1), (300, 400), p))
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.1
    for mask in (first, other):
        assert abs((mask > 0).mean() - (1 - p)) < 0.005
