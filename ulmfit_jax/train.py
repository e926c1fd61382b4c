"""The training loop: stages of epochs of steps, checkpointed, resumable, interruptible.

`fit_language_model` and `fit_classifier` lay out their batches (`ulmfit_jax.text.batches`) and
run `run_stages`, which drives `steps.TrainState` through `train_step(state, batch)`:

- Stages (`Stage`: epochs, an optimizer config, the trained groups) share one compiled train step:
  the stage's groups, learning rates and length are arrays in the optimizer state
  (`optim.stage_hyper`). Every batch shape and the evaluation's forward passes compile ahead, in a
  background thread, while the first shape trains (`compile_ahead.Compiler`).
- Losses stay on the device and are read every `log_every` steps and at each epoch's end (one
  transfer); a NaN or inf stops the run at that read, naming the steps, before anything is saved.
- The global step fixes the stage, the epoch and the batch (batches are deterministic in the seed
  and the epoch), so a checkpoint is the `TrainState` alone, of one structure in every stage:
  rerunning resumes from the newest, at a stage boundary or between any two steps, and equals the
  run that was not stopped. A checkpoint is written after every epoch and on SIGINT / SIGTERM
  (several processes: on SIGTERM, every process at the same step), never from non-finite parameters.
- Several processes: the mesh spans every device of every process; each feeds its own rows of
  each global batch (`parallel.shard_batch`); evaluation runs on every process's local copy of the
  parameters; logging (`log`, `on_epoch_end`, the progress bar) is the caller's to restrict to
  process 0 (`parallel.is_main_process`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from ulmfit_jax import encoder, metrics, optim, parallel, predict, steps
from ulmfit_jax.compile_ahead import Compiler, quick_compile_options
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig
from ulmfit_jax.steps import RegularizationConfig  # noqa: F401  (the loop's callers pass it)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs trained with one set of trainable groups and one schedule (fastai's `freeze_to` +
    `fit_one_cycle`: a fresh optimizer state). `trainable=None` trains every group."""
    epochs: int
    optimizer: optim.OptimizerConfig
    trainable: frozenset[int] | None = None


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was saved."""

    def __init__(self, step: int, signal_number: int):
        super().__init__(f"interrupted by signal {signal_number} after step {step}; checkpoint saved")
        self.step = step
        self.signal_number = signal_number


class _Signals:
    """SIGINT / SIGTERM turned into a flag the loop checks between steps (never mid-step). With several
    processes, JAX's preemption service (started by `jax.distributed.initialize`, which takes SIGTERM
    itself) agrees on the step at which all of them stop (`multihost_utils.reached_preemption_sync_point`),
    so that every process saves the same step; no handler of ours is installed then."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        import signal
        if jax.process_count() == 1:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def stop_at(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.received is not None
        import signal
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(step):
            self.received = signal.SIGTERM
            return True
        return False

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# A run is short enough for XLA:CPU's quick settings (`compile_ahead.QUICK_COMPILE_CPU_OPTIONS`) when
# its steps cover at most QUICK_COMPILE_MAX_POSITIONS[kind] token positions (batch x length, padding
# included). With a 128/384/2 model on CPU a quick language-model step compiles faster but runs a
# sixth slower, so only a run of a few seconds of steps gains; a classifier's train steps (BPT3C
# over several widths) save more compile time each for a similar loss, about even for TREC-6 (1.6M
# positions) and 900 IMDb reviews (5.0M).
QUICK_COMPILE_MAX_POSITIONS = {"lm": 100_000, "classifier": 4_000_000}

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_seconds = [0.0]


def _count_compile(event, seconds, **_):
    if event == _COMPILE_EVENT:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """XLA compile time spent in this process so far (every program, in any thread; a persistent
    compilation cache hit costs none)."""
    return _compile_seconds[0]


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every floating-point value in `tree` is finite. One reduction over the leaves laid end
    to end (a copy, once an epoch) compiles in a third of the time of one reduction per leaf."""
    leaves = [x.ravel() for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    return jax.numpy.isfinite(jax.numpy.concatenate(leaves)).all()


def run_stages(kind: str, config, state: steps.TrainState, stages, steps_per_epoch: int, *, epoch_batches,
               batch_specs, reset_carry, evaluate, mesh, regularization=RegularizationConfig(),
               compute_dtype=None, share_compiles: bool = True, checkpointer=None, max_steps=None, log=None,
               on_epoch_end=None, progress: bool = False, log_every: int = 50, quick_compile: bool | None = None,
               compiler: Compiler | None = None, ahead=()):
    """The loop both fits share. -> (state, history: per-epoch records, throughput).

    `epoch_batches(epoch)` yields (batch on the mesh, tokens in it), deterministic in (seed, epoch);
    `batch_specs`: a spec of every batch shape it can yield (compiled ahead); `reset_carry(state)`
    does what an epoch resets (the LM's hidden state); `evaluate(params, carry)` -> validation
    metrics. `share_compiles`: one train step for every stage (the backward pass runs through
    frozen groups); False: each stage's own, differentiating only its groups. `quick_compile`: compile
    the train step for compile time rather than run time (`compile_ahead.QUICK_COMPILE_CPU_OPTIONS`,
    CPU only); None: when the run is short (its steps times its widest batch's token positions at
    most `QUICK_COMPILE_MAX_POSITIONS[kind]`). `compiler`: where the train steps compile (and
    `evaluate` may call its programs); `ahead`: `(fn, *args)` of further programs to compile in the
    background after the train steps (the evaluation's).
    """
    labels = optim.layer_group_labels(state.params, kind)
    count = optim.n_groups(labels)
    stage_of_epoch = [i for i, stage in enumerate(stages) for _ in range(stage.epochs)]
    stage_start = [sum(s.epochs for s in stages[:i]) * steps_per_epoch for i in range(len(stages))]
    total_steps = len(stage_of_epoch) * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    trainables = [optim.unfreeze(count) if s.trainable is None else frozenset(s.trainable) for s in stages]
    params_like = jax.eval_shape(lambda p: p, state.params)
    if quick_compile is None:
        positions = max(int(np.prod(leaf.shape)) for spec in batch_specs for leaf in jax.tree.leaves(spec))
        quick_compile = total_steps * positions <= QUICK_COMPILE_MAX_POSITIONS[kind]
    compiler_options = quick_compile_options() if quick_compile else None
    built = {}

    def stage_step(index):
        """(optimizer, train step) of stage `index`, shared by the stages that compile alike."""
        fixed = dataclasses.replace(stages[index].optimizer, learning_rate=0.0)   # the hyper's, at run time
        differentiated = None if share_compiles else trainables[index]
        if (fixed, differentiated) not in built:
            optimizer = optim.stage_optimizer(fixed, params_like, kind)
            built[fixed, differentiated] = optimizer, steps.make_train_step(
                kind, config, optimizer, params_like, regularization=regularization, compute_dtype=compute_dtype,
                differentiated=differentiated, train_bn=fixed.train_bn, compiler_options=compiler_options)
        return built[fixed, differentiated]

    def stage_state(index, state):
        """`state` with stage `index`'s fresh optimizer state."""
        optimizer, _ = stage_step(index)
        hyper = optim.stage_hyper(stages[index].optimizer, count, stages[index].epochs * steps_per_epoch,
                                  trainables[index])
        return state.replace(opt_state=parallel.replicate(optimizer.init(state.params, hyper), mesh))

    def stage_at(step):
        return stage_of_epoch[min(step // steps_per_epoch, len(stage_of_epoch) - 1)]

    step, epoch_losses = 0, []        # the current epoch's losses so far, as floats
    state = stage_state(0, state)
    if checkpointer is not None:
        saved_step, restored = checkpointer.restore(lambda saved: _checkpoint_tree(
            stage_state(stage_at(saved), state), [0.0] * (saved % steps_per_epoch)))
        if restored is not None:
            step = saved_step
            epoch_losses = [float(v) for v in restored.pop("epoch_losses")[:step % steps_per_epoch]]
            state = steps.TrainState(**restored)
            _log(log, {"resumed_from_step": step})

    compiler = Compiler() if compiler is None else compiler
    for index in sorted({stage_of_epoch[e] for e in range(step // steps_per_epoch, len(stage_of_epoch))},
                        key=lambda i: (i != stage_at(step), i)):
        for spec in batch_specs:
            compiler.submit(stage_step(index)[1], state, spec, key=_shapes(spec))
    for fn, *args in ahead:
        compiler.submit(fn, *args)
    if checkpointer is not None:
        compiler.submit(_all_finite, (state.params, state.opt_state))     # the check before every save
    history, throughput, losses = [], metrics.Throughput(), metrics.LossBuffer()
    compiled_before = compile_seconds()

    def save(step, state):
        if checkpointer is None:
            return
        if not bool(compiler.call(_all_finite, (state.params, state.opt_state))):
            raise FloatingPointError(f"the parameters are not finite after step {step}; no checkpoint written")
        checkpointer.save(step, _checkpoint_tree(state, epoch_losses))

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    window_tokens = 0
    clock, waited = time.perf_counter(), compiler.wait_seconds

    def read():
        """Fetch the pending losses (the one host sync), count their steps' time and tokens."""
        nonlocal clock, waited, window_tokens
        values = losses.read()
        now = time.perf_counter()
        throughput.record(now - clock - (compiler.wait_seconds - waited), window_tokens)
        clock, waited, window_tokens = now, compiler.wait_seconds, 0
        epoch_losses.extend(values)
        bar.update(len(values))
        if values:
            bar.set_postfix(epoch=(step - 1) // steps_per_epoch, loss=f"{values[-1]:.3f}",
                            tokens_per_s=f"{throughput.tokens_per_second:.0f}",
                            compile_s=f"{compile_seconds() - compiled_before:.0f}", refresh=False)

    with _Signals() as signals, bar, compiler:
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            index = stage_of_epoch[epoch]
            _, train_step = stage_step(index)
            if step == stage_start[index]:
                state = stage_state(index, state)
            if batch_in_epoch == 0:
                state = reset_carry(state)
                epoch_losses.clear()
            for batch_index, (batch, n_tokens) in enumerate(epoch_batches(epoch)):
                if batch_index < batch_in_epoch:
                    continue
                if batch_index >= steps_per_epoch or step >= total_steps:
                    break
                state, step_metrics = compiler.call(train_step, state, batch, key=_shapes(batch))
                losses.add(step, step_metrics["loss"])
                window_tokens += n_tokens
                step += 1
                if len(losses) >= log_every:
                    read()
                if signals.stop_at(step):
                    read()
                    save(step, state)
                    raise Interrupted(step, signals.received)
            read()
            if step % steps_per_epoch and step < total_steps:
                raise RuntimeError(f"epoch {epoch} gave fewer than the {steps_per_epoch} batches expected")
            record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                      "trainable": sorted(trainables[index]), "tokens_per_s": throughput.tokens_per_second}
            record.update(evaluate(state.params, state.carry))
            history.append(record)
            bar.clear()              # the record goes on a line of its own, not after the bar
            _log(log, record)
            save(step, state)
            if on_epoch_end is not None:
                on_epoch_end(record, state.params, state.carry)
            clock, waited = time.perf_counter(), compiler.wait_seconds   # evaluation and saving are not training
    throughput.compile_seconds = compile_seconds() - compiled_before
    return state, history, throughput


def _shapes(batch: dict) -> tuple:
    """A batch's shapes: within a run they alone select the train step's executable."""
    return tuple((name, value.shape) for name, value in batch.items())


def _checkpoint_tree(state: steps.TrainState, epoch_losses) -> dict:
    """What a checkpoint holds: the state, and the losses of the epoch so far (its `train_loss` after a
    resume covers the whole epoch); float32[max(1, n)], as the device computed them."""
    return {**{field.name: getattr(state, field.name) for field in dataclasses.fields(state)},
            "epoch_losses": np.asarray(epoch_losses or [0.0], np.float32)}


def _log(log, record):
    if log is not None:
        log(record)


# ----------------------------------------------------------------------------------------------
# Language model

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
                       progress: bool = False, log_every: int = 50, share_compiles: bool = True,
                       quick_compile: bool | None = None):
    """Train an LM over `stages`; validation loss / perplexity / accuracy after every epoch.

    train_documents, valid_documents: lists of int32 token arrays (documents are shuffled each
    epoch and concatenated: fastai's LMDataLoader). `batch_size` is the global batch. The last,
    shorter window of an epoch is dropped in training, so every step has one shape; validation
    uses all of it. Returns (params, history: per-epoch records, throughput).
    """
    from ulmfit_jax.evaluation import evaluate_language_model
    from ulmfit_jax.text.batches import LMBatchSettings, concatenate_documents, lm_epoch
    mesh = parallel.data_mesh() if mesh is None else mesh
    settings = LMBatchSettings(batch_size=batch_size, seq_len=bptt, backwards=backwards)
    steps_per_epoch = _language_model_steps_per_epoch(sum(len(d) for d in train_documents), batch_size, bptt)
    valid_stream = concatenate_documents(valid_documents, backwards=backwards) if valid_documents else None
    initial_carry = lambda: parallel.shard_batch(encoder.initial_state(config.encoder, batch_size), mesh)

    def epoch_batches(epoch):
        for batch in lm_epoch(train_documents, settings, np.random.default_rng([seed, epoch])):
            yield parallel.shard_batch(steps.language_model_batch(batch), mesh), batch.inputs.size

    def evaluate(params, _carry):
        if valid_stream is None:
            return {}
        result = evaluate_language_model(parallel.local_copy(params), config, valid_stream,
                                         batch_size=max(1, min(batch_size, (len(valid_stream) - 1) // bptt)),
                                         bptt=bptt)
        return {f"valid_{k}": v for k, v in result.items()}

    windows = jax.ShapeDtypeStruct((batch_size, bptt), np.int32,
                                   sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    state = steps.init_state(params, None, None, seed)
    state = parallel.replicate(state, mesh).replace(carry=initial_carry())
    state, history, throughput = run_stages(
        "lm", config, state, stages, steps_per_epoch, epoch_batches=epoch_batches,
        batch_specs=[{"inputs": windows, "targets": windows}], reset_carry=lambda s: s.replace(carry=initial_carry()),
        evaluate=evaluate, mesh=mesh, regularization=regularization, compute_dtype=compute_dtype,
        share_compiles=share_compiles, checkpointer=checkpointer, max_steps=max_steps, log=log,
        on_epoch_end=on_epoch_end, progress=progress, log_every=log_every, quick_compile=quick_compile)
    return state.params, history, throughput


# ----------------------------------------------------------------------------------------------
# Classifier

def classifier_layout(config: ClassifierConfig, train_documents, batch_size: int, backwards: bool = False,
                      epochs: int = 1, valid_documents=(), predict_documents=()):
    """-> (batch settings with the bucket lengths best compiled for `epochs` epochs over the training
    documents, validating on `valid_documents` each epoch and predicting `predict_documents` once
    (`text.batches.bucket_lengths`), steps per epoch)."""
    from ulmfit_jax.text.batches import bucket_lengths
    steps_per_epoch = len(train_documents) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(train_documents)} documents: fewer than one batch of {batch_size}")
    settings = predict.classifier_batch_settings(config, batch_size, backwards)
    lengths = lambda documents: [len(d) for d in documents or ()]
    settings = dataclasses.replace(settings, lengths=bucket_lengths(
        lengths(train_documents), settings, epochs=epochs,
        predicted=((lengths(valid_documents), epochs), (lengths(predict_documents), 1))))
    return settings, steps_per_epoch


def fit_classifier(params, batch_stats, config: ClassifierConfig, train_documents, train_labels,
                   valid_documents, valid_labels, stages, *, batch_size: int = 64, seed: int = 0,
                   backwards: bool = False, regularization: RegularizationConfig = RegularizationConfig(),
                   max_steps: int | None = None, compute_dtype=None, mesh=None, checkpointer=None, log=None,
                   on_epoch_end=None, progress: bool = False, log_every: int = 50, share_compiles: bool = True,
                   quick_compile: bool | None = None, predict_documents=(), layout=None):
    """Train the classifier over `stages` (gradual unfreezing: one stage per trainable set).

    `predict_documents`: documents the caller will predict afterwards (`predict.predict_classifier`
    with the fit's `layout`, e.g. a test set): their forward passes compile in the background during
    training, as the validation's do. `layout`: the batch settings to train and predict with
    (`classifier_layout`'s, which the caller needs to predict through the fit's programs); None:
    `classifier_layout`'s for these documents and stages.

    Returns (params, batch_stats, history, throughput).
    """
    from ulmfit_jax.text.batches import classifier_batches, padded_length
    mesh = parallel.data_mesh() if mesh is None else mesh
    settings, steps_per_epoch = classifier_layout(config, train_documents, batch_size, backwards,
                                                  sum(stage.epochs for stage in stages), valid_documents,
                                                  predict_documents)
    if layout is not None:
        if (layout.batch_size, layout.backwards) != (batch_size, backwards):
            raise ValueError(f"the layout's batch size and direction ({layout.batch_size}, backwards="
                             f"{layout.backwards}) are not the fit's ({batch_size}, backwards={backwards})")
        settings = layout
    predictor = predict.classifier_predictor(config, compute_dtype)
    compiler = Compiler()
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def epoch_batches(epoch):
        rng = np.random.RandomState([seed, epoch])
        for batch in classifier_batches(train_documents, train_labels, settings, train=True, rng=rng):
            yield parallel.shard_batch(steps.classifier_batch(batch), mesh), int(batch.lengths.sum())

    def evaluate(params, batch_stats):
        if valid_documents is None:
            return {}
        local = parallel.local_copy((params, batch_stats))
        # through the executables compiled ahead (a plain call then finds them in jax.jit's cache too)
        probabilities = predict.predict_classifier(functools.partial(compiler.call, predictor), *local,
                                                   valid_documents, settings)
        return {f"valid_{k}": v for k, v in metrics.classification_metrics(probabilities, valid_labels).items()}

    def batch_spec(length):
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)
        return {"tokens": spec((batch_size, length), np.int32), "labels": spec((batch_size,), np.int32),
                "regularized_mask": spec((batch_size, length), np.bool_)}

    state = parallel.replicate(steps.init_state(params, None, batch_stats, seed), mesh)
    evaluation_programs = []
    local = parallel.local_copy((state.params, state.carry))
    for length in sorted({padded_length(len(d), settings) for d in [*(valid_documents or ()), *predict_documents]}):
        evaluation_programs.append((predictor, *local, np.zeros((batch_size, length), np.int32)))
    state, history, throughput = run_stages(
        "classifier", config, state, stages, steps_per_epoch, epoch_batches=epoch_batches,
        batch_specs=[batch_spec(n) for n in settings.lengths], reset_carry=lambda s: s, evaluate=evaluate,
        mesh=mesh, regularization=regularization, compute_dtype=compute_dtype, share_compiles=share_compiles,
        checkpointer=checkpointer, max_steps=max_steps, log=log, on_epoch_end=on_epoch_end, progress=progress,
        log_every=log_every, quick_compile=quick_compile, compiler=compiler, ahead=evaluation_programs)
    return state.params, state.carry, history, throughput
