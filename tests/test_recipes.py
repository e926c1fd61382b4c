"""ulmfit_jax.recipes: each recipe gives the stages its source describes, and the scripts' default
command lines give exactly the stages they gave before the recipes became data (fastai's tutorial
for train_classifier.py and finetune_lm.py, the demo's own for scripts/demo.py)."""

import argparse
import dataclasses
import importlib.util
from fractions import Fraction
from pathlib import Path

import pytest

from ulmfit_jax import optim, recipes, train
from ulmfit_jax.recipes import All, EachAlone, Gradual, Last, Only, SliceRates, StageRecipe

ROOT = Path(__file__).resolve().parent.parent
FASTAI_ADAM = optim.OptimizerConfig(weight_decay=0.01)        # what cli.optimizer_config gives --preset fastai


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"recipes_test_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    pass


def script_args(module, argv, monkeypatch):
    """`argv` through the script's own parser (its main stops right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        module.main([str(a) for a in argv])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    return parsed.value.args[0]


@pytest.fixture(scope="module")
def train_classifier():
    return load_script("train_classifier")


@pytest.fixture(scope="module")
def finetune_lm():
    return load_script("finetune_lm")


@pytest.fixture(scope="module")
def demo():
    return load_script("demo")


def facts(stages):
    """(epochs, trainable groups or None, the learning rate as given) per stage."""
    return [(s.epochs, None if s.trainable is None else sorted(s.trainable), s.optimizer.learning_rate) for s in stages]


# --------------------------------------------------------------------------- fastai's tutorial

def test_the_fastai_tutorial_classifier_on_its_five_groups():
    """The tutorial's own numbers at lr 2e-2 for the 3-layer AWD-LSTM's 5 groups: the head at 2e-2,
    freeze_to(-2) at slice(1e-2 / 2.6**4, 1e-2), freeze_to(-3) at slice(5e-3 / 2.6**4, 5e-3),
    unfreeze() at slice(1e-3 / 2.6**4, 1e-3), one epoch each but the last."""
    stages = recipes.training_stages(recipes.FASTAI.classifier, n_groups=5, optimizer=FASTAI_ADAM, lr=2e-2, epochs=2)
    assert facts(stages) == [
        (1, [4], optim.Slice(2e-2 / 2.6**4, 2e-2)),
        (1, [3, 4], optim.Slice(1e-2 / 2.6**4, 1e-2)),
        (1, [2, 3, 4], optim.Slice(5e-3 / 2.6**4, 5e-3)),
        (2, None, optim.Slice(1e-3 / 2.6**4, 1e-3))]
    assert all(s.optimizer == dataclasses.replace(FASTAI_ADAM, learning_rate=s.optimizer.learning_rate)
               for s in stages)
    # discriminative rates: each group 2.6 times below the next
    rates = optim.group_values(stages[-1].optimizer.learning_rate, 5)
    assert [rates[k + 1] / rates[k] for k in range(4)] == pytest.approx([2.6] * 4, rel=1e-12)


def test_the_fastai_recipe_spreads_the_slice_over_any_number_of_groups():
    """slice(lr_k / 2.6**(groups - 1), lr_k): a step of 2.6 between groups for 4 groups too."""
    stages = recipes.training_stages(recipes.FASTAI.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=1.0, epochs=3)
    assert facts(stages) == [(1, [3], optim.Slice(1 / 2.6**3, 1.0)), (1, [2, 3], optim.Slice(0.5 / 2.6**3, 0.5)),
                             (1, [1, 2, 3], optim.Slice(0.25 / 2.6**3, 0.25)),
                             (3, None, optim.Slice(0.05 / 2.6**3, 1.0 / 20))]


def test_from_scratch_trains_every_group_three_epochs_longer_at_a_quarter():
    stages = recipes.training_stages(recipes.FASTAI.from_scratch, n_groups=5, optimizer=FASTAI_ADAM, lr=2e-2,
                                     epochs=2)
    assert facts(stages) == [(5, None, optim.Slice(5e-3 / 2.6**4, 5e-3))]


def test_the_fastai_lm_fine_tuning_freezes_then_unfreezes():
    stages = recipes.training_stages(recipes.FASTAI.finetune, n_groups=4, optimizer=FASTAI_ADAM, lr=1e-3,
                                     frozen_lr=1e-2, epochs=10, freeze_epochs=1)
    assert facts(stages) == [(1, [3], 1e-2), (10, None, 1e-3)]
    no_frozen = recipes.training_stages(recipes.FASTAI.finetune, n_groups=4, optimizer=FASTAI_ADAM, lr=1e-3,
                                        frozen_lr=1e-2, epochs=10, freeze_epochs=0)
    assert facts(no_frozen) == [(10, None, 1e-3)]


def test_chain_thaw_the_head_then_each_group_alone_then_all():
    stages = recipes.training_stages(recipes.CHAIN_THAW.classifier, n_groups=5, optimizer=FASTAI_ADAM, lr=2e-2,
                                     epochs=2)
    assert [(e, t) for e, t, _ in facts(stages)] == [(1, [4]), (1, [0]), (1, [1]), (1, [2]), (1, [3]), (2, None)]
    assert [s.optimizer.learning_rate.stop for s in stages] == [2e-2] + [2e-3] * 4 + [1e-3]
    assert [frozenset(t or range(5)) for _, t, _ in facts(stages)] == [set(t) for t in optim.chain_thaw(5)]


# --------------------------------------------------------------------------- the other recipes

def test_the_paper_unfreezes_one_group_per_epoch_with_stlr_and_lr_over_2_6_per_group():
    stages = recipes.training_stages(recipes.PAPER.classifier, n_groups=5, optimizer=FASTAI_ADAM, lr=0.01, epochs=4)
    assert [(e, t) for e, t, _ in facts(stages)] == [(1, [4]), (1, [3, 4]), (1, [2, 3, 4]), (1, [1, 2, 3, 4]),
                                                     (4, None)]
    assert [frozenset(t or range(5)) for _, t, _ in facts(stages)] == list(optim.gradual_unfreezing(5))
    for stage in stages:
        assert stage.optimizer.schedule == optim.SlantedTriangular(cut_frac=0.1, ratio=32.0)
        assert stage.optimizer.learning_rate == tuple(0.01 / 2.6**k for k in (4, 3, 2, 1, 0))
    lm = recipes.training_stages(recipes.PAPER.finetune, n_groups=4, optimizer=FASTAI_ADAM, lr=0.004, epochs=3)
    assert facts(lm) == [(3, None, tuple(0.004 / 2.6**k for k in (3, 2, 1, 0)))]


def test_multifit_trains_every_group_at_its_slice_with_fastai_1_one_cycle():
    """MultiFiT's reference: unfreeze(), fit_one_cycle(8, slice(1e-2 / 2.6**4, 2e-2), moms=(0.8, 0.7))."""
    stages = recipes.training_stages(recipes.MULTIFIT.classifier, n_groups=6, optimizer=FASTAI_ADAM, lr=2e-2,
                                     epochs=8)
    assert facts(stages) == [(8, None, optim.Slice(1e-2 / 2.6**4, 2e-2))]
    assert stages[0].optimizer.schedule == optim.OneCycle(div=25.0, div_final=25e4, pct_start=0.3,
                                                          moms=(0.8, 0.7, 0.8))


def test_the_demo_recipe_keeps_its_numbers():
    """The demo's classifier: lr, lr/2, lr/4 and then every group at lr/4 (not lr/20), always
    slice(lr_k / 2.6**4, lr_k) over its 4 groups; LM fine-tuning one frozen epoch, then all."""
    stages = recipes.training_stages(recipes.DEMO.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2, epochs=12)
    assert facts(stages) == [
        (1, [3], optim.Slice(2e-2 / 2.6**4, 2e-2)),
        (1, [2, 3], optim.Slice(1e-2 / 2.6**4, 1e-2)),
        (1, [1, 2, 3], optim.Slice(5e-3 / 2.6**4, 5e-3)),
        (12, None, optim.Slice(5e-3 / 2.6**4, 5e-3))]
    scratch = recipes.training_stages(recipes.DEMO.from_scratch, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2,
                                      epochs=12)
    assert facts(scratch) == [(15, None, optim.Slice(5e-3 / 2.6**4, 5e-3))]
    lm = recipes.training_stages(recipes.DEMO.finetune, n_groups=3, optimizer=FASTAI_ADAM, lr=2e-3, frozen_lr=1e-2,
                                 epochs=4)
    assert facts(lm) == [(1, [2], 1e-2), (4, None, 2e-3)]
    assert all(s.optimizer.schedule == optim.OneCycle() for s in stages + scratch + lm)


def test_demo_settings_keep_their_numbers():
    assert dataclasses.asdict(recipes.DemoSettings()) == dict(
        wiki_words=4_500_000, wiki_min_freq=3, max_vocab=10000, held_out_tokens=20000, trec_min_freq=2,
        emb_sz=128, n_hid=384, n_layers=2, bptt=70, weight_decay=0.01, lr_factor=2.6,
        pretrain_bs=64, pretrain_epochs=1, pretrain_lr=5e-3, pretrain_drop_mult=0.1, pretrain_clip=0.4,
        finetune_bs=32, finetune_drop_mult=0.3, finetune_frozen_lr=1e-2, finetune_epochs=4, finetune_lr=2e-3,
        classifier_bs=64, classifier_drop_mult=0.5, classifier_lr=2e-2, classifier_epochs=12)


def test_full_trains_every_group_from_the_start_as_long_as_the_tutorial():
    """The paper's "Full": the tutorial's epochs (3 + the run's) in one stage of every group, at the
    rate the tutorial trains every group at."""
    stages = recipes.training_stages(recipes.FULL.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2, epochs=4)
    assert facts(stages) == [(7, None, optim.Slice(1e-3 / 2.6**3, 1e-3))]
    tutorial = recipes.training_stages(recipes.FASTAI.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2,
                                       epochs=4)
    assert sum(s.epochs for s in tutorial) == 7
    assert recipes.FULL.finetune == recipes.FASTAI.finetune and recipes.FULL.from_scratch == recipes.FASTAI.from_scratch


def test_last_trains_the_head_alone_as_long_as_the_tutorial():
    stages = recipes.training_stages(recipes.LAST.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2, epochs=4)
    assert facts(stages) == [(7, [3], optim.Slice(2e-2 / 2.6**3, 2e-2))]
    assert recipes.LAST.finetune == recipes.FASTAI.finetune


def test_without_discriminative_gives_every_group_the_stages_rate():
    for recipe in (recipes.FASTAI, recipes.CHAIN_THAW, recipes.FULL, recipes.PAPER):
        plain = recipes.training_stages(recipes.without_discriminative(recipe.classifier), n_groups=4,
                                        optimizer=FASTAI_ADAM, lr=2e-2, epochs=4)
        spread = recipes.training_stages(recipe.classifier, n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2, epochs=4)
        assert [(e, t) for e, t, _ in facts(plain)] == [(e, t) for e, t, _ in facts(spread)]
        assert [lr for _, _, lr in facts(plain)] == [max(optim.group_values(lr, 4)) for _, _, lr in facts(spread)]
        assert all(isinstance(lr, float) for _, _, lr in facts(plain))
    assert [lr for _, _, lr in facts(recipes.training_stages(
        recipes.without_discriminative(recipes.FASTAI.classifier), n_groups=4, optimizer=FASTAI_ADAM, lr=2e-2,
        epochs=4))] == [2e-2, 1e-2, 5e-3, 1e-3]


# --------------------------------------------------------------------------- the conversion itself

def test_rates_are_exact_fractions_of_the_base_rate():
    """lr * 1 / 20 is the float lr / 20, not lr * 0.05 (which differs in the last bit for some lr)."""
    lr = 0.0123
    assert lr * 0.05 != lr / 20                              # why the recipe holds fractions
    [stage] = recipes.training_stages((StageRecipe(lr=Fraction(1, 20), rates=None),), n_groups=3,
                                      optimizer=FASTAI_ADAM, lr=lr)
    assert stage.optimizer.learning_rate == lr / 20


def test_trainable_specs():
    stage = lambda trainable: [s.trainable for s in recipes.training_stages(
        (StageRecipe(trainable, rates=None),), n_groups=4, optimizer=FASTAI_ADAM, lr=1.0)]
    assert stage(All()) == [None]
    assert stage(Last(2)) == [{2, 3}]
    assert stage(Last(9)) == [{0, 1, 2, 3}]                  # as fastai's freeze_to(-9)
    assert stage(Only(-1)) == [{3}] and stage(Only(1)) == [{1}]
    assert stage(EachAlone()) == [{0}, {1}, {2}]
    assert stage(Gradual()) == [{3}, {2, 3}, {1, 2, 3}]
    with pytest.raises(ValueError):
        stage(Only(4))
    with pytest.raises(ValueError):
        stage(Last(0))


def test_a_callable_optimizer_and_a_stage_schedule():
    seen = []

    def settings(learning_rate):
        seen.append(learning_rate)
        return optim.OptimizerConfig(learning_rate=learning_rate, beta1=0.7, schedule=optim.SlantedTriangular())

    stages = recipes.training_stages(
        (StageRecipe(rates=SliceRates(2.0, depth=2)), StageRecipe(rates=None, schedule=optim.OneCycle())),
        n_groups=3, optimizer=settings, lr=0.4)
    assert seen == [optim.Slice(0.1, 0.4), 0.4]
    assert stages[0].optimizer.schedule == optim.SlantedTriangular() and stages[0].optimizer.beta1 == 0.7
    assert stages[1].optimizer.schedule == optim.OneCycle() and stages[1].optimizer.beta1 == 0.7


def test_a_stage_needing_a_setting_the_run_does_not_give_is_refused():
    with pytest.raises(ValueError, match="frozen_lr"):
        recipes.training_stages(recipes.FASTAI.finetune, n_groups=3, optimizer=FASTAI_ADAM, lr=1e-3, epochs=1,
                                freeze_epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        recipes.training_stages(recipes.FASTAI.classifier, n_groups=5, optimizer=FASTAI_ADAM, lr=1e-3)
    with pytest.raises(ValueError, match="unknown run setting"):
        recipes.training_stages((StageRecipe(epochs="steps"),), n_groups=5, optimizer=FASTAI_ADAM, lr=1e-3)


def test_with_factor_changes_every_discriminative_factor():
    stages = recipes.with_factor(recipes.DEMO.classifier + recipes.DEMO.finetune, 3.0)
    assert [s.rates and s.rates.factor for s in stages] == [3.0] * 4 + [None, None]


# --------------------------------------------------------------------------- the scripts read them

CLASSIFIER_ARGV = ["--data", "d", "--out", "o", "--encoder", "e"]


def test_train_classifier_default_command_line(train_classifier, monkeypatch):
    """`train_classifier.py --data D --encoder E --out O`: --lr 2e-2, --epochs 2, fastai preset."""
    args = script_args(train_classifier, CLASSIFIER_ARGV, monkeypatch)
    stages = train_classifier.stages_for(args, 5, from_scratch=False)
    assert stages == recipes.training_stages(recipes.FASTAI.classifier, n_groups=5, optimizer=FASTAI_ADAM,
                                             lr=2e-2, epochs=2)
    assert facts(stages)[-1] == (2, None, optim.Slice(1e-3 / 2.6**4, 1e-3))
    assert facts(train_classifier.stages_for(args, 5, from_scratch=True)) == [
        (5, None, optim.Slice(5e-3 / 2.6**4, 5e-3))]


def test_train_classifier_chain_thaw_flag_is_the_recipe(train_classifier, monkeypatch):
    flag = script_args(train_classifier, CLASSIFIER_ARGV + ["--chain-thaw"], monkeypatch)
    named = script_args(train_classifier, CLASSIFIER_ARGV + ["--recipe", "chain-thaw"], monkeypatch)
    assert train_classifier.stages_for(flag, 5, False) == train_classifier.stages_for(named, 5, False)
    assert [t for _, t, _ in facts(train_classifier.stages_for(flag, 5, False))] == [[4], [0], [1], [2], [3], None]


def test_train_classifier_paper_preset_keeps_the_tutorial_stages_under_stlr(train_classifier, monkeypatch):
    args = script_args(train_classifier, CLASSIFIER_ARGV + ["--preset", "paper", "--lr", "0.01"], monkeypatch)
    stages = train_classifier.stages_for(args, 5, from_scratch=False)
    assert facts(stages) == facts(recipes.training_stages(recipes.FASTAI.classifier, n_groups=5,
                                                          optimizer=FASTAI_ADAM, lr=0.01, epochs=2))
    assert all(s.optimizer.schedule == optim.SlantedTriangular() and s.optimizer.beta1 == 0.7 for s in stages)


def test_train_classifier_recipe_flag(train_classifier, monkeypatch):
    args = script_args(train_classifier, CLASSIFIER_ARGV + ["--recipe", "demo", "--epochs", "12"], monkeypatch)
    assert facts(train_classifier.stages_for(args, 4, False))[-1] == (12, None, optim.Slice(5e-3 / 2.6**4, 5e-3))


def test_train_classifier_no_discriminative_flag(train_classifier, monkeypatch):
    args = script_args(train_classifier, CLASSIFIER_ARGV + ["--recipe", "chain-thaw", "--no-discriminative"],
                       monkeypatch)
    assert train_classifier.stages_for(args, 5, False) == recipes.training_stages(
        recipes.without_discriminative(recipes.CHAIN_THAW.classifier), n_groups=5, optimizer=FASTAI_ADAM, lr=2e-2,
        epochs=2)
    with pytest.raises(SystemExit, match="--preset paper"):
        train_classifier.main(CLASSIFIER_ARGV + ["--no-discriminative", "--preset", "paper"])


def test_finetune_lm_default_command_line(finetune_lm, monkeypatch):
    """`finetune_lm.py`: the last group for 1 epoch at 1e-2, then all for 10 at 1e-3."""
    argv = ["--data", "d", "--out", "o", "--pretrained", "p"]
    stages = finetune_lm.stages_for(script_args(finetune_lm, argv, monkeypatch), 4)
    assert facts(stages) == [(1, [3], 1e-2), (10, None, 1e-3)]
    assert all(s.optimizer == dataclasses.replace(FASTAI_ADAM, learning_rate=s.optimizer.learning_rate)
               for s in stages)
    stages = finetune_lm.stages_for(script_args(finetune_lm, argv + ["--freeze-epochs", "0"], monkeypatch), 4)
    assert facts(stages) == [(10, None, 1e-3)]
    # --preset paper spreads a plain rate lr / 2.6 per group, as before the recipes
    stages = finetune_lm.stages_for(script_args(finetune_lm, argv + ["--preset", "paper"], monkeypatch), 4)
    assert facts(stages) == [(1, [3], optim.discriminative_lrs(1e-2, 4)), (10, None, optim.discriminative_lrs(1e-3, 4))]


def test_the_demo_builds_the_demo_recipe(demo):
    settings = recipes.DemoSettings()
    _, stages = demo.classifier_plan(settings, 100, 6, from_scratch=False)
    assert facts(stages) == facts(recipes.training_stages(recipes.DEMO.classifier, n_groups=4,
                                                          optimizer=FASTAI_ADAM, lr=2e-2, epochs=12))
    assert all(s.optimizer == dataclasses.replace(FASTAI_ADAM, learning_rate=s.optimizer.learning_rate)
               for s in stages)
    _, lm = demo.finetune_plan(settings, 100)
    assert facts(lm) == [(1, [2], 1e-2), (4, None, 2e-3)]
    _, other = demo.classifier_plan(dataclasses.replace(settings, lr_factor=3.0, classifier_epochs=2), 100, 6,
                                    from_scratch=True)
    assert facts(other) == [(5, None, optim.Slice(5e-3 / 3.0**4, 5e-3))]


def test_no_stage_list_is_written_out_in_the_scripts():
    """The recipes live in ulmfit_jax/recipes.py alone: no script or benchmark picks trainable groups
    or spreads rates over groups itself."""
    for path in [*(ROOT / "scripts").glob("*.py"), ROOT / "benchmarks" / "bench_trec_recipe.py",
                 ROOT / "benchmarks" / "bench_small_data.py", *(ROOT / "experiments").glob("*.py")]:
        text = path.read_text()
        for code in ("optim.freeze", "optim.unfreeze", "optim.Slice(", "discriminative_lrs(", "FACTOR", "** 4"):
            assert code not in text, f"{path.name}: {code}"


def test_stage_is_the_loops_stage():
    [stage] = recipes.training_stages((StageRecipe(),), n_groups=2, optimizer=FASTAI_ADAM, lr=1.0)
    assert isinstance(stage, train.Stage)
