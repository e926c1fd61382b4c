"""LM sampling with carried state (ulmfit_jax.generate, scripts/generate.py)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jit_calls import count_jitted_calls
from ulmfit_jax import checkpoint, convert, generate, models
from ulmfit_jax.config import awd_lstm_lm_config, awd_qrnn_lm_config
from ulmfit_jax.text.rules import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parent.parent
GREEDY = generate.Sampling(top_k=1)


def _model(config_fn=awd_lstm_lm_config, vocab_size=40, seed=0, **overrides):
    config = config_fn(vocab_size, emb_size=8, n_hidden=12, n_layers=2, **overrides)
    params = models.init_language_model(jax.random.PRNGKey(seed), config)
    # sharper logits than the U(-0.1, 0.1) init, so greedy choices are not near-ties
    params["encoder"]["embed"] = params["encoder"]["embed"] * 20
    return config, params


@pytest.mark.parametrize("sampling", [GREEDY, generate.Sampling(temperature=0.7, top_k=10)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("config_fn", [awd_lstm_lm_config, awd_qrnn_lm_config], ids=["lstm", "qrnn"])
def test_carried_state_equals_rerunning_the_prefix(config_fn, sampling):
    config, params = _model(config_fn)
    prompt = np.random.default_rng(1).integers(2, 40, size=(2, 7))
    key = jax.random.PRNGKey(0)
    # window 3: two whole windows, then 1 prompt token through the single-token step
    carried = generate.generate(params, prompt, 8, key, config=config, sampling=sampling, window=3)
    rerun = generate.generate_by_rerunning(params, prompt, 8, key, config=config, sampling=sampling)
    assert carried.shape == (2, 8) and carried.dtype == np.int32
    np.testing.assert_array_equal(carried, rerun)
    if sampling is not GREEDY:
        assert len(set(carried.ravel().tolist())) > 2   # a varied sequence, not a fixed point


def test_one_compile_per_number_of_tokens_whatever_the_prompt():
    config, params = _model(seed=4)
    key = jax.random.PRNGKey(0)
    generate.generate(params, np.full((2, 4), 7), 5, key, config=config, sampling=GREEDY, window=3)
    compiled = generate._continue._cache_size(), generate._feed._cache_size()
    for length in (3, 7, 1, 12):     # 0, 2, 0 and 2 tokens left over after the whole windows
        generate.generate(params, np.full((2, length), 9), 5, key, config=config, sampling=GREEDY, window=3)
    assert (generate._continue._cache_size(), generate._feed._cache_size()) == compiled
    # n_tokens is static: a new count compiles the generation loop once, and the prompt windows not at all
    for _ in range(2):
        generate.generate(params, np.full((2, 7), 9), 9, key, config=config, sampling=GREEDY, window=3)
    assert (generate._continue._cache_size(), generate._feed._cache_size()) == (compiled[0] + 1, compiled[1])


@pytest.mark.parametrize("length, windows", [(8, 2), (2, 0), (1, 0)])
def test_the_new_tokens_are_one_dispatch(monkeypatch, length, windows):
    config, params = _model(seed=5)
    prompt = np.random.default_rng(length).integers(2, 40, size=(2, length))
    sampling = generate.Sampling(temperature=0.7, top_k=10)
    key = jax.random.PRNGKey(3)
    expected = generate.generate_by_rerunning(params, prompt, 30, key, config=config, sampling=sampling)
    calls = count_jitted_calls(monkeypatch, generate)
    out = generate.generate(params, prompt, 30, key, config=config, sampling=sampling, window=3)
    # one call per whole prompt window of 3 (of the T - 1 tokens before the last), then one for
    # the leftover prompt tokens and all 30 new ones: nothing per token
    assert calls.pop("_feed", None) == windows and calls.pop("_continue", None) == 1, calls
    assert not any(calls.values()), calls
    np.testing.assert_array_equal(out, expected)


def test_temperature_top_k_min_p_and_no_unk_weights():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)) * 2, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)

    def distribution(sampling):
        return np.asarray(jax.nn.softmax(generate.sampling_logits(logits, sampling), -1), np.float64)

    # temperature: fastai's res.pow_(1 / T), normalised (no_unk off: unk keeps its probability)
    for temperature in (0.5, 1.0, 2.5):
        expected = probs ** (1 / temperature)
        np.testing.assert_allclose(distribution(generate.Sampling(temperature=temperature, no_unk=False)),
                                   expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    # no_unk: xxunk (id 0) gets probability 0, the rest renormalised
    kept = probs.copy()
    kept[:, 0] = 0
    np.testing.assert_allclose(distribution(generate.Sampling()), kept / kept.sum(1, keepdims=True), rtol=1e-5)
    # top_k: exactly the k most probable survive
    top = distribution(generate.Sampling(top_k=4, no_unk=False))
    for row in range(3):
        assert set(np.flatnonzero(top[row])) == set(np.argsort(-probs[row])[:4])
    # min_p: probabilities below it are zeroed; skipped when no token reaches it (fastai warns)
    below = distribution(generate.Sampling(min_p=0.05, no_unk=False))
    np.testing.assert_array_equal(below == 0, probs < 0.05)
    np.testing.assert_allclose(distribution(generate.Sampling(min_p=0.999, no_unk=False)), probs, rtol=1e-5)


def test_samples_follow_the_options():
    row = jnp.linspace(0.0, 1.0, 12).at[0].set(50.0)       # xxunk (id 0) dominant
    logits = jnp.tile(row, (400, 1))                          # 400 independent draws

    def draw(sampling):
        return np.asarray(generate.sample(logits, jax.random.PRNGKey(0), sampling))

    assert np.all(draw(generate.Sampling(no_unk=False)) == 0)
    no_unk = draw(generate.Sampling())
    assert 0 not in no_unk and len(set(no_unk.tolist())) > 5
    assert set(draw(generate.Sampling(top_k=3)).tolist()) == {9, 10, 11}
    assert np.all(draw(generate.Sampling(temperature=0.01)) == 11)
    # the same key gives the same tokens; another key other tokens
    config, params = _model(seed=6)
    prompt = np.array([[2, 5, 6], [7, 8, 9]])
    sampling = generate.Sampling(temperature=0.7, top_k=10)
    a, b, c = (generate.generate(params, prompt, 20, jax.random.PRNGKey(s), config=config, sampling=sampling,
                                 window=3) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_input_is_named():
    config, params = _model()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="n_tokens"):
        generate.generate(params, np.array([[2]]), 0, key, config=config)
    with pytest.raises(ValueError, match="T >= 1"):
        generate.generate(params, np.zeros((1, 0), int), 3, key, config=config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate.generate(params, np.array([[2, 40]]), 3, key, config=config)
    with pytest.raises(ValueError, match="temperature"):
        generate.Sampling(temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate.Sampling(top_k=0)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        generate.generate(params, np.array([[2]]), 3, key, config=config, sampling=generate.Sampling(top_k=41))
    with pytest.raises(ValueError, match="empty"):
        generate.prompt_tokens("  ", str.split)
    bidirectional, bi_params = _model(bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        generate.generate(bi_params, np.array([[2]]), 3, key, config=bidirectional)


def test_backwards_prompt_is_reversed_without_bos():
    tokenize = lambda text: ["xxbos"] + text.split()
    assert generate.prompt_tokens("a b c", tokenize) == ["xxbos", "a", "b", "c"]
    assert generate.prompt_tokens("a b c", tokenize, backwards=True) == ["c", "b", "a"]


# ----------------------------------------------------------------------------------------------
# Golden: fastai's greedy continuation, rerunning its model on the prefix as LMLearner.predict does


def test_greedy_continuation_equals_fastai_rerunning_the_prefix():
    from fastai_reference import fastai_language_model, state_dict_numpy, torch
    config, _ = _model()     # the sizes of the other tests: their compiles are reused
    reference = fastai_language_model(config, seed=7).eval()
    with torch.no_grad():   # sharper logits, so argmax is not decided by float rounding
        reference[0].encoder.weight.mul_(20)
    imported_config, params = convert.import_language_model(state_dict_numpy(reference))
    prompt = [2, 11, 30, 4, 17, 23, 9]
    n_words = 12

    expected = list(prompt)
    for _ in range(n_words):
        reference.reset()
        with torch.no_grad():
            probs = torch.softmax(reference(torch.tensor([expected]))[0][0, -1], -1)
        probs[0] = 0.0                                   # fastai's no_unk
        expected.append(int(probs.argmax()))
    ours = generate.generate(params, np.array([prompt]), n_words, jax.random.PRNGKey(0), config=imported_config,
                             sampling=GREEDY, window=3)
    assert ours[0].tolist() == expected[len(prompt):]


# ----------------------------------------------------------------------------------------------
# The script


def _script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, *args):
    _script().main([str(a) for a in args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_script_contract(tmp_path, capsys):
    words = "the cat sat on a mat and dog ran far away".split()
    vocab = list(SPECIAL_TOKENS) + words + ["xxfake"] * (40 - len(SPECIAL_TOKENS) - len(words))
    config, params = _model()
    checkpoint.save_model(tmp_path / "lm", config, params, vocab)

    out = _run(capsys, "--model", tmp_path / "lm", "--prompt", "The cat", "--n-words", 6, "--top-k", 1)
    assert out["prompt"] == "The cat" and len(out["tokens"]) == 6 and out["seconds"] > 0
    assert out["text"].startswith("The cat") and "xxbos" not in out["text"]
    again = _run(capsys, "--model", tmp_path / "lm", "--prompt", "The cat", "--n-words", 6, "--top-k", 1)
    assert again["tokens"] == out["tokens"]
    back = _run(capsys, "--model", tmp_path / "lm", "--prompt", "sat on", "--n-words", 4, "--backwards",
                "--temperature", 0.8, "--seed", 3)
    assert back["text"].lower().endswith("sat on") and len(back["tokens"]) == 4

    for args, message in ((("--model", tmp_path / "nothing", "--prompt", "a", "--n-words", 2), "not a ulmfit_jax"),
                          (("--model", tmp_path / "lm", "--prompt", " ", "--n-words", 2), "empty"),
                          (("--model", tmp_path / "lm", "--prompt", "a", "--n-words", 0), "--n-words"),
                          (("--model", tmp_path / "lm", "--prompt", "a", "--n-words", 2, "--temperature", -1),
                           "temperature")):
        with pytest.raises(SystemExit, match=message):
            _script().main([str(a) for a in args])
