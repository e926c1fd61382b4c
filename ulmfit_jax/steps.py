"""The training state and the jitted train step, one signature for both models:

    train_step(state: TrainState, batch: dict) -> (state, metrics)

`TrainState` holds the global step, the parameters, the optimizer state (`optim.StageState`: the
stage's trained groups, learning rates and length as arrays, then Adam's moments) and the model's
carry: the language model's hidden state (carried across windows, truncated BPTT) or the
classifier's batch-norm statistics. Because the stage lives in the state, one compiled step serves
every stage of a run (gradual unfreezing is four stages, one program); a new stage is
`state.replace(opt_state=optimizer.init(state.params, hyper))`. Dropout masks are drawn from
`fold_in(state.key, state.step)`, so a run is reproducible from its seed and a resumed run draws the
masks it would have drawn.

Batches (`language_model_batch`, `classifier_batch` turn `ulmfit_jax.text.batches`' into them):
    language model: {"inputs": int32[B, T], "targets": int32[B, T]}
    classifier:     {"tokens": int32[B, S], "labels": int32[B], "regularized_mask": bool[B, S]}
`regularized_mask` marks the positions fastai's own padding of the batch would have; AR and TAR
average over those, so the padding our length buckets add does not enter the regulariser.

A research loop:

    optimizer = optim.stage_optimizer(optim.OptimizerConfig(), params, "classifier")
    train_step = steps.make_train_step("classifier", config, optimizer, params)
    hyper = optim.stage_hyper(optim.OptimizerConfig(learning_rate=1e-2), 4, n_steps, optim.freeze(4))
    state = steps.init_state(params, optimizer.init(params, hyper), batch_stats, seed=0)
    for batch in batches:
        state, metrics = train_step(state, steps.classifier_batch(batch))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import frozen, heads, losses, models, optim
from ulmfit_jax.config import ClassifierConfig, LanguageModelConfig

KINDS = ("lm", "classifier")


@flax.struct.dataclass
class TrainState:
    """step int32[]: optimizer steps done in the run; params; opt_state (`optim.StageState`); carry:
    the LM's hidden state (a list of per-layer states, batch first) or the classifier's batch-norm
    statistics; key: the run's base dropout key (uint32[2])."""
    step: jax.Array
    params: Any
    opt_state: Any
    carry: Any
    key: jax.Array


def init_state(params, opt_state, carry, seed: int = 0) -> TrainState:
    return TrainState(np.zeros((), np.int32), params, opt_state, carry, np.asarray(jax.random.PRNGKey(seed)))


@dataclasses.dataclass(frozen=True)
class RegularizationConfig:
    """fastai's TextLearner defaults: AR alpha 2, TAR beta 1; label smoothing off."""
    alpha: float = 2.0
    beta: float = 1.0
    label_smoothing: float = 0.0


def language_model_batch(batch) -> dict:
    """`text.batches.LMBatch` -> the train step's batch."""
    return {"inputs": batch.inputs, "targets": batch.targets}


def classifier_batch(batch) -> dict:
    """`text.batches.ClassifierBatch` -> the train step's batch."""
    return {"tokens": batch.tokens, "labels": batch.labels, "regularized_mask": batch.fastai_mask}


def language_model_loss(params, carry, batch, key, *, config: LanguageModelConfig,
                        regularization: RegularizationConfig, compute_dtype=None, backward=None):
    """Train mode: cross-entropy (+ label smoothing) + AR + TAR. -> (loss, (new carry, metrics)).
    `backward`: `encoder.encoder_apply`'s."""
    dropped, new_state, (raw, _) = models.language_model_hidden(
        params, batch["inputs"], carry, config=config, train=True, key=key, compute_dtype=compute_dtype,
        backward=backward)
    targets = batch["targets"]
    if not regularization.label_smoothing and compute_dtype is None:
        # never materialises the [B*T, V] logits: the decoder is most of the FLOPs and memory-bound
        loss = losses.fused_linear_cross_entropy(dropped, heads.decoder_weight(params, config),
                                                 params["decoder"].get("bias"), targets)
    else:
        logits = heads.lm_logits(params, dropped, config, compute_dtype)
        loss = losses.cross_entropy(logits, targets, label_smoothing=regularization.label_smoothing)
    metrics = {"loss": loss}
    loss = (loss + losses.activation_regularization(dropped, regularization.alpha)
            + losses.temporal_activation_regularization(raw, regularization.beta))
    return loss, (new_state, metrics)


def classifier_loss(params, carry, batch, key, *, config: ClassifierConfig,
                    regularization: RegularizationConfig, compute_dtype=None, backward=None):
    """Train mode: cross-entropy + AR + TAR over the encoder's kept outputs (fastai's RNNRegularizer
    sees them as both raw and dropped). -> (loss, (new batch statistics, metrics)).
    `backward`: `encoder.encoder_apply`'s."""
    tokens = batch["tokens"]
    logits, new_stats, outputs = models.classifier_apply(params, carry, tokens, config=config, train=True, key=key,
                                                         compute_dtype=compute_dtype, backward=backward)
    loss = losses.cross_entropy(logits, batch["labels"], label_smoothing=regularization.label_smoothing)
    metrics = {"loss": loss}
    mask = batch.get("regularized_mask")
    if mask is not None:                    # the outputs are the kept (last) windows: cut the mask to them
        mask = mask[:, tokens.shape[1] - outputs.shape[1]:]
    loss = (loss + losses.activation_regularization(outputs, regularization.alpha, mask)
            + losses.temporal_activation_regularization(outputs, regularization.beta, mask))
    return loss, (new_stats, metrics)


def make_train_step(kind: str, config, optimizer: optim.StageOptimizer, params_like, *,
                    regularization: RegularizationConfig = RegularizationConfig(), compute_dtype=None,
                    differentiated: frozenset[int] | None = None, train_bn: bool = True,
                    compiler_options: dict | None = None):
    """-> jitted `train_step(state, batch) -> (state, {"loss": f32[]})`, the state donated.

    `kind`: "lm" or "classifier"; `params_like`: the parameters (or their `jax.eval_shape`), for the
    layer groups. `differentiated`: the layer groups autodiff differentiates (None: all). The
    groups a stage trains must be among them. With None one program serves every stage and the
    backward pass stops, at run time, below the lowest layer the stage trains (`frozen.gated`: a
    frozen layer with only frozen layers below it costs no backward compute); with a stage's own
    groups each stage compiles its own program. `metrics["loss"]` is the cross-entropy, as fastai reports it; AR and TAR are added
    to what is differentiated. `compiler_options`: XLA options for the compile (`jax.jit`'s).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loss_fn = functools.partial(language_model_loss if kind == "lm" else classifier_loss, config=config,
                                regularization=regularization, compute_dtype=compute_dtype)
    labels = optim.layer_group_labels(params_like, kind)
    n_layers = len(params_like["encoder"]["rnn"])

    @functools.partial(jax.jit, donate_argnums=0, compiler_options=compiler_options)
    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.key, state.step)
        backward = frozen.backward_flags(state.opt_state.hyper.trainable, kind, n_layers)
        if differentiated is None:
            trained, fixed = state.params, jax.tree.map(lambda _: None, state.params)
        else:
            trained, fixed = optim.split_trainable(state.params, labels, differentiated, train_bn)
        loss = lambda t: loss_fn(optim.merge(t, fixed), state.carry, batch, key, backward=backward)
        (_, (carry, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(trained)
        grads = optim.merge(grads, jax.tree.map(lambda f: None if f is None else jnp.zeros_like(f), fixed,
                                                is_leaf=lambda x: x is None))
        params, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             carry=jax.lax.stop_gradient(carry)), metrics

    return train_step
