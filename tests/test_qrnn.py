"""The QRNN: forget-mult implementations, zoneout, bad input, presets, weight import / export, and
golden tests against fastai 1.0.61's QRNN (run in a subprocess, see fastai1_qrnn_reference.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import convert, dropout, encoder, losses, models, qrnn
from ulmfit_jax.config import (EncoderConfig, awd_lstm_lm_config, awd_qrnn_clas_config, awd_qrnn_lm_config,
                               multifit_clas_config, multifit_lm_config)

ROOT = Path(__file__).resolve().parents[1]
FASTAI1_DIR = ROOT / ".venv" / "fastai1"
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "fastai1_qrnn_reference.py"


def forget_mult_loop(z, f, c0, reverse=False):
    """The recurrence written out in numpy, float64: c_t = f_t z_t + (1 - f_t) c_{t-1}."""
    z, f, cell = np.asarray(z, np.float64), np.asarray(f, np.float64), np.asarray(c0, np.float64)
    cells = np.zeros_like(z)
    for t in (range(len(z) - 1, -1, -1) if reverse else range(len(z))):
        cell = f[t] * z[t] + (1 - f[t]) * cell
        cells[t] = cell
    return cells


def _gates(key, steps, batch, hidden):
    z_key, f_key, c_key = jax.random.split(key, 3)
    z = jnp.tanh(jax.random.normal(z_key, (steps, batch, hidden)))
    f = jax.nn.sigmoid(2 * jax.random.normal(f_key, (steps, batch, hidden)))
    return z, f, jax.random.normal(c_key, (batch, hidden))


# ----------------------------------------------------------------------------------------------
# Forget-mult

@pytest.mark.parametrize("steps", [1, 2, 7, 33])
@pytest.mark.parametrize("reverse", [False, True])
def test_forget_mult_scan_and_associative_equal_the_loop(key, steps, reverse):
    z, f, c0 = _gates(key, steps, 3, 5)
    expected = forget_mult_loop(z, f, c0, reverse)
    for method in qrnn.FORGET_MULT_METHODS:
        cells = jax.jit(lambda z, f, c: qrnn.forget_mult(z, f, c, method=method, reverse=reverse))(z, f, c0)
        np.testing.assert_allclose(np.asarray(cells), expected, atol=1e-6, rtol=0, err_msg=method)


@pytest.mark.parametrize("steps", [1, 5, 40])
@pytest.mark.parametrize("reverse", [False, True])
def test_forget_mult_gradients_equal_across_implementations(key, steps, reverse):
    z, f, c0 = _gates(key, steps, 2, 4)
    weights = jax.random.normal(jax.random.fold_in(key, 1), z.shape)

    def loss(method, z, f, c0):
        cells = qrnn.forget_mult(z, f, c0, method=method, reverse=reverse)
        last = cells[0] if reverse else cells[-1]
        return jnp.sum(cells * weights) + jnp.sum(last ** 2)

    grads = {method: jax.grad(loss, argnums=(1, 2, 3))(method, z, f, c0) for method in qrnn.FORGET_MULT_METHODS}

    # and autodiff through a plain lax.scan, the custom VJP's reference
    def plain(z, f, c0):
        zs, fs = (z[::-1], f[::-1]) if reverse else (z, f)
        _, cells = jax.lax.scan(lambda c, zf: (zf[1] * zf[0] + (1 - zf[1]) * c,) * 2, c0, (zs, fs))
        return cells[::-1] if reverse else cells

    def plain_loss(z, f, c0):
        cells = plain(z, f, c0)
        return jnp.sum(cells * weights) + jnp.sum((cells[0] if reverse else cells[-1]) ** 2)

    expected = jax.grad(plain_loss, argnums=(0, 1, 2))(z, f, c0)
    for method, got in grads.items():
        for name, g, e in zip(("dz", "df", "dc0"), got, expected):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5, rtol=0, err_msg=f"{method} {name}")


def test_forget_mult_gradient_matches_finite_differences(key):
    z, f, c0 = _gates(key, 6, 2, 3)
    z, f, c0 = (np.asarray(a, np.float64) for a in (z, f, c0))
    weights = np.asarray(jax.random.normal(key, z.shape), np.float64)
    loss64 = lambda z, f, c: float(np.sum(forget_mult_loop(z, f, c) * weights))
    d_z, d_f, d_c0 = jax.grad(lambda z, f, c: jnp.sum(qrnn.forget_mult_scan(z, f, c) * weights),
                              argnums=(0, 1, 2))(jnp.asarray(z, jnp.float32), jnp.asarray(f, jnp.float32),
                                                 jnp.asarray(c0, jnp.float32))
    eps = 1e-6
    for arrays, grad, name in ((0, d_z, "z"), (1, d_f, "f"), (2, d_c0, "c0")):
        args = [z, f, c0]
        index = (0,) * args[arrays].ndim
        bumped = [a.copy() for a in args]
        bumped[arrays][index] += eps
        numeric = (loss64(*bumped) - loss64(*args)) / eps
        assert abs(float(grad[index]) - numeric) < 1e-4, name


def test_forget_mult_rejects_unknown_method(key):
    z, f, c0 = _gates(key, 3, 1, 2)
    with pytest.raises(ValueError, match="forget-mult method"):
        qrnn.forget_mult(z, f, c0, method="parallel")


# ----------------------------------------------------------------------------------------------
# One layer: equations, zoneout, bad input

def _layer(key, n_in=5, hidden=4, window=2, batch=3, steps=6):
    params = qrnn.init_qrnn_params(key, n_in, hidden, window=window)
    x_key, c_key, p_key = jax.random.split(jax.random.fold_in(key, 7), 3)
    x = jax.random.normal(x_key, (steps, batch, n_in))
    return params, x, jax.random.normal(c_key, (batch, hidden)), jax.random.normal(p_key, (batch, n_in))


def _layer_by_hand(params, x, cell, prev_x, window, backward=False, mask=None):
    x, prev_x = np.asarray(x, np.float64), np.asarray(prev_x, np.float64)
    if window == 2:
        shifted = np.concatenate([x[1:], prev_x[None]]) if backward else np.concatenate([prev_x[None], x[:-1]])
        x = np.concatenate([x, shifted], -1)
    gates = x @ np.asarray(params["weight"], np.float64).T + np.asarray(params["bias"], np.float64)
    z, f, o = np.split(gates, 3, -1)
    z, f, o = np.tanh(z), 1 / (1 + np.exp(-f)), 1 / (1 + np.exp(-o))
    if mask is not None:
        f = f * np.asarray(mask, np.float64)
    cells = forget_mult_loop(z, f, cell, backward)
    return o * cells, cells


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("backward", [False, True])
def test_layer_equals_its_equations(key, window, backward):
    params, x, cell, prev_x = _layer(key, window=window)
    outputs, last_cell, saved = qrnn.qrnn_layer(params, x, cell, prev_x, window=window, backward=backward)
    expected, cells = _layer_by_hand(params, x, cell, prev_x if window == 2 else None, window, backward)
    np.testing.assert_allclose(np.asarray(outputs), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(last_cell), cells[0] if backward else cells[-1], atol=1e-5, rtol=0)
    if window == 2:
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(x[0] if backward else x[-1]))
    else:
        assert saved is None


def test_zoneout_is_fastais_rescaled_mask_in_training_and_nothing_in_eval(key):
    params, x, cell, prev_x = _layer(key, hidden=6, steps=20)
    p = 0.4
    zoneout_key = jax.random.PRNGKey(3)
    trained, _, _ = qrnn.qrnn_layer(params, x, cell, prev_x, window=2, zoneout=p, zoneout_key=zoneout_key)
    mask = dropout.dropout_mask(zoneout_key, (20, 3, 6), p)
    np.testing.assert_allclose(np.unique(np.asarray(mask)), [0.0, 1 / (1 - p)], rtol=1e-6)
    expected, cells = _layer_by_hand(params, x, cell, prev_x, 2, mask=mask)
    np.testing.assert_allclose(np.asarray(trained), expected, atol=1e-5, rtol=0)
    # where the mask is zero, the cell is carried unchanged ("zoned out")
    previous = np.concatenate([np.asarray(cell, np.float64)[None], cells[:-1]])
    zoned = np.asarray(mask) == 0
    assert zoned.mean() > 0.2
    np.testing.assert_allclose(cells[zoned], previous[zoned], atol=1e-12)
    # eval: no key, no zoneout, and no (1 - p) scaling (salesforce's eval rule is not fastai's)
    evaluated, _, _ = qrnn.qrnn_layer(params, x, cell, prev_x, window=2, zoneout=p, zoneout_key=None)
    plain, _ = _layer_by_hand(params, x, cell, prev_x, 2)
    np.testing.assert_allclose(np.asarray(evaluated), plain, atol=1e-5, rtol=0)


def test_zoneout_in_the_encoder_acts_only_in_training(key):
    config = awd_lstm_lm_config(30, arch="qrnn", emb_size=6, n_hidden=8, n_layers=2, drop_mult=0.0, zoneout=0.5)
    params = models.init_language_model(key, config)
    tokens = jax.random.randint(key, (2, 9), 2, 30)
    state = encoder.initial_state(config.encoder, 2)
    apply = jax.jit(lambda p, x, s, k, config, train: models.language_model_apply(
        p, x, s, config=config, train=train, key=k)[0], static_argnums=(4, 5))
    evaluated = apply(params, tokens, state, None, config, False)
    trained = apply(params, tokens, state, key, config, True)
    no_zoneout = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, zoneout=0.0))
    trained_without = apply(params, tokens, state, key, no_zoneout, True)
    np.testing.assert_allclose(np.asarray(trained_without), np.asarray(evaluated), atol=1e-6)
    assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 1e-3


def test_unsupported_window_is_a_clear_error(key):
    with pytest.raises(ValueError, match="window must be 1 or 2"):
        qrnn.init_qrnn_params(key, 4, 3, window=3)
    params, x, cell, _ = _layer(key, window=1)
    with pytest.raises(ValueError, match="window must be 1 or 2"):
        qrnn.qrnn_layer(params, x, cell, window=3)
    # a weight whose width implies window 3 in the encoder
    config = EncoderConfig(vocab_size=10, emb_size=5, n_hidden=4, n_layers=1, arch="qrnn")
    wide = {"weight": jnp.zeros((15, 15)), "bias": jnp.zeros(15)}
    with pytest.raises(ValueError, match=r"columns must be 5 \(window 1\) or 10 \(window 2\)"):
        qrnn.qrnn_stack_layer(wide, x, {"cell": jnp.zeros((3, 5))}, config=config, weight_key=None, train=False)


def test_bidirectional_qrnn_cannot_save_the_previous_input(key):
    with pytest.raises(ValueError, match="bidirectional QRNN cannot save the previous input.*save_prev_x=False"):
        EncoderConfig(vocab_size=10, emb_size=6, n_hidden=8, n_layers=2, arch="qrnn", bidirectional=True)
    config = EncoderConfig(vocab_size=10, emb_size=6, n_hidden=8, n_layers=2, arch="qrnn", bidirectional=True,
                           save_prev_x=False)
    assert all(set(s) == {"cell"} for s in encoder.initial_state(config, 2))
    # a config built around the check (object.__setattr__) is still refused by the layer functions
    sneaky = dataclasses.replace(config)
    object.__setattr__(sneaky, "save_prev_x", True)
    for call in (lambda: qrnn.init_qrnn_encoder(key, sneaky), lambda: qrnn.initial_qrnn_state(sneaky, 2)):
        with pytest.raises(ValueError, match="cannot save the previous input"):
            call()
    # the LSTM has no such restriction
    EncoderConfig(vocab_size=10, emb_size=6, n_hidden=8, n_layers=2, bidirectional=True)


def test_wrong_weight_shapes_are_clear_errors(key):
    params, x, cell, prev_x = _layer(key, n_in=5, hidden=4, window=2)
    with pytest.raises(ValueError, match=r"gate weight has shape \(12, 10\); a window-1 layer .* needs \(12, 5\)"):
        qrnn.qrnn_layer(params, x, cell, window=1)
    with pytest.raises(ValueError, match=r"gate weight has shape \(12, 10\).* 3 gates needs \(9, 10\)"):
        qrnn.qrnn_layer(params, x, cell[:, :3], prev_x, window=2)
    with pytest.raises(ValueError, match=r"gate bias has shape \(11,\), needs \(12,\)"):
        qrnn.qrnn_layer(dict(params, bias=params["bias"][:11]), x, cell, prev_x, window=2)
    with pytest.raises(ValueError, match=r"saved input has shape \(3, 4\)"):
        qrnn.qrnn_layer(params, x, cell, prev_x[:, :4], window=2)
    with pytest.raises(ValueError, match="time-major"):
        qrnn.qrnn_layer(params, x[0], cell, prev_x, window=2)
    # and through the encoder: a layer built for another width
    config = awd_lstm_lm_config(20, arch="qrnn", emb_size=5, n_hidden=4, n_layers=2)
    model = models.init_language_model(key, config)
    model["encoder"]["rnn"][1] = qrnn.init_qrnn_params(key, 4, 3, window=1)
    with pytest.raises(ValueError, match="gate weight has shape"):
        models.language_model_apply(model, jnp.ones((3, 4), jnp.int32), encoder.initial_state(config.encoder, 3),
                                    config=config)


def test_importing_a_wrong_shape_names_the_tensor(key):
    config = awd_lstm_lm_config(20, arch="qrnn", emb_size=5, n_hidden=4, n_layers=2)
    state_dict = convert.export_language_model(models.init_language_model(key, config), config)
    state_dict["0.rnns.1.layers.0.linear.module.bias"] = np.zeros(13, np.float32)
    with pytest.raises(convert.WeightsError, match=r"'0.rnns.1.layers.0.linear.module.bias' has shape \(13,\)"):
        convert.import_language_model(state_dict, config)
    del state_dict["0.rnns.1.layers.0.linear.module.bias"]
    with pytest.raises(convert.WeightsError, match="missing keys.*0.rnns.1.layers.0.linear.module.bias"):
        convert.import_language_model(state_dict, config)
    bad_first = convert.export_language_model(models.init_language_model(key, config), config)
    for suffix in ("weight_raw", "module.weight"):
        bad_first[f"0.rnns.0.layers.0.linear.{suffix}"] = np.zeros((12, 5), np.float32)   # window 1
    with pytest.raises(convert.WeightsError, match="first layer needs"):
        convert.import_language_model(bad_first)


# ----------------------------------------------------------------------------------------------
# Encoder, state, presets

def test_state_has_the_batch_axis_first_and_windows_compose(key):
    config = awd_lstm_lm_config(40, arch="qrnn", emb_size=6, n_hidden=10, n_layers=3)
    params = models.init_language_model(key, config)
    state = encoder.initial_state(config.encoder, 4)
    assert [jax.tree.map(jnp.shape, s) for s in state] == [
        {"cell": (4, 10), "prev_x": (4, 6)}, {"cell": (4, 10)}, {"cell": (4, 6)}]
    assert float(jnp.abs(params["encoder"]["embed"][config.encoder.pad_token]).max()) == 0.0   # v1 init
    tokens = jax.random.randint(key, (4, 12), 0, 40)
    apply = jax.jit(lambda p, x, s: models.language_model_apply(p, x, s, config=config)[:2])
    whole, _ = apply(params, tokens, state)
    first, carried = apply(params, tokens[:, :5], state)
    second, _ = apply(params, tokens[:, 5:], carried)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, second], 1)), np.asarray(whole), atol=1e-5)
    # without the saved input, the second window would start from zeros: the test can fail
    no_saved = [carried[0] | {"prev_x": jnp.zeros_like(carried[0]["prev_x"])}] + carried[1:]
    run = lambda state: encoder.encoder_apply(params["encoder"], tokens[:, 5:6], state, config=config.encoder)[1]
    with_saved, without = run(carried)[0]["cell"], run(no_saved)[0]["cell"]
    assert np.abs(np.asarray(with_saved) - np.asarray(without)).max() > 1e-2


def test_weight_drop_masks_the_gate_weight_once_per_call(key):
    config = EncoderConfig(vocab_size=10, emb_size=5, n_hidden=4, n_layers=1, arch="qrnn", weight_p=0.5)
    params = qrnn.init_qrnn_params(key, 5, 5, window=2)
    x = jax.random.normal(key, (7, 3, 5))
    state = qrnn.initial_qrnn_state(config, 3)[0]
    weight_key = jax.random.PRNGKey(11)
    trained, _ = qrnn.qrnn_stack_layer(params, x, state, config=config, weight_key=weight_key, train=True)
    drop_key, _ = jax.random.split(weight_key)
    mask = dropout.dropout_mask(drop_key, params["weight"].shape, 0.5)
    masked = dict(params, weight=params["weight"] * mask)           # the bias is not dropped
    expected, _ = qrnn.qrnn_stack_layer(masked, x, state, config=config, weight_key=None, train=False)
    np.testing.assert_allclose(np.asarray(trained), np.asarray(expected), atol=1e-6)
    evaluated, _ = qrnn.qrnn_stack_layer(params, x, state, config=config, weight_key=weight_key, train=False)
    assert np.abs(np.asarray(trained) - np.asarray(evaluated)).max() > 1e-2


def test_batch_sharded_over_devices_equals_one_device(key):
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (forced CPU) devices")
    config = awd_lstm_lm_config(30, arch="qrnn", emb_size=6, n_hidden=8, n_layers=2)
    params = models.init_language_model(key, config)
    batch = 2 * len(devices)
    tokens = jax.random.randint(key, (batch, 7), 0, 30)
    state = encoder.initial_state(config.encoder, batch)
    apply = jax.jit(lambda p, x, s: models.language_model_apply(p, x, s, config=config, train=True, key=key)[:2])
    expected_logits, expected_state = apply(params, tokens, state)
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    logits, new_state = apply(params, jax.device_put(tokens, rows), jax.device_put(state, rows))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 new_state, expected_state)


def test_associative_forget_mult_in_the_encoder_gives_the_same_model(key):
    config = awd_lstm_lm_config(40, arch="qrnn", emb_size=6, n_hidden=10, n_layers=3, drop_mult=0.5)
    associative = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, forget_mult="associative"))
    params = models.init_language_model(key, config)
    tokens = jax.random.randint(key, (3, 9), 0, 40)
    state = encoder.initial_state(config.encoder, 3)

    def loss(params, config):
        logits, _, _ = models.language_model_apply(params, tokens, state, config=config, train=True, key=key)
        return losses.cross_entropy(logits[:, :-1], tokens[:, 1:])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value_scan, grads_scan = value_and_grad(params, config)
    value_assoc, grads_assoc = value_and_grad(params, associative)
    assert abs(float(value_scan) - float(value_assoc)) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0),
                 grads_scan, grads_assoc)


def test_qrnn_classifier_runs_bpt3c(key):
    config = awd_qrnn_clas_config(30, 3, emb_size=6, n_hidden=8, n_layers=2, bptt=4, max_len=8)
    params, stats = models.init_classifier(key, config)
    tokens = np.full((2, 11), config.encoder.pad_token)
    tokens[0, :] = np.arange(2, 13)
    tokens[1, 4:] = np.arange(2, 9)
    apply = jax.jit(lambda p, s, x, k: models.classifier_apply(p, s, x, config=config, train=True, key=k))
    logits, _, outputs = apply(params, stats, jnp.asarray(tokens), key)
    assert logits.shape == (2, 3) and outputs.shape == (2, 7, 6)
    assert np.isfinite(np.asarray(logits)).all()


def test_presets():
    lm = awd_qrnn_lm_config(1000).encoder
    assert (lm.arch, lm.emb_size, lm.n_hidden, lm.n_layers, lm.weight_p) == ("qrnn", 400, 1552, 4, 0.2)
    clas = awd_qrnn_clas_config(1000, 2, drop_mult=0.5)
    assert (clas.encoder.n_hidden, clas.encoder.hidden_p, clas.head_ps) == (1552, 0.15, (0.2, 0.1))
    multifit = multifit_lm_config()
    assert (multifit.encoder.vocab_size, multifit.encoder.n_layers, multifit.encoder.n_hidden) == (15_000, 4, 1550)
    assert multifit.output_p == 0.25 and multifit.encoder.input_p == 0.2 and multifit.encoder.weight_p == 0.15
    multifit_clas = multifit_clas_config(15_000, 4, drop_mult=0.5)
    assert multifit_clas.head_ps == (0.125, 0.1) and multifit_clas.encoder.hidden_p == 0.05
    assert multifit_clas.encoder.arch == "qrnn" and multifit_clas.encoder.save_prev_x
    assert multifit_lm_config(100, n_layers=2).encoder.n_layers == 2


# ----------------------------------------------------------------------------------------------
# fastai 1.0.61

LM_SPECS = [
    dict(name="L1", vocab_size=37, emb_sz=7, n_hid=11, n_layers=1, tie_weights=True),
    dict(name="L3", vocab_size=50, emb_sz=8, n_hid=10, n_layers=3, tie_weights=True),
    dict(name="L4-untied", vocab_size=41, emb_sz=6, n_hid=14, n_layers=4, tie_weights=False),
]
LAYER_SPECS = [
    dict(name="bidir-w2", input_size=8, hidden_size=4, bidirectional=True, window=2, save_prev_x=False),
    dict(name="bidir-w1", input_size=6, hidden_size=3, bidirectional=True, window=1, save_prev_x=False),
    dict(name="fwd-w2-saved", input_size=5, hidden_size=5, bidirectional=False, window=2, save_prev_x=True),
]
BATCH, BPTT, N_WINDOWS = 3, 6, 3
ALPHA, BETA = 2.0, 1.0


@pytest.fixture(scope="module")
def fastai1(tmp_path_factory):
    """Runs every fastai 1.0.61 job in one subprocess; returns the folder with its outputs."""
    if not (FASTAI1_DIR / "fastai" / "text" / "models" / "qrnn.py").exists():
        pytest.skip(f"fastai 1.0.61 is not installed in {FASTAI1_DIR} (make venv installs it: "
                    "pip install --no-deps --target .venv/fastai1 fastai==1.0.61 'setuptools<81')")
    out = tmp_path_factory.mktemp("fastai1")
    rng = np.random.default_rng(0)
    jobs = []
    for seed, spec in enumerate(LM_SPECS):
        spec = dict(spec)
        name, vocab_size = spec.pop("name"), spec.pop("vocab_size")
        stream = rng.integers(0, vocab_size, size=(BATCH, BPTT * N_WINDOWS + 1))
        np.savez(out / f"{name}-tokens.npz", stream=stream)
        config = dict(spec, pad_token=1, qrnn=True, bidir=False, output_p=0.1, hidden_p=0.15, input_p=0.25,
                      embed_p=0.02, weight_p=0.2, out_bias=True)
        jobs.append(dict(kind="lm", name=name, seed=seed, vocab_size=vocab_size, config=config,
                         tokens=str(out / f"{name}-tokens.npz"), bptt=BPTT, n_windows=N_WINDOWS, alpha=ALPHA,
                         beta=BETA, init_scale=0.5))
    for seed, spec in enumerate(LAYER_SPECS):
        n_dir = 2 if spec["bidirectional"] else 1
        steps = BPTT * N_WINDOWS
        np.savez(out / f"{spec['name']}-inputs.npz",
                 x=rng.normal(size=(BATCH, steps, spec["input_size"])).astype(np.float32),
                 cotangents=rng.normal(size=(BATCH, steps, n_dir * spec["hidden_size"])).astype(np.float32),
                 hidden_cotangent=rng.normal(size=(n_dir, BATCH, spec["hidden_size"])).astype(np.float32))
        jobs.append(dict(spec, kind="layer", seed=seed, inputs=str(out / f"{spec['name']}-inputs.npz"),
                         n_windows=N_WINDOWS))
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(FASTAI1_DIR))
    result = subprocess.run([sys.executable, str(REFERENCE_SCRIPT), str(out / "jobs.json"), str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"fastai 1.0.61 reference failed:\n{result.stderr[-4000:]}"
    return out


def _reference(out, name):
    results = np.load(out / f"{name}.npz")
    state_dict = convert.read_state_dict(out / f"{name}.pth")
    return state_dict, results


@pytest.mark.parametrize("method", qrnn.FORGET_MULT_METHODS)
@pytest.mark.parametrize("spec", LM_SPECS, ids=lambda s: s["name"])
def test_language_model_logits_equal_fastai1_over_windows(fastai1, spec, method):
    state_dict, results = _reference(fastai1, spec["name"])
    assert convert.detect_format(state_dict) == ("v1", "language_model")
    config, params = convert.import_language_model(state_dict, forget_mult=method)
    assert config.encoder.arch == "qrnn" and config.encoder.save_prev_x and config.encoder.forget_mult == method
    assert (config.encoder.n_layers, config.encoder.emb_size, config.tie_weights) == (
        spec["n_layers"], spec["emb_sz"], spec["tie_weights"])
    if spec["n_layers"] > 1:
        assert config.encoder.n_hidden == spec["n_hid"]
    stream = np.load(fastai1 / f"{spec['name']}-tokens.npz")["stream"]
    apply = jax.jit(lambda p, x, s: models.language_model_apply(p, x, s, config=config)[:2])
    state = encoder.initial_state(config.encoder, BATCH)
    for window in range(N_WINDOWS):
        logits, state = apply(params, jnp.asarray(stream[:, window * BPTT:(window + 1) * BPTT]), state)
        np.testing.assert_allclose(np.asarray(logits), results[f"logits_{window}"], atol=1e-5, rtol=0,
                                   err_msg=f"window {window}")


@pytest.mark.parametrize("spec", LM_SPECS, ids=lambda s: s["name"])
def test_language_model_gradients_equal_fastai1(fastai1, spec):
    state_dict, results = _reference(fastai1, spec["name"])
    inferred, params = convert.import_language_model(state_dict)
    config = dataclasses.replace(inferred, output_p=0.0, encoder=dataclasses.replace(
        inferred.encoder, hidden_p=0.0, input_p=0.0, embed_p=0.0, weight_p=0.0))
    gradients = {k[len("grad/"):]: results[k] for k in results.files if k.startswith("grad/")}
    assert "0.rnns.0.layers.0.linear.weight_raw" in gradients
    _, expected = convert.import_language_model(gradients, config)
    stream = jnp.asarray(np.load(fastai1 / f"{spec['name']}-tokens.npz")["stream"])

    def loss_fn(params):
        state = encoder.initial_state(config.encoder, BATCH)
        for window in range(N_WINDOWS - 1):
            _, state, _ = models.language_model_apply(params, stream[:, window * BPTT:(window + 1) * BPTT], state,
                                                      config=config, train=True, key=jax.random.PRNGKey(window))
            state = jax.lax.stop_gradient(state)
        start = (N_WINDOWS - 1) * BPTT
        logits, _, (raw, dropped) = models.language_model_apply(
            params, stream[:, start:start + BPTT], state, config=config, train=True, key=jax.random.PRNGKey(9))
        return (losses.cross_entropy(logits, stream[:, start + 1:start + BPTT + 1])
                + losses.activation_regularization(dropped, ALPHA)
                + losses.temporal_activation_regularization(raw, BETA))

    value, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(value) - float(results["loss"])) < 1e-5
    compared = jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, atol=1e-4, rtol=0),
                            grads, expected)
    assert len(jax.tree.leaves(compared, is_leaf=lambda x: x is None)) == len(jax.tree.leaves(grads))


@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: s["name"])
def test_layer_outputs_and_gradients_equal_fastai1_qrnn(fastai1, spec):
    """fastai's one-layer `QRNN` (bidirectional: `layers` and `layers_bwd`) vs `qrnn_stack_layer`,
    hidden state carried (not detached) through the windows."""
    state_dict, results = _reference(fastai1, spec["name"])
    inputs = np.load(fastai1 / f"{spec['name']}-inputs.npz")
    bidirectional, hidden = spec["bidirectional"], spec["hidden_size"]
    n_dir = 2 if bidirectional else 1

    def direction(name):
        return {"weight": jnp.asarray(state_dict[f"{name}.0.linear.weight"]),
                "bias": jnp.asarray(state_dict[f"{name}.0.linear.bias"])}

    params = ({"forward": direction("layers"), "backward": direction("layers_bwd")} if bidirectional
              else direction("layers"))
    config = EncoderConfig(vocab_size=2, emb_size=spec["input_size"], n_hidden=n_dir * hidden, n_layers=1,
                           arch="qrnn", bidirectional=bidirectional, save_prev_x=spec["save_prev_x"])
    assert config.layer_sizes[0] == (spec["input_size"], n_dir * hidden)
    x = jnp.asarray(inputs["x"]).transpose(1, 0, 2)                                  # [T, B, D]
    cotangents = jnp.asarray(inputs["cotangents"]).transpose(1, 0, 2)

    def run(params, x):
        state = {"cell": jnp.zeros((BATCH, n_dir * hidden))}
        if spec["save_prev_x"]:
            state["prev_x"] = jnp.zeros((BATCH, spec["input_size"]))
        outputs, cells, loss = [], [], 0.0
        for w in range(N_WINDOWS):
            out, state = qrnn.qrnn_stack_layer(params, x[w * BPTT:(w + 1) * BPTT], state, config=config,
                                               weight_key=None, train=False)
            outputs.append(out)
            cells.append(state["cell"])
            loss = loss + jnp.sum(out * cotangents[w * BPTT:(w + 1) * BPTT])
        last = state["cell"].reshape(BATCH, n_dir, hidden).transpose(1, 0, 2)       # fastai's [n_dir, B, H]
        return loss + jnp.sum(last * inputs["hidden_cotangent"]), (outputs, cells)

    (_, (outputs, cells)), (d_params, d_x) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(params, x)
    for w in range(N_WINDOWS):
        np.testing.assert_allclose(np.asarray(outputs[w]).transpose(1, 0, 2), results[f"output_{w}"], atol=1e-5,
                                   rtol=0)
        np.testing.assert_allclose(np.asarray(cells[w]).reshape(BATCH, n_dir, hidden).transpose(1, 0, 2),
                                   results[f"hidden_{w}"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(d_x).transpose(1, 0, 2), results["grad_x"], atol=1e-4, rtol=0)
    directions = ({"forward": "layers", "backward": "layers_bwd"} if bidirectional else {None: "layers"})
    for ours, theirs in directions.items():
        grads = d_params[ours] if ours else d_params
        for leaf in ("weight", "bias"):
            np.testing.assert_allclose(np.asarray(grads[leaf]), results[f"grad/{theirs}.0.linear.{leaf}"],
                                       atol=1e-4, rtol=0, err_msg=f"{theirs} {leaf}")


def test_export_round_trips_fastai1_state_dict_exactly(fastai1):
    state_dict = convert.read_state_dict(fastai1 / "L3.pth")
    config, params = convert.import_language_model(state_dict)
    exported = convert.export_language_model(params, config)
    assert list(exported) == list(state_dict)          # fastai 1.0.61's keys, in its order
    for k in state_dict:
        np.testing.assert_array_equal(exported[k], state_dict[k], err_msg=k)
