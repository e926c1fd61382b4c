"""Frozen layers at no backward cost in the shared train step (`frozen.gated`, `frozen.backward_flags`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import compile_ahead, frozen, models, optim, steps
from ulmfit_jax.config import awd_lstm_clas_config, awd_qrnn_clas_config


def test_gated_gives_autodiffs_gradients_when_on_and_runs_no_backward_when_off():
    runs = []

    @jax.custom_vjp
    def counted(x):
        return jnp.sin(x)

    def counted_bwd(x, cotangent):
        jax.debug.callback(lambda: runs.append(1))
        return (jnp.cos(x) * cotangent,)

    counted.defvjp(lambda x: (jnp.sin(x), x), counted_bwd)
    fn = lambda d, other: counted(d["w"] * other) + d["b"]
    params, other = {"w": jnp.arange(3.0), "b": jnp.ones(3)}, jnp.full(3, 2.0)

    def gradient(flag):
        return jax.jit(jax.grad(lambda p: frozen.gated(flag, fn, p, other).sum()))(params)

    plain = jax.grad(lambda p: fn(p, other).sum())(params)
    runs.clear()
    on = jax.block_until_ready(gradient(jnp.array(True)))
    assert runs == [1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), on, plain)
    runs.clear()
    off = jax.block_until_ready(gradient(jnp.array(False)))
    assert runs == []                                          # the backward pass did not run
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0.0), off)


@pytest.mark.parametrize("kind, trainable, expected", [
    # classifier groups: embedding 0, layers 1..3, head 4; flags: [embedding, layer 0, 1, 2]
    ("classifier", [0, 0, 0, 0, 1], [0, 0, 0, 0]),
    ("classifier", [0, 0, 0, 1, 1], [0, 0, 0, 1]),
    ("classifier", [0, 0, 1, 1, 1], [0, 0, 1, 1]),
    ("classifier", [1, 1, 1, 1, 1], [1, 1, 1, 1]),
    ("classifier", [0, 1, 0, 0, 1], [0, 1, 1, 1]),            # chain-thaw: layer 0 alone
    # LM groups: layers 0..2, embedding and decoder 3
    ("lm", [0, 0, 0, 1], [1, 1, 1, 1]),                        # the tied embedding trains: all the way down
    ("lm", [0, 0, 1, 0], [0, 0, 0, 1]),
])
def test_backward_flags_run_the_backward_pass_down_to_the_lowest_trained_part(kind, trainable, expected):
    flags = frozen.backward_flags(np.array(trainable, bool), kind, n_layers=3)
    np.testing.assert_array_equal(flags, np.array(expected, bool))


@pytest.mark.parametrize("make_config, stages", [(awd_lstm_clas_config, (-1, -2)), (awd_qrnn_clas_config, (-3,))])
def test_the_shared_step_trains_each_stage_as_a_step_that_differentiates_only_its_groups(make_config, stages):
    """Gradual unfreezing's stages through the one shared program (backward pass gated at run time)
    equal the per-stage programs (frozen groups not differentiated at all); frozen groups stay bit
    for bit."""
    config = make_config(50, 3, emb_size=8, n_hidden=12, n_layers=2, bptt=5)
    params, stats = models.init_classifier(jax.random.PRNGKey(0), config)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(2, 50, (4, 12)), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 3, 4), jnp.int32), "regularized_mask": jnp.ones((4, 12), bool)}
    labels = optim.layer_group_labels(params, "classifier")
    config_opt = optim.OptimizerConfig(learning_rate=1e-2)
    optimizer = optim.stage_optimizer(config_opt, params, "classifier")
    quick = dict(compile_ahead.QUICK_COMPILE_CPU_OPTIONS)
    shared = steps.make_train_step("classifier", config, optimizer, params, compiler_options=quick)
    for trainable in [optim.freeze_to(n, 4) for n in stages]:
        own = steps.make_train_step("classifier", config, optimizer, params, differentiated=trainable,
                                    compiler_options=quick)
        hyper = optim.stage_hyper(config_opt, 4, 10, trainable)
        results = []
        for step in (shared, own):
            state = steps.init_state(jax.tree.map(jnp.array, params), optimizer.init(params, hyper),
                                     jax.tree.map(jnp.array, stats), seed=1)
            for _ in range(2):
                state, _ = step(state, batch)
            results.append(jax.tree.map(np.asarray, state.params))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)
        for result in results:
            jax.tree.map(lambda new, old, group: group in trainable or np.testing.assert_array_equal(new, old),
                         result, jax.tree.map(np.asarray, params), labels)
