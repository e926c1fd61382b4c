"""Optimisation as ULMFiT and fastai 2.8.12 do it: layer groups, discriminative learning rates,
slanted triangular and one-cycle schedules, fastai's Adam, gradient clipping, freezing.

Everything ends in one `optax.GradientTransformation` built by `make_optimizer`:

    clip_gradient_norm(clip_norm)                    (optional, over all trained gradients)
    -> optax.partition({label: fastai_adam(...)})    (one Adam per layer group, and per group a
                                                      second one without weight decay for biases
                                                      and batch-norm parameters)

Layer groups (fastai's `awd_lstm_lm_split` / `awd_lstm_clas_split`), for an encoder of L layers:

    language model:  [rnn_0, rnn_1, ..., rnn_{L-1}, embed + decoder]     (L + 1 groups)
    classifier:      [embed, rnn_0, ..., rnn_{L-1}, head]                 (L + 2 groups)

Freezing is a static set of trainable group indices (a `frozenset`, hashable, so a train step can
take it as a `jax.jit` static argument: one compile per stage). `split_trainable` cuts the
parameters into the trained part and the frozen part; differentiate with respect to the trained
part only, so frozen groups cost no backward compute, get no optimizer state, and are never
touched by arithmetic (bit-identical). A train step looks like:

    labels = layer_group_labels(params, "classifier")
    trainable = freeze_to(-2, n_groups(labels))
    optimizer = make_optimizer(config, params, "classifier", total_steps, trainable)
    opt_state = optimizer.init(split_trainable(params, labels, trainable)[0])

    @functools.partial(jax.jit, static_argnames="trainable")
    def train_step(params, opt_state, batch, trainable):
        trained, frozen = split_trainable(params, labels, trainable)
        loss, grads = jax.value_and_grad(lambda t: loss_fn(merge(t, frozen), batch))(trained)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        return merge(optax.apply_updates(trained, updates), frozen), opt_state, loss

As in fastai, where `Learner.freeze_to` clears the optimizer state, every stage starts with a
fresh optimizer (`make_optimizer` + `init`).

Step convention: the optimizer's update number `t` counts from 0. fastai's `fit_one_cycle` sets
the hyper-parameters before batch `t` from `pos = t / total_steps`, and its Adam then counts that
update as step `t + 1` for bias correction; `learning_rate_schedules` and `momentum_schedule`
return exactly those per-step values, so they can be logged or compared with fastai's recorder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr, tree_map_with_path

Schedule = Callable[[jax.Array], jax.Array]
PyTree = Any

# Leaves of a normalisation layer (fastai's `norm_types`): no weight decay, trained when frozen.
NORM_LEAF_NAMES = ("bn_scale", "bn_bias")
# fastai's `norm_bias_params(with_bias=True)` also exempts any module attribute named `bias`
# (the LM decoder's bias); nn.LSTM's `bias_ih_l0` / `bias_hh_l0` are not `bias`, so `b_ih`, `b_hh`
# are decayed.
BIAS_LEAF_NAME = "bias"
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
TORCH_CLIP_EPS = 1e-6

KINDS = ("lm", "classifier")


# --------------------------------------------------------------------------- layer groups


def _path_names(path) -> tuple:
    names = []
    for key in path:
        if isinstance(key, DictKey):
            names.append(key.key)
        elif isinstance(key, SequenceKey):
            names.append(key.idx)
        elif isinstance(key, GetAttrKey):
            names.append(key.name)
        else:
            raise TypeError(f"unsupported pytree key {key!r} in {keystr(path)}")
    return tuple(names)


def layer_group_labels(params: PyTree, kind: str) -> PyTree:
    """The layer group (an int) of every leaf of `params`, in a tree of the same structure.

    Groups follow fastai's splitters, by layer index (so LSTM, bidirectional and QRNN layers are
    grouped alike, whatever their leaves):
      kind "lm":          rnn layer l -> l; embed and decoder -> L (the tied embedding is
                          in the last group, with the decoder)
      kind "classifier":  embed -> 0; rnn layer l -> l + 1; head -> L + 1
    A leaf outside these parts raises ValueError, so every leaf gets a group. Reads only the tree
    structure, so it can be called inside `jax.jit` on traced parameters.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n_layers = len(params["encoder"]["rnn"])

    def label(path, _leaf) -> int:
        names = _path_names(path)
        if names[0] == "encoder" and len(names) > 1:
            if names[1] == "embed":
                return n_layers if kind == "lm" else 0
            if names[1] == "rnn":
                return names[2] if kind == "lm" else names[2] + 1
        if kind == "lm" and names[0] == "decoder":
            return n_layers
        if kind == "classifier" and names[0] == "head":
            return n_layers + 1
        raise ValueError(f"parameter {keystr(path)} belongs to no layer group of a {kind}")

    return tree_map_with_path(label, params)


def n_groups(labels: PyTree) -> int:
    """Number of layer groups in a labels tree from `layer_group_labels`."""
    return max(jax.tree.leaves(labels)) + 1


def weight_decay_mask(params: PyTree) -> PyTree:
    """True where fastai (`wd_bn_bias=False`) applies weight decay: every leaf except the
    normalisation leaves (`bn_scale`, `bn_bias`) and leaves named `bias`."""
    def decays(path, _leaf) -> bool:
        name = _path_names(path)[-1]
        return name not in NORM_LEAF_NAMES and name != BIAS_LEAF_NAME
    return tree_map_with_path(decays, params)


def trainable_mask(params: PyTree, labels: PyTree, trainable: frozenset[int],
                   train_bn: bool = True) -> PyTree:
    """True for the leaves trained in this stage: those of the groups in `trainable`, and, with
    `train_bn` (fastai's default), batch-norm leaves of every group."""
    def trained(path, _leaf, group) -> bool:
        return group in trainable or (train_bn and _path_names(path)[-1] in NORM_LEAF_NAMES)
    return tree_map_with_path(trained, params, labels)


def split_trainable(params: PyTree, labels: PyTree, trainable: frozenset[int],
                    train_bn: bool = True) -> tuple[PyTree, PyTree]:
    """(trained, frozen): two trees shaped like `params`, each with `None` where the other has
    the leaf. `labels` must be concrete (closed over, or `layer_group_labels` called in the
    traced function). Differentiate with respect to `trained` only; `merge` puts them back."""
    mask = trainable_mask(params, labels, trainable, train_bn)
    trained = jax.tree.map(lambda leaf, m: leaf if m else None, params, mask)
    frozen = jax.tree.map(lambda leaf, m: None if m else leaf, params, mask)
    return trained, frozen


def merge(trained: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split_trainable`: the leaf of whichever tree has it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trained, frozen,
                        is_leaf=lambda x: x is None)


# --------------------------------------------------------------------------- freezing


def _resolve_groups(groups: Sequence[int], count: int) -> frozenset[int]:
    """Group indices, negative ones counted from the end as in Python."""
    for g in groups:
        if not -count <= g < count:
            raise ValueError(f"group {g} out of range for {count} groups")
    return frozenset(range(count)[g] for g in groups)


def unfreeze(count: int) -> frozenset[int]:
    """All `count` groups trainable."""
    return frozenset(range(count))


def freeze_to(n: int, count: int) -> frozenset[int]:
    """fastai's `freeze_to(n)`: groups `[:n]` frozen, `[n:]` trainable (Python slicing, so
    negative `n` counts from the end and `n >= count` freezes everything)."""
    return frozenset(range(count)[n:])


def freeze(count: int) -> frozenset[int]:
    """fastai's `freeze()` = `freeze_to(-1)`: only the last group trains."""
    return freeze_to(-1, count)


def freeze_all_but(n: int, count: int) -> frozenset[int]:
    """fastai 0.7's `freeze_all_but(n)`: only group `n` (negative counts from the end) trains."""
    return _resolve_groups([n], count)


def freeze_groups(groups: Sequence[int], count: int) -> frozenset[int]:
    """fastai 0.7's `freeze_groups(groups)`: unfreeze everything, then freeze `groups`."""
    return unfreeze(count) - _resolve_groups(groups, count)


def unfreeze_groups(trainable: frozenset[int], groups: Sequence[int],
                    count: int) -> frozenset[int]:
    """fastai 0.7's `unfreeze_groups(groups)`: `groups` become trainable, the rest unchanged."""
    return frozenset(trainable) | _resolve_groups(groups, count)


def gradual_unfreezing(count: int, n_stages: int | None = None) -> tuple[frozenset[int], ...]:
    """ULMFiT's gradual unfreezing, one trainable set per stage (an epoch each in the paper):
    the last group, then the last two, ..., and in the final stage all groups. `n_stages`
    (default `count`) shortens it: fastai's tutorial uses `freeze_to(-1), (-2), (-3)` and then
    `unfreeze()`, which is `n_stages=4` for the 5 classifier groups."""
    n_stages = count if n_stages is None else n_stages
    if not 1 <= n_stages <= count:
        raise ValueError(f"n_stages must be in [1, {count}], got {n_stages}")
    return tuple(freeze_to(-stage, count) for stage in range(1, n_stages)) + (unfreeze(count),)


def chain_thaw(count: int) -> tuple[frozenset[int], ...]:
    """Chain-thaw (Felbo et al. 2017), the alternative the ULMFiT paper compares with: the last
    (new) group alone, then each group alone from the first to the second-to-last, then all."""
    return ((frozenset({count - 1}),) + tuple(frozenset({g}) for g in range(count - 1))
            + (unfreeze(count),))


# --------------------------------------------------------------------------- per-group values


@dataclasses.dataclass(frozen=True)
class Slice:
    """fastai's `slice(start, stop)` for a per-group value, hashable (unlike Python's `slice`):
    `Slice(lo, hi)` spaces the groups geometrically from lo to hi (`even_mults`);
    `Slice(None, hi)` gives `hi / 10` to every group but the last, which gets `hi`."""
    start: float | None
    stop: float


def even_mults(start: float, stop: float, count: int) -> tuple[float, ...]:
    """fastcore's `even_mults`: `start * (stop / start) ** (k / (count - 1))` for k < count,
    computed as fastcore does (`start * step**k`), so values are bit-equal to fastai's."""
    if count == 1:
        return (stop,)
    step = (stop / start) ** (1 / (count - 1))
    return tuple(start * step**k for k in range(count))


def discriminative_lrs(lr: float, count: int, factor: float = 2.6) -> tuple[float, ...]:
    """The paper's discriminative fine-tuning, eta^{l-1} = eta^l / factor: group k gets
    `lr / factor ** (count - 1 - k)`, the last group `lr`."""
    return tuple(lr / factor ** (count - 1 - k) for k in range(count))


def group_values(value: float | Slice | slice | Sequence[float], count: int) -> tuple[float, ...]:
    """One value per group, as fastai's `Optimizer.set_hyper` spreads a hyper-parameter: a number
    goes to every group, a `Slice` / `slice` is spaced as fastai does, a sequence has one value
    per group (or a single value for all)."""
    if isinstance(value, (Slice, slice)):
        if value.start:
            return even_mults(value.start, value.stop, count)
        return (value.stop / 10,) * (count - 1) + (value.stop,)
    if isinstance(value, (int, float)):
        return (float(value),) * count
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{len(values)} values for {count} parameter groups: {values}")
    return values


# --------------------------------------------------------------------------- schedules


def _cosine_between(start, end, done, left):
    """fastai's `sched_cos(start, end, pos)` = start + (1 + cos(pi (1 - pos))) (end - start) / 2
    with pos = done / (done + left), computed as the equal
        start sin^2(pi/2 * left / length) + end sin^2(pi/2 * done / length):
    two non-negative terms, each angle from an exact step difference, so float32 keeps its
    relative precision near the ends of a phase (the one-cycle anneal ends at lr / 1e5, where the
    original form cancels and `1 - pos` loses digits). A phase of length 0 (pct_start 0 or 1)
    is never selected; its length is kept positive so that no NaN appears."""
    length = jnp.maximum(done + left, jnp.finfo(jnp.float32).tiny)
    return (start * jnp.sin(jnp.pi / 2 * left / length) ** 2
            + end * jnp.sin(jnp.pi / 2 * done / length) ** 2)


def combined_cosine(pct_start: float, start: float, middle: float, end: float,
                    total_steps: int) -> Schedule:
    """fastai's `combined_cos(pct_start, start, middle, end)` evaluated, as `fit_one_cycle` does,
    at pos = t / total_steps before step t:
        pos <  pct_start:  sched_cos(start, middle, pos / pct_start)
        pos >= pct_start:  sched_cos(middle, end, (pos - pct_start) / (1 - pct_start))
    with sched_cos(a, b, x) = a + (1 + cos(pi (1 - x))) (b - a) / 2 (see `_cosine_between`).
    """
    if total_steps < 1 or not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"need total_steps >= 1 and pct_start in [0, 1], got {total_steps}, "
                         f"{pct_start}")
    return lambda step: _combined_cosine(step, total_steps, pct_start, start, middle, end)


def _combined_cosine(step, total_steps, pct_start, start, middle, end):
    """`combined_cosine`'s value at `step`; `total_steps` may be traced (a stage length known at run time)."""
    t = jnp.asarray(step, jnp.float32)
    warm_steps = total_steps * pct_start
    warm = _cosine_between(start, middle, t, warm_steps - t)
    anneal = _cosine_between(middle, end, t - warm_steps, total_steps - t)
    return jnp.where(t < warm_steps, warm, anneal)


def stlr(peak_lr: float, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> Schedule:
    """Slanted triangular learning rate, the ULMFiT paper's equation 3, at step t (from 0):

        cut   = floor(T * cut_frac)
        p     = t / cut                                        if t < cut
                1 - (t - cut) / (cut * (1 / cut_frac - 1))     otherwise
        eta_t = eta_max * (1 + p * (ratio - 1)) / ratio

    e.g. T = 1000: 3.125e-4 at t = 0, 1e-2 at t = 100, 3.23e-4 at t = 999. When T * cut_frac is
    not whole the decay denominator is shorter than the T - cut steps left and p would go
    negative at the end (T = 37: eta_36 = -2.2e-3); p is clamped to [0, 1], so the last steps stay
    at eta_max / ratio. cut is at least 1 (one warm-up step at eta_max / ratio) when
    T * cut_frac < 1.
    """
    if total_steps < 1 or not 0.0 < cut_frac < 1.0 or ratio < 1.0:
        raise ValueError(f"need total_steps >= 1, 0 < cut_frac < 1, ratio >= 1; got "
                         f"{total_steps}, {cut_frac}, {ratio}")
    cut = max(math.floor(total_steps * cut_frac), 1)
    return lambda step: _stlr(step, peak_lr, cut, cut_frac, ratio)


def _stlr(step, peak_lr, cut, cut_frac: float, ratio: float):
    """`stlr`'s value at `step`; `peak_lr` and `cut` may be traced (a stage known at run time)."""
    t = jnp.asarray(step, jnp.float32)
    decay_length = cut * (1 / cut_frac - 1)
    # 1 - (t - cut) / D written as (D - (t - cut)) / D: no cancellation in float32 near p = 0
    p = jnp.where(t < cut, t / cut, (decay_length - (t - cut)) / decay_length)
    p = jnp.clip(p, 0.0, 1.0)
    return peak_lr * (1 + p * (ratio - 1)) / ratio


def exponential(start: float, end: float, total_steps: int) -> Schedule:
    """fastai's `sched_exp(start, end, pos)` = start * (end / start) ** pos at pos = t / total_steps
    (its LR finder's schedule: step t of `num_it` uses pos = t / num_it, so the last step is just
    below `end`). Computed as exp(log start + pos log(end / start)) in float32."""
    if total_steps < 1 or start <= 0.0 or end <= 0.0:
        raise ValueError(f"need total_steps >= 1 and positive start, end; got {total_steps}, {start}, {end}")
    log_start, log_ratio = math.log(start), math.log(end / start)

    def schedule(step):
        return jnp.exp(log_start + jnp.asarray(step, jnp.float32) / total_steps * log_ratio)

    return schedule


def constant(value: float) -> Schedule:
    """The same value at every step."""
    return lambda step: jnp.full((), value, jnp.float32)


@dataclasses.dataclass(frozen=True)
class OneCycle:
    """fastai's `fit_one_cycle`: learning rate lr/div -> lr (cosine, first pct_start of the steps)
    -> lr/div_final (cosine); momentum (beta1) moms[0] -> moms[1] -> moms[2] on the same cycle
    (text learners: 0.8, 0.7, 0.8); `moms=None` keeps beta1 constant."""
    div: float = 25.0
    div_final: float = 1e5
    pct_start: float = 0.25
    moms: tuple[float, float, float] | None = (0.8, 0.7, 0.8)


@dataclasses.dataclass(frozen=True)
class SlantedTriangular:
    """The ULMFiT paper's STLR (`stlr`), momentum constant at beta1."""
    cut_frac: float = 0.1
    ratio: float = 32.0


@dataclasses.dataclass(frozen=True)
class Constant:
    """Constant learning rate and momentum (fastai's plain `fit`)."""


@dataclasses.dataclass(frozen=True)
class Exponential:
    """fastai's `SchedExp(start, end)` at pos = t / total_steps, as its LR finder runs it:
    lr_t = start * (end / start) ** (t / total_steps), momentum constant at beta1. `start` and
    `end` are the learning rates themselves (a number, a `Slice` or one per group, spread like
    `learning_rate`), so `OptimizerConfig.learning_rate` is not used with this schedule."""
    start: float | Slice | tuple[float, ...] = 1e-7
    end: float | Slice | tuple[float, ...] = 10.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """fastai's Adam with per-group hyper-parameters, a schedule and gradient clipping.

    The defaults are fastai 2.8.12's text learners (`Adam(mom=0.9, sqr_mom=0.99, eps=1e-5,
    wd=0.01)`, `fit_one_cycle` with moms 0.8/0.7/0.8, no clipping); `paper_config` gives the
    paper's recipe. `learning_rate` and `weight_decay` take a number (every group), a `Slice`
    (fastai's `slice`) or a tuple with one value per group (`discriminative_lrs`); the
    learning rate is the schedule's peak. `beta1` is used where the schedule doesn't schedule
    momentum. `clip_norm` clips the global norm of all trained gradients first (fastai's
    `GradientClip`). `train_bn`: batch-norm leaves train even in frozen groups.
    """
    learning_rate: float | Slice | tuple[float, ...] = 1e-3
    weight_decay: float | Slice | tuple[float, ...] = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-5
    decouple_weight_decay: bool = True
    clip_norm: float | None = None
    train_bn: bool = True
    schedule: OneCycle | SlantedTriangular | Constant | Exponential = OneCycle()


def paper_config(learning_rate: float, count: int, **overrides) -> OptimizerConfig:
    """The ULMFiT paper's recipe: STLR (cut_frac 0.1, ratio 32), Adam betas (0.7, 0.99),
    discriminative learning rates `learning_rate / 2.6**depth` over `count` groups. The paper
    does not state eps or weight decay; they stay fastai's unless overridden."""
    fields = dict(learning_rate=discriminative_lrs(learning_rate, count), beta1=0.7, beta2=0.99,
                  schedule=SlantedTriangular())
    fields.update(overrides)
    return OptimizerConfig(**fields)


def learning_rate_schedules(config: OptimizerConfig, count: int,
                            total_steps: int) -> tuple[Schedule, ...]:
    """One learning-rate schedule per group: the config's schedule peaking at the group's rate."""
    peaks = group_values(config.learning_rate, count)
    schedule = config.schedule
    if isinstance(schedule, OneCycle):
        return tuple(combined_cosine(schedule.pct_start, lr / schedule.div, lr,
                                     lr / schedule.div_final, total_steps) for lr in peaks)
    if isinstance(schedule, SlantedTriangular):
        return tuple(stlr(lr, total_steps, schedule.cut_frac, schedule.ratio) for lr in peaks)
    if isinstance(schedule, Exponential):
        return tuple(exponential(start, end, total_steps) for start, end in
                     zip(group_values(schedule.start, count), group_values(schedule.end, count)))
    return tuple(constant(lr) for lr in peaks)


def momentum_schedule(config: OptimizerConfig, total_steps: int) -> Schedule:
    """beta1 at each step: one-cycle's `moms` cycle, otherwise constant `config.beta1`."""
    schedule = config.schedule
    if isinstance(schedule, OneCycle) and schedule.moms is not None:
        return combined_cosine(schedule.pct_start, *schedule.moms, total_steps)
    return constant(config.beta1)


# --------------------------------------------------------------------------- transformations


class FastaiAdamState(NamedTuple):
    count: jax.Array      # updates done so far; fastai's `step` is count + 1 during an update
    grad_avg: PyTree      # first moment
    sqr_avg: PyTree       # second moment


def fastai_adam(learning_rate: float | Schedule, beta1: float | Schedule, beta2: float = 0.99,
                eps: float = 1e-5, weight_decay: float = 0.0,
                decouple_weight_decay: bool = True) -> optax.GradientTransformation:
    """fastai's `Adam` (optimizer.py: `weight_decay` or `l2_reg`, `average_grad` with dampening,
    `average_sqr_grad`, `step_stat`, `adam_step`), learning rate and beta1 evaluated at the
    update number t (from 0), s = t + 1:

        g    <- g + wd p                                  (only if not decoupled: L2)
        m    <- beta1_t m + (1 - beta1_t) g
        v    <- beta2 v + (1 - beta2) g^2
        p    <- p (1 - lr_t wd)                           (only if decoupled, before the step)
        p    <- p - lr_t / (1 - beta1_t^s) * m / (sqrt(v / (1 - beta2^s)) + eps)

    The bias corrections use the current beta1_t (not the product of past ones), as fastai's
    `debias` does. Returns the update (new p - p); needs `params` when weight_decay != 0.
    """
    learning_rate_at = learning_rate if callable(learning_rate) else constant(learning_rate)
    beta1_at = beta1 if callable(beta1) else constant(beta1)

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return FastaiAdamState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(grads, state, params=None):
        if weight_decay and params is None:
            raise ValueError("fastai_adam with weight decay needs params in update()")
        lr = learning_rate_at(state.count)
        mom = beta1_at(state.count)
        step = (state.count + 1).astype(jnp.float32)
        if weight_decay and not decouple_weight_decay:
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
        grad_avg = jax.tree.map(lambda m, g: mom * m + (1 - mom) * g, state.grad_avg, grads)
        sqr_avg = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.sqr_avg, grads)
        debias1 = 1 - mom**step
        debias2 = 1 - beta2**step
        updates = jax.tree.map(
            lambda m, v: -(lr / debias1) * m / (jnp.sqrt(v / debias2) + eps), grad_avg, sqr_avg)
        if weight_decay and decouple_weight_decay:
            updates = jax.tree.map(lambda u, p: u - lr * weight_decay * p, updates, params)
        return updates, FastaiAdamState(state.count + 1, grad_avg, sqr_avg)

    return optax.GradientTransformation(init, update)


def clip_gradient_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's `clip_grad_norm_` (fastai's `GradientClip`) over the whole gradient tree:
    g <- g * min(1, max_norm / (||g||_2 + 1e-6)), ||g||_2 the norm of all leaves together."""
    def update(grads, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: g * scale, grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig, params: PyTree, kind: str, total_steps: int,
                   trainable: frozenset[int] | None = None) -> optax.GradientTransformation:
    """The whole optimizer of one training stage as one optax transformation.

    `params` (the full tree) fixes the groups (`layer_group_labels(params, kind)`); `trainable`
    (default: all groups) the stage's trained groups; `total_steps` the schedule length. The
    transformation works on the trained part of the parameters (`split_trainable(params,
    labels, trainable, config.train_bn)[0]`, the whole tree when everything trains): init it on
    that tree, update with gradients of that tree. Each trained group g gets
    `fastai_adam(lr_g(t), beta1(t), ...)` with its weight decay (zero on biases and batch-norm
    leaves), behind `clip_gradient_norm` when `config.clip_norm` is set.
    """
    labels = layer_group_labels(params, kind)
    count = n_groups(labels)
    trainable = unfreeze(count) if trainable is None else frozenset(trainable)
    if not trainable <= unfreeze(count):
        raise ValueError(f"trainable groups {sorted(trainable)} outside the {count} groups")
    lr_schedules = learning_rate_schedules(config, count, total_steps)
    beta1 = momentum_schedule(config, total_steps)
    weight_decays = group_values(config.weight_decay, count)

    optimizer_labels: dict[str, str] = {}
    transforms: dict[str, optax.GradientTransformation] = {}
    leaves = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels),
                 jax.tree.leaves(weight_decay_mask(params)),
                 jax.tree.leaves(trainable_mask(params, labels, trainable, config.train_bn)))
    for (path, _leaf), group, decays, trained in leaves:
        if not trained:
            continue
        label = f"group_{group}" if decays else f"group_{group}_no_weight_decay"
        optimizer_labels[keystr(path)] = label
        if label not in transforms:
            transforms[label] = fastai_adam(
                lr_schedules[group], beta1, config.beta2, config.eps,
                weight_decays[group] if decays else 0.0, config.decouple_weight_decay)
    if not transforms:
        raise ValueError(f"nothing to train: trainable groups {sorted(trainable)}, "
                         f"train_bn={config.train_bn}")

    def label_tree(tree):
        def label(path, _leaf):
            key = keystr(path)
            if key not in optimizer_labels:
                raise ValueError(f"parameter {key} is frozen in this stage: give the optimizer "
                                 "split_trainable(params, labels, trainable)[0]")
            return optimizer_labels[key]
        return tree_map_with_path(label, tree)

    adam = optax.partition(transforms, label_tree)
    if config.clip_norm is None:
        return adam
    return optax.chain(clip_gradient_norm(config.clip_norm), adam)


# --------------------------------------------------------------------------- stages at run time


class StageHyper(NamedTuple):
    """What changes from one training stage to the next, as arrays, so that one compiled train step
    serves every stage of a run: `trainable` bool[G] (the trained layer groups), `learning_rate`
    f32[G] (each group's peak rate: `OptimizerConfig.learning_rate` spread by `group_values`),
    `total_steps` int32[] (the stage's length, which the schedule spans)."""
    trainable: jax.Array
    learning_rate: jax.Array
    total_steps: jax.Array


class StageState(NamedTuple):
    """A stage optimizer's state: the stage's `hyper` and the Adam state of every parameter (frozen
    ones included, so the tree is the same in every stage)."""
    hyper: StageHyper
    adam: PyTree


class StageOptimizer(NamedTuple):
    """`init(params, hyper) -> StageState`; `update(grads, state, params) -> (new_params, state)`.

    Built by `stage_optimizer`; `stage_hyper` makes a stage's `hyper`."""
    init: Callable[[PyTree, StageHyper], StageState]
    update: Callable[[PyTree, StageState, PyTree], tuple[PyTree, StageState]]


def stage_hyper(config: OptimizerConfig, count: int, total_steps: int,
                trainable: frozenset[int] | None = None) -> StageHyper:
    """The run-time part of one stage for `stage_optimizer`: `config.learning_rate` per group, the
    trained groups (default all) and the stage's length."""
    import numpy as np
    trainable = unfreeze(count) if trainable is None else frozenset(trainable)
    if not trainable <= unfreeze(count):
        raise ValueError(f"trainable groups {sorted(trainable)} outside the {count} groups")
    if total_steps < 1:
        raise ValueError(f"a stage needs at least one step, got {total_steps}")
    return StageHyper(np.array([g in trainable for g in range(count)]),
                      np.asarray(group_values(config.learning_rate, count), np.float32),
                      np.asarray(total_steps, np.int32))


def stage_optimizer(config: OptimizerConfig, params: PyTree, kind: str) -> StageOptimizer:
    """`make_optimizer` with the stage's trained groups, learning rates and length read from the
    state (`StageHyper`) instead of fixed in the program: every stage of a run (gradual unfreezing,
    chain-thaw) runs the same compiled train step. `config.learning_rate` is not used (it is the
    hyper's); the rest of `config` is fixed.

    The same arithmetic as `make_optimizer` on the trained leaves: fastai's Adam per group (through
    `optax.partition`), its schedule at the group's peak rate, clipping over the trained gradients.
    Frozen leaves get a zero gradient (their moments stay zero) and `update` returns them
    unchanged, bit for bit; batch-norm leaves train in frozen groups when `config.train_bn`. A new
    stage starts from `init` (fastai's `freeze_to` clears the optimizer state). The price of one
    program for all stages: the backward pass runs through frozen groups too (differentiate only
    the groups that can train with `make_train_step(differentiated=...)`).
    """
    if isinstance(config.schedule, Exponential) and not (
            isinstance(config.schedule.start, (int, float)) and isinstance(config.schedule.end, (int, float))):
        raise ValueError("a stage optimizer's exponential schedule takes one start and one end rate")
    labels = layer_group_labels(params, kind)
    count = n_groups(labels)
    group_of = jax.tree.leaves(labels)
    norm_leaf = [_path_names(path)[-1] in NORM_LEAF_NAMES for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    decays = jax.tree.leaves(weight_decay_mask(params))
    weight_decays = group_values(config.weight_decay, count)
    optimizer_labels = jax.tree.unflatten(jax.tree.structure(params), [
        f"group_{g}" if d else f"group_{g}_no_weight_decay" for g, d in zip(group_of, decays)])
    schedule = config.schedule

    def adam(learning_rates, beta1) -> optax.GradientTransformation:
        """fastai's Adam per optimizer label; learning_rates f32[G] at this step, beta1 f32[]."""
        transforms = {}
        for g, d in zip(group_of, decays):
            label = f"group_{g}" if d else f"group_{g}_no_weight_decay"
            if label not in transforms:
                transforms[label] = fastai_adam(learning_rates[g], beta1, config.beta2, config.eps,
                                                weight_decays[g] if d else 0.0, config.decouple_weight_decay)
        return optax.partition(transforms, optimizer_labels)

    def rates_at(t, hyper):
        """(learning rate per group f32[G], beta1) at the stage's update t."""
        total, peak = hyper.total_steps, hyper.learning_rate
        if isinstance(schedule, OneCycle):
            rates = _combined_cosine(t, total, schedule.pct_start, peak / schedule.div, peak,
                                     peak / schedule.div_final)
            beta1 = (_combined_cosine(t, total, schedule.pct_start, *schedule.moms) if schedule.moms is not None
                     else jnp.float32(config.beta1))
            return rates, beta1
        if isinstance(schedule, SlantedTriangular):
            cut = jnp.maximum(jnp.floor(total * schedule.cut_frac), 1).astype(jnp.float32)
            return _stlr(t, peak, cut, schedule.cut_frac, schedule.ratio), jnp.float32(config.beta1)
        if isinstance(schedule, Exponential):
            rate = jnp.exp(math.log(schedule.start) + jnp.asarray(t, jnp.float32) / total
                           * math.log(schedule.end / schedule.start))
            return jnp.broadcast_to(rate, peak.shape), jnp.float32(config.beta1)
        return peak, jnp.float32(config.beta1)

    def trained_leaves(hyper):
        return [hyper.trainable[g] | (config.train_bn and is_norm) for g, is_norm in zip(group_of, norm_leaf)]

    @jax.jit                     # one compile for the whole tree, not one per leaf shape
    def init(params, hyper):
        zeros = jnp.zeros(count, jnp.float32)
        return StageState(hyper, adam(zeros, jnp.float32(0.0)).init(params))

    def update(grads, state, params):
        structure = jax.tree.structure(params)
        trained = trained_leaves(state.hyper)
        grads = jax.tree.unflatten(structure, [jnp.where(m, g, jnp.zeros_like(g)) for m, g in
                                               zip(trained, jax.tree.leaves(grads))])
        if config.clip_norm is not None:
            grads, _ = clip_gradient_norm(config.clip_norm).update(grads, optax.EmptyState())
        # every group's Adam counts the stage's updates alike: read t from the first
        t = jax.tree.leaves(state.adam, is_leaf=lambda x: isinstance(x, FastaiAdamState))[0].count
        rates, beta1 = rates_at(t, state.hyper)
        updates, adam_state = adam(rates, beta1).update(grads, state.adam, params)
        new_params = jax.tree.unflatten(structure, [
            jnp.where(m, p + u, p) for m, p, u in zip(trained, jax.tree.leaves(params), jax.tree.leaves(updates))])
        return new_params, StageState(state.hyper, adam_state)

    return StageOptimizer(init, update)
