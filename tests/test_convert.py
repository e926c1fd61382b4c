"""Golden tests: fastai 2.8.12 in PyTorch and ulmfit_jax with the same (converted) weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastai_reference import (encoder_kwargs, fastai_classifier, fastai_language_model, gradient_dict,
                              pad_input_chunk, state_dict_numpy, torch)
from ulmfit_jax import convert, encoder, losses, models
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config

LM_CONFIGS = [
    dict(vocab_size=37, emb_size=7, n_hidden=11, n_layers=1),
    dict(vocab_size=50, emb_size=8, n_hidden=10, n_layers=2, bidirectional=True),
    dict(vocab_size=41, emb_size=9, n_hidden=13, n_layers=3, tie_weights=False),
    dict(vocab_size=64, emb_size=6, n_hidden=14, n_layers=4, bidirectional=True),
]


def _lm_config(spec, drop_mult=1.0):
    spec = dict(spec)
    return awd_lstm_lm_config(spec.pop("vocab_size"), drop_mult=drop_mult, **spec)


@pytest.mark.parametrize("spec", LM_CONFIGS, ids=lambda s: f"L{s['n_layers']}-bidir{s.get('bidirectional', False)}")
def test_language_model_logits_equal_fastai_over_windows(spec):
    config = _lm_config(spec)
    reference = fastai_language_model(config, seed=spec["n_layers"]).eval()
    imported_config, params = convert.import_language_model(state_dict_numpy(reference))
    assert imported_config.encoder.layer_sizes == config.encoder.layer_sizes
    assert imported_config.tie_weights == config.tie_weights

    rng = np.random.default_rng(spec["n_layers"])
    batch, bptt, n_windows = 3, 6, 3
    stream = rng.integers(0, config.encoder.vocab_size, size=(batch, bptt * n_windows))
    apply = jax.jit(lambda p, x, s: models.language_model_apply(p, x, s, config=imported_config)[:2])
    state = encoder.initial_state(imported_config.encoder, batch)
    reference.reset()
    for window in range(n_windows):
        tokens = stream[:, window * bptt:(window + 1) * bptt]
        with torch.no_grad():
            expected = reference(torch.tensor(tokens))[0].numpy()
        logits, state = apply(params, jnp.asarray(tokens), state)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", LM_CONFIGS[:3], ids=lambda s: f"L{s['n_layers']}")
def test_language_model_gradients_equal_torch_autograd(spec):
    config = _lm_config(spec, drop_mult=0.0)
    reference = fastai_language_model(config, seed=7).train()
    _, params = convert.import_language_model(state_dict_numpy(reference), config)
    rng = np.random.default_rng(0)
    batch, bptt = 2, 5
    tokens = rng.integers(0, config.encoder.vocab_size, size=(batch, 2 * bptt + 1))
    alpha, beta = 2.0, 1.0

    # Two windows: the second starts from the (detached) state of the first, as in fastai's LM.
    reference.reset()
    reference(torch.tensor(tokens[:, :bptt]))
    logits, raw, dropped = reference(torch.tensor(tokens[:, bptt:2 * bptt]))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.tensor(tokens[:, bptt + 1:]).reshape(-1))
    loss = loss + alpha * dropped.pow(2).mean() + beta * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    loss.backward()
    _, expected = convert.import_language_model(gradient_dict(reference), config)

    def loss_fn(params):
        state = encoder.initial_state(config.encoder, batch)
        _, state, _ = models.language_model_apply(params, jnp.asarray(tokens[:, :bptt]), state, config=config)
        state = jax.lax.stop_gradient(state)
        logits, _, (raw, dropped) = models.language_model_apply(params, jnp.asarray(tokens[:, bptt:2 * bptt]),
                                                                state, config=config)
        return (losses.cross_entropy(logits, jnp.asarray(tokens[:, bptt + 1:]))
                + losses.activation_regularization(dropped, alpha)
                + losses.temporal_activation_regularization(raw, beta))

    value, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(value) - loss.item()) < 1e-5
    chex_close = jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, atol=1e-4, rtol=0),
                              grads, expected)
    assert len(jax.tree.leaves(chex_close, is_leaf=lambda x: x is None)) == len(jax.tree.leaves(grads))


CLASSIFIER_CONFIGS = [
    dict(vocab_size=40, emb_size=7, n_hidden=9, n_layers=2, n_classes=3, bptt=5, max_len=15),
    dict(vocab_size=33, emb_size=8, n_hidden=12, n_layers=3, n_classes=4, bptt=4, max_len=None, bidirectional=True),
    dict(vocab_size=29, emb_size=5, n_hidden=11, n_layers=1, n_classes=2, bptt=6, max_len=12, hidden_sizes=(7, 6)),
]


def _classifier_config(spec, drop_mult=1.0):
    spec = dict(spec)
    return awd_lstm_clas_config(spec.pop("vocab_size"), spec.pop("n_classes"), drop_mult=drop_mult, **spec)


def _padded_batch(config, lengths, seed):
    rng = np.random.default_rng(seed)
    # ids 2.. so that no padding id sits inside a document
    docs = [rng.integers(2, config.encoder.vocab_size, size=n) for n in sorted(lengths, reverse=True)]
    return pad_input_chunk(docs, config.encoder.pad_token, config.bptt)


@pytest.mark.parametrize("spec", CLASSIFIER_CONFIGS, ids=lambda s: f"L{s['n_layers']}-maxlen{s['max_len']}")
def test_classifier_logits_equal_fastai_on_padded_batches(spec):
    config = _classifier_config(spec)
    reference = fastai_classifier(config, seed=3).eval()
    rng = np.random.default_rng(1)
    for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.copy_(torch.tensor(rng.normal(size=bn.num_features), dtype=torch.float32))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, size=bn.num_features), dtype=torch.float32))
    imported_config, params, stats = convert.import_classifier(state_dict_numpy(reference))
    imported_config = dataclasses.replace(imported_config, bptt=config.bptt, max_len=config.max_len)
    # Lengths chosen to hit fastai's corner cases: whole windows of front padding, remainders at the
    # end, a row whose last window is all padding, documents longer than max_len.
    for seed, lengths in enumerate([[23, 17, 9, 4, 1], [12, 12, 10, 6, 5], [7, 3, 2]]):
        tokens = _padded_batch(config, lengths, seed)
        with torch.no_grad():
            expected = reference(torch.tensor(tokens))[0].numpy()
        logits, _, _ = models.classifier_apply(params, stats, jnp.asarray(tokens), config=imported_config)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_classifier_gradients_equal_torch_autograd():
    spec = dict(CLASSIFIER_CONFIGS[0])
    config = _classifier_config(spec, drop_mult=0.0)
    config = dataclasses.replace(config, head_ps=(0.0, 0.0))
    reference = fastai_classifier(config, seed=5).train()
    tokens = _padded_batch(config, [19, 14, 8, 3], seed=4)
    labels = np.array([0, 2, 1, 2])
    logits = reference(torch.tensor(tokens))[0]
    torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).backward()
    # running statistics after one train step come back through gradient_dict
    _, expected, expected_stats = convert.import_classifier(gradient_dict(reference), config)
    _, params, stats = convert.import_classifier(
        {k: v for k, v in state_dict_numpy(fastai_classifier(config, seed=5)).items()}, config)

    def loss_fn(params):
        logits, new_stats, _ = models.classifier_apply(params, stats, jnp.asarray(tokens), config=config,
                                                       train=True, key=jax.random.PRNGKey(0))
        return losses.cross_entropy(logits, jnp.asarray(labels)), new_stats

    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Batch norm over 4 rows makes some gradients large (|g| ~ 6): 1e-4 absolute plus float32's
    # relative rounding on those.
    jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, atol=1e-4, rtol=1e-5), grads, expected)
    jax.tree.map(lambda s, e: np.testing.assert_allclose(np.asarray(s), e, atol=1e-5, rtol=1e-5),
                 new_stats, expected_stats)


def test_export_then_fastai_gives_the_same_logits(tmp_path):
    config = _lm_config(LM_CONFIGS[1])
    source = fastai_language_model(config, seed=11).eval()
    _, params = convert.import_language_model(state_dict_numpy(source))
    convert.write_state_dict(convert.export_language_model(params, config), tmp_path / "lm.pth")
    target = fastai_language_model(config, seed=99).eval()
    target.load_state_dict(torch.load(tmp_path / "lm.pth", weights_only=True), strict=True)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, config.encoder.vocab_size, size=(2, 9)))
    source.reset(), target.reset()
    with torch.no_grad():
        np.testing.assert_array_equal(target(tokens)[0].numpy(), source(tokens)[0].numpy())

    clas_config = _classifier_config(CLASSIFIER_CONFIGS[0])
    source = fastai_classifier(clas_config, seed=12).eval()
    _, params, stats = convert.import_classifier(state_dict_numpy(source))
    target = fastai_classifier(clas_config, seed=98).eval()
    exported = convert.export_classifier(params, stats, clas_config)
    target.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in exported.items()}, strict=True)
    tokens = torch.tensor(_padded_batch(clas_config, [11, 4], seed=2))
    with torch.no_grad():
        np.testing.assert_array_equal(target(tokens)[0].numpy(), source(tokens)[0].numpy())


@pytest.mark.parametrize("spec", LM_CONFIGS, ids=lambda s: f"L{s['n_layers']}-bidir{s.get('bidirectional', False)}")
def test_exported_keys_are_in_fastais_order(spec):
    """fastai's `load_pretrained` matches tensors by position: the export must list them as fastai does."""
    config = _lm_config(spec)
    reference = fastai_language_model(config)
    _, params = convert.import_language_model(state_dict_numpy(reference))
    assert list(convert.export_language_model(params, config)) == list(reference.state_dict())
    clas_spec = {k: v for k, v in spec.items() if k != "tie_weights"}
    clas_config = _classifier_config(dict(clas_spec, n_classes=3, bptt=5, max_len=10, hidden_sizes=(6,)))
    reference = fastai_classifier(clas_config)
    _, params, stats = convert.import_classifier(state_dict_numpy(reference))
    assert list(convert.export_classifier(params, stats, clas_config)) == list(reference.state_dict())


# emb 10 != n_hid 14: a wrong order is a size mismatch; emb == n_hid == 12: every LSTM matrix has
# the same shape and a wrong order would load the wrong tensors without a word.
@pytest.mark.parametrize("sizes", [dict(emb_size=10, n_hidden=14), dict(emb_size=12, n_hidden=12)],
                         ids=lambda s: f"emb{s['emb_size']}-hid{s['n_hidden']}")
def test_exported_lm_loads_through_fastais_load_pretrained(tmp_path, sizes):
    """Our LM -> convert_fastai's export -> fastai's own `language_model_learner` +
    `Learner.load_pretrained` onto another vocabulary: fastai's weights and logits equal ours after
    our `match_embeddings`."""
    from fastai.data.core import DataLoaders
    from fastai.text.data import LMDataLoader
    from fastai.text.learner import language_model_learner
    from fastai.text.models.awdlstm import AWD_LSTM

    old_vocab = ["xxunk", "xxpad"] + [f"w{i}" for i in range(28)]
    new_vocab = ["xxunk", "xxpad", "w5", "new0", "w1", "w29", "new1"] + [f"w{i}" for i in range(10, 25)]
    config = awd_lstm_lm_config(len(old_vocab), n_layers=2, **sizes)
    params = jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(3), config))
    params["decoder"]["bias"] = np.random.default_rng(0).normal(size=len(old_vocab)).astype(np.float32)
    convert.write_state_dict(convert.export_language_model(params, config), tmp_path / "lm.pth")
    convert.write_vocab_pickle(old_vocab, tmp_path / "lm.pkl")

    ids = [torch.tensor(np.random.default_rng(1).integers(2, len(new_vocab), size=40))]
    dls = DataLoaders(LMDataLoader(ids, bs=2, seq_len=5), LMDataLoader(ids, bs=2, seq_len=5), path=tmp_path)
    dls.vocab = new_vocab
    fastai_config = dict(encoder_kwargs(config.encoder), output_p=config.output_p,
                         tie_weights=config.tie_weights, out_bias=config.out_bias)
    torch.manual_seed(0)
    learn = language_model_learner(dls, AWD_LSTM, config=fastai_config, pretrained=False)
    learn.load_pretrained(tmp_path / "lm.pth", tmp_path / "lm.pkl")

    moved = convert.match_embeddings(params, old_vocab, new_vocab)
    new_config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, vocab_size=len(new_vocab)))
    _, loaded = convert.import_language_model(state_dict_numpy(learn.model), new_config)
    # equal but for the mean rows of unknown tokens (torch's mean and numpy's round differently)
    jax.tree.map(lambda ours, theirs: np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-7), moved, loaded)

    tokens = np.random.default_rng(2).integers(0, len(new_vocab), size=(3, 8))
    model = learn.model.eval()
    model.reset()
    with torch.no_grad():
        expected = model(torch.tensor(tokens))[0].numpy()
    logits, _, _ = models.language_model_apply(moved, jnp.asarray(tokens),
                                               encoder.initial_state(new_config.encoder, 3), config=new_config)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def _as_v1(state_dict):
    """fastai v1's WeightDropout also keeps the dropped copy, `module.weight_hh_l0`, in the state dict."""
    out = dict(state_dict)
    for key in list(state_dict):
        if key.endswith("weight_hh_l0_raw"):
            out[key.replace("weight_hh_l0_raw", "module.weight_hh_l0")] = state_dict[key]
    return out


def _as_fastai_07(state_dict):
    """fastai 0.7's RNN_Encoder keys; its decoder has no bias."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("encoder_dp.emb", "encoder_with_dropout.embed")
        key = key.replace(".weight_hh_l0_raw", ".module.weight_hh_l0_raw")
        if key != "1.decoder.bias":
            renamed[key] = value
    return renamed


def test_fastai_v1_and_07_state_dicts_import_to_the_same_model():
    config = _lm_config(LM_CONFIGS[2])
    state_dict = state_dict_numpy(fastai_language_model(config, seed=1))
    assert convert.detect_format(state_dict) == ("v2", "language_model")
    _, v2 = convert.import_language_model(state_dict)
    v1_config, v1 = convert.import_language_model(_as_v1(state_dict))
    assert convert.detect_format(_as_v1(state_dict))[0] == "v1"
    jax.tree.map(np.testing.assert_array_equal, v1, v2)
    old_config, old = convert.import_language_model(_as_fastai_07(state_dict))
    assert convert.detect_format(_as_fastai_07(state_dict))[0] == "0.7"
    assert not old_config.out_bias and "bias" not in old["decoder"]
    jax.tree.map(np.testing.assert_array_equal, old["encoder"], v2["encoder"])


def test_mismatched_shapes_and_keys_are_named():
    config = _lm_config(dict(vocab_size=30, emb_size=8, n_hidden=12, n_layers=2))
    state_dict = state_dict_numpy(fastai_language_model(config))
    other = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, n_hidden=14))
    with pytest.raises(convert.WeightsError, match=r"'0\.rnns\.0\.module\.weight_ih_l0' has shape \(48, 8\), "
                                                   r"the model needs \(56, 8\)"):
        convert.import_language_model(state_dict, other)
    with pytest.raises(convert.WeightsError, match=r"unknown keys: \['0\.rnns\.0\.extra'\]"):
        convert.import_language_model(dict(state_dict, **{"0.rnns.0.extra": np.zeros(1)}), config)
    missing = {k: v for k, v in state_dict.items() if k != "0.rnns.1.module.bias_hh_l0"}
    with pytest.raises(convert.WeightsError, match=r"missing keys: \['0\.rnns\.1\.module\.bias_hh_l0'\]"):
        convert.import_language_model(missing, config)
    with pytest.raises(convert.WeightsError, match="not a fastai AWD-LSTM state dict"):
        convert.import_language_model({"weight": np.zeros(3)})


def test_match_embeddings_as_fastai():
    from fastai.text.learner import match_embeds
    config = _lm_config(dict(vocab_size=6, emb_size=4, n_hidden=5, n_layers=1))
    state_dict = state_dict_numpy(fastai_language_model(config))
    old_vocab, new_vocab = ["xxunk", "xxpad", "a", "b", "c", "d"], ["xxunk", "xxpad", "c", "zz", "a", "yy", "b"]
    expected = match_embeds({k: torch.from_numpy(v) for k, v in state_dict.items()}, old_vocab, new_vocab)
    _, params = convert.import_language_model(state_dict)
    moved = convert.match_embeddings(params, old_vocab, new_vocab)
    np.testing.assert_allclose(moved["encoder"]["embed"], expected["0.encoder.weight"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(moved["decoder"]["bias"], expected["1.decoder.bias"].numpy(), rtol=1e-6)
