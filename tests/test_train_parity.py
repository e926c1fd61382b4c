"""Training parity with fastai 2.8.12: `Learner.fit_one_cycle` against ulmfit_jax's train steps.

From the same weights, dropouts off, on the same fixed batches, fastai's real training loop (a
`TextLearner` with fastai's `Adam`, the AWD-LSTM splitter, discriminative learning rates through
`slice`, weight decay, `GradientClip`, the one-cycle schedule with moms 0.8/0.7/0.8, AR/TAR from
`RNNRegularizer`, the LM's hidden state carried across batches and reset by `ModelResetter` at
each epoch) and 20 steps of `steps.make_train_step` (the `TrainState` step the training loop runs, with
`optim.stage_optimizer`) give the same loss at every step: the cross-entropy fastai reports
(`learn.loss`) and the regularised loss it differentiates (`learn.loss_grad`), within 1e-4
relative. Trainable everything, and with frozen groups (`freeze()`, `freeze_to(-2)`). Trained
parameters end equal to fastai's, frozen ones bit-identical on both sides. Gradual unfreezing too:
three `freeze_to` + `fit_one_cycle` calls on one Learner against three of our stages, each with a
fresh optimizer state (`Learner.freeze_to` clears fastai's).

Measured on the shared 2-core CPU: at most 2e-7 relative for the LM, 7e-6 for the classifier.
The classifier's batches have 16 rows: with 4, batch norm over 4 rows made some steps' gradient
norms reach 300 and float32 rounding grew to 2e-4..6e-4 relative by step 12-19; the same run in
float64 on both sides (fastai's `.double()` model, JAX x64) agreed to 1e-7 at every step (fastai
keeps `learn.loss` in float32), so that was conditioning, not a difference in the algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastai_reference import fastai_classifier, fastai_language_model, pad_input_chunk, state_dict_numpy, torch
from ulmfit_jax import convert, encoder, losses, models, optim, steps
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
from ulmfit_jax.text.batches import fastai_layout_mask, pad_input_chunk as our_pad_input_chunk

from fastai.callback.core import Callback  # noqa: E402  (after fastai_reference's importorskip)
from fastai.callback.progress import ProgressCallback  # noqa: E402,F401  (Learner.no_bar)
from fastai.callback.rnn import RNNRegularizer  # noqa: E402
from fastai.callback.schedule import fit_one_cycle  # noqa: E402,F401  (patches Learner.fit_one_cycle)
from fastai.callback.training import GradientClip  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.data.load import DataLoader  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.optimizer import Adam  # noqa: E402
from fastai.text.learner import TextLearner  # noqa: E402
from fastai.text.models.awdlstm import WeightDropout, awd_lstm_clas_split, awd_lstm_lm_split  # noqa: E402

RTOL = 1e-4
N_EPOCHS, STEPS_PER_EPOCH = 2, 10          # 20 optimizer steps in one fit_one_cycle
TOTAL_STEPS = N_EPOCHS * STEPS_PER_EPOCH
LR, WD, FACTOR = 2e-2, 0.1, 2.6
LM_CLIP, CLAS_CLIP = 0.2, 1.5             # each clips some steps, not all
ALPHA, BETA = 2.0, 1.0                     # TextLearner's AR / TAR defaults


class RecordLosses(Callback):
    """Per training step: `learn.loss` (cross-entropy), `learn.loss_grad` (plus AR / TAR, what is
    differentiated), and the gradient norm before `GradientClip` (to show clipping happens)."""
    order = GradientClip.order - 1     # before_step before the clip; after_loss after RNNRegularizer

    def __init__(self):
        super().__init__()
        self.losses, self.totals, self.grad_norms = [], [], []     # over all fits (gradual unfreezing)

    def after_loss(self):
        if self.training:
            self.losses.append(self.learn.loss.item())
            self.totals.append(self.learn.loss_grad.item())

    def before_step(self):   # order < GradientClip's: the norm before clipping
        grads = [p.grad for p in self.learn.model.parameters() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        self.grad_norms.append(torch.linalg.vector_norm(norms).item())


assert RecordLosses.order > RNNRegularizer.order


def without_weight_dropout_aliasing(model):
    """fastai 2.8.12's WeightDropout with weight_p = 0 breaks `ModelResetter` on torch 2.13: in train
    mode `F.dropout(raw, p=0)` returns the `weight_hh_l0_raw` Parameter itself, `_setweights`
    assigns it to the LSTM, which registers it as the LSTM's parameter `weight_hh_l0`, and the
    next `reset()` (before validation, or the next epoch) fails: "cannot assign 'torch.FloatTensor'
    as parameter 'weight_hh_l0'". With p = 0 the dropped weight is the raw weight, so a copy that
    gradients flow through (what `_setweights` does in eval mode) computes the same thing."""
    for module in model.modules():
        if isinstance(module, WeightDropout) and module.weight_p == 0:
            def setweights(self=module):
                for layer in self.layer_names:
                    setattr(self.module, layer, getattr(self, f"{layer}_raw").clone())
            module._setweights = setweights
    return model


def fastai_fit(model, splitter, batches, freeze_to, clip, stages=None):
    """fit_one_cycle(N_EPOCHS) of a TextLearner over `batches` (a list of (x, y) tensors, in order,
    the same every epoch) -> the RecordLosses callback. `stages`, a list of (freeze_to, epochs), runs
    gradual unfreezing instead: `freeze_to` then `fit_one_cycle(epochs)` for each, one Learner."""
    train_dl = DataLoader(batches, bs=None, shuffle=False)
    valid_dl = DataLoader(batches[:1], bs=None, shuffle=False)
    dls = DataLoaders(train_dl, valid_dl, device=torch.device("cpu"))
    recorder = RecordLosses()
    learn = TextLearner(dls, without_weight_dropout_aliasing(model), alpha=ALPHA, beta=BETA,
                        loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=splitter, wd=WD,
                        cbs=[GradientClip(clip), recorder])
    n_groups = len(splitter(model))
    with learn.no_bar(), learn.no_logging():
        for stage_freeze_to, epochs in stages or [(freeze_to, N_EPOCHS)]:
            learn.freeze_to(0 if stage_freeze_to is None else stage_freeze_to)
            learn.fit_one_cycle(epochs, slice(LR / FACTOR ** (n_groups - 1), LR))
    assert len(recorder.losses) == sum(epochs for _, epochs in stages or [(freeze_to, N_EPOCHS)]) * len(batches)
    return recorder


def optimizer_config(count, clip):
    return optim.OptimizerConfig(learning_rate=optim.Slice(LR / FACTOR ** (count - 1), LR), weight_decay=WD,
                                 clip_norm=clip, schedule=optim.OneCycle(moms=(0.8, 0.7, 0.8)))


def trainable_groups(freeze_to, count):
    return optim.unfreeze(count) if freeze_to is None else optim.freeze_to(freeze_to, count)


def max_relative(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


def assert_losses_close(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    relative = np.abs(ours - theirs) / np.abs(theirs)
    assert relative.max() < RTOL, (f"{what}: max relative difference {relative.max():.2e} at step "
                                   f"{relative.argmax()}\nours   {ours}\nfastai {theirs}")
    return relative.max()


def assert_losses_match(ours, totals, fastai, what, clip):
    """Our cross-entropies and regularised losses against fastai's recorded ones, at every step."""
    print(f"\n{what}: max relative difference, cross-entropy {max_relative(ours, fastai.losses):.1e}, "
          f"regularised {max_relative(totals, fastai.totals):.1e}; gradient norms "
          f"{min(fastai.grad_norms):.3f}..{max(fastai.grad_norms):.3f} (clip {clip})")
    assert_losses_close(ours, fastai.losses, what + " cross-entropy")
    assert_losses_close(totals, fastai.totals, what + " cross-entropy + AR + TAR")
    assert_trained(fastai.losses, what)


def assert_trained(losses_, what):
    # the comparison is not vacuous: training moved the loss
    assert abs(losses_[-1] - losses_[0]) > 1e-3 * abs(losses_[0]), f"{what}: the loss did not move"


# ----------------------------------------------------------------------------------------------
# Language model

LM_BATCH, LM_BPTT = 4, 6
LM_CONFIG = awd_lstm_lm_config(50, drop_mult=0.0, emb_size=8, n_hidden=12, n_layers=3)


@jax.jit
def lm_regularized_loss(params, state, tokens, targets, key):
    """What fastai differentiates: cross-entropy + AR on the dropped output + TAR on the raw one."""
    logits, _, (raw, dropped) = models.language_model_apply(params, tokens, state, config=LM_CONFIG, train=True,
                                                            key=key)
    return (losses.cross_entropy(logits, targets) + losses.activation_regularization(dropped, ALPHA)
            + losses.temporal_activation_regularization(raw, BETA))


def our_training(params, config, kind, freeze_to, clip, total_steps=TOTAL_STEPS, differentiated=None):
    """-> (labels, trainable groups, initial optimizer state, train step) for one of our stages.
    `differentiated`: the groups the step differentiates (None: all; the stage's: frozen ones skipped)."""
    labels = optim.layer_group_labels(params, kind)
    count = optim.n_groups(labels)
    trainable = trainable_groups(freeze_to, count)
    optimizer = optim.stage_optimizer(optimizer_config(count, clip), params, kind)
    opt_state = optimizer.init(params, optim.stage_hyper(optimizer_config(count, clip), count, total_steps, trainable))
    train_step = steps.make_train_step(kind, config, optimizer, params, differentiated=differentiated,
                                       regularization=steps.RegularizationConfig(alpha=ALPHA, beta=BETA))
    return labels, trainable, opt_state, train_step


@pytest.mark.parametrize("freeze_to", [None, -1, -2], ids=["unfrozen", "freeze", "freeze_to-2"])
def test_language_model_training_equals_fastai_fit_one_cycle(freeze_to):
    config = LM_CONFIG
    assert config.output_p == 0 and config.encoder.weight_p == 0
    reference = fastai_language_model(config, seed=1)
    _, params = convert.import_language_model(state_dict_numpy(reference), config)

    rng = np.random.default_rng(0)
    stream = rng.integers(0, config.encoder.vocab_size, size=(LM_BATCH, STEPS_PER_EPOCH * LM_BPTT + 1))
    windows = [(stream[:, i * LM_BPTT:(i + 1) * LM_BPTT], stream[:, i * LM_BPTT + 1:(i + 1) * LM_BPTT + 1])
               for i in range(STEPS_PER_EPOCH)]
    fastai = fastai_fit(reference, awd_lstm_lm_split,
                        [(torch.tensor(x), torch.tensor(y)) for x, y in windows], freeze_to, LM_CLIP)

    _, trained_reference = convert.import_language_model(state_dict_numpy(reference), config)
    initial = jax.tree.map(np.asarray, params)
    count = optim.n_groups(optim.layer_group_labels(params, "lm"))
    # one program for every stage (the backward pass through frozen groups too), and a stage's own
    for differentiated in (None, trainable_groups(freeze_to, count)):
        labels, trainable, opt_state, train_step = our_training(initial, config, "lm", freeze_to, LM_CLIP,
                                                                differentiated=differentiated)
        state = steps.init_state(jax.tree.map(jnp.array, initial), opt_state, None)
        ours, totals = [], []
        for epoch in range(N_EPOCHS):
            state = state.replace(carry=encoder.initial_state(config.encoder, LM_BATCH))  # ModelResetter
            for i, (x, y) in enumerate(windows):
                key = jax.random.fold_in(state.key, state.step)       # dropouts are 0: masks are all ones
                tokens, targets = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)
                totals.append(float(lm_regularized_loss(state.params, state.carry, tokens, targets, key)))
                state, metrics = train_step(state, {"inputs": tokens, "targets": targets})
                ours.append(float(metrics["loss"]))

        what = f"LM freeze_to={freeze_to}, differentiated={differentiated}"
        assert_losses_match(ours, totals, fastai, what, LM_CLIP)
        # frozen groups untouched on both sides, trained ones equal to fastai's
        for (path, ours_leaf), theirs, before, group in zip(
                jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(trained_reference),
                jax.tree.leaves(initial), jax.tree.leaves(labels)):
            if group not in trainable:
                np.testing.assert_array_equal(np.asarray(ours_leaf), before, err_msg=jax.tree_util.keystr(path))
                np.testing.assert_array_equal(theirs, before, err_msg=jax.tree_util.keystr(path))
            else:
                np.testing.assert_allclose(np.asarray(ours_leaf), theirs, atol=2e-5, rtol=0,
                                           err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# Classifier

CLAS_BATCH = 16      # batch norm over 4 rows is ill-conditioned in float32 (module docstring)
CLAS_LONGEST = 18    # windows of 5 from 0, 5, 10, 15; max_len 15 keeps the last three
CLAS_CONFIG = awd_lstm_clas_config(40, 3, drop_mult=0.0, emb_size=8, n_hidden=12, n_layers=2, bptt=5, max_len=15,
                                   hidden_sizes=(10,), head_ps=(0.0, 0.0))


@jax.jit
def classifier_regularized_loss(params, batch_stats, tokens, targets, key):
    """fastai's RNNRegularizer on a classifier sees the encoder's kept outputs as both outputs."""
    logits, _, outputs = models.classifier_apply(params, batch_stats, tokens, config=CLAS_CONFIG, train=True, key=key)
    return (losses.cross_entropy(logits, targets) + losses.activation_regularization(outputs, ALPHA)
            + losses.temporal_activation_regularization(outputs, BETA))


def classifier_batches(config, rng):
    """STEPS_PER_EPOCH padded batches in fastai's pad_input_chunk layout, all CLAS_LONGEST wide (one
    compile): documents longer than max_len, whole windows of front padding, rows absent from early
    windows, a shorter last window."""
    batches = []
    for _ in range(STEPS_PER_EPOCH):
        lengths = [CLAS_LONGEST] + list(rng.integers(1, CLAS_LONGEST + 1, size=CLAS_BATCH - 1))
        docs = [rng.integers(2, config.encoder.vocab_size, size=n) for n in sorted(lengths, reverse=True)]
        batches.append((pad_input_chunk(docs, config.encoder.pad_token, config.bptt),
                        rng.integers(0, config.n_classes, size=CLAS_BATCH)))
    return batches


@pytest.mark.parametrize("freeze_to", [None, -1, -2], ids=["unfrozen", "freeze", "freeze_to-2"])
def test_classifier_training_equals_fastai_fit_one_cycle(freeze_to):
    config = CLAS_CONFIG
    assert config.encoder.weight_p == 0 and config.head_ps == (0.0, 0.0)
    reference = fastai_classifier(config, seed=2)
    _, params, batch_stats = convert.import_classifier(state_dict_numpy(reference), config)

    batches = classifier_batches(config, np.random.default_rng(1))
    fastai = fastai_fit(reference, awd_lstm_clas_split,
                        [(torch.tensor(x), torch.tensor(y)) for x, y in batches], freeze_to, CLAS_CLIP)

    labels, trainable, opt_state, train_step = our_training(params, config, "classifier", freeze_to, CLAS_CLIP)

    ours, totals = [], []
    initial = jax.tree.map(np.asarray, params)
    state = steps.init_state(params, opt_state, batch_stats)
    for epoch in range(N_EPOCHS):
        for i, (x, y) in enumerate(batches):
            key = jax.random.fold_in(state.key, state.step)
            tokens, targets = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)
            totals.append(float(classifier_regularized_loss(state.params, state.carry, tokens, targets, key)))
            state, metrics = train_step(state, {"tokens": tokens, "labels": targets})
            ours.append(float(metrics["loss"]))
    params, batch_stats = state.params, state.carry

    assert_losses_match(ours, totals, fastai, f"classifier freeze_to={freeze_to}", CLAS_CLIP)
    _, trained_reference, trained_stats = convert.import_classifier(state_dict_numpy(reference), config)
    for (path, ours_leaf), theirs, before, group in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(trained_reference),
            jax.tree.leaves(initial), jax.tree.leaves(labels)):
        name = jax.tree_util.keystr(path)
        if group not in trainable and not name.endswith(("'bn_scale']", "'bn_bias']")):
            np.testing.assert_array_equal(np.asarray(ours_leaf), before, err_msg=name)
            np.testing.assert_array_equal(theirs, before, err_msg=name)
        else:
            np.testing.assert_allclose(np.asarray(ours_leaf), theirs, atol=2e-5, rtol=0, err_msg=name)
    # batch-norm running statistics after 20 train-mode batches (fastai also ran one validation batch,
    # in eval mode, which does not update them)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=1e-5),
                 batch_stats, trained_stats)


def test_classifier_on_wider_buckets_equals_fastai_on_its_own_padding():
    """Our length buckets pad a batch wider than fastai's `pad_input_chunk` (to the batch's longest
    document). Here fastai's batches are 10, 15 and 20 tokens wide and ours all 25 (whole windows of
    front padding more): with `fastai_layout_mask` as the step's `regularized_mask`, AR and TAR
    average over fastai's own positions, and the 20 steps give fastai's losses and parameters.
    Without the mask the padding the buckets add enters the regulariser, and they do not."""
    config = CLAS_CONFIG
    width = 25
    reference = fastai_classifier(config, seed=4)
    _, initial_params, initial_stats = convert.import_classifier(state_dict_numpy(reference), config)
    rng = np.random.default_rng(3)
    fastai_batches, our_batches = [], []
    for i in range(STEPS_PER_EPOCH):
        longest = (10, 15, 20)[i % 3]
        lengths = sorted([longest] + list(rng.integers(1, longest + 1, size=CLAS_BATCH - 1)), reverse=True)
        docs = [rng.integers(2, config.encoder.vocab_size, size=n) for n in lengths]
        targets = rng.integers(0, config.n_classes, size=CLAS_BATCH)
        fastai_batches.append((pad_input_chunk(docs, config.encoder.pad_token, config.bptt), targets))
        tokens = our_pad_input_chunk(docs, config.encoder.pad_token, seq_len=config.bptt, pad_len=width)
        our_batches.append((tokens, targets, fastai_layout_mask(lengths, width, config.bptt)))
    fastai = fastai_fit(reference, awd_lstm_clas_split,
                        [(torch.tensor(x), torch.tensor(y)) for x, y in fastai_batches], None, CLAS_CLIP)

    @jax.jit
    def masked_regularized_loss(params, batch_stats, tokens, targets, key, mask):
        logits, _, outputs = models.classifier_apply(params, batch_stats, tokens, config=config, train=True, key=key)
        mask = mask[:, tokens.shape[1] - outputs.shape[1]:]
        return (losses.cross_entropy(logits, targets) + losses.activation_regularization(outputs, ALPHA, mask)
                + losses.temporal_activation_regularization(outputs, BETA, mask))

    def train(use_mask):
        _, trainable, opt_state, train_step = our_training(initial_params, config, "classifier", None, CLAS_CLIP)
        state = steps.init_state(jax.tree.map(jnp.array, (initial_params, initial_stats))[0], opt_state,
                                 jax.tree.map(jnp.array, initial_stats))
        ours, totals = [], []
        for epoch in range(N_EPOCHS):
            for i, (x, y, mask) in enumerate(our_batches):
                key = jax.random.fold_in(state.key, state.step)
                tokens, targets, mask = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32), jnp.asarray(mask)
                totals.append(float(masked_regularized_loss(state.params, state.carry, tokens, targets, key, mask)))
                batch = {"tokens": tokens, "labels": targets}
                if use_mask:
                    batch["regularized_mask"] = mask
                state, metrics = train_step(state, batch)
                ours.append(float(metrics["loss"]))
        return ours, totals, state.params

    ours, totals, params = train(use_mask=True)
    assert_losses_match(ours, totals, fastai, "classifier on wider buckets", CLAS_CLIP)
    _, trained_reference, _ = convert.import_classifier(state_dict_numpy(reference), config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=2e-5, rtol=0),
                 params, trained_reference)

    unmasked, _, unmasked_params = train(use_mask=False)
    assert max_relative(unmasked, fastai.losses) > 10 * RTOL
    assert max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in
               zip(jax.tree.leaves(unmasked_params), jax.tree.leaves(trained_reference))) > 1e-3


def test_gradual_unfreezing_equals_fastai():
    """fastai's gradual unfreezing, `freeze_to(-1)`, `freeze_to(-2)`, `unfreeze()`, each followed by
    `fit_one_cycle(1)` on one Learner, against three of our stages, each a fresh optimizer state for its
    trainable groups (`train.Stage`), all three through one compiled step: equal because `Learner.freeze_to` clears the optimizer state
    (Adam's moments and step count restart with each stage)."""
    config = CLAS_CONFIG
    stages = [(-1, 1), (-2, 1), (None, 1)]
    reference = fastai_classifier(config, seed=3)
    _, params, batch_stats = convert.import_classifier(state_dict_numpy(reference), config)
    batches = classifier_batches(config, np.random.default_rng(2))
    fastai = fastai_fit(reference, awd_lstm_clas_split,
                        [(torch.tensor(x), torch.tensor(y)) for x, y in batches], None, CLAS_CLIP, stages=stages)

    # one train step (one program) for the three stages; each stage a fresh optimizer state
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _seconds, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
        and "train_step" in kw.get("fun_name", "") else None)
    _, _, opt_state, train_step = our_training(params, config, "classifier", None, CLAS_CLIP)
    state = steps.init_state(params, opt_state, batch_stats)
    ours, totals = [], []
    for freeze_to, epochs in stages:
        _, _, opt_state, _ = our_training(state.params, config, "classifier", freeze_to, CLAS_CLIP,
                                          total_steps=epochs * STEPS_PER_EPOCH)
        state = state.replace(opt_state=opt_state)
        for _ in range(epochs):
            for x, y in batches:
                key = jax.random.fold_in(state.key, state.step)
                tokens, targets = jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)
                totals.append(float(classifier_regularized_loss(state.params, state.carry, tokens, targets, key)))
                state, metrics = train_step(state, {"tokens": tokens, "labels": targets})
                ours.append(float(metrics["loss"]))
    params = state.params

    assert len(ours) == 3 * STEPS_PER_EPOCH and len(compiles) == 1, compiles
    assert_losses_match(ours, totals, fastai, "classifier, gradual unfreezing", CLAS_CLIP)
    # 30 steps with gradient norms up to ~17: float32 rounding reaches 3e-5 in a few weights
    _, trained_reference, _ = convert.import_classifier(state_dict_numpy(reference), config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=5e-5, rtol=0),
                 params, trained_reference)
