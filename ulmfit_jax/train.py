"""Jitted train and eval steps for the language model and the classifier, and the epoch loops.

A step is a pure function `(params, opt_state, ..., batch, step_key) -> (params, opt_state, ...,
metrics)`. The trained groups are a static argument (`trainable`, a frozenset): one compile per
stage, and frozen groups are outside the differentiated tree, so they cost no backward compute and
stay bit-identical. Dropout keys are `fold_in(base_key, step)`, so a run is reproducible from its
seed and a resumed run draws the masks it would have drawn.

Data parallelism: batches (and the LM state) are sharded over all local devices on the batch axis,
parameters and optimizer state replicated (`ulmfit_jax.parallel`); `jit` inserts the gradient
all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ulmfit_jax import encoder, heads, losses, models, optim
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """fastai's TextLearner defaults: AR alpha 2, TAR beta 1; label smoothing off."""
    alpha: float = 2.0
    beta: float = 1.0
    label_smoothing: float = 0.0


def _language_model_loss(params, tokens, targets, state, key, *, config, regularization, compute_dtype, train):
    dropped, raw, new_state = models.language_model_hidden(params, tokens, state, config=config, train=train,
                                                           key=key, compute_dtype=compute_dtype)
    logits = heads.lm_logits(params, dropped, config, compute_dtype)
    loss = losses.cross_entropy(logits, targets, label_smoothing=regularization.label_smoothing)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}
    if train:
        loss = (loss + losses.activation_regularization(dropped, regularization.alpha)
                + losses.temporal_activation_regularization(raw, regularization.beta))
    return loss, (new_state, metrics)


def make_language_model_steps(config: LanguageModelConfig, optimizer: optax.GradientTransformation,
                              labels, *, regularization: RegularizationConfig = RegularizationConfig(),
                              train_bn: bool = True, compute_dtype=None):
    """-> (train_step, eval_step).

    train_step(params, opt_state, state, tokens, targets, key, trainable) -> (params, opt_state, state, metrics)
    eval_step(params, state, tokens, targets) -> (state, metrics)
    tokens, targets: int32[B, T]; state from `encoder.initial_state`. The LM state is detached between
    windows (truncated BPTT), as fastai does.
    """
    loss_fn = functools.partial(_language_model_loss, config=config, regularization=regularization,
                                compute_dtype=compute_dtype)

    @functools.partial(jax.jit, static_argnames="trainable", donate_argnums=(0, 1))
    def train_step(params, opt_state, state, tokens, targets, key, trainable):
        trained, frozen = optim.split_trainable(params, labels, trainable, train_bn)
        (_, (new_state, metrics)), grads = jax.value_and_grad(
            lambda t: loss_fn(optim.merge(t, frozen), tokens, targets, state, key, train=True), has_aux=True)(trained)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        params = optim.merge(optax.apply_updates(trained, updates), frozen)
        return params, opt_state, jax.lax.stop_gradient(new_state), metrics

    @jax.jit
    def eval_step(params, state, tokens, targets):
        _, (new_state, metrics) = loss_fn(params, tokens, targets, state, None, train=False)
        return new_state, metrics

    return train_step, eval_step


def make_classifier_steps(config: ClassifierConfig, optimizer: optax.GradientTransformation, labels, *,
                          regularization: RegularizationConfig = RegularizationConfig(),
                          train_bn: bool = True, compute_dtype=None):
    """-> (train_step, predict).

    train_step(params, batch_stats, opt_state, tokens, targets, key, trainable)
        -> (params, batch_stats, opt_state, metrics)
    predict(params, batch_stats, tokens) -> probabilities f32[B, C]
    tokens: int32[B, S] in pad_input_chunk layout; targets: int32[B].
    """

    def loss_fn(trained, frozen, batch_stats, tokens, targets, key):
        params = optim.merge(trained, frozen)
        logits, new_stats, outputs = models.classifier_apply(params, batch_stats, tokens, config=config, train=True,
                                                             key=key, compute_dtype=compute_dtype)
        loss = losses.cross_entropy(logits, targets, label_smoothing=regularization.label_smoothing)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}
        # fastai's RNNRegularizer sees the classifier's encoder outputs as both raw and dropped
        loss = (loss + losses.activation_regularization(outputs, regularization.alpha)
                + losses.temporal_activation_regularization(outputs, regularization.beta))
        return loss, (new_stats, metrics)

    @functools.partial(jax.jit, static_argnames="trainable", donate_argnums=(0, 1, 2))
    def train_step(params, batch_stats, opt_state, tokens, targets, key, trainable):
        trained, frozen = optim.split_trainable(params, labels, trainable, train_bn)
        (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trained, frozen, batch_stats, tokens, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        params = optim.merge(optax.apply_updates(trained, updates), frozen)
        return params, batch_stats, opt_state, metrics

    return train_step, classifier_predictor(config, compute_dtype)


def classifier_predictor(config: ClassifierConfig, compute_dtype=None):
    """-> predict(params, batch_stats, tokens int32[B, S]) -> probabilities f32[B, C], eval mode."""

    @jax.jit
    def predict(params, batch_stats, tokens):
        logits, _, _ = models.classifier_apply(params, batch_stats, tokens, config=config,
                                               compute_dtype=compute_dtype)
        return jax.nn.softmax(logits, axis=-1)

    return predict


# ----------------------------------------------------------------------------------------------
# Metrics

def macro_f1(predictions: np.ndarray, targets: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from both counts 0."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((predictions == c) & (targets == c))
        fp = np.sum((predictions == c) & (targets != c))
        fn = np.sum((predictions != c) & (targets == c))
        scores.append(0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


class Throughput:
    """Tokens per second over training steps only: the first call of each compiled step is counted
    as compile time, not throughput."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0

    def record(self, seconds: float, tokens: int, compiled: bool) -> None:
        if compiled:
            self.compile_seconds += seconds
        else:
            self.tokens += tokens
            self.seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.nan


def timed(fn, *args, **kwargs):
    """Run and block until the result is ready: (result, seconds)."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args, **kwargs))
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Loops

@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs trained with one set of trainable groups and one schedule (one compile, fresh optimizer,
    as fastai's `freeze_to` + `fit_one_cycle`). `trainable=None` trains every group."""
    epochs: int
    optimizer: optim.OptimizerConfig
    trainable: frozenset[int] | None = None


def _log(log, record):
    if log is not None:
        log(record)


def fit_language_model(params, config: LanguageModelConfig, train_documents, valid_documents, stages, *,
                       batch_size: int = 64, bptt: int = 70, seed: int = 0, backwards: bool = False,
                       regularization: RegularizationConfig = RegularizationConfig(), max_steps: int | None = None,
                       compute_dtype=None, mesh=None, log=None):
    """Train an LM over `stages`; validation loss / perplexity / accuracy after every epoch.

    train_documents, valid_documents: lists of int32 token arrays. The last, shorter window of an
    epoch is dropped in training (every step has one shape); validation uses all of it.
    Returns (params, history: list of per-epoch records, throughput).
    """
    from ulmfit_jax.evaluation import evaluate_language_model
    from ulmfit_jax.text.batches import LMBatchSettings, concatenate_documents, lm_epoch
    from ulmfit_jax import parallel
    mesh = parallel.data_mesh() if mesh is None else mesh
    kind = "lm"
    labels = optim.layer_group_labels(params, kind)
    count = optim.n_groups(labels)
    settings = LMBatchSettings(batch_size=batch_size, seq_len=bptt, backwards=backwards)
    valid_stream = concatenate_documents(valid_documents, backwards=backwards) if valid_documents else None
    rng = np.random.default_rng(seed)
    base_key = jax.random.PRNGKey(seed)
    params = parallel.replicate(params, mesh)
    history, throughput, step, epoch = [], Throughput(), 0, 0
    for stage in stages:
        trainable = optim.unfreeze(count) if stage.trainable is None else frozenset(stage.trainable)
        steps_per_epoch = sum(1 for b in lm_epoch(train_documents, settings, np.random.default_rng(0))
                              if b.length == bptt)
        optimizer = optim.make_optimizer(stage.optimizer, params, kind, stage.epochs * steps_per_epoch, trainable)
        train_step, _ = make_language_model_steps(config, optimizer, labels, regularization=regularization,
                                                  train_bn=stage.optimizer.train_bn, compute_dtype=compute_dtype)
        opt_state = parallel.replicate(optimizer.init(optim.split_trainable(params, labels, trainable,
                                                                           stage.optimizer.train_bn)[0]), mesh)
        compiled = False
        for _ in range(stage.epochs):
            state = parallel.shard_batch(encoder.initial_state(config.encoder, batch_size), mesh)
            losses_sum, n = 0.0, 0
            for batch in lm_epoch(train_documents, settings, rng):
                if batch.length != bptt:
                    continue
                tokens, targets = parallel.shard_batch((batch.inputs, batch.targets), mesh)
                key = jax.random.fold_in(base_key, step)
                (params, opt_state, state, metrics), seconds = timed(
                    train_step, params, opt_state, state, tokens, targets, key, trainable)
                throughput.record(seconds, batch.inputs.size, compiled=not compiled)
                compiled = True
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}")
                losses_sum, n, step = losses_sum + loss, n + 1, step + 1
                if max_steps is not None and step >= max_steps:
                    break
            record = {"epoch": epoch, "step": step, "train_loss": losses_sum / max(n, 1),
                      "trainable": sorted(trainable), "tokens_per_s": throughput.tokens_per_second}
            if valid_stream is not None:
                record.update({f"valid_{k}": v for k, v in evaluate_language_model(
                    params, config, valid_stream, batch_size=min(batch_size, (len(valid_stream) - 1)),
                    bptt=bptt).items()})
            history.append(record)
            _log(log, record)
            epoch += 1
            if max_steps is not None and step >= max_steps:
                return params, history, throughput
    return params, history, throughput


def predict_classifier(predict, params, batch_stats, documents, settings):
    """Class probabilities f32[N, C] in the documents' order."""
    from ulmfit_jax.text.batches import classifier_batches
    probabilities = None
    for batch in classifier_batches(documents, None, settings, train=False):
        out = np.asarray(predict(params, batch_stats, batch.tokens))
        if probabilities is None:
            probabilities = np.zeros((len(documents), out.shape[1]), np.float32)
        probabilities[batch.indices[batch.row_mask]] = out[batch.row_mask]
    return probabilities


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    predictions = probabilities.argmax(axis=1)
    labels = np.asarray(labels)
    nll = -np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12)))
    return {"loss": float(nll), "accuracy": float(np.mean(predictions == labels)),
            "macro_f1": macro_f1(predictions, labels, probabilities.shape[1])}


def fit_classifier(params, batch_stats, config: ClassifierConfig, train_documents, train_labels,
                   valid_documents, valid_labels, stages, *, batch_size: int = 64, seed: int = 0,
                   backwards: bool = False, regularization: RegularizationConfig = RegularizationConfig(),
                   max_steps: int | None = None, compute_dtype=None, mesh=None, log=None):
    """Train the classifier over `stages` (gradual unfreezing: one stage per trainable set).

    Returns (params, batch_stats, history, throughput).
    """
    from ulmfit_jax.text.batches import ClassifierBatchSettings, classifier_batches
    from ulmfit_jax import parallel
    mesh = parallel.data_mesh() if mesh is None else mesh
    kind = "classifier"
    labels = optim.layer_group_labels(params, kind)
    count = optim.n_groups(labels)
    settings = ClassifierBatchSettings(batch_size=batch_size, seq_len=config.bptt, max_len=None,
                                       bucket_multiple=config.bptt, backwards=backwards)
    rng = np.random.RandomState(seed)
    base_key = jax.random.PRNGKey(seed)
    params, batch_stats = parallel.replicate((params, batch_stats), mesh)
    steps_per_epoch = len(train_documents) // batch_size
    history, throughput, step, epoch = [], Throughput(), 0, 0
    for stage in stages:
        trainable = optim.unfreeze(count) if stage.trainable is None else frozenset(stage.trainable)
        optimizer = optim.make_optimizer(stage.optimizer, params, kind, stage.epochs * steps_per_epoch, trainable)
        train_step, predict = make_classifier_steps(config, optimizer, labels, regularization=regularization,
                                                    train_bn=stage.optimizer.train_bn, compute_dtype=compute_dtype)
        opt_state = parallel.replicate(optimizer.init(optim.split_trainable(params, labels, trainable,
                                                                           stage.optimizer.train_bn)[0]), mesh)
        shapes_seen = set()
        for _ in range(stage.epochs):
            losses_sum, n = 0.0, 0
            for batch in classifier_batches(train_documents, train_labels, settings, train=True, rng=rng):
                tokens, targets = parallel.shard_batch((batch.tokens, batch.labels), mesh)
                key = jax.random.fold_in(base_key, step)
                (params, batch_stats, opt_state, metrics), seconds = timed(
                    train_step, params, batch_stats, opt_state, tokens, targets, key, trainable)
                throughput.record(seconds, int(batch.lengths.sum()), compiled=batch.tokens.shape not in shapes_seen)
                shapes_seen.add(batch.tokens.shape)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}")
                losses_sum, n, step = losses_sum + loss, n + 1, step + 1
                if max_steps is not None and step >= max_steps:
                    break
            record = {"epoch": epoch, "step": step, "train_loss": losses_sum / max(n, 1), "trainable": sorted(trainable)}
            if valid_documents is not None:
                probabilities = predict_classifier(predict, params, batch_stats, valid_documents, settings)
                record.update({f"valid_{k}": v for k, v in classification_metrics(probabilities, valid_labels).items()})
            history.append(record)
            _log(log, record)
            epoch += 1
            if max_steps is not None and step >= max_steps:
                return params, batch_stats, history, throughput
    return params, batch_stats, history, throughput
