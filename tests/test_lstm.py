"""The custom-VJP LSTM against a plain Python loop differentiated by JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax.lstm import init_lstm_params, lstm_layer


def python_loop_lstm(params, x, state, reverse=False):
    h, c = state
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in order:
        gates = x[t] @ params["w_ih"].T + params["b_ih"] + h @ params["w_hh"].T + params["b_hh"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        outputs[t] = h
    return jnp.stack(outputs), (h, c)


@pytest.mark.parametrize("reverse", [False, True])
def test_outputs_and_gradients_equal_autodiff_of_a_loop(reverse):
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    params = init_lstm_params(keys[0], 5, 7)
    x = jax.random.normal(keys[1], (6, 3, 5))
    state = (jax.random.normal(keys[2], (3, 7)), jax.random.normal(keys[3], (3, 7)))

    def loss(layer, params, x, state):
        outputs, (h, c) = layer(params, x, state, reverse=reverse)
        return jnp.sum(jnp.sin(outputs)) + jnp.sum(h ** 2) + jnp.sum(3 * c)

    ours = jax.value_and_grad(lambda *a: loss(lstm_layer, *a), argnums=(0, 1, 2))(params, x, state)
    reference = jax.value_and_grad(lambda *a: loss(python_loop_lstm, *a), argnums=(0, 1, 2))(params, x, state)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ours[1], reference[1])


def test_weight_override_is_used_and_differentiated():
    params = init_lstm_params(jax.random.PRNGKey(0), 4, 3)
    x = jnp.ones((5, 2, 4))
    state = (jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    zero = jnp.zeros_like(params["w_hh"])
    out_zero, _ = lstm_layer(params, x, state, w_hh=zero)
    out_plain, _ = lstm_layer(dict(params, w_hh=zero), x, state)
    np.testing.assert_array_equal(out_zero, out_plain)
    gradient = jax.grad(lambda w: jnp.sum(lstm_layer(params, x, state, w_hh=w)[0]))(params["w_hh"])
    assert np.abs(np.asarray(gradient)).sum() > 0
