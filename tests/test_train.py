"""Training steps and loops: freezing, compile counts, resuming, several devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import checkpoint, models, optim, parallel, train
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config

LM_CONFIG = awd_lstm_lm_config(40, emb_size=8, n_hidden=12, n_layers=2)
CLAS_CONFIG = awd_lstm_clas_config(40, 3, emb_size=8, n_hidden=12, n_layers=2, bptt=6)


def documents(n, seed=0, low=5, high=20):
    """Runs of consecutive ids (mod 38, from 2): a language model can learn them."""
    rng = np.random.default_rng(seed)
    return [((rng.integers(0, 38) + np.arange(rng.integers(low, high))) % 38 + 2).astype(np.int32)
            for _ in range(n)]


def random_lm_batches(n, seed=0):
    """n (tokens, targets) pairs of int32[4, 5] over the 40-token vocabulary."""
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.integers(0, 40, (4, 5))), jnp.asarray(rng.integers(0, 40, (4, 5)))) for _ in range(n)]


def test_frozen_groups_stay_bit_identical_and_each_stage_compiles_once():
    params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
    labels = optim.layer_group_labels(params, "lm")
    config = optim.OptimizerConfig(learning_rate=1e-2)
    batches = random_lm_batches(3)
    initial = jax.tree.map(np.array, params)
    state = models.encoder.initial_state(LM_CONFIG.encoder, 4)
    for trainable in (optim.freeze(3), optim.freeze_to(-2, 3)):
        optimizer = optim.make_optimizer(config, params, "lm", 10, trainable)
        train_step = train.make_language_model_train_step(LM_CONFIG, optimizer, labels)
        opt_state = optimizer.init(optim.split_trainable(params, labels, trainable)[0])
        stage_start = jax.tree.map(np.array, params)
        for step, (tokens, targets) in enumerate(batches):
            params, opt_state, state, metrics = train_step(params, opt_state, state, tokens, targets,
                                                           jax.random.PRNGKey(step), trainable)
        assert train_step._cache_size() == 1
        flat_labels = jax.tree.leaves(labels)
        for label, before, after in zip(flat_labels, jax.tree.leaves(stage_start), jax.tree.leaves(params)):
            if label in trainable:
                assert not np.array_equal(before, after)
            else:
                np.testing.assert_array_equal(before, after)
    # the first rnn layer was frozen throughout
    np.testing.assert_array_equal(initial["encoder"]["rnn"][0]["w_hh"], params["encoder"]["rnn"][0]["w_hh"])


def _fit_lm(max_steps=None, checkpointer=None, mesh=None):
    params = models.init_language_model(jax.random.PRNGKey(1), LM_CONFIG)
    stages = [train.Stage(1, optim.OptimizerConfig(learning_rate=5e-2), optim.freeze(3)),
              train.Stage(2, optim.OptimizerConfig(learning_rate=3e-2))]
    return train.fit_language_model(params, LM_CONFIG, documents(16), documents(4, seed=1), stages, batch_size=4,
                                    bptt=5, seed=3, max_steps=max_steps, checkpointer=checkpointer, mesh=mesh)


def test_language_model_learns_and_a_stopped_run_resumes_exactly(tmp_path):
    params, history, throughput = _fit_lm()
    assert len(history) == 3 and history[-1]["valid_loss"] < history[0]["valid_loss"]
    assert throughput.tokens > 0 and throughput.compile_seconds > 0

    steps_per_epoch = history[0]["step"]
    stop_at = steps_per_epoch + 3                     # mid-epoch, in the second stage
    checkpointer = checkpoint.TrainingCheckpointer(tmp_path / "ckpt")
    _, partial, _ = _fit_lm(max_steps=stop_at, checkpointer=checkpointer)
    assert checkpointer.latest_step() == stop_at
    resumed, rest, _ = _fit_lm(checkpointer=checkpoint.TrainingCheckpointer(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, resumed, params)
    assert rest[-1]["valid_loss"] == history[-1]["valid_loss"]


def test_four_devices_give_the_losses_and_parameters_of_one():
    assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
    one, history_one, _ = _fit_lm(max_steps=8, mesh=parallel.data_mesh(jax.devices()[:1]))
    four, history_four, _ = _fit_lm(max_steps=8, mesh=parallel.data_mesh(jax.devices()[:4]))
    assert four["encoder"]["embed"].sharding.num_devices == 4
    np.testing.assert_allclose(history_four[-1]["train_loss"], history_one[-1]["train_loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5), four, one)


def test_classifier_learns_a_separable_task_with_gradual_unfreezing():
    # Equal lengths and many small batches: the pooled features of this toy task vary little
    # (variance ~1e-4), so batch norm's running variance needs ~100 steps to forget its initial 1.
    docs = documents(96, seed=2, low=5, high=6)
    labels = np.array([int(d[0]) % 3 for d in docs])           # the class is in the first token
    config = dataclasses.replace(awd_lstm_clas_config(40, 3, emb_size=8, n_hidden=12, n_layers=2, bptt=6,
                                                      drop_mult=0.0), head_ps=(0.0, 0.0))
    params, stats = models.init_classifier(jax.random.PRNGKey(0), config)
    stage = lambda epochs, lr, trainable: train.Stage(epochs, optim.OptimizerConfig(
        learning_rate=optim.Slice(lr / 2.6 ** 3, lr)), trainable)
    # 12 epochs: the task is learnt (accuracy 0.99-1.0 for 3 initialisations) with a margin, so the
    # test does not hang on one lucky trajectory (6 epochs ended anywhere in 0.45-0.6)
    stages = [stage(1, 3e-2, optim.freeze_to(-1, 4)), stage(1, 3e-2, optim.freeze_to(-2, 4)), stage(12, 3e-2, None)]
    initial_embed = np.array(params["encoder"]["embed"])
    params, stats, history, _ = train.fit_classifier(params, stats, config, docs, labels, docs, labels, stages,
                                                     batch_size=8, seed=0)
    assert [h["trainable"] for h in history[:3]] == [[3], [2, 3], [0, 1, 2, 3]]
    assert history[-1]["valid_accuracy"] > 0.9 and history[0]["valid_accuracy"] < 0.6
    assert not np.array_equal(initial_embed, params["encoder"]["embed"])


def test_steps_compiled_ahead_are_what_the_loops_call():
    """`compile_*_ahead` submits every stage and batch shape of the fits; the fits, started at once
    (their first steps wait for or take over the background compiles), compile nothing more: each
    train-step program is compiled exactly once."""
    compiles = []

    def listener(event, _seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and "train_step" in kwargs.get("fun_name", ""):
            compiles.append(kwargs["fun_name"])

    lm_documents, clas_documents = documents(16), documents(40, seed=4, low=2, high=14)
    clas_labels = np.arange(40) % 3
    adam = lambda lr: optim.OptimizerConfig(learning_rate=lr)
    lm_stages = [train.Stage(1, adam(1e-2), optim.freeze(3), quick_compile=True), train.Stage(1, adam(1e-3))]
    clas_stages = [train.Stage(1, adam(1e-2), optim.freeze_to(-1, 4), quick_compile=True),
                   train.Stage(1, adam(1e-3))]
    lm_params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
    clas_params, stats = models.init_classifier(jax.random.PRNGKey(1), CLAS_CONFIG)
    settings, _ = train._classifier_layout(CLAS_CONFIG, clas_documents, 8, False)
    assert len(settings.lengths) > 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with train.CompileAhead() as ahead:
            train.compile_language_model_ahead(ahead, jax.eval_shape(lambda: lm_params), LM_CONFIG,
                                               sum(map(len, lm_documents)), lm_stages, batch_size=4, bptt=5)
            train.compile_classifier_ahead(ahead, *jax.eval_shape(lambda: (clas_params, stats)), CLAS_CONFIG,
                                           clas_documents, clas_stages, batch_size=8)
            train.fit_language_model(lm_params, LM_CONFIG, lm_documents, None, lm_stages, batch_size=4, bptt=5,
                                     ahead=ahead)
            _, _, history, _ = train.fit_classifier(clas_params, stats, CLAS_CONFIG, clas_documents, clas_labels,
                                                    None, None, clas_stages, batch_size=8, ahead=ahead)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(history) == 2
    # LM: 2 stages, one shape; classifier: 2 stages x its bucket lengths; nothing twice
    assert len(compiles) == 2 + 2 * len(settings.lengths)


def test_a_quick_compiled_step_carries_its_options_and_trains_alike(monkeypatch):
    """`quick_compile` reaches the step's `jax.jit` as XLA options (on CPU) and changes no result
    beyond floating-point reassociation: three steps give the losses and parameters of the full compile."""
    batches = random_lm_batches(3)
    trainable = optim.freeze(3)
    real_jit, options_seen = jax.jit, []

    def recording_jit(*args, **kwargs):
        options_seen.append(kwargs.get("compiler_options"))
        return real_jit(*args, **kwargs)

    results = {}
    for quick in (False, True):
        params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
        with monkeypatch.context() as patch:
            patch.setattr(jax, "jit", recording_jit)
            optimizer, train_step = train.stage_step("lm", LM_CONFIG, optim.OptimizerConfig(learning_rate=1e-2),
                                                     jax.tree.structure(params), 10, trainable, quick_compile=quick)
        quick_on_this_backend = quick and jax.default_backend() == "cpu"
        assert options_seen[-1] == (dict(train.QUICK_COMPILE_CPU_OPTIONS) if quick_on_this_backend else None)
        labels = optim.layer_group_labels(params, "lm")
        opt_state = optimizer.init(optim.split_trainable(params, labels, trainable)[0])
        state = models.encoder.initial_state(LM_CONFIG.encoder, 4)
        step_losses = []
        for step, (tokens, targets) in enumerate(batches):
            params, opt_state, state, metrics = train_step(params, opt_state, state, tokens, targets,
                                                           jax.random.PRNGKey(step), trainable)
            step_losses.append(float(metrics["loss"]))
        results[quick] = step_losses, params
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    for quick_leaf, full_leaf in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1])):
        np.testing.assert_allclose(quick_leaf, full_leaf, rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_the_step_named(tmp_path):
    params = models.init_language_model(jax.random.PRNGKey(1), LM_CONFIG)
    params["decoder"]["bias"] = params["decoder"]["bias"].at[3].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train.fit_language_model(params, LM_CONFIG, documents(30), None,
                                 [train.Stage(1, optim.OptimizerConfig())], batch_size=4, bptt=5,
                                 checkpointer=checkpoint.TrainingCheckpointer(tmp_path / "c"))


def test_a_training_set_too_small_for_one_batch_is_a_clear_error():
    stages = [train.Stage(1, optim.OptimizerConfig())]
    params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
    with pytest.raises(ValueError, match="the training set has 0 tokens: too few for one batch of 4 x 5"):
        train.fit_language_model(params, LM_CONFIG, [], None, stages, batch_size=4, bptt=5)
    params, stats = models.init_classifier(jax.random.PRNGKey(0), CLAS_CONFIG)
    with pytest.raises(ValueError, match="the training set has 3 documents: fewer than one batch of 8"):
        train.fit_classifier(params, stats, CLAS_CONFIG, documents(3), np.zeros(3, int), None, None, stages,
                             batch_size=8)


def test_macro_f1_by_hand():
    predictions, targets = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert train.macro_f1(predictions, targets, 3) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
