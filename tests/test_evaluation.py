"""LM evaluation over a stream (ulmfit_jax.evaluation): one compiled scan over the windows."""

import functools

import jax
import numpy as np
import pytest

from jit_calls import count_jitted_calls
from ulmfit_jax import encoder, evaluation, models
from ulmfit_jax.config import awd_lstm_lm_config, awd_qrnn_lm_config

VOCAB = 40


def _model(config_fn=awd_lstm_lm_config, seed=0):
    config = config_fn(VOCAB, emb_size=8, n_hidden=12, n_layers=2)
    params = models.init_language_model(jax.random.PRNGKey(seed), config)
    params["encoder"]["embed"] = params["encoder"]["embed"] * 20     # losses well away from log(V)
    params["decoder"]["bias"] = params["decoder"]["bias"].at[2:4].add(3.0)   # tokens 2, 3 often the argmax
    return config, params


def _stream(n_ids, seed):
    """Random ids, half of them 2 or 3: the model gets some of them right (accuracy in (0, 1))."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n_ids) < 0.5, rng.integers(2, 4, size=n_ids), rng.integers(0, VOCAB, size=n_ids))


@functools.partial(jax.jit, static_argnames="config")
def _reference_window(params, tokens, state, config):
    logits, state, _ = models.language_model_apply(params, tokens, state, config=config)
    return jax.nn.log_softmax(logits, axis=-1), state


def _reference(params, config, ids, batch_size, bptt):
    """Window by window from the host, unpadded: the last window is just shorter; f64 sums."""
    inputs, targets = evaluation.stream_rows(ids, batch_size)
    state = encoder.initial_state(config.encoder, batch_size)
    total_loss = total_correct = 0.0
    for start in range(0, inputs.shape[1], bptt):
        log_probs, state = _reference_window(params, inputs[:, start:start + bptt], state, config)
        log_probs = np.asarray(log_probs, np.float64)
        window_targets = targets[:, start:start + bptt]
        total_loss -= np.take_along_axis(log_probs, window_targets[..., None], axis=-1).sum()
        total_correct += (log_probs.argmax(-1) == window_targets).sum()
    n_tokens = inputs.size
    return {"loss": total_loss / n_tokens, "perplexity": np.exp(total_loss / n_tokens),
            "accuracy": total_correct / n_tokens, "tokens": n_tokens}


@pytest.mark.parametrize("config_fn", [awd_lstm_lm_config, awd_qrnn_lm_config], ids=["lstm", "qrnn"])
@pytest.mark.parametrize("n_ids, batch_size, bptt", [(301, 3, 7),     # 100 columns: 15 windows, the last of 2
                                                     (85, 2, 6),      # 42 columns: 7 whole windows, no padding
                                                     (20, 1, 70)])    # 19 columns: one window, mostly padding
def test_equals_the_window_by_window_reference(config_fn, n_ids, batch_size, bptt):
    config, params = _model(config_fn)
    ids = _stream(n_ids, seed=n_ids)
    result = evaluation.evaluate_language_model(params, config, ids, batch_size=batch_size, bptt=bptt)
    expected = _reference(params, config, ids, batch_size, bptt)
    assert set(result) == {"loss", "perplexity", "accuracy", "tokens"}
    assert result["tokens"] == expected["tokens"] == batch_size * ((n_ids - 1) // batch_size)
    assert isinstance(result["tokens"], int) and all(isinstance(result[k], float) for k in ("loss", "accuracy"))
    for name in ("loss", "perplexity", "accuracy"):
        assert abs(result[name] - expected[name]) <= 1e-5 * max(1.0, abs(expected[name])), name
    assert 0.0 < result["accuracy"] < 1.0 and result["loss"] > 0.1     # a meaningful comparison


def test_the_stream_is_one_dispatch(monkeypatch):
    config, params = _model()
    ids = _stream(301, seed=3)
    calls = count_jitted_calls(monkeypatch, evaluation)
    evaluation.evaluate_language_model(params, config, ids, batch_size=3, bptt=7)
    assert sum(calls.values()) == 1, calls          # 15 windows, one call of one compiled program
    monkeypatch.undo()
    # the same number of windows compiles nothing new; another one compiles the scan once more
    compiled = evaluation._evaluate_windows._cache_size()
    evaluation.evaluate_language_model(params, config, ids[:-1], batch_size=3, bptt=7)
    assert evaluation._evaluate_windows._cache_size() == compiled
    evaluation.evaluate_language_model(params, config, ids[:-50], batch_size=3, bptt=7)
    assert evaluation._evaluate_windows._cache_size() == compiled + 1


def test_bad_streams_are_named():
    config, params = _model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        evaluation.evaluate_language_model(params, config, np.array([1, 2, VOCAB]), batch_size=1)
    with pytest.raises(ValueError, match="too short"):
        evaluation.evaluate_language_model(params, config, np.array([1, 2, 3]), batch_size=4)
    with pytest.raises(ValueError, match="1-D"):
        evaluation.evaluate_language_model(params, config, np.ones((2, 5), int), batch_size=1)
