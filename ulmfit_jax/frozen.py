"""Frozen layers that cost no backward pass, decided at run time.

One compiled train step serves every unfreezing stage (the stage's trained groups are an array in
the optimizer state, `optim.StageHyper.trainable`), so which layers are frozen is not known when
the step is traced, and plain autodiff would run the backward pass through every layer. `gated`
wraps one layer: its backward pass runs under a `lax.cond` on a traced flag, and with the flag off
it returns zero gradients without computing anything. With every layer below a frozen one frozen
too (gradual unfreezing, chain-thaw's head stage), the backward pass stops at the lowest trained
layer, as it does in fastai, where frozen parameters do not require gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gated(run_backward: jax.Array, fn, differentiable, other):
    """`fn(differentiable, other)`, whose backward pass runs only where `run_backward` (bool[],
    traced) is true; otherwise `differentiable` gets zero cotangents. `other` (keys, token ids,
    masks) is never differentiated."""

    @jax.custom_vjp
    def call(differentiable, other, run_backward):
        return fn(differentiable, other)

    def forward(differentiable, other, run_backward):
        out, vjp = jax.vjp(lambda d: fn(d, other), differentiable)
        return out, (vjp, run_backward)

    def backward(residuals, cotangent):
        vjp, run_backward = residuals
        shapes = jax.eval_shape(lambda c: vjp(c)[0], cotangent)
        zeros = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.cond(run_backward, lambda c: vjp(c)[0], zeros, cotangent), None, None

    call.defvjp(forward, backward)
    return call(differentiable, other, run_backward)


def backward_flags(trainable: jax.Array, kind: str, n_layers: int) -> jax.Array:
    """bool[G] trained groups (`optim.layer_group_labels`' numbering) -> bool[1 + n_layers]: whether
    the backward pass must run through the embedding and through each recurrent layer, i.e. whether
    that part or anything below it is trained.

    Groups: classifier: embedding 0, layer l -> l + 1, head L + 1; language model: layer l -> l,
    embedding and decoder L (the tied embedding trains with the decoder)."""
    trainable = jnp.asarray(trainable)
    if kind == "classifier":
        below = trainable[:n_layers + 1]                                # [embedding, layer 0, ...]
    else:
        below = jnp.concatenate([trainable[n_layers:n_layers + 1], trainable[:n_layers]])
    return jnp.cumsum(below.astype(jnp.int32)) > 0
