"""Training recipes as data: which layer groups train, for how many epochs, at which learning rates
and on which schedule, for ULMFiT's LM fine-tuning and its classifier.

A `Recipe` is three tuples of `StageRecipe`: LM fine-tuning, the classifier on a fine-tuned
encoder, and the classifier trained from scratch (no encoder). A stage names its rates relative to
the run's base learning rate and its length in epochs or relative to the run's epoch count, so one
recipe serves any data set, model size and `--lr`. `training_stages` turns a recipe's stages into
the `train.Stage` list the training loop takes, for a number of layer groups and an optimizer.

Recipes held here (`RECIPES`, by the names the scripts' `--recipe` takes):
- `fastai`: fastai's text tutorial (fastai 2.8.12), what the scripts run by default;
- `chain-thaw`: the same with the classifier's chain-thaw (Felbo et al. 2017), the alternative
  Howard & Ruder 2018 compare gradual unfreezing with;
- `paper`: Howard & Ruder 2018, section 3 (discriminative fine-tuning, STLR, gradual unfreezing);
- `multifit`: MultiFiT's reference implementation (Eisenschlos et al. 2019);
- `demo`: the CPU demo's (scripts/demo.py), a short gradual unfreezing for a small model;
- `full`, `last`: the classifier's baselines of Howard & Ruder 2018's fine-tuning ablation (their
  Table 7): every group from the start, or the head alone, for as many epochs as `fastai`'s.

`without_discriminative` turns any recipe's stages into the same stages with one rate for every
group (the ablation's "without discriminative fine-tuning").

Learning rates are fractions of the base rate (`Fraction(1, 20)`), applied as `lr * numerator /
denominator`, so `lr / 20` here is bit for bit the `lr / 20` of fastai's own code.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Callable, Union

from ulmfit_jax import optim, train

# --------------------------------------------------------------------------- which groups train


@dataclasses.dataclass(frozen=True)
class All:
    """Every layer group (fastai's `unfreeze()`)."""


@dataclasses.dataclass(frozen=True)
class Last:
    """The last `n` layer groups (fastai's `freeze_to(-n)`; `Last(1)` is `freeze()`; every group
    when the model has no more than `n`)."""
    n: int


@dataclasses.dataclass(frozen=True)
class Only:
    """One group alone (negative counts from the end: `Only(-1)` is the head, or the LM's
    embedding + decoder)."""
    group: int


@dataclasses.dataclass(frozen=True)
class EachAlone:
    """One stage per group, from the first to the one before the last, that group alone: the
    middle of chain-thaw."""


@dataclasses.dataclass(frozen=True)
class Gradual:
    """One stage per unfreezing step short of all groups: the last group, then the last two, ...,
    then all but the first: gradual unfreezing before a final `All()` stage."""


Trainable = Union[All, Last, Only, EachAlone, Gradual]

# --------------------------------------------------------------------------- rates across groups


@dataclasses.dataclass(frozen=True)
class SliceRates:
    """fastai's `slice(lo, hi)`: the last group at the stage's rate `hi`, the first at
    `lo = hi / start_divisor / factor**depth`, the groups between spaced geometrically
    (`optim.Slice`). `depth=None` is the number of groups less one, which makes the step between
    neighbouring groups exactly `factor`."""
    factor: float = 2.6
    depth: int | None = None
    start_divisor: float = 1


@dataclasses.dataclass(frozen=True)
class FactorRates:
    """The paper's discriminative fine-tuning, eta^(l-1) = eta^l / factor: group k gets
    `lr / factor**(groups - 1 - k)` (`optim.discriminative_lrs`)."""
    factor: float = 2.6


Rates = Union[SliceRates, FactorRates, None]
Schedule = Union[optim.OneCycle, optim.SlantedTriangular, None]

# --------------------------------------------------------------------------- stages and recipes


@dataclasses.dataclass(frozen=True)
class StageRecipe:
    """One stage of a recipe.

    trainable: which groups train (`All`, `Last(n)`, `Only(g)`; `EachAlone` and `Gradual` expand to
      one stage per group).
    epochs: a number, or the name of a run setting ("epochs", "freeze_epochs"), plus
      `extra_epochs`; a stage that comes to 0 epochs is left out (`--freeze-epochs 0`).
    lr: the stage's peak rate (the last group's) as a fraction of a run's base rate, `lr_of`:
      "lr" or "frozen_lr" (LM fine-tuning's frozen epoch has a rate of its own).
    rates: how the rate spreads over the groups (`SliceRates`, `FactorRates`; None: the same
      number for every group, left to the optimizer settings).
    schedule: the stage's schedule; None keeps the optimizer settings' (one-cycle by default, STLR
      under `--preset paper`).
    """
    trainable: Trainable = All()
    epochs: int | str = 1
    extra_epochs: int = 0
    lr: Fraction = Fraction(1)
    lr_of: str = "lr"
    rates: Rates = SliceRates()
    schedule: Schedule = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: LM fine-tuning's stages, the classifier's on a fine-tuned encoder, and
    the classifier's from scratch."""
    name: str
    finetune: tuple[StageRecipe, ...]
    classifier: tuple[StageRecipe, ...]
    from_scratch: tuple[StageRecipe, ...]


OptimizerSettings = Union[optim.OptimizerConfig, Callable[..., optim.OptimizerConfig]]
RUN_SETTINGS = ("lr", "frozen_lr", "epochs", "freeze_epochs")


def _trainable_sets(trainable: Trainable, n_groups: int) -> list[frozenset[int] | None]:
    """The trainable groups of the stages `trainable` stands for (None: every group)."""
    if isinstance(trainable, All):
        return [None]
    if isinstance(trainable, Last):
        if trainable.n < 1:
            raise ValueError(f"Last({trainable.n}): at least one group trains")
        return [optim.freeze_to(-trainable.n, n_groups)]
    if isinstance(trainable, Only):
        return [optim.freeze_all_but(trainable.group, n_groups)]
    if isinstance(trainable, EachAlone):
        return [frozenset({g}) for g in range(n_groups - 1)]
    if isinstance(trainable, Gradual):
        return [optim.freeze_to(-k, n_groups) for k in range(1, n_groups)]
    raise TypeError(f"not a trainable-groups spec: {trainable!r}")


def _group_rates(rates: Rates, peak: float, n_groups: int):
    """The stage's `learning_rate` for `optim.OptimizerConfig`."""
    if rates is None:
        return peak
    if isinstance(rates, SliceRates):
        depth = n_groups - 1 if rates.depth is None else rates.depth
        return optim.Slice(peak / rates.start_divisor / rates.factor ** depth, peak)
    if isinstance(rates, FactorRates):
        return optim.discriminative_lrs(peak, n_groups, rates.factor)
    raise TypeError(f"not a rates spec: {rates!r}")


def training_stages(stages: tuple[StageRecipe, ...], *, n_groups: int, optimizer: OptimizerSettings,
                    lr: float, epochs: int | None = None, frozen_lr: float | None = None,
                    freeze_epochs: int | None = None) -> list[train.Stage]:
    """A recipe's stages -> the `train.Stage` list `train.fit_*` take.

    n_groups: the model's layer groups (`optim.n_groups(optim.layer_group_labels(params, kind))`).
    optimizer: the optimizer settings, an `optim.OptimizerConfig` whose `learning_rate` each stage
      replaces, or a function from a stage's learning rate to its `OptimizerConfig` (the scripts
      pass `cli.optimizer_config` for their preset); a stage's own schedule replaces theirs.
    lr, frozen_lr, epochs, freeze_epochs: the run's settings the stages refer to (`lr_of`, and
      `epochs` given by name); one a stage needs and is not given is an error.
    """
    run = {"lr": lr, "frozen_lr": frozen_lr, "epochs": epochs, "freeze_epochs": freeze_epochs}

    def setting(name: str, stage: StageRecipe):
        if name not in run:
            raise ValueError(f"unknown run setting {name!r} in {stage} (known: {', '.join(RUN_SETTINGS)})")
        if run[name] is None:
            raise ValueError(f"the stage {stage} needs the run's {name}")
        return run[name]

    result = []
    for stage in stages:
        count = (stage.epochs if isinstance(stage.epochs, int) else setting(stage.epochs, stage)) + stage.extra_epochs
        if count < 0:
            raise ValueError(f"{count} epochs for the stage {stage}")
        if count == 0:
            continue
        base = setting(stage.lr_of, stage)
        peak = base * stage.lr.numerator / stage.lr.denominator
        learning_rate = _group_rates(stage.rates, peak, n_groups)
        if isinstance(optimizer, optim.OptimizerConfig):
            config = dataclasses.replace(optimizer, learning_rate=learning_rate)
        else:
            config = optimizer(learning_rate)
        if stage.schedule is not None:
            config = dataclasses.replace(config, schedule=stage.schedule)
        result += [train.Stage(count, config, trainable) for trainable in _trainable_sets(stage.trainable, n_groups)]
    return result


def without_discriminative(stages: tuple[StageRecipe, ...]) -> tuple[StageRecipe, ...]:
    """The stages with every group at the stage's rate (`rates=None`): Howard & Ruder 2018's
    ablation without discriminative fine-tuning. The optimizer settings then see a plain number,
    which `--preset paper`'s spread over the groups again: that preset has no such variant."""
    return tuple(dataclasses.replace(stage, rates=None) for stage in stages)


def with_factor(stages: tuple[StageRecipe, ...], factor: float) -> tuple[StageRecipe, ...]:
    """The stages with another discriminative factor (the demo's `--lr-factor`)."""
    return tuple(dataclasses.replace(stage, rates=dataclasses.replace(stage.rates, factor=factor))
                 if stage.rates is not None else stage for stage in stages)


# --------------------------------------------------------------------------- the recipes

# LM fine-tuning as fastai's tutorial: the last group (embedding + decoder) alone for
# `freeze_epochs` at its own rate, then every group; one rate for every group.
_FINETUNE = (StageRecipe(Last(1), epochs="freeze_epochs", lr_of="frozen_lr", rates=None),
             StageRecipe(All(), epochs="epochs", rates=None))

# Without a pretrained encoder, the classifier trains every group from the start, three epochs
# longer, at a quarter of the rate (this project's baseline, not from a publication).
_FROM_SCRATCH = (StageRecipe(All(), epochs="epochs", extra_epochs=3, lr=Fraction(1, 4)),)

FASTAI = Recipe(
    name="fastai",
    finetune=_FINETUNE,
    classifier=(StageRecipe(Last(1), lr=Fraction(1)),
                StageRecipe(Last(2), lr=Fraction(1, 2)),
                StageRecipe(Last(3), lr=Fraction(1, 4)),
                StageRecipe(All(), epochs="epochs", lr=Fraction(1, 20))),
    from_scratch=_FROM_SCRATCH)
"""fastai's text tutorial (fastai 2.8.12): LM fine-tuning one frozen epoch, then all groups;
the classifier's head alone for an epoch at lr, `freeze_to(-2)` for an epoch at lr/2,
`freeze_to(-3)` at lr/4, then `unfreeze()` at lr/20, each stage with discriminative rates
`slice(lr_k / 2.6**(groups-1), lr_k)` (the tutorial's `2.6**4` for its 5 classifier groups),
each its own one-cycle schedule (the optimizer settings')."""

CHAIN_THAW = dataclasses.replace(
    FASTAI, name="chain-thaw",
    classifier=(StageRecipe(Only(-1), lr=Fraction(1)),
                StageRecipe(EachAlone(), lr=Fraction(1, 10)),
                StageRecipe(All(), epochs="epochs", lr=Fraction(1, 20))))
"""Chain-thaw (Felbo et al. 2017), the alternative to gradual unfreezing that Howard & Ruder 2018
compare with: the head alone at lr, then each group alone from the first at lr/10, then every group
at lr/20 for the run's epochs. The rates are this project's choice (the paper gives none); LM
fine-tuning and the from-scratch classifier are the tutorial's."""

_STLR = optim.SlantedTriangular()
PAPER = Recipe(
    name="paper",
    finetune=(StageRecipe(All(), epochs="epochs", rates=FactorRates(2.6), schedule=_STLR),),
    classifier=(StageRecipe(Gradual(), rates=FactorRates(2.6), schedule=_STLR),
                StageRecipe(All(), epochs="epochs", rates=FactorRates(2.6), schedule=_STLR)),
    from_scratch=(StageRecipe(All(), epochs="epochs", rates=FactorRates(2.6), schedule=_STLR),))
"""Howard & Ruder 2018, section 3: LM fine-tuning of every layer with discriminative rates
(each group lr / 2.6 of the next) and slanted triangular learning rates (cut_frac 0.1, ratio 32);
the classifier with gradual unfreezing, one more group each epoch from the last, then every group
for the run's epochs, all at the same base rate with the same discriminative rates and STLR (each
stage its own cycle). The paper's Adam betas (0.7, 0.99) are optimizer settings: `--preset paper`."""

_MULTIFIT_ONE_CYCLE = optim.OneCycle(div=25.0, div_final=25.0 * 1e4, pct_start=0.3, moms=(0.8, 0.7, 0.8))
MULTIFIT = Recipe(
    name="multifit",
    finetune=(StageRecipe(Last(1), epochs="freeze_epochs", lr_of="frozen_lr", rates=None,
                          schedule=_MULTIFIT_ONE_CYCLE),
              StageRecipe(All(), epochs="epochs", rates=None, schedule=_MULTIFIT_ONE_CYCLE)),
    classifier=(StageRecipe(All(), epochs="epochs", rates=SliceRates(2.6, depth=4, start_divisor=2),
                            schedule=_MULTIFIT_ONE_CYCLE),),
    from_scratch=(StageRecipe(All(), epochs="epochs", rates=SliceRates(2.6, depth=4, start_divisor=2),
                              schedule=_MULTIFIT_ONE_CYCLE),))
"""MultiFiT (Eisenschlos et al. 2019), its reference implementation's `multifit_paper_version`:
LM fine-tuning one frozen epoch (at ten times the base rate there: 1e-2), then every group (1e-3,
20 epochs); the classifier trains every group from the start (8 epochs) at `slice(lr / 2 / 2.6**4,
lr)`. Schedules: fastai 1's one-cycle as that implementation calls it (div 25, pct_start 0.3, end
at lr / 25e4, momentum 0.8 -> 0.7 -> 0.8). Label smoothing, Adam betas and the QRNN are the
preset's (`--preset multifit`)."""

DEMO = Recipe(
    name="demo",
    finetune=(StageRecipe(Last(1), epochs=1, lr_of="frozen_lr", rates=None, schedule=optim.OneCycle()),
              StageRecipe(All(), epochs="epochs", rates=None, schedule=optim.OneCycle())),
    classifier=(StageRecipe(Last(1), lr=Fraction(1), rates=SliceRates(2.6, depth=4), schedule=optim.OneCycle()),
                StageRecipe(Last(2), lr=Fraction(1, 2), rates=SliceRates(2.6, depth=4), schedule=optim.OneCycle()),
                StageRecipe(Last(3), lr=Fraction(1, 4), rates=SliceRates(2.6, depth=4), schedule=optim.OneCycle()),
                StageRecipe(All(), epochs="epochs", lr=Fraction(1, 4), rates=SliceRates(2.6, depth=4),
                            schedule=optim.OneCycle())),
    from_scratch=(StageRecipe(All(), epochs="epochs", extra_epochs=3, lr=Fraction(1, 4),
                              rates=SliceRates(2.6, depth=4), schedule=optim.OneCycle()),))
"""The CPU demo's recipe (scripts/demo.py, its 128/384/2 AWD-LSTM on TREC-6): LM fine-tuning one
frozen epoch, then every group; the classifier's gradual unfreezing as the tutorial's at lr, lr/2,
lr/4, but the final stage of every group at lr/4 rather than lr/20 and for more epochs (the demo's
own choice, and the numbers its reported accuracy was measured with), the tutorial's literal
`slice(lr_k / 2.6**4, lr_k)` over the demo's 4 groups; from scratch the tutorial's baseline with
that slice; fastai's one-cycle throughout."""

FULL = dataclasses.replace(
    FASTAI, name="full",
    classifier=(StageRecipe(All(), epochs="epochs", extra_epochs=3, lr=Fraction(1, 20)),))
"""Howard & Ruder 2018's "Full" (Table 7): every group from the first epoch, for as many epochs as
`fastai`'s gradual unfreezing takes (its three one-group-more epochs + the run's epochs), at the rate
that recipe trains every group at (lr/20, discriminative `slice(lr_k / 2.6**(groups-1), lr_k)`), one
one-cycle schedule. What it leaves out against `fastai` is the unfreezing alone. LM fine-tuning and the
from-scratch classifier are the tutorial's."""

LAST = dataclasses.replace(
    FASTAI, name="last",
    classifier=(StageRecipe(Last(1), epochs="epochs", extra_epochs=3, lr=Fraction(1)),))
"""Howard & Ruder 2018's "Last" (Table 7): the head alone (the encoder stays as LM fine-tuning left
it), for as many epochs as `fastai`'s recipe, at the rate that recipe trains the head alone at (lr).
With one group training, discriminative rates make no difference (it trains at lr either way,
to the last bit of the slice's spacing). LM fine-tuning and the from-scratch
classifier are the tutorial's."""

RECIPES = {recipe.name: recipe for recipe in (FASTAI, CHAIN_THAW, PAPER, MULTIFIT, DEMO, FULL, LAST)}


# --------------------------------------------------------------------------- the demo's settings


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The CPU demo's run settings on TREC-6 (scripts/demo.py; its stages are `DEMO`): a small
    AWD-LSTM pretrained on a prefix of a Wikipedia shard, sized so that all three stages run on a
    small CPU in minutes rather than hours."""
    # data
    wiki_words: int = 4_500_000          # pretraining corpus: this many words of the Wikipedia shard
    wiki_min_freq: int = 3
    max_vocab: int = 10000
    held_out_tokens: int = 20000         # the end of the last article, for validation perplexity
    trec_min_freq: int = 2
    # model
    emb_sz: int = 128
    n_hid: int = 384
    n_layers: int = 2
    bptt: int = 70
    weight_decay: float = 0.01
    lr_factor: float = 2.6               # discriminative learning rates: slice(lr / factor**4, lr)
    # stage 1: pretraining, one-cycle
    pretrain_bs: int = 64
    pretrain_epochs: int = 1
    pretrain_lr: float = 5e-3
    pretrain_drop_mult: float = 0.1
    pretrain_clip: float = 0.4
    # stage 2: LM fine-tuning, one epoch of the last group, then all groups
    finetune_bs: int = 32
    finetune_drop_mult: float = 0.3
    finetune_frozen_lr: float = 1e-2
    finetune_epochs: int = 4
    finetune_lr: float = 2e-3
    # stage 3: the classifier
    classifier_bs: int = 64
    classifier_drop_mult: float = 0.5
    classifier_lr: float = 2e-2
    classifier_epochs: int = 12          # once all groups train
