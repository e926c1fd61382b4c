"""Tests of ulmfit_jax.optim against the formulas, hand-computed updates, and fastai 2.8.12."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import keystr, tree_map_with_path

from ulmfit_jax import optim

try:   # the PyTorch reference (requirements-reference.txt): only the comparison tests need it
    import torch
    from fastai.callback.schedule import SchedCos, combined_cos
    from fastai.optimizer import Adam as FastaiAdam
    from fastai.optimizer import Optimizer as FastaiOptimizer
    from fastai.optimizer import sgd_step
    from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_clas_split, awd_lstm_lm_split
    from fastai.text.models.core import get_language_model, get_text_classifier
    from fastai.torch_core import norm_bias_params
    HAVE_FASTAI = True
except ImportError:
    HAVE_FASTAI = False
requires_fastai = pytest.mark.skipif(not HAVE_FASTAI, reason="needs torch and fastai 2.8.12")

N_LAYERS = 2
VOCAB = 10
FASTAI_CONFIG = dict(emb_sz=4, n_hid=6, n_layers=N_LAYERS, pad_token=1, bidir=False, output_p=0.1,
                     hidden_p=0.1, input_p=0.1, embed_p=0.1, weight_p=0.1)


# --------------------------------------------------------------------------- fastai models


def fastai_model(kind: str, tie_weights: bool = True):
    torch.manual_seed(0)
    if kind == "lm":
        config = dict(FASTAI_CONFIG, tie_weights=tie_weights, out_bias=True)
        model = get_language_model(AWD_LSTM, VOCAB, config=config)
        return model, awd_lstm_lm_split(model)
    model = get_text_classifier(AWD_LSTM, VOCAB, 3, config=FASTAI_CONFIG, lin_ftrs=[5])
    return model, awd_lstm_clas_split(model)


def fastai_name(path, kind: str) -> str:
    """The fastai parameter name of one of our leaves (as a converter would map it)."""
    names = optim._path_names(path)
    encoder = "0." if kind == "lm" else "0.module."
    if names[:2] == ("encoder", "embed"):
        return encoder + "encoder.weight"
    if names[:2] == ("encoder", "rnn"):
        layer, leaf = names[2], names[3]
        return {"w_ih": f"{encoder}rnns.{layer}.module.weight_ih_l0",
                "w_hh": f"{encoder}rnns.{layer}.weight_hh_l0_raw",
                "b_ih": f"{encoder}rnns.{layer}.module.bias_ih_l0",
                "b_hh": f"{encoder}rnns.{layer}.module.bias_hh_l0"}[leaf]
    if names[0] == "decoder":
        return f"1.decoder.{names[1]}"
    block, leaf = names[1], names[2]
    return {"bn_scale": f"1.layers.{block}.0.weight", "bn_bias": f"1.layers.{block}.0.bias",
            "weight": f"1.layers.{block}.2.weight"}[leaf]


def skeleton(kind: str, tie_weights: bool = True):
    """Our parameter tree layout (leaves are placeholders) for the fastai models above."""
    layer = {"w_ih": 0, "w_hh": 0, "b_ih": 0, "b_hh": 0}
    encoder = {"embed": 0, "rnn": [dict(layer) for _ in range(N_LAYERS)]}
    if kind == "lm":
        decoder = {"bias": 0} if tie_weights else {"bias": 0, "weight": 0}
        return {"encoder": encoder, "decoder": decoder}
    block = {"bn_scale": 0, "bn_bias": 0, "weight": 0}
    return {"encoder": encoder, "head": [dict(block), dict(block)]}


def params_from_fastai(model, kind: str, tie_weights: bool = True):
    named = dict(model.named_parameters())
    return tree_map_with_path(
        lambda path, _: jnp.asarray(named[fastai_name(path, kind)].detach().numpy().copy()),
        skeleton(kind, tie_weights))


# --------------------------------------------------------------------------- layer groups

@requires_fastai
@pytest.mark.parametrize("kind,tie_weights", [("lm", True), ("lm", False), ("classifier", True)])
def test_labels_cover_every_leaf_and_match_fastai_splitters(kind, tie_weights):
    model, fastai_groups = fastai_model(kind, tie_weights)
    group_of = {id(p): g for g, group in enumerate(fastai_groups) for p in group}
    named = dict(model.named_parameters())
    params = params_from_fastai(model, kind, tie_weights)
    labels = optim.layer_group_labels(params, kind)

    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert optim.n_groups(labels) == len(fastai_groups)
    leaves = jax.tree_util.tree_leaves_with_path(labels)
    for path, label in leaves:
        assert label == group_of[id(named[fastai_name(path, kind)])], keystr(path)
    # every fastai parameter is one of our leaves, and every group has leaves
    assert sorted(fastai_name(path, kind) for path, _ in leaves) == sorted(named)
    assert set(jax.tree.leaves(labels)) == set(range(len(fastai_groups)))


def test_labels_group_by_layer_index_whatever_the_leaves():
    direction = {"w_ih": 0, "w_hh": 0, "b_ih": 0, "b_hh": 0}
    params = {"encoder": {"embed": 0, "rnn": [{"forward": direction, "backward": direction},
                                              {"weight": 0, "bias": 0}]},
              "head": [{"bn_scale": 0, "bn_bias": 0, "weight": 0}]}
    labels = optim.layer_group_labels(params, "classifier")
    assert set(jax.tree.leaves(labels["encoder"]["rnn"][0])) == {1}
    assert jax.tree.leaves(labels["encoder"]["rnn"][1]) == [1 + 1, 1 + 1]
    assert set(jax.tree.leaves(labels["head"])) == {3}
    assert optim.n_groups(labels) == 4


def test_labels_reject_unknown_parameters():
    params = {"encoder": {"embed": 0, "rnn": [{"w_ih": 0}]}, "decoder": {"bias": 0}}
    with pytest.raises(ValueError, match="no layer group"):
        optim.layer_group_labels(params, "classifier")
    with pytest.raises(ValueError, match="kind"):
        optim.layer_group_labels(params, "seq2seq")


@requires_fastai
@pytest.mark.parametrize("kind,tie_weights", [("lm", True), ("lm", False), ("classifier", True)])
def test_weight_decay_and_train_bn_leaves_match_fastai(kind, tie_weights):
    """fastai's Learner: do_wd=False on norm_bias_params(with_bias=True), force_train on
    norm_bias_params(with_bias=False). nn.LSTM's `bias` attribute is a bool, not a tensor."""
    model, _ = fastai_model(kind, tie_weights)
    no_decay = {id(p) for p in norm_bias_params(model, True) if isinstance(p, torch.Tensor)}
    forced = {id(p) for p in norm_bias_params(model, False) if isinstance(p, torch.Tensor)}
    named = dict(model.named_parameters())
    params = params_from_fastai(model, kind, tie_weights)
    labels = optim.layer_group_labels(params, kind)
    nothing_trainable = optim.trainable_mask(params, labels, frozenset())
    for (path, decays), trained in zip(
            jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params)),
            jax.tree.leaves(nothing_trainable)):
        p = named[fastai_name(path, kind)]
        assert decays == (id(p) not in no_decay), keystr(path)
        assert trained == (id(p) in forced), keystr(path)
    assert not any(jax.tree.leaves(optim.trainable_mask(params, labels, frozenset(),
                                                         train_bn=False)))


# --------------------------------------------------------------------------- per-group values


def fastai_hyper(value, count):
    """What fastai's Optimizer.set_hyper makes of `value` over `count` groups."""
    groups = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(count)]
    opt = FastaiOptimizer(groups, [sgd_step], lr=1.0)
    opt.set_hyper("lr", value)
    return tuple(h["lr"] for h in opt.hypers)


@requires_fastai
@pytest.mark.parametrize("count", [1, 4, 5])
def test_group_values_equal_fastai_set_hyper(count):
    assert optim.group_values(optim.Slice(1e-2 / 2.6**4, 1e-2), count) == fastai_hyper(
        slice(1e-2 / 2.6**4, 1e-2), count)
    assert optim.group_values(slice(1e-3, 1e-1), count) == fastai_hyper(slice(1e-3, 1e-1), count)
    assert optim.group_values(optim.Slice(None, 3e-3), count) == fastai_hyper(slice(3e-3), count)
    assert optim.group_values(0.02, count) == fastai_hyper(0.02, count)
    explicit = tuple(0.1 * (k + 1) for k in range(count))
    assert optim.group_values(explicit, count) == fastai_hyper(list(explicit), count)


def test_discriminative_lrs():
    lrs = optim.discriminative_lrs(0.01, 5)
    assert lrs[-1] == 0.01
    np.testing.assert_allclose(np.array(lrs[1:]) / np.array(lrs[:-1]), 2.6, rtol=1e-12)
    # fastai's tutorial slice(lr / 2.6**4, lr) over the 5 classifier groups is the same spacing
    np.testing.assert_allclose(lrs, optim.even_mults(0.01 / 2.6**4, 0.01, 5), rtol=1e-12)
    with pytest.raises(ValueError, match="3 values for 5"):
        optim.group_values((1.0, 2.0, 3.0), 5)


# --------------------------------------------------------------------------- schedules


def stlr_reference(t, total, cut_frac=0.1, ratio=32.0, peak=0.01):
    """The paper's equation 3, in Python floats."""
    cut = math.floor(total * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return peak * (1 + p * (ratio - 1)) / ratio


def test_stlr_paper_values():
    schedule = optim.stlr(0.01, 1000)
    values = np.asarray(jax.vmap(schedule)(jnp.arange(1000)))
    np.testing.assert_allclose(values[[0, 100, 999]], [3.125e-4, 1e-2, 3.2326e-4], rtol=1e-4)
    np.testing.assert_allclose(values, [stlr_reference(t, 1000) for t in range(1000)], rtol=1e-6)
    assert np.argmax(values) == 100
    assert np.all(np.diff(values[:101]) > 0) and np.all(np.diff(values[100:]) < 0)


@pytest.mark.parametrize("total,cut_frac,ratio", [(37, 0.1, 32.0), (95, 0.1, 32.0),
                                                  (200, 0.25, 10.0), (7, 0.3, 5.0)])
def test_stlr_clamps_where_the_formula_goes_below_its_floor(total, cut_frac, ratio):
    values = np.asarray(jax.vmap(optim.stlr(0.01, total, cut_frac, ratio))(jnp.arange(total)))
    reference = np.array([stlr_reference(t, total, cut_frac, ratio) for t in range(total)])
    floor = 0.01 / ratio
    np.testing.assert_allclose(values, np.maximum(reference, floor), rtol=1e-6)
    assert values.min() >= floor * (1 - 1e-6) and values.max() <= 0.01 * (1 + 1e-6)
    if total == 37:
        # cut = 3, decay denominator 27 < 34 steps left: eta_36 = 0.01 (1 - 31 * 6 / 27) / 32
        assert reference[-1] == pytest.approx(-1.8403e-3, rel=1e-4)
        assert values[-1] == pytest.approx(floor)


def test_stlr_with_less_than_one_warm_up_step():
    values = jax.vmap(optim.stlr(0.01, 5))(jnp.arange(5))   # floor(5 * 0.1) = 0 -> cut = 1
    assert values[0] == pytest.approx(0.01 / 32)
    assert np.all(np.isfinite(values)) and values.min() >= 0.01 / 32 * (1 - 1e-6)


@requires_fastai
def test_cosine_phase_equals_fastai_sched_cos():
    """With pct_start = 0 the cycle is one cosine phase: fastai's SchedCos(start, end)(pos)."""
    schedule = optim.combined_cosine(0.0, 0.0, 0.8, 0.7, 10)
    ours = np.asarray(jax.vmap(schedule)(jnp.arange(11)))
    np.testing.assert_allclose(ours, [SchedCos(0.8, 0.7)(t / 10) for t in range(11)], rtol=3e-7)


def one_cycle_reference(t, total, pct_start, start, middle, end):
    """fastai's combined_cos in float64 (fastai itself rounds the phase position to float32)."""
    pos = t / total
    if pos < pct_start:
        a, b, x = start, middle, pos / pct_start
    else:
        a, b, x = middle, end, (pos - pct_start) / (1 - pct_start)
    return a + (1 + math.cos(math.pi * (1 - x))) * (b - a) / 2


@requires_fastai
@pytest.mark.parametrize("total,pct_start", [(20, 0.25), (37, 0.25), (100, 0.3), (9, 0.99),
                                             (10, 0.0)])
def test_one_cycle_equals_fastai_fit_one_cycle(total, pct_start):
    """fit_one_cycle: lr combined_cos(pct, lr/div, lr, lr/div_final) per group (fastai passes the
    array of group lrs), mom combined_cos(pct, 0.8, 0.7, 0.8), evaluated at pct = t / total."""
    config = optim.OptimizerConfig(learning_rate=optim.Slice(1e-3, 1e-2),
                                   schedule=optim.OneCycle(pct_start=pct_start))
    peaks = np.array(fastai_hyper(slice(1e-3, 1e-2), 4))
    fastai_lr = combined_cos(pct_start, peaks / 25.0, peaks, peaks / 1e5)
    fastai_mom = combined_cos(pct_start, 0.8, 0.7, 0.8)
    lr_schedules = optim.learning_rate_schedules(config, 4, total)
    mom_schedule = optim.momentum_schedule(config, total)
    steps = jnp.arange(total)
    ours_lr = np.stack([np.asarray(jax.vmap(s)(steps)) for s in lr_schedules], axis=1)
    ours_mom = np.asarray(jax.vmap(mom_schedule)(steps))
    # fastai computes the phase position in float32: agreement to 1e-5 at the lr / 1e5 end
    np.testing.assert_allclose(ours_lr, [fastai_lr(t / total) for t in range(total)], rtol=1e-5)
    np.testing.assert_allclose(ours_mom, [fastai_mom(t / total) for t in range(total)], rtol=1e-6)
    exact = [[one_cycle_reference(t, total, pct_start, lr / 25, lr, lr / 1e5) for lr in peaks]
             for t in range(total)]
    np.testing.assert_allclose(ours_lr, exact, rtol=2e-6)
    assert ours_lr[0, -1] == pytest.approx(1e-2 / 25.0 if pct_start > 0 else 1e-2, rel=1e-6)


def test_one_cycle_shape():
    lr = optim.combined_cosine(0.25, 0.01 / 25, 0.01, 0.01 / 1e5, 100)
    assert float(lr(0)) == pytest.approx(4e-4, rel=1e-6)
    assert float(lr(25)) == pytest.approx(0.01, rel=1e-6)
    assert float(lr(100)) == pytest.approx(1e-7, rel=1e-4)


def test_constant_and_stlr_keep_momentum_constant():
    config = optim.paper_config(0.01, 5)
    assert config.learning_rate == optim.discriminative_lrs(0.01, 5)
    momentum = optim.momentum_schedule(config, 50)
    assert float(momentum(0)) == float(momentum(37)) == pytest.approx(0.7)
    lrs = optim.learning_rate_schedules(config, 5, 1000)
    assert float(lrs[-1](100)) == pytest.approx(0.01, rel=1e-6)
    assert float(lrs[0](100)) == pytest.approx(0.01 / 2.6**4, rel=1e-6)
    constant = optim.OptimizerConfig(learning_rate=0.3, beta1=0.85, schedule=optim.Constant())
    assert float(optim.learning_rate_schedules(constant, 2, 10)[0](7)) == pytest.approx(0.3)
    assert float(optim.momentum_schedule(constant, 10)(7)) == pytest.approx(0.85)


# --------------------------------------------------------------------------- hand-computed Adam


def tiny_classifier_params():
    key = iter(jax.random.split(jax.random.key(0), 16))
    normal = lambda *shape: jax.random.normal(next(key), shape)
    layer = lambda n_in, n_out: {"w_ih": normal(4 * n_out, n_in), "w_hh": normal(4 * n_out, n_out),
                                 "b_ih": normal(4 * n_out), "b_hh": normal(4 * n_out)}
    return {"encoder": {"embed": normal(5, 3), "rnn": [layer(3, 2), layer(2, 3)]},
            "head": [{"bn_scale": 1 + normal(9), "bn_bias": normal(9), "weight": normal(2, 9)}]}


def sine_loss(params, coefficients):
    """A loss whose gradient depends on the parameters: sum c * sin(p) + 0.5 p^2."""
    terms = jax.tree.map(lambda p, c: jnp.sum(c * jnp.sin(p) + 0.5 * p * p), params, coefficients)
    return sum(jax.tree.leaves(terms))


def numpy_cos(start, end, pos):
    return start + (1 + np.cos(np.pi * (1 - pos))) * (end - start) / 2


@pytest.mark.parametrize("decouple", [True, False])
def test_updates_equal_hand_computation(decouple):
    """Three steps of one-cycle Adam, discriminative lrs, per-group weight decay, no decay on
    batch norm, clipping active, recomputed in float64 numpy from fastai's formulas."""
    params = tiny_classifier_params()
    coefficients = jax.tree.map(lambda p: 3.0 * jnp.cos(2.0 * p + 1.0), params)
    total, lrs, wds, clip = 10, (1e-3, 2e-3, 5e-3, 1e-2), (0.1, 0.01, 0.0, 0.05), 0.7
    config = optim.OptimizerConfig(learning_rate=lrs, weight_decay=wds, clip_norm=clip, eps=1e-5,
                                   decouple_weight_decay=decouple, schedule=optim.OneCycle())
    optimizer = optim.make_optimizer(config, params, "classifier", total)
    state = optimizer.init(params)
    labels = optim.layer_group_labels(params, "classifier")
    decays = optim.weight_decay_mask(params)

    structure = jax.tree.structure(params)
    expected = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    c = [np.asarray(x, np.float64) for x in jax.tree.leaves(coefficients)]
    first_moments = [np.zeros_like(p) for p in expected]
    second_moments = [np.zeros_like(p) for p in expected]
    ours = params
    for t in range(3):
        pos, step = t / total, t + 1
        mom = numpy_cos(0.8, 0.7, pos / 0.25)
        grads = [ck * np.cos(p) + p for ck, p in zip(c, expected)]
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        assert norm > clip, "the test must exercise clipping"
        scale = min(1.0, clip / (norm + 1e-6))
        for k, (group, decay) in enumerate(zip(jax.tree.leaves(labels), jax.tree.leaves(decays))):
            lr = numpy_cos(lrs[group] / 25, lrs[group], pos / 0.25)
            wd = wds[group] if decay else 0.0
            p, g = expected[k], grads[k] * scale
            if not decouple:
                g = g + wd * p
            first_moments[k] = mom * first_moments[k] + (1 - mom) * g
            second_moments[k] = 0.99 * second_moments[k] + 0.01 * g * g
            if decouple:
                p = p * (1 - lr * wd)
            expected[k] = p - lr / (1 - mom**step) * first_moments[k] / (
                np.sqrt(second_moments[k] / (1 - 0.99**step)) + 1e-5)

        grads_jax = jax.grad(sine_loss)(ours, coefficients)
        updates, state = optimizer.update(grads_jax, state, ours)
        ours = optax.apply_updates(ours, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                     ours, jax.tree.unflatten(structure, expected))


# --------------------------------------------------------------------------- fastai's Adam


def run_fastai(model, groups, kind, n_steps, lr, wd, clip, freeze, coefficients, total):
    """fastai's Adam driven as Learner.create_opt + freeze_to + fit_one_cycle drive it."""
    opt = FastaiAdam(groups, lr=1e-3)
    for p in norm_bias_params(model, True):      # Learner.create_opt, wd_bn_bias=False
        opt.state[p]["do_wd"] = False
    for p in norm_bias_params(model, False):     # train_bn=True
        opt.state[p]["force_train"] = True
    opt.freeze_to(freeze)
    opt.clear_state()
    opt.set_hyper("lr", lr)                      # fit_one_cycle
    lr_max = np.array([h["lr"] for h in opt.hypers])
    scheds = {"lr": combined_cos(0.25, lr_max / 25.0, lr_max, lr_max / 1e5),
              "mom": combined_cos(0.25, 0.8, 0.7, 0.8)}
    opt.set_hypers(wd=wd)                        # Learner.fit
    named = dict(model.named_parameters())
    trained = [p for p in named.values() if p.requires_grad]
    for t in range(n_steps):
        for name, f in scheds.items():           # ParamScheduler.before_batch
            opt.set_hyper(name, f(t / total))
        loss = sum((torch.tensor(np.array(coefficients[n])) * torch.sin(p) + 0.5 * p * p).sum()
                   for n, p in named.items() if p.requires_grad)
        loss.backward()
        if clip is not None:                     # GradientClip.before_step
            torch.nn.utils.clip_grad_norm_(trained, clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().numpy() for n, p in named.items()}


@requires_fastai
@pytest.mark.parametrize("kind,freeze,clip", [("lm", 0, 0.5), ("lm", -1, None),
                                              ("classifier", 0, 0.5), ("classifier", 2, 0.5),
                                              ("classifier", 4, None)])
def test_equals_fastai_adam(kind, freeze, clip):
    """Our optimizer and fastai's real Adam, from the same weights and the same loss, over 8
    one-cycle steps with slice learning rates, per-group weight decay and clipping; frozen
    groups (fastai's freeze_to, batch norm still trained) bit-identical. freeze_to(4) freezes
    all 4 groups of the 2-layer classifier: only its batch-norm parameters train."""
    model, groups = fastai_model(kind)
    params = params_from_fastai(model, kind)
    names = tree_map_with_path(lambda path, _: fastai_name(path, kind), params)
    coefficients = {n: np.asarray(jnp.cos(3.0 * p + 0.5)) for n, p in
                    zip(jax.tree.leaves(names), jax.tree.leaves(params))}
    count, total, n_steps = len(groups), 20, 8
    lr, wd = slice(1e-2 / 2.6 ** (count - 1), 1e-2), [0.3] * (count - 1) + [0.1]

    expected = run_fastai(model, groups, kind, n_steps, lr, wd, clip, freeze, coefficients, total)

    labels = optim.layer_group_labels(params, kind)
    trainable = optim.freeze_to(freeze, count)
    config = optim.OptimizerConfig(learning_rate=optim.Slice(lr.start, lr.stop),
                                   weight_decay=tuple(wd), clip_norm=clip)
    optimizer = optim.make_optimizer(config, params, kind, total, trainable)
    leaf_coefficients = jax.tree.map(lambda n: jnp.asarray(coefficients[n]), names)

    @jax.jit
    def step(params, state):
        trained, frozen = optim.split_trainable(params, labels, trainable)
        coefficients = optim.split_trainable(leaf_coefficients, labels, trainable)[0]
        grads = jax.grad(sine_loss)(trained, coefficients)
        updates, state = optimizer.update(grads, state, trained)
        return optim.merge(optax.apply_updates(trained, updates), frozen), state

    ours = params
    state = optimizer.init(optim.split_trainable(params, labels, trainable)[0])
    for _ in range(n_steps):
        ours, state = step(ours, state)

    trained_mask = optim.trainable_mask(params, labels, trainable)
    for name, before, after, trained in zip(jax.tree.leaves(names), jax.tree.leaves(params),
                                            jax.tree.leaves(ours), jax.tree.leaves(trained_mask)):
        np.testing.assert_allclose(after, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
        if trained:
            assert not np.array_equal(after, before), name
        else:
            assert np.array_equal(np.asarray(after).view(np.uint32),
                                  np.asarray(before).view(np.uint32)), name
            assert np.array_equal(expected[name], np.asarray(before)), name


# --------------------------------------------------------------------------- freezing


@requires_fastai
@pytest.mark.parametrize("n", range(-7, 7))
def test_freeze_to_equals_fastai(n):
    groups = [[torch.nn.Parameter(torch.zeros(1))] for _ in range(5)]
    opt = FastaiOptimizer(groups, [sgd_step], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # fastai warns when n freezes every group
        opt.freeze_to(n)
    fastai_trainable = frozenset(g for g, group in enumerate(groups) if group[0].requires_grad)
    assert optim.freeze_to(n, 5) == fastai_trainable


def test_freezing_helpers():
    assert optim.freeze(5) == {4}
    assert optim.unfreeze(5) == {0, 1, 2, 3, 4}
    assert optim.freeze_all_but(1, 5) == {1} and optim.freeze_all_but(-2, 5) == {3}
    assert optim.freeze_groups([0, -1], 5) == {1, 2, 3}
    assert optim.unfreeze_groups(frozenset({4}), [2, -2], 5) == {2, 3, 4}
    with pytest.raises(ValueError, match="out of range"):
        optim.freeze_all_but(5, 5)
    assert optim.gradual_unfreezing(4) == ({3}, {2, 3}, {1, 2, 3}, {0, 1, 2, 3})
    assert optim.gradual_unfreezing(5, n_stages=4) == ({4}, {3, 4}, {2, 3, 4}, {0, 1, 2, 3, 4})
    assert optim.chain_thaw(4) == ({3}, {0}, {1}, {2}, {0, 1, 2, 3})


def test_gradual_unfreezing_compiles_once_per_stage_and_keeps_frozen_params():
    params = tiny_classifier_params()
    coefficients = jax.tree.map(lambda p: jnp.sin(p + 2.0), params)
    labels = optim.layer_group_labels(params, "classifier")
    config = optim.OptimizerConfig(learning_rate=optim.Slice(1e-3, 1e-2), clip_norm=1.0)
    traces = []

    @functools.partial(jax.jit, static_argnames=("optimizer", "trainable"))
    def train_step(params, state, optimizer, trainable):
        traces.append(trainable)
        trained, frozen = optim.split_trainable(params, labels, trainable)
        grads = jax.grad(lambda t: sine_loss(optim.merge(t, frozen), coefficients))(trained)
        assert jax.tree.structure(grads) == jax.tree.structure(trained)
        updates, state = optimizer.update(grads, state, trained)
        return optim.merge(optax.apply_updates(trained, updates), frozen), state

    stages = optim.gradual_unfreezing(optim.n_groups(labels))
    for trainable in stages:
        optimizer = optim.make_optimizer(config, params, "classifier", 3, trainable)
        trained = optim.split_trainable(params, labels, trainable)[0]
        state = optimizer.init(trained)
        # optimizer state only for trained leaves: their first and second moments
        moments = [leaf for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.float32]
        assert len(moments) == 2 * len(jax.tree.leaves(trained))
        before = params
        for _ in range(3):
            params, state = train_step(params, state, optimizer, trainable)
        mask = optim.trainable_mask(params, labels, trainable)
        for old, new, trained_leaf in zip(jax.tree.leaves(before), jax.tree.leaves(params),
                                          jax.tree.leaves(mask)):
            same = np.array_equal(np.asarray(old).view(np.uint32), np.asarray(new).view(np.uint32))
            assert same != trained_leaf
    assert traces == list(stages)


def test_optimizer_refuses_frozen_leaves():
    params = tiny_classifier_params()
    optimizer = optim.make_optimizer(optim.OptimizerConfig(), params, "classifier", 10,
                                     optim.freeze(4))
    with pytest.raises(ValueError, match="frozen in this stage"):
        optimizer.init(params)
    with pytest.raises(ValueError, match="nothing to train"):
        optim.make_optimizer(optim.OptimizerConfig(train_bn=False), params, "classifier", 10,
                             frozenset())
