"""fastai 2.8.12's learning-rate finder (`Learner.lr_find`, `LRFinder`, `valley` / `minimum` / `steep`).

The finder trains for at most `num_it` steps while the learning rate grows exponentially,
lr_i = start_lr * (end_lr / start_lr) ** (i / num_it) for step i (from 0; fastai's `SchedExp` at
pos = train_iter / num_it, here `optim.Exponential` in the optimizer's schedule), and records
after every step the smoothed training loss, fastai's `AvgSmoothLoss`:

    v_i = beta v_{i-1} + (1 - beta) loss_i          (torch.lerp(loss, v, beta), v_0 = 0)
    smoothed_i = v_i / (1 - beta ** (i + 1))        (debiased; beta = 0.98)

It stops after the step whose smoothed loss exceeds 4x the smallest so far (`stop_div`), or
after `num_it` steps, or (here, not in fastai) at a non-finite loss, since fastai's NaN
smoothed losses would be cut from the suggestions anyway. The record is (lrs, smoothed losses),
the learning rate being the last layer group's (fastai's `recorder.lrs` reads `hypers[-1]`).

Suggestions, as `lr_find` makes them: on the record without its first `num_it // 10` and last 5
points (cut at the first NaN), `valley` (fastai's default), `minimum` and `steep`; each gives
(suggested lr, (lr, loss) of the point plotted for it). The functions below are fastai's, computed
in float32 as fastai computes them on its float32 tensors.

Nothing is returned but the record: the trained parameters are dropped, so the caller's model is
unchanged (fastai saves and reloads it).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import encoder, optim, predict, steps
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig

SUGGESTIONS = ("valley", "minimum", "steep")


@dataclasses.dataclass(frozen=True)
class FinderConfig:
    """fastai's `lr_find` defaults; `beta` is the Recorder's smoothing."""
    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_it: int = 100
    stop_div: bool = True
    beta: float = 0.98

    def __post_init__(self):
        if not 0.0 < self.start_lr < self.end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got {self.start_lr}, {self.end_lr}")
        if self.num_it < 1:
            raise ValueError(f"num_it must be positive, got {self.num_it}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    @property
    def steps(self) -> int:
        """fastai's `LRFinder` runs at least 6 iterations (`if num_it < 6: num_it = 6`)."""
        return max(self.num_it, 6)


@dataclasses.dataclass(frozen=True)
class FinderRecord:
    """lrs f64[n] and smoothed losses f32[n] after each of the n steps run; raw losses f32[n];
    why it stopped: "num_it", "diverged" (smoothed > 4x best) or "non-finite" (NaN); num_it as
    asked (fastai's suggestion window uses it, not the 6-step minimum)."""
    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    stopped: str
    num_it: int


# ----------------------------------------------------------------------------------------------
# The finder loop


def run_finder(step: Callable, carry, batches: Iterator, finder: FinderConfig,
               lr_at: Callable[[int], float]) -> FinderRecord:
    """Run `step(carry, batch) -> (carry, loss)` once per batch until fastai's LRFinder would stop;
    `lr_at(i)` is the learning rate of step i (recorded). The final carry is dropped."""
    beta = np.float32(finder.beta)
    average = np.float32(0.0)
    best = math.inf
    lrs, smoothed, raw = [], [], []
    stopped = "num_it"
    for i in range(finder.steps):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the training data ran out after {i} batches")
        carry, loss = step(carry, batch)
        loss = np.float32(loss)
        average = loss + beta * (average - loss)                   # torch.lerp(loss, average, beta)
        value = np.float32(average / (1 - finder.beta ** (i + 1)))
        lrs.append(float(lr_at(i)))
        smoothed.append(value)
        raw.append(loss)
        if math.isnan(value):
            stopped = "non-finite"
            break
        best = min(best, float(value))
        if finder.stop_div and value > 4 * best:
            stopped = "diverged"
            break
    return FinderRecord(np.asarray(lrs, np.float64), np.asarray(smoothed, np.float32), np.asarray(raw, np.float32),
                        stopped, finder.num_it)


def _strong_copy(tree):
    """A copy of every leaf with its dtype made explicit: the caller's buffers survive the train
    step's donation, and weak-typed leaves (as from `jnp.full(..., 0.0)`) do not cost a second
    compile when the step returns them strongly typed."""
    return jax.tree.map(lambda leaf: jnp.array(leaf, dtype=jnp.asarray(leaf).dtype), tree)


def _finder(kind: str, config, params, carry, finder: FinderConfig, base: optim.OptimizerConfig, trainable,
            regularization, seed: int):
    """-> (train step, initial `steps.TrainState`, lr_at): the exponential schedule over the trained groups
    (only those are differentiated)."""
    opt_config = dataclasses.replace(base, schedule=optim.Exponential(finder.start_lr, finder.end_lr))
    count = optim.n_groups(optim.layer_group_labels(params, kind))
    trainable = optim.unfreeze(count) if trainable is None else frozenset(trainable)
    optimizer = optim.stage_optimizer(opt_config, params, kind)
    hyper = optim.stage_hyper(opt_config, count, finder.steps, trainable)
    train_step = steps.make_train_step(kind, config, optimizer, params, regularization=regularization,
                                       differentiated=trainable, train_bn=base.train_bn)
    params, carry = _strong_copy((params, carry))        # the train step donates its input buffers
    state = steps.init_state(params, optimizer.init(params, hyper), carry, seed)
    lr_at = optim.exponential(finder.start_lr, finder.end_lr, finder.steps)
    return train_step, state, lambda i: float(lr_at(i))


def find_language_model_lr(params, config: LanguageModelConfig, documents, *, batch_size: int = 64,
                           bptt: int = 70, finder: FinderConfig = FinderConfig(),
                           optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
                           trainable: frozenset[int] | None = None, backwards: bool = False, seed: int = 0,
                           regularization: steps.RegularizationConfig = steps.RegularizationConfig()
                           ) -> FinderRecord:
    """The LR finder over LM training steps (`steps.make_train_step`).

    documents: int32 token arrays, shuffled and concatenated each epoch (fastai's LMDataLoader)
    into batches int32[batch_size, bptt] (an epoch's short last window is skipped); the hidden
    state is carried between windows and reset each epoch (fastai's ModelResetter). `optimizer`
    gives Adam's other settings (weight decay, betas, clipping); its schedule is replaced by the
    exponential one. `trainable`: the trained layer groups (default all). `params` is unchanged.
    """
    from ulmfit_jax.text.batches import LMBatchSettings, lm_epoch
    n_tokens = sum(len(d) for d in documents)
    if n_tokens <= batch_size * bptt:   # so every epoch has a whole window
        raise ValueError(f"the training set has {n_tokens} tokens: too few for one batch of {batch_size} x {bptt}")
    initial = lambda: encoder.initial_state(config.encoder, batch_size)     # a fresh one: steps donate theirs
    train_step, state, lr_at = _finder("lm", config, params, initial(), finder, optimizer, trainable, regularization,
                                       seed)
    settings = LMBatchSettings(batch_size=batch_size, seq_len=bptt, backwards=backwards)

    def batches():
        for epoch in itertools.count():
            new_epoch = True
            for batch in lm_epoch(documents, settings, np.random.default_rng([seed, epoch])):
                if batch.length == bptt:
                    yield new_epoch, steps.language_model_batch(batch)
                    new_epoch = False

    def step(state, batch):
        new_epoch, batch = batch
        state, metrics = train_step(state.replace(carry=initial()) if new_epoch else state, batch)
        return state, metrics["loss"]

    return run_finder(step, state, batches(), finder, lr_at)


def find_classifier_lr(params, batch_stats, config: ClassifierConfig, documents, labels, *, batch_size: int = 64,
                       finder: FinderConfig = FinderConfig(), optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
                       trainable: frozenset[int] | None = None, backwards: bool = False, seed: int = 0,
                       regularization: steps.RegularizationConfig = steps.RegularizationConfig()) -> FinderRecord:
    """The LR finder over classifier training steps (`steps.make_train_step`).

    documents: int32 token arrays, labels int[N]; batches as `train.fit_classifier` draws them
    (fastai's SortedDL order, int32[batch_size, S] with S bucketed to multiples of config.bptt).
    Other arguments as `find_language_model_lr`; `params` and `batch_stats` are unchanged.
    """
    from ulmfit_jax.text.batches import classifier_batches
    if len(documents) < batch_size:
        raise ValueError(f"the training set has {len(documents)} documents: fewer than one batch of {batch_size}")
    if labels is None or len(labels) != len(documents):
        raise ValueError("the classifier LR finder needs one label per training document")
    train_step, state, lr_at = _finder("classifier", config, params, batch_stats, finder, optimizer, trainable,
                                       regularization, seed)
    settings = predict.classifier_batch_settings(config, batch_size, backwards)

    def batches():
        for epoch in itertools.count():
            rng = np.random.RandomState([seed, epoch])
            for batch in classifier_batches(documents, labels, settings, train=True, rng=rng):
                yield steps.classifier_batch(batch)

    def step(state, batch):
        state, metrics = train_step(state, batch)
        return state, metrics["loss"]

    return run_finder(step, state, batches(), finder, lr_at)


# ----------------------------------------------------------------------------------------------
# Suggestions (fastai.callback.schedule), on float32 arrays as fastai's tensors


def valley(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, tuple[float, float]]:
    """fastai's `valley`: the longest run of decreasing losses (longest decreasing subsequence
    ending at each point, O(n^2)), and the point 1/3 + 1/6 of the way down it."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    index = max_start + int(sections) + int(sections / 2)
    return float(lrs[index]), (float(lrs[index]), float(losses[index]))


def minimum(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, tuple[float, float]]:
    """fastai's `minimum`: a tenth of the lr at the lowest loss (plotted at that lr)."""
    lr_min = float(lrs[np.argmin(losses)])
    nearest = min(range(len(lrs)), key=lambda i: abs(float(lrs[i]) - lr_min))
    return lr_min / 10, (lr_min, float(losses[nearest]))


def steep(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, tuple[float, float]]:
    """fastai's `steep`: the lr where d loss / d log(lr) is most negative."""
    lrs, losses = np.asarray(lrs, np.float32), np.asarray(losses, np.float32)
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    lr_steep = float(lrs[np.argmin(grads)])
    nearest = min(range(len(lrs)), key=lambda i: abs(float(lrs[i]) - lr_steep))
    return lr_steep, (lr_steep, float(losses[nearest]))


SUGGESTION_FUNCTIONS = {"valley": valley, "minimum": minimum, "steep": steep}


def suggestion_window(record: FinderRecord) -> tuple[np.ndarray, np.ndarray]:
    """What fastai's `lr_find` suggests from: lrs and losses f32[m] without the first
    num_it // 10 and the last 5 of the points fastai records, cut at the first NaN. (fastai would
    have gone on recording NaN to the end after a non-finite loss; the window is the same.)"""
    n_recorded = record.lrs.size if record.stopped != "non-finite" else max(record.num_it, 6)
    window = slice(record.num_it // 10, n_recorded - 5)
    lrs = record.lrs[window].astype(np.float32)
    losses = record.losses[window]
    nan = np.flatnonzero(np.isnan(losses))
    if nan.size:
        lrs, losses = lrs[:nan[0]], losses[:nan[0]]
    if lrs.size < 2:
        raise ValueError(f"the finder stopped ({record.stopped}) after {record.lrs.size} steps: too few points to "
                         f"suggest from (the first {record.num_it // 10} and the last 5 are left out); "
                         "lower the start learning rate or raise num_it")
    return lrs, losses


def suggest(record: FinderRecord, names=SUGGESTIONS) -> dict[str, tuple[float, tuple[float, float]]]:
    """{name: (suggested lr, (lr, loss) of its plotted point)} for fastai's suggestion functions."""
    lrs, losses = suggestion_window(record)
    return {name: SUGGESTION_FUNCTIONS[name](lrs, losses) for name in names}


def plot(record: FinderRecord, suggestions: dict, path) -> None:
    """fastai's `plot_lr_find`: smoothed loss against lr (log x) without the last 5 points, and a
    marker per suggestion; saved as PNG at `path`."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    end = max(record.lrs.size - 5, 1)
    axes.plot(record.lrs[:end], record.losses[:end])
    axes.set_xscale("log")
    axes.set_xlabel("Learning Rate")
    axes.set_ylabel("Loss")
    for name, (lr, (x, y)) in suggestions.items():
        axes.plot(x, y, "o", label=f"{name}: {lr:.2e}")
    if suggestions:
        axes.legend(loc="best")
    figure.savefig(path, dpi=100, bbox_inches="tight")
