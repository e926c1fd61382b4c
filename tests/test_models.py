"""Model composition: mixed precision tracks float32; the LM's hidden and full forward agree; a
classifier starts from a given encoder."""

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import encoder, losses, models
from ulmfit_jax.config import ClassifierConfig, EncoderConfig, awd_lstm_lm_config


def test_bfloat16_matmuls_track_float32_and_keep_float32_state(key):
    """`compute_dtype=bfloat16` rounds the inputs of the input projections and the decoder to bf16
    (8 bits of mantissa); accumulation, cell state, outputs and the loss stay float32. Stated
    tolerance: loss within 1% relative, logits within 0.05 absolute (they are O(1))."""
    config = awd_lstm_lm_config(60, emb_size=16, n_hidden=32, n_layers=2)
    params = models.init_language_model(key, config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 60)
    targets = jnp.roll(tokens, -1, axis=1)
    state = encoder.initial_state(config.encoder, 4)
    full, full_state, _ = models.language_model_apply(params, tokens, state, config=config)
    mixed, mixed_state, _ = models.language_model_apply(params, tokens, state, config=config,
                                                        compute_dtype=jnp.bfloat16)
    assert mixed.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mixed_state))
    assert float(jnp.max(jnp.abs(mixed - full))) < 0.05
    assert not np.array_equal(np.asarray(mixed), np.asarray(full))          # bf16 was really used
    full_loss, mixed_loss = losses.cross_entropy(full, targets), losses.cross_entropy(mixed, targets)
    assert abs(float(mixed_loss) - float(full_loss)) < 0.01 * float(full_loss)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.05), mixed_state, full_state)


def test_language_model_hidden_returns_what_language_model_apply_returns_but_the_logits(key):
    """(dropped, new state, (raw, dropped)) in `language_model_apply`'s order (logits, new state,
    (raw, dropped)), in train mode with its dropout keys as well."""
    from ulmfit_jax import heads
    config = awd_lstm_lm_config(50, emb_size=8, n_hidden=12, n_layers=2)
    params = models.init_language_model(key, config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 50)
    state = encoder.initial_state(config.encoder, 3)
    dropped, new_state, (raw, dropped_again) = models.language_model_hidden(
        params, tokens, state, config=config, train=True, key=jax.random.PRNGKey(2))
    logits, apply_state, (apply_raw, apply_dropped) = models.language_model_apply(
        params, tokens, state, config=config, train=True, key=jax.random.PRNGKey(2))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, new_state, apply_state)
    np.testing.assert_array_equal(raw, apply_raw)
    np.testing.assert_array_equal(dropped, dropped_again)
    np.testing.assert_array_equal(dropped, apply_dropped)
    assert not np.array_equal(raw, dropped)                                  # output dropout was applied
    np.testing.assert_allclose(heads.lm_logits(params, dropped, config), logits, rtol=1e-6)


def test_init_classifier_from_an_encoder_keeps_it_and_draws_the_same_head():
    config = ClassifierConfig(encoder=EncoderConfig(vocab_size=30, emb_size=8, n_hidden=12, n_layers=2), n_classes=3)
    params, stats = models.init_classifier(jax.random.PRNGKey(0), config)
    fine_tuned = models.init_classifier(jax.random.PRNGKey(1), config)[0]["encoder"]
    started, started_stats = models.init_classifier(jax.random.PRNGKey(0), config, fine_tuned)
    jax.tree.map(np.testing.assert_array_equal, started["encoder"], fine_tuned)
    jax.tree.map(np.testing.assert_array_equal, (started["head"], started_stats), (params["head"], stats))
    assert not np.array_equal(started["encoder"]["embed"], params["encoder"]["embed"])
