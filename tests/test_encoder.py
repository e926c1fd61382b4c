"""Encoder behaviour beyond the golden tests: train-mode dropout, bad ids, BPT3C gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import encoder
from ulmfit_jax.config import EncoderConfig

CONFIG = EncoderConfig(vocab_size=30, emb_size=6, n_hidden=8, n_layers=2, hidden_p=0.0, input_p=0.0,
                       embed_p=0.0, weight_p=0.0)


def test_embedding_dropout_drops_whole_words(key):
    embed = jax.random.normal(key, (30, 6))
    tokens = jnp.array([[3, 4, 3, 3, 5, 4, 3]])
    p = 0.5
    vectors = np.asarray(encoder.embed_tokens(embed, tokens, pad_token=1, embed_p=p, key=jax.random.PRNGKey(2)))
    for token in (3, 4, 5):
        rows = vectors[0][np.asarray(tokens[0]) == token]
        np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
        scale = rows[0] / np.asarray(embed[token])
        assert np.allclose(scale, 0.0) or np.allclose(scale, 1 / (1 - p), rtol=1e-6)


def test_padding_row_gets_no_gradient_from_the_lookup(key):
    embed = jax.random.normal(key, (30, 6))
    tokens = jnp.array([[1, 2, 1, 3]])
    gradient = jax.grad(lambda e: jnp.sum(encoder.embed_tokens(e, tokens, pad_token=1, embed_p=0.0, key=None)))(embed)
    assert np.all(np.asarray(gradient[1]) == 0) and np.all(np.asarray(gradient[2]) == 1)


def test_ids_outside_the_vocabulary_are_refused_not_clamped(key):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30\): \[30, 99\]"):
        encoder.check_token_ids(np.array([[0, 30, 99]]), 30)
    params = encoder.init_encoder(key, CONFIG)
    outputs, _ = encoder.encoder_apply(params, jnp.array([[2, 30]]), encoder.initial_state(CONFIG, 1), config=CONFIG)
    assert np.isnan(np.asarray(outputs)[0, 1]).all()      # never a silently clamped row


def test_weight_drop_in_train_mode_leaves_raw_weight_with_gradients(key):
    config = EncoderConfig(vocab_size=30, emb_size=6, n_hidden=8, n_layers=2, hidden_p=0.0, input_p=0.0,
                           embed_p=0.0, weight_p=0.5)
    params = encoder.init_encoder(key, config)
    before = jax.tree.map(np.array, params)
    tokens = jnp.array([[2, 3, 4, 5]])

    def loss(params, dropout_key):
        outputs, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(config, 1), config=config,
                                           train=True, key=dropout_key)
        return jnp.sum(outputs ** 2)

    gradients = jax.grad(loss)(params, jax.random.PRNGKey(5))
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert all(np.abs(np.asarray(layer["w_hh"])).sum() > 0 for layer in gradients["rnn"])
    # a different key draws a different mask; the same key the same one
    assert loss(params, jax.random.PRNGKey(5)) == loss(params, jax.random.PRNGKey(5))
    assert loss(params, jax.random.PRNGKey(5)) != loss(params, jax.random.PRNGKey(6))
    # eval mode ignores weight_p: equal to a model with weight_p 0
    evaluated, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(config, 1), config=config)
    reference, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(CONFIG, 1), config=CONFIG)
    np.testing.assert_array_equal(evaluated, reference)


def test_train_mode_needs_a_key(key):
    params = encoder.init_encoder(key, CONFIG)
    with pytest.raises(ValueError, match="PRNG key"):
        encoder.encoder_apply(params, jnp.array([[2]]), encoder.initial_state(CONFIG, 1), config=CONFIG, train=True)


def test_bpt3c_carries_state_but_no_gradient_into_windows_before_max_len(key):
    params = encoder.init_encoder(key, CONFIG)
    bptt, max_len = 3, 6
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12, 13]])    # windows [5 6 7] (dropped), [8 9 10], [11 12 13]

    def pooled(params, tokens):
        outputs, is_pad = encoder.sentence_encoder(params, tokens, config=CONFIG, bptt=bptt, max_len=max_len)
        assert outputs.shape == (1, 6, 6) and not bool(is_pad.any())
        return jnp.sum(outputs)

    gradient = jax.grad(pooled)(params, tokens)["embed"]
    assert np.all(np.asarray(gradient[5:8]) == 0)              # the dropped window: no gradient
    assert np.all(np.abs(np.asarray(gradient[8:14])).sum(axis=1) > 0)
    changed = tokens.at[0, 0].set(20)                          # but its state reaches the kept windows
    assert float(pooled(params, changed)) != float(pooled(params, tokens))
