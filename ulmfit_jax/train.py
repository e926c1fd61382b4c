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
import warnings

import jax
import numpy as np
import optax

from ulmfit_jax import encoder, heads, losses, models, optim, parallel
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """fastai's TextLearner defaults: AR alpha 2, TAR beta 1; label smoothing off."""
    alpha: float = 2.0
    beta: float = 1.0
    label_smoothing: float = 0.0


def _language_model_loss(params, tokens, targets, state, key, *, config, regularization, compute_dtype):
    """Train mode: cross-entropy (+ label smoothing) + AR + TAR. -> (loss, (new state, metrics))."""
    dropped, raw, new_state = models.language_model_hidden(params, tokens, state, config=config, train=True,
                                                           key=key, compute_dtype=compute_dtype)
    if not regularization.label_smoothing and compute_dtype is None:
        # never materialises the [B*T, V] logits (DESIGN.md: ~60% of the FLOPs, memory-bound)
        loss = losses.fused_linear_cross_entropy(dropped, heads.decoder_weight(params, config),
                                                 params["decoder"].get("bias"), targets)
    else:
        logits = heads.lm_logits(params, dropped, config, compute_dtype)
        loss = losses.cross_entropy(logits, targets, label_smoothing=regularization.label_smoothing)
    metrics = {"loss": loss}
    loss = (loss + losses.activation_regularization(dropped, regularization.alpha)
            + losses.temporal_activation_regularization(raw, regularization.beta))
    return loss, (new_state, metrics)


def make_language_model_train_step(config: LanguageModelConfig, optimizer: optax.GradientTransformation,
                              labels, *, regularization: RegularizationConfig = RegularizationConfig(),
                              train_bn: bool = True, compute_dtype=None, compiler_options: dict | None = None):
    """-> train_step(params, opt_state, state, tokens, targets, key, trainable) -> (params, opt_state, state,
    metrics). tokens, targets: int32[B, T]; state from `encoder.initial_state`. The LM state is detached between
    windows (truncated BPTT), as fastai does. `compiler_options`: XLA options for its compile (`jax.jit`'s).
    """
    loss_fn = functools.partial(_language_model_loss, config=config, regularization=regularization,
                                compute_dtype=compute_dtype)

    @functools.partial(jax.jit, static_argnames="trainable", donate_argnums=(0, 1), compiler_options=compiler_options)
    def train_step(params, opt_state, state, tokens, targets, key, trainable):
        trained, frozen = optim.split_trainable(params, labels, trainable, train_bn)
        (_, (new_state, metrics)), grads = jax.value_and_grad(
            lambda t: loss_fn(optim.merge(t, frozen), tokens, targets, state, key), has_aux=True)(trained)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        params = optim.merge(optax.apply_updates(trained, updates), frozen)
        return params, opt_state, jax.lax.stop_gradient(new_state), metrics

    return train_step


def make_classifier_train_step(config: ClassifierConfig, optimizer: optax.GradientTransformation, labels, *,
                          regularization: RegularizationConfig = RegularizationConfig(),
                          train_bn: bool = True, compute_dtype=None, compiler_options: dict | None = None):
    """-> train_step(params, batch_stats, opt_state, tokens, targets, key, trainable, regularized_mask=None)
        -> (params, batch_stats, opt_state, metrics)
    tokens: int32[B, S] in pad_input_chunk layout; targets: int32[B]; regularized_mask: bool[B, S], the
    positions AR and TAR average over (None: all of them). A batch padded wider than fastai pads it
    (our length buckets) passes `ClassifierBatch.fastai_mask`, so that the padding the buckets add does
    not enter the regulariser: fastai's mean is over its own batch, padded to the longest document.
    `compiler_options`: as for the LM's.
    """

    def loss_fn(trained, frozen, batch_stats, tokens, targets, key, regularized_mask):
        params = optim.merge(trained, frozen)
        logits, new_stats, outputs = models.classifier_apply(params, batch_stats, tokens, config=config, train=True,
                                                             key=key, compute_dtype=compute_dtype)
        loss = losses.cross_entropy(logits, targets, label_smoothing=regularization.label_smoothing)
        metrics = {"loss": loss}
        # fastai's RNNRegularizer sees the classifier's encoder outputs as both raw and dropped; the
        # outputs are the kept (last) windows, so the mask is cut to them
        mask = None if regularized_mask is None else regularized_mask[:, tokens.shape[1] - outputs.shape[1]:]
        loss = (loss + losses.activation_regularization(outputs, regularization.alpha, mask)
                + losses.temporal_activation_regularization(outputs, regularization.beta, mask))
        return loss, (new_stats, metrics)

    @functools.partial(jax.jit, static_argnames="trainable", donate_argnums=(0, 1, 2),
                       compiler_options=compiler_options)
    def train_step(params, batch_stats, opt_state, tokens, targets, key, trainable, regularized_mask=None):
        trained, frozen = optim.split_trainable(params, labels, trainable, train_bn)
        (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trained, frozen, batch_stats, tokens, targets, key, regularized_mask)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        params = optim.merge(optax.apply_updates(trained, updates), frozen)
        return params, batch_stats, opt_state, metrics

    return train_step


def classifier_predictor(config: ClassifierConfig, compute_dtype=None):
    """-> predict(params, batch_stats, tokens int32[B, S]) -> probabilities f32[B, C], eval mode."""

    @jax.jit
    def predict(params, batch_stats, tokens):
        logits, _, _ = models.classifier_apply(params, batch_stats, tokens, config=config,
                                               compute_dtype=compute_dtype)
        return jax.nn.softmax(logits, axis=-1)

    return predict


# ----------------------------------------------------------------------------------------------
# Stage steps, and compiling them ahead

# XLA:CPU options that trade run time for compile time: the demo's 14 train steps compiled in 23.0 s
# instead of 44.6 s with both (40.0 s with the first alone, 36.4 s with the second), and its
# classifier step ran ~8% slower (the from-scratch demo at 12,100 against 13,200 tokens/s).
QUICK_COMPILE_CPU_OPTIONS = (("xla_backend_optimization_level", 1), ("xla_cpu_use_fusion_emitters", False))


def stage_step(kind: str, config, optimizer_config: optim.OptimizerConfig, structure, stage_steps: int,
               trainable: frozenset[int], regularization: RegularizationConfig = RegularizationConfig(),
               compute_dtype=None, quick_compile: bool = False):
    """(optimizer, jitted train step) of one training stage; `structure` is the parameters'
    `jax.tree.structure` (the groups come from the tree's paths only). `quick_compile`: on CPU,
    compile with `QUICK_COMPILE_CPU_OPTIONS` (elsewhere it changes nothing)."""
    params_like = jax.tree.unflatten(structure, [0] * structure.num_leaves)
    labels = optim.layer_group_labels(params_like, kind)
    optimizer = optim.make_optimizer(optimizer_config, params_like, kind, stage_steps, trainable)
    make_step = make_language_model_train_step if kind == "lm" else make_classifier_train_step
    compiler_options = dict(QUICK_COMPILE_CPU_OPTIONS) if quick_compile and jax.default_backend() == "cpu" else None
    return optimizer, make_step(config, optimizer, labels, regularization=regularization,
                                train_bn=optimizer_config.train_bn, compute_dtype=compute_dtype,
                                compiler_options=compiler_options)


class CompileAhead:
    """Compiles train steps in one background thread while the main thread does something else
    (the demo: the fine-tuning's 2 steps and the classifier's 12 while it pretrains).

    `compile_language_model_ahead` / `compile_classifier_ahead` submit a fit's steps; pass the same
    object to the fit as `ahead=`. Each step is lowered and compiled from `jax.ShapeDtypeStruct`s
    (shape, dtype, sharding: what the loop's call will see), which fills jit's in-memory caches, and
    `stage_step` hands the fit the same jitted functions: the loop's first call of each stage and
    batch shape then runs at once. In the demo on 2 CPU cores the 14 compiles run while it pretrains;
    with `cli.keep_freed_memory` the demo went from 397 s to 364-371 s (README "The demo").

    `wait(train_step, batch_shape)` is what the loop calls before each step: a compile not yet started is
    cancelled (the loop compiles it itself rather than queue behind others), one in progress is
    waited for (never compiled twice side by side), and one that failed is reported as a warning and
    left to the loop, which raises the error itself if it is real. Use it as a context manager: on
    an error the queued compiles are cancelled. Tracing happens in the worker thread, so
    thread-local JAX settings (`jax.default_matmul_precision(...)` as a context manager) do not
    reach it; set them globally (`jax.config.update`) when compiling ahead."""

    def __init__(self):
        import concurrent.futures
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        self._futures = {}
        self._steps = {}

    def stage_step(self, *arguments):
        """`stage_step(*arguments)`, memoised for the lifetime of this object, so that the fit calls the
        jitted function that was compiled ahead (unhashable arguments, e.g. a Python `slice` learning
        rate: built afresh, compiled by the loop)."""
        try:
            hash(arguments)
        except TypeError:
            return stage_step(*arguments)
        if arguments not in self._steps:
            self._steps[arguments] = stage_step(*arguments)
        return self._steps[arguments]

    def submit(self, train_step, *args, trainable: frozenset[int], batch_shape: tuple[int, ...],
               **keywords) -> None:
        def compile_step():
            # `trainable` positional and `keywords` by name, as the loop calls it
            train_step.lower(*args, trainable, **keywords).compile()
        key = (train_step, tuple(batch_shape))
        if key not in self._futures:
            self._futures[key] = self._executor.submit(compile_step)

    def wait(self, train_step, batch_shape: tuple[int, ...]) -> None:
        future = self._futures.pop((train_step, tuple(batch_shape)), None)      # later calls: nothing to do
        if future is None or future.cancel():
            return
        error = future.exception()
        if error is not None:
            warnings.warn(f"compiling ahead failed ({error!r}); the training loop compiles the step itself")

    def close(self, cancel: bool = False) -> None:
        """Wait for the submitted compiles to finish (`cancel`: drop those not started)."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(cancel=exc_type is not None)


def _spec(tree, sharding):
    """Every leaf -> `jax.ShapeDtypeStruct` with `sharding` (leaves may be arrays or specs), strongly
    typed as the loop's arrays are (`parallel.replicate` and `shard_batch` make them so)."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


def _stage_specs(ahead, kind, config, params, stages, steps_per_epoch, regularization, compute_dtype, mesh):
    """Per stage, as `_run_stages` builds and holds them: (jitted train step, trainable groups, spec of
    the parameters, spec of the optimizer state), both replicated over the mesh."""
    from jax.sharding import NamedSharding, PartitionSpec
    replicated = NamedSharding(mesh, PartitionSpec())
    params_spec = _spec(params, replicated)
    labels = optim.layer_group_labels(params_spec, kind)
    count = optim.n_groups(labels)
    for stage in stages:
        trainable = _stage_trainable(stage, count)
        optimizer, train_step = ahead.stage_step(kind, config, stage.optimizer, jax.tree.structure(params),
                                                 stage.epochs * steps_per_epoch, trainable, regularization,
                                                 compute_dtype, stage.quick_compile)
        trained = optim.split_trainable(params_spec, labels, trainable, stage.optimizer.train_bn)[0]
        yield train_step, trainable, params_spec, _spec(jax.eval_shape(optimizer.init, trained), replicated)


def _stage_trainable(stage, count):
    return optim.unfreeze(count) if stage.trainable is None else frozenset(stage.trainable)


def compile_language_model_ahead(ahead: CompileAhead, params, config: LanguageModelConfig, n_train_tokens: int,
                                 stages, *, batch_size: int = 64, bptt: int = 70,
                                 regularization: RegularizationConfig = RegularizationConfig(),
                                 compute_dtype=None, mesh=None) -> None:
    """Submit the train steps `fit_language_model` will run with these arguments (`params`: arrays or
    `jax.eval_shape` specs of them; `n_train_tokens`: the training documents' total length)."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = parallel.data_mesh() if mesh is None else mesh
    steps_per_epoch = _language_model_steps_per_epoch(n_train_tokens, batch_size, bptt)
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    state = _spec(encoder.initial_state(config.encoder, batch_size), sharded)
    windows = jax.ShapeDtypeStruct((batch_size, bptt), np.int32, sharding=sharded)
    for train_step, trainable, params_spec, opt_state_spec in _stage_specs(
            ahead, "lm", config, params, stages, steps_per_epoch, regularization, compute_dtype, mesh):
        ahead.submit(train_step, params_spec, opt_state_spec, state, windows, windows, _example_key(),
                     trainable=trainable, batch_shape=windows.shape)


def compile_classifier_ahead(ahead: CompileAhead, params, batch_stats, config: ClassifierConfig,
                             train_documents, stages, *, batch_size: int = 64, backwards: bool = False,
                             regularization: RegularizationConfig = RegularizationConfig(),
                             compute_dtype=None, mesh=None) -> None:
    """Submit the train steps `fit_classifier` will run with these arguments, every stage and batch
    shape, in order (`params`, `batch_stats`: arrays or `jax.eval_shape` specs of them)."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = parallel.data_mesh() if mesh is None else mesh
    settings, steps_per_epoch = _classifier_layout(config, train_documents, batch_size, backwards)
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    stats = _spec(batch_stats, NamedSharding(mesh, PartitionSpec()))
    targets = jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharded)
    for train_step, trainable, params_spec, opt_state_spec in _stage_specs(
            ahead, "classifier", config, params, stages, steps_per_epoch, regularization, compute_dtype, mesh):
        for length in settings.lengths:
            tokens = jax.ShapeDtypeStruct((batch_size, length), np.int32, sharding=sharded)
            mask = jax.ShapeDtypeStruct((batch_size, length), np.bool_, sharding=sharded)
            ahead.submit(train_step, params_spec, stats, opt_state_spec, tokens, targets, _example_key(),
                         trainable=trainable, batch_shape=tokens.shape, regularized_mask=mask)


def _example_key():
    """A dropout key as the loop makes them (`fold_in` of the base key: an uncommitted array)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), 0)


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
    as fastai's `freeze_to` + `fit_one_cycle`). `trainable=None` trains every group. `quick_compile`:
    compile the step for compile time rather than run time (`QUICK_COMPILE_CPU_OPTIONS`), for a
    stage too short to repay a full compile (gradual unfreezing's one-epoch stages on a small set)."""
    epochs: int
    optimizer: optim.OptimizerConfig
    trainable: frozenset[int] | None = None
    quick_compile: bool = False


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was saved."""

    def __init__(self, step: int, signal_number: int):
        super().__init__(f"interrupted by signal {signal_number} after step {step}; checkpoint saved")
        self.step = step
        self.signal_number = signal_number


class _SignalFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps (never mid-step)."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        import signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _run_stages(stages, steps_per_epoch: int, *, kind: str, params, carry, build_stage, epoch_batches,
                new_epoch_carry, place_carry, evaluate, seed: int, mesh, checkpointer=None, max_steps=None,
                log=None, on_epoch_end=None, progress: bool = False):
    """The loop shared by both models: stages of epochs of steps, checkpointed and resumable.

    `build_stage(stage) -> (optimizer, step_fn)` with `step_fn(params, opt_state, carry, batch, key,
    trainable) -> (params, opt_state, carry, metrics)`; `epoch_batches(epoch)` yields device batches,
    deterministic in (seed, epoch), so a resumed run skips to the same batch; `new_epoch_carry(carry)`
    resets what an epoch resets (the LM's hidden state); `place_carry` puts a restored carry on the
    mesh (parameters and optimizer state are replicated). The global step fixes the stage, the epoch and
    the batch, so a checkpoint is `{params, opt_state, carry, step}`.
    """
    labels = optim.layer_group_labels(params, kind)
    count = optim.n_groups(labels)
    stage_of_epoch = [i for i, stage in enumerate(stages) for _ in range(stage.epochs)]
    total_steps = len(stage_of_epoch) * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    built = {}

    def stage_parts(index):
        if index not in built:
            stage = stages[index]
            trainable = _stage_trainable(stage, count)
            optimizer, step_fn = build_stage(stage, trainable, stage.epochs * steps_per_epoch)
            built[index] = (trainable, optimizer, step_fn)
        return built[index]

    def initial_opt_state(index, params):
        trainable, optimizer, _ = stage_parts(index)
        trained = optim.split_trainable(params, labels, trainable, stages[index].optimizer.train_bn)[0]
        return parallel.replicate(optimizer.init(trained), mesh)

    step = 0
    opt_state = None
    if checkpointer is not None:
        def target(saved_step):
            index = stage_of_epoch[min(saved_step // steps_per_epoch, len(stage_of_epoch) - 1)]
            return {"params": params, "opt_state": initial_opt_state(index, params), "carry": carry, "step": 0}
        saved_step, restored = checkpointer.restore(target)
        if restored is not None:
            step = saved_step
            params, opt_state = parallel.replicate((restored["params"], restored["opt_state"]), mesh)
            carry = place_carry(restored["carry"])
            _log(log, {"resumed_from_step": step})
    base_key = jax.random.PRNGKey(seed)
    history, throughput = [], Throughput()
    compiled = set()          # (stage, batch shape): each compiles once; its first step is not throughput

    def save(step):
        if checkpointer is not None:
            checkpointer.save(step, {"params": params, "opt_state": opt_state, "carry": carry, "step": step})

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not progress, leave=False,
               dynamic_ncols=True)
    # One step in flight: step k+1 is dispatched before step k's loss is read, so the host prepares
    # the next batch while the device computes (on GPU / TPU the loss read would otherwise idle it).
    # `pending` is (step number, metrics, seconds if it ran synchronously, else None).
    pending, clock, epoch_losses = None, time.perf_counter(), []

    def settle():
        """Wait for the step in flight, check its loss, count it."""
        nonlocal pending, clock
        if pending is None:
            return
        step_number, metrics, compile_seconds = pending
        pending = None
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {step_number}; stopped, the last good checkpoint is kept"
                + (f" in {checkpointer.directory}" if checkpointer is not None else ""))
        now = time.perf_counter()
        compiled_now = compile_seconds is not None
        throughput.record(compile_seconds if compiled_now else now - clock, int(metrics["tokens"]),
                          compiled=compiled_now)
        clock = now
        epoch_losses.append(loss)
        bar.update(1)
        bar.set_postfix(epoch=step_number // steps_per_epoch, loss=f"{loss:.3f}",
                        tokens_per_s=f"{throughput.tokens_per_second:.0f}", refresh=False)

    with _SignalFlag() as signals, bar:
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            index = stage_of_epoch[epoch]
            trainable, _, step_fn = stage_parts(index)
            if batch_in_epoch == 0:
                opt_state = initial_opt_state(index, params) if (epoch == 0 or stage_of_epoch[epoch - 1] != index) \
                    else opt_state
                carry = new_epoch_carry(carry)
            elif opt_state is None:
                opt_state = initial_opt_state(index, params)
            epoch_losses.clear()
            for batch_index, batch in enumerate(epoch_batches(epoch)):
                if batch_index < batch_in_epoch:
                    continue
                if batch_index >= steps_per_epoch or step >= total_steps:
                    break
                key = jax.random.fold_in(base_key, step)
                compile_key = (index, jax.tree.leaves(batch)[0].shape)
                if compile_key in compiled:
                    params, opt_state, carry, metrics = step_fn(params, opt_state, carry, batch, key, trainable)
                    settle()
                    pending = (step, metrics, None)
                else:      # compiles: run it alone, so that its time is compile time, not throughput
                    settle()
                    (params, opt_state, carry, metrics), seconds = timed(
                        step_fn, params, opt_state, carry, batch, key, trainable)
                    compiled.add(compile_key)
                    pending = (step, metrics, seconds)
                    settle()
                step += 1
                if signals.received is not None:
                    settle()
                    save(step)
                    raise Interrupted(step, signals.received)
            settle()
            if step % steps_per_epoch and step < total_steps:
                raise RuntimeError(f"epoch {epoch} gave fewer than the {steps_per_epoch} batches expected")
            record = {"epoch": epoch, "step": step, "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
                      "trainable": sorted(trainable), "tokens_per_s": throughput.tokens_per_second}
            record.update(evaluate(params, carry))
            history.append(record)
            bar.clear()              # the record goes on a line of its own, not after the bar
            _log(log, record)
            save(step)
            if on_epoch_end is not None:
                on_epoch_end(record, params, carry)
            clock = time.perf_counter()          # evaluation and saving are not training time
    return params, carry, history, throughput


def _log(log, record):
    if log is not None:
        log(record)


def _language_model_steps_per_epoch(n_tokens: int, batch_size: int, bptt: int) -> int:
    from ulmfit_jax.text.batches import lm_layout
    if n_tokens <= batch_size * bptt:
        raise ValueError(f"the training set has {n_tokens} tokens: too few for one batch of {batch_size} x {bptt}")
    row_length, _, _ = lm_layout(n_tokens, batch_size, bptt)
    return row_length // bptt


def fit_language_model(params, config: LanguageModelConfig, train_documents, valid_documents, stages, *,
                       batch_size: int = 64, bptt: int = 70, seed: int = 0, backwards: bool = False,
                       regularization: RegularizationConfig = RegularizationConfig(), max_steps: int | None = None,
                       compute_dtype=None, mesh=None, checkpointer=None, log=None, on_epoch_end=None,
                       progress: bool = False, ahead: CompileAhead | None = None):
    """Train an LM over `stages`; validation loss / perplexity / accuracy after every epoch.

    train_documents, valid_documents: lists of int32 token arrays (documents are shuffled each
    epoch and concatenated: fastai's LMDataLoader). The last, shorter window of an epoch is dropped
    in training, so every step has one shape; validation uses all of it.
    `ahead`: where `compile_language_model_ahead` submitted these stages' steps.
    Returns (params, history: per-epoch records, throughput).
    """
    from ulmfit_jax.evaluation import evaluate_language_model
    from ulmfit_jax.text.batches import LMBatchSettings, concatenate_documents, lm_epoch
    mesh = parallel.data_mesh() if mesh is None else mesh
    settings = LMBatchSettings(batch_size=batch_size, seq_len=bptt, backwards=backwards)
    steps_per_epoch = _language_model_steps_per_epoch(sum(len(d) for d in train_documents), batch_size, bptt)
    valid_stream = concatenate_documents(valid_documents, backwards=backwards) if valid_documents else None
    structure = jax.tree.structure(params)

    def build_stage(stage, trainable, stage_steps):
        build = stage_step if ahead is None else ahead.stage_step
        optimizer, train_step = build("lm", config, stage.optimizer, structure, stage_steps, trainable,
                                      regularization, compute_dtype, stage.quick_compile)

        def step_fn(params, opt_state, state, batch, key, trainable):
            if ahead is not None:
                ahead.wait(train_step, batch[0].shape)
            params, opt_state, state, metrics = train_step(params, opt_state, state, *batch, key, trainable)
            return params, opt_state, state, dict(metrics, tokens=batch[0].size)
        return optimizer, step_fn

    def epoch_batches(epoch):
        for batch in lm_epoch(train_documents, settings, np.random.default_rng([seed, epoch])):
            yield parallel.shard_batch((batch.inputs, batch.targets), mesh)

    def evaluate(params, _state):
        if valid_stream is None:
            return {}
        result = evaluate_language_model(params, config, valid_stream,
                                         batch_size=max(1, min(batch_size, (len(valid_stream) - 1) // bptt)),
                                         bptt=bptt)
        return {f"valid_{k}": v for k, v in result.items()}

    state = encoder.initial_state(config.encoder, batch_size)
    params, _, history, throughput = _run_stages(
        stages, steps_per_epoch, kind="lm", params=parallel.replicate(params, mesh),
        carry=parallel.shard_batch(state, mesh), build_stage=build_stage, epoch_batches=epoch_batches,
        new_epoch_carry=lambda _: parallel.shard_batch(encoder.initial_state(config.encoder, batch_size), mesh),
        place_carry=lambda state: parallel.shard_batch(state, mesh), evaluate=evaluate, seed=seed, mesh=mesh,
        checkpointer=checkpointer, max_steps=max_steps, log=log, on_epoch_end=on_epoch_end, progress=progress)
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


def classifier_batch_settings(config: ClassifierConfig, batch_size: int, backwards: bool = False):
    """Batches for `config`: windows of its bptt, lengths bucketed to multiples of bptt (few shapes),
    or of 8 for batches shorter than one window.

    Multiples of bptt keep fastai's last-state index (`masked_concat_pool`) on the last real token;
    within one window there is no front padding, so any length does."""
    from ulmfit_jax.text.batches import ClassifierBatchSettings
    return ClassifierBatchSettings(batch_size=batch_size, seq_len=config.bptt, max_len=None,
                                   bucket_multiple=config.bptt, short_bucket_multiple=min(8, config.bptt),
                                   backwards=backwards)


def _classifier_layout(config: ClassifierConfig, train_documents, batch_size: int, backwards: bool):
    """-> (batch settings with the training set's merged bucket lengths, steps per epoch)."""
    from ulmfit_jax.text.batches import merged_bucket_lengths
    settings = classifier_batch_settings(config, batch_size, backwards)
    settings = dataclasses.replace(settings, lengths=merged_bucket_lengths([len(d) for d in train_documents],
                                                                           settings))
    steps_per_epoch = len(train_documents) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(train_documents)} documents: fewer than one batch of {batch_size}")
    return settings, steps_per_epoch


def fit_classifier(params, batch_stats, config: ClassifierConfig, train_documents, train_labels,
                   valid_documents, valid_labels, stages, *, batch_size: int = 64, seed: int = 0,
                   backwards: bool = False, regularization: RegularizationConfig = RegularizationConfig(),
                   max_steps: int | None = None, compute_dtype=None, mesh=None, checkpointer=None, log=None,
                   on_epoch_end=None, progress: bool = False, ahead: CompileAhead | None = None):
    """Train the classifier over `stages` (gradual unfreezing: one stage per trainable set).

    `ahead`: where `compile_classifier_ahead` submitted these stages' steps.
    Returns (params, batch_stats, history, throughput).
    """
    from ulmfit_jax.text.batches import classifier_batches
    mesh = parallel.data_mesh() if mesh is None else mesh
    settings, steps_per_epoch = _classifier_layout(config, train_documents, batch_size, backwards)
    predict = classifier_predictor(config, compute_dtype)
    structure = jax.tree.structure(params)

    def build_stage(stage, trainable, stage_steps):
        build = stage_step if ahead is None else ahead.stage_step
        optimizer, train_step = build("classifier", config, stage.optimizer, structure, stage_steps, trainable,
                                      regularization, compute_dtype, stage.quick_compile)

        def step_fn(params, opt_state, batch_stats, batch, key, trainable):
            tokens, targets, fastai_mask, n_tokens = batch
            if ahead is not None:
                ahead.wait(train_step, tokens.shape)
            params, batch_stats, opt_state, metrics = train_step(params, batch_stats, opt_state, tokens, targets,
                                                                 key, trainable, regularized_mask=fastai_mask)
            return params, opt_state, batch_stats, dict(metrics, tokens=n_tokens)
        return optimizer, step_fn

    def epoch_batches(epoch):
        rng = np.random.RandomState([seed, epoch])
        for batch in classifier_batches(train_documents, train_labels, settings, train=True, rng=rng):
            yield (*parallel.shard_batch((batch.tokens, batch.labels, batch.fastai_mask), mesh),
                   int(batch.lengths.sum()))

    def evaluate(params, batch_stats):
        if valid_documents is None:
            return {}
        probabilities = predict_classifier(predict, params, batch_stats, valid_documents, settings)
        return {f"valid_{k}": v for k, v in classification_metrics(probabilities, valid_labels).items()}

    params, batch_stats, history, throughput = _run_stages(
        stages, steps_per_epoch, kind="classifier", params=parallel.replicate(params, mesh),
        carry=parallel.replicate(batch_stats, mesh), build_stage=build_stage, epoch_batches=epoch_batches,
        new_epoch_carry=lambda stats: stats, place_carry=lambda stats: parallel.replicate(stats, mesh),
        evaluate=evaluate, seed=seed, mesh=mesh, checkpointer=checkpointer,
        max_steps=max_steps, log=log, on_epoch_end=on_epoch_end, progress=progress)
    return params, batch_stats, history, throughput
