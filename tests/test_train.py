"""Training steps and loops: freezing, compile counts, reading losses, resuming, several devices."""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import checkpoint, metrics, models, optim, parallel, predict, steps, train
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
from ulmfit_jax.text.batches import padded_length

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


def count_compiles(name="train_step"):
    """A context manager listing the backend compiles of functions whose name contains `name`."""
    import contextlib

    @contextlib.contextmanager
    def counting():
        compiles = []

        def listener(event, _seconds, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration" and name in kwargs.get("fun_name", ""):
                compiles.append(kwargs["fun_name"])
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield compiles
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    return counting()


def test_one_program_serves_every_stage_and_frozen_groups_stay_bit_identical():
    params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
    labels = optim.layer_group_labels(params, "lm")
    config = optim.OptimizerConfig(learning_rate=1e-2)
    optimizer = optim.stage_optimizer(config, params, "lm")
    train_step = steps.make_train_step("lm", LM_CONFIG, optimizer, params)
    initial = jax.tree.map(np.array, params)
    state = steps.init_state(params, None, models.encoder.initial_state(LM_CONFIG.encoder, 4))
    with count_compiles() as compiles:
        for trainable in (optim.freeze(3), optim.freeze_to(-2, 3)):
            state = state.replace(opt_state=optimizer.init(state.params, optim.stage_hyper(config, 3, 3, trainable)))
            stage_start = jax.tree.map(np.array, state.params)
            for tokens, targets in random_lm_batches(3):
                state, _ = train_step(state, {"inputs": tokens, "targets": targets})
            for label, before, after in zip(jax.tree.leaves(labels), jax.tree.leaves(stage_start),
                                            jax.tree.leaves(state.params)):
                if label in trainable:
                    assert not np.array_equal(before, after)
                else:
                    np.testing.assert_array_equal(before, after)
    assert len(compiles) == 1 and int(state.step) == 6
    # the first rnn layer was frozen throughout
    np.testing.assert_array_equal(initial["encoder"]["rnn"][0]["w_hh"], state.params["encoder"]["rnn"][0]["w_hh"])


def _fit_lm(max_steps=None, checkpointer=None, mesh=None, **options):
    params = models.init_language_model(jax.random.PRNGKey(1), LM_CONFIG)
    stages = [train.Stage(1, optim.OptimizerConfig(learning_rate=5e-2), optim.freeze(3)),
              train.Stage(2, optim.OptimizerConfig(learning_rate=3e-2))]
    return train.fit_language_model(params, LM_CONFIG, documents(16), documents(4, seed=1), stages, batch_size=4,
                                    bptt=5, seed=3, max_steps=max_steps, checkpointer=checkpointer, mesh=mesh,
                                    **options)


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


def test_forced_devices_run_independent_collectives_without_deadlock():
    """The tests' 4 CPU devices on this machine's few cores: a program whose devices have several
    all-gathers in flight at once aborts after XLA's 40 s rendezvous timeout unless the thread pool
    is wide enough (conftest's PJRT_NPROC; the scripts the tests run inherit the environment)."""
    program = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, PartitionSpec as P
        mesh = Mesh(jax.devices(), ("d",))

        def body(carry, _):
            gathered = [jax.lax.all_gather(jnp.tanh(carry * (k + 1)), "d", tiled=True)[:carry.shape[0]] for k in range(4)]
            return carry + 1e-3 * sum(gathered), None

        step = jax.jit(jax.shard_map(lambda x: jax.lax.scan(body, x, None, length=200)[0],
                                     mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        x = jnp.ones((4 * 64, 32))
        for _ in range(100):
            x = step(x)
        print(jax.device_count(), bool(jnp.isfinite(x).all()))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.split() == ["4", "True"]


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


def test_each_program_compiles_once_for_the_whole_run():
    """Two stages of each model: one train step for each batch shape (not one per stage and shape),
    compiled ahead of use, and one classifier forward pass per validation shape; a prediction
    afterwards through the fit's layout (what train_classifier.py does with its test set) compiles
    nothing more."""
    lm_documents, clas_documents = documents(16), documents(40, seed=4, low=2, high=14)
    test_documents = documents(12, seed=5, low=2, high=18)          # some longer than every training one
    clas_labels = np.arange(40) % 3
    adam = lambda lr: optim.OptimizerConfig(learning_rate=lr)
    lm_stages = [train.Stage(1, adam(1e-2), optim.freeze(3)), train.Stage(1, adam(1e-3))]
    clas_stages = [train.Stage(1, adam(1e-2), optim.freeze_to(-1, 4)), train.Stage(1, adam(1e-3))]
    lm_params = models.init_language_model(jax.random.PRNGKey(0), LM_CONFIG)
    clas_params, stats = models.init_classifier(jax.random.PRNGKey(1), CLAS_CONFIG)
    layout, _ = train.classifier_layout(CLAS_CONFIG, clas_documents, 8, epochs=2, valid_documents=clas_documents,
                                        predict_documents=test_documents)
    assert len(layout.lengths) > 1
    shapes = lambda docs: {padded_length(len(d), layout) for d in docs}
    with count_compiles() as compiles, count_compiles("predict") as predicts:
        train.fit_language_model(lm_params, LM_CONFIG, lm_documents, None, lm_stages, batch_size=4, bptt=5)
        params, stats, history, _ = train.fit_classifier(
            clas_params, stats, CLAS_CONFIG, clas_documents, clas_labels, clas_documents, clas_labels, clas_stages,
            batch_size=8, predict_documents=test_documents, layout=layout)
    assert len(history) == 2
    assert len(compiles) == 1 + len(layout.lengths), compiles
    assert len(predicts) == len(shapes(clas_documents) | shapes(test_documents)), predicts
    with count_compiles("predict") as after:
        predict.predict_classifier(predict.classifier_predictor(CLAS_CONFIG), *parallel.local_copy((params, stats)),
                                   test_documents, layout)
    assert after == []
    with pytest.raises(ValueError, match="batch size and direction"):
        train.fit_classifier(clas_params, stats, CLAS_CONFIG, clas_documents, clas_labels, None, None, clas_stages,
                             batch_size=4, layout=layout)


def test_a_program_per_stage_trains_alike():
    """`share_compiles=False` differentiates only each stage's groups: a program per stage, the same
    training up to floating-point reassociation."""
    results = {}
    for share in (True, False):
        with count_compiles() as compiles:
            params, history, _ = _fit_lm(max_steps=None, share_compiles=share)
        results[share] = params, [h["train_loss"] for h in history], len(compiles)
    assert results[True][2] == 1 and results[False][2] == 2
    np.testing.assert_allclose(results[False][1], results[True][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), results[False][0],
                 results[True][0])


def test_losses_are_read_every_log_every_steps(monkeypatch):
    reads = []
    original = metrics.LossBuffer.read

    def counting_read(self):
        values = original(self)
        reads.append(len(values))
        return values
    monkeypatch.setattr(metrics.LossBuffer, "read", counting_read)
    _, history, _ = _fit_lm(log_every=4)
    steps_per_epoch = history[0]["step"]
    assert sum(reads) == 3 * steps_per_epoch and max(reads) == 4
    assert len([r for r in reads if r]) == 3 * -(-steps_per_epoch // 4)


def test_a_run_stopped_at_a_stage_boundary_resumes_exactly(tmp_path):
    """The checkpoint that ends gradual unfreezing's first stage holds that stage's optimizer state; the
    rerun starts the next stage from it and ends where the uninterrupted run ends."""
    docs = documents(48, seed=2, low=3, high=12)
    labels = np.array([int(d[0]) % 3 for d in docs])
    params, stats = models.init_classifier(jax.random.PRNGKey(0), CLAS_CONFIG)
    stages = [train.Stage(1, optim.OptimizerConfig(learning_rate=optim.Slice(1e-3, 1e-2)), optim.freeze_to(-1, 4)),
              train.Stage(1, optim.OptimizerConfig(learning_rate=optim.Slice(1e-4, 1e-3)), optim.freeze_to(-2, 4)),
              train.Stage(1, optim.OptimizerConfig(learning_rate=optim.Slice(1e-4, 1e-3)))]
    fit = lambda **kw: train.fit_classifier(params, stats, CLAS_CONFIG, docs, labels, None, None, stages,
                                            batch_size=8, seed=1, **kw)
    whole, whole_stats, whole_history, _ = fit()
    steps_per_epoch = whole_history[0]["step"]
    for stop in (steps_per_epoch, steps_per_epoch + 1):            # at the boundary, and one step into stage 2
        directory = tmp_path / f"stop{stop}"
        fit(max_steps=stop, checkpointer=checkpoint.TrainingCheckpointer(directory))
        resumed, resumed_stats, history, _ = fit(checkpointer=checkpoint.TrainingCheckpointer(directory))
        assert history[-1]["step"] == whole_history[-1]["step"]
        jax.tree.map(np.testing.assert_array_equal, (resumed, resumed_stats), (whole, whole_stats))


def test_nan_loss_stops_with_the_step_named(tmp_path):
    params = models.init_language_model(jax.random.PRNGKey(1), LM_CONFIG)
    params["decoder"]["bias"] = params["decoder"]["bias"].at[3].set(jnp.nan)
    checkpointer = checkpoint.TrainingCheckpointer(tmp_path / "c")
    with pytest.raises(FloatingPointError, match="the loss is nan at step 0"):
        train.fit_language_model(params, LM_CONFIG, documents(30), None,
                                 [train.Stage(1, optim.OptimizerConfig())], batch_size=4, bptt=5,
                                 checkpointer=checkpointer)
    assert checkpointer.latest_step() is None           # nothing saved from non-finite state


def test_parameters_that_turn_non_finite_are_never_checkpointed(tmp_path):
    """An infinite learning rate: the first step's loss is finite, the parameters after it are not."""
    params = models.init_language_model(jax.random.PRNGKey(1), LM_CONFIG)
    checkpointer = checkpoint.TrainingCheckpointer(tmp_path / "c")
    with pytest.raises(FloatingPointError, match="the parameters are not finite after step 1"):
        train.fit_language_model(params, LM_CONFIG, documents(30), None,
                                 [train.Stage(1, optim.OptimizerConfig(learning_rate=float("inf")))],
                                 batch_size=4, bptt=5, max_steps=1, checkpointer=checkpointer)
    assert checkpointer.latest_step() is None


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
    assert metrics.macro_f1(predictions, targets, 3) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
