"""QRNN layers (Bradbury et al. 2016) as fastai 1.0.61 builds them, and the AWD-QRNN encoder.

One QRNN layer (one direction) in fastai's layout, gates fused in the order `[z, f, o]`:

    {"weight": f32[G*H, W*D], "bias": f32[G*H]}      G = 3 with the output gate (2 without),
                                                       W = window (1 or 2), D = input width

For inputs x_t: f32[B, D], t = 0..T-1, and the carried cell c_{-1}: f32[B, H],

    s_t = [x_t]                      window 1
    s_t = [x_t, x_{t-1}]             window 2, forward direction (x_{-1}: the saved previous input
                                     with `save_prev_x`, else zeros)
    s_t = [x_t, x_{t+1}]             window 2, backward direction (x_T: zeros, or the saved input)
    [z_t, f_t, o_t] = s_t W^T + b
    z_t = tanh(z_t);  f_t = sigmoid(f_t);  o_t = sigmoid(o_t)
    c_t = f_t * z_t + (1 - f_t) * c_{t-1}                       (the forget-mult)
    h_t = o_t * c_t                  (h_t = c_t without the output gate)

The forget-mult follows fastai's (and salesforce/pytorch-qrnn's) convention; the paper writes
`c_t = f_t * c_{t-1} + (1 - f_t) * z_t`, the same up to relabelling f <-> 1 - f, which matters for
importing weights. The backward direction runs the recurrence from t = T-1 down to 0 (its carried
cell is c_T) and keeps outputs in input order. The layer returns the last cell processed (c_{T-1}
forward, c_0 backward) as the next carried state.

Zoneout, fastai's semantics: in training, `f_t <- f_t * m_t` with `m_t` an inverted dropout mask
(Bernoulli(1 - p) / (1 - p), drawn per element and time step), nothing in eval. A zeroed f_t keeps
the previous cell (`c_t = c_{t-1}`); a kept one is scaled up by 1 / (1 - p), so it can exceed 1.
salesforce/pytorch-qrnn instead multiplies f by an unscaled Bernoulli(1 - p) mask in training and
by (1 - p) in eval (the expectation of its training mask). Weights trained with one are not
interchangeable with the other when zoneout > 0; fastai's AWD-QRNN uses zoneout 0.

Two forget-mult implementations with equal outputs and gradients:
- `forget_mult_scan`: `lax.scan` over time with a custom VJP whose backward pass is the reverse
  recurrence `dc_t = dcells_t + (1 - f_{t+1}) dc_{t+1}`, then `dz_t = f_t dc_t`,
  `df_t = (z_t - c_{t-1}) dc_t`, `dc_{-1} = (1 - f_0) dc_0` (elementwise, no matmuls). Default: on
  CPU it is faster than the associative scan (benchmarks/bench_qrnn.py).
- `forget_mult_associative`: `lax.associative_scan` of the affine maps `c -> a_t c + b_t`,
  `a_t = 1 - f_t`, `b_t = f_t z_t`, composed as `(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)`;
  O(log T) depth for long sequences on accelerators. Differentiated by JAX's autodiff.

The AWD-QRNN encoder (fastai 1.0.61's `AWD_LSTM(qrnn=True)`): layer l is a one-layer
`QRNN(save_prev_x=True, zoneout=0, window=2 if l == 0 else 1, output_gate=True)` whose gate
projection's weight is wrapped in `WeightDropout` (DropConnect on the whole `[3H, W*D]` weight, not
the bias). Parameters, per layer `layer` as above, or `{"forward": layer, "backward": layer}` when
bidirectional:

    {"embed": f32[V, E], "rnn": [layer_0, ..., layer_{L-1}]}

State, per layer, batch axis first on every leaf (data parallelism shards axis 0):

    {"cell": f32[B, H_l]}                             H_l the layer's output width ([fwd, bwd])
    {"cell": f32[B, H_0], "prev_x": f32[B, D_0]}      layer 0 (window 2) with `save_prev_x`

`prev_x` is the layer's last input of the previous window, detached (fastai `.detach()`es it).
fastai's `QRNN` cannot save the previous input of a bidirectional layer, nor can this one.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from ulmfit_jax import dropout
from ulmfit_jax.config import EncoderConfig

WINDOWS = (1, 2)
FORGET_MULT_METHODS = ("scan", "associative")


# ----------------------------------------------------------------------------------------------
# Parameters

def init_qrnn_params(key: jax.Array, input_size: int, hidden_size: int, *, window: int,
                     output_gate: bool = True) -> dict:
    """PyTorch's `nn.Linear(window * input_size, G * hidden_size)` init: weight and bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = window * input_size."""
    _check_window(window)
    n_gates = 3 if output_gate else 2
    fan_in = window * input_size
    bound = 1.0 / fan_in ** 0.5
    weight_key, bias_key = jax.random.split(key)
    return {"weight": jax.random.uniform(weight_key, (n_gates * hidden_size, fan_in), minval=-bound, maxval=bound),
            "bias": jax.random.uniform(bias_key, (n_gates * hidden_size,), minval=-bound, maxval=bound)}


def _check_window(window) -> None:
    if window not in WINDOWS:
        raise ValueError(f"a QRNN layer's window must be 1 or 2 (as in fastai and salesforce's QRNN), got {window!r}")


# ----------------------------------------------------------------------------------------------
# The forget-mult

def _forget_mult_forward(z, f, c0, unroll):
    def step(cell, gates_t):
        z_t, f_t = gates_t
        cell = f_t * z_t + (1.0 - f_t) * cell
        return cell, cell

    _, cells = jax.lax.scan(step, c0, (z, f), unroll=unroll)
    return cells


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def forget_mult_scan(z: jax.Array, f: jax.Array, c0: jax.Array, unroll: int = 1) -> jax.Array:
    """c_t = f_t * z_t + (1 - f_t) * c_{t-1}, sequentially.

    z, f: f32[T, B, H]; c0 (= c_{-1}): f32[B, H]. Returns the cells f32[T, B, H]; the last one is
    the next carried state. The backward pass is the reverse recurrence (module docstring).
    """
    return _forget_mult_forward(z, f, c0, unroll)


def _forget_mult_scan_fwd(z, f, c0, unroll):
    cells = _forget_mult_forward(z, f, c0, unroll)
    return cells, (z, f, c0, cells)


def _forget_mult_scan_bwd(unroll, residuals, d_cells):
    z, f, c0, cells = residuals

    def step(d_from_next, inputs):
        d_cell_t, f_t = inputs
        d_c = d_cell_t + d_from_next          # total gradient reaching c_t
        return (1.0 - f_t) * d_c, d_c

    d_c0, d_c = jax.lax.scan(step, jnp.zeros_like(c0), (d_cells, f), reverse=True, unroll=unroll)
    c_prev = jnp.concatenate([c0[None], cells[:-1]], axis=0)
    return d_c * f, d_c * (z - c_prev), d_c0


forget_mult_scan.defvjp(_forget_mult_scan_fwd, _forget_mult_scan_bwd)


def forget_mult_associative(z: jax.Array, f: jax.Array, c0: jax.Array) -> jax.Array:
    """The same recurrence as `forget_mult_scan`, by `lax.associative_scan` over time.

    Each step is the affine map `c -> a_t c + b_t` (a_t = 1 - f_t, b_t = f_t z_t); c0 is folded into
    the first map's offset, so the prefix compositions are the cells themselves.
    """
    decay = 1.0 - f
    drive = (f * z).at[0].add(decay[0] * c0)

    def compose(earlier, later):
        decay_1, drive_1 = earlier
        decay_2, drive_2 = later
        return decay_1 * decay_2, decay_2 * drive_1 + drive_2

    _, cells = jax.lax.associative_scan(compose, (decay, drive), axis=0)
    return cells


def forget_mult(z: jax.Array, f: jax.Array, c0: jax.Array, *, method: str = "scan", reverse: bool = False,
                unroll: int = 1) -> jax.Array:
    """Dispatch: `method` "scan" (default) or "associative". With `reverse`, the recurrence runs
    from t = T-1 down to 0 (c0 is then c_T) and the cells come back in input order."""
    if method not in FORGET_MULT_METHODS:
        raise ValueError(f"forget-mult method must be one of {FORGET_MULT_METHODS}, got {method!r}")
    if reverse:
        z, f = z[::-1], f[::-1]
    cells = forget_mult_scan(z, f, c0, unroll) if method == "scan" else forget_mult_associative(z, f, c0)
    return cells[::-1] if reverse else cells


# ----------------------------------------------------------------------------------------------
# One layer

def window_source(x: jax.Array, prev_x: jax.Array | None, *, window: int, backward: bool = False) -> jax.Array:
    """The gate projection's input. x: f32[T, B, D] -> f32[T, B, W*D]: `[x_t]` or `[x_t, x_{t-1}]`
    (`[x_t, x_{t+1}]` backward), the missing neighbour taken from `prev_x` f32[B, D] or zeros."""
    _check_window(window)
    if window == 1:
        return x
    edge = jnp.zeros_like(x[0]) if prev_x is None else prev_x.astype(x.dtype)
    if backward:
        shifted = jnp.concatenate([x[1:], edge[None]], axis=0)
    else:
        shifted = jnp.concatenate([edge[None], x[:-1]], axis=0)
    return jnp.concatenate([x, shifted], axis=-1)


def _check_layer_shapes(params, x, cell, prev_x, window, output_gate):
    if x.ndim != 3:
        raise ValueError(f"QRNN input must be time-major f32[T, B, D], got shape {x.shape}")
    steps, batch, width = x.shape
    n_gates = 3 if output_gate else 2
    hidden = cell.shape[-1]
    expected_weight = (n_gates * hidden, window * width)
    weight, bias = params["weight"], params["bias"]
    if tuple(weight.shape) != expected_weight:
        raise ValueError(
            f"QRNN gate weight has shape {tuple(weight.shape)}; a window-{window} layer over {width} input "
            f"features with {hidden} hidden units and {n_gates} gates needs {expected_weight}")
    if tuple(bias.shape) != (n_gates * hidden,):
        raise ValueError(f"QRNN gate bias has shape {tuple(bias.shape)}, needs {(n_gates * hidden,)}")
    if tuple(cell.shape) != (batch, hidden):
        raise ValueError(f"QRNN cell state has shape {tuple(cell.shape)}, the input needs {(batch, hidden)}")
    if prev_x is not None and tuple(prev_x.shape) != (batch, width):
        raise ValueError(f"QRNN saved input has shape {tuple(prev_x.shape)}, the input needs {(batch, width)}")


def qrnn_layer(params: dict, x: jax.Array, cell: jax.Array, prev_x: jax.Array | None = None, *, window: int,
               output_gate: bool = True, backward: bool = False, weight: jax.Array | None = None,
               zoneout: float = 0.0, zoneout_key: jax.Array | None = None, method: str = "scan",
               unroll: int = 1, compute_dtype=None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One direction of one QRNN layer, time-major (fastai's `QRNNLayer.forward`).

    x: f32[T, B, D]; cell: f32[B, H] (the carried c); prev_x: f32[B, D] or None (zeros): the
    neighbour of the first step (last step backward) for window 2. `weight` replaces
    `params["weight"]` (weight drop). Zoneout is applied when `zoneout_key` is given and
    `zoneout > 0` (training). Returns (outputs f32[T, B, H], the last cell processed f32[B, H],
    the input to save for the next window with window 2: x_{T-1} forward, x_0 backward, detached;
    None with window 1).
    """
    _check_window(window)
    _check_layer_shapes(params, x, cell, prev_x, window, output_gate)
    if not 0.0 <= zoneout < 1.0:
        raise ValueError(f"zoneout must be in [0, 1), got {zoneout}")
    weight = params["weight"] if weight is None else weight
    source = window_source(x, prev_x, window=window, backward=backward)
    if compute_dtype is not None:
        source, weight = source.astype(compute_dtype), weight.astype(compute_dtype)
    gates = jnp.einsum("tbi,gi->tbg", source, weight, preferred_element_type=jnp.float32) + params["bias"]
    if output_gate:
        z, f, o = jnp.split(gates, 3, axis=-1)
    else:
        (z, f), o = jnp.split(gates, 2, axis=-1), None
    z, f = jnp.tanh(z), jax.nn.sigmoid(f)
    if zoneout_key is not None and zoneout > 0.0:
        f = f * dropout.dropout_mask(zoneout_key, f.shape, zoneout, f.dtype)
    cells = forget_mult(z, f, cell, method=method, reverse=backward, unroll=unroll)
    outputs = jax.nn.sigmoid(o) * cells if output_gate else cells
    last_cell = cells[0] if backward else cells[-1]
    saved = None if window == 1 else jax.lax.stop_gradient(x[0] if backward else x[-1])
    return outputs, last_cell, saved


# ----------------------------------------------------------------------------------------------
# The AWD-QRNN encoder

def layer_window(layer: int) -> int:
    """fastai's AWD-QRNN: window 2 on the first layer, 1 on the others."""
    return 2 if layer == 0 else 1


def _check_config(config: EncoderConfig) -> None:
    if config.bidirectional and config.save_prev_x:
        raise ValueError("a bidirectional QRNN cannot save the previous input (fastai's QRNN asserts the same); "
                         "build the EncoderConfig with save_prev_x=False")


def init_qrnn_encoder(key: jax.Array, config: EncoderConfig) -> dict:
    """fastai 1.0.61's init: embedding U(-0.1, 0.1) with the padding row zeroed; each gate
    projection as PyTorch's nn.Linear."""
    _check_config(config)
    embed_key, *layer_keys = jax.random.split(key, config.n_layers + 1)
    layers = []
    for layer, (layer_key, (n_in, n_out)) in enumerate(zip(layer_keys, config.layer_sizes)):
        width = n_out // config.n_directions
        init = functools.partial(init_qrnn_params, input_size=n_in, hidden_size=width, window=layer_window(layer))
        if config.bidirectional:
            forward_key, backward_key = jax.random.split(layer_key)
            layers.append({"forward": init(forward_key), "backward": init(backward_key)})
        else:
            layers.append(init(layer_key))
    embed = jax.random.uniform(embed_key, (config.vocab_size, config.emb_size), minval=-0.1, maxval=0.1)
    if 0 <= config.pad_token < config.vocab_size:
        embed = embed.at[config.pad_token].set(0.0)
    return {"embed": embed, "rnn": layers}


def initial_qrnn_state(config: EncoderConfig, batch_size: int) -> list:
    """Zero state for `batch_size` streams (fastai's `reset`: zero cells, no saved input)."""
    _check_config(config)
    states = []
    for layer, (n_in, n_out) in enumerate(config.layer_sizes):
        state = {"cell": jnp.zeros((batch_size, n_out))}
        if config.save_prev_x and layer_window(layer) == 2:
            state["prev_x"] = jnp.zeros((batch_size, n_in))
        states.append(state)
    return states


def _window_of(weight: jax.Array, width: int) -> int:
    window, remainder = divmod(weight.shape[-1], width)
    if remainder or window not in WINDOWS:
        raise ValueError(f"QRNN gate weight has shape {tuple(weight.shape)}: over {width} input features its "
                         f"columns must be {width} (window 1) or {2 * width} (window 2)")
    return window


def qrnn_stack_layer(layer_params: dict, x: jax.Array, state: dict, *, config: EncoderConfig,
                     weight_key: jax.Array | None, train: bool, compute_dtype=None) -> tuple[jax.Array, dict]:
    """One (possibly bidirectional) AWD-QRNN layer. x: f32[T, B, D] -> (f32[T, B, H_out], new state).

    The window comes from the weight's shape (`W*D` columns; fastai's layout defines it that way):
    2 on layer 0, 1 elsewhere for weights from `init_qrnn_encoder` or fastai. In training the key
    is split into DropConnect on the forward direction's gate weight (fastai wraps
    `rnn.layers[0].linear` alone) and zoneout (both directions).
    """
    _check_config(config)
    if not isinstance(state, dict) or "cell" not in state:
        raise ValueError(f"a QRNN layer's state is {{'cell': f32[B, H], ('prev_x': f32[B, D])}}, got {state!r:.200}")
    run = functools.partial(qrnn_layer, output_gate=True, method=config.forget_mult, unroll=config.unroll,
                            compute_dtype=compute_dtype)
    weight_p = config.weight_p if train else 0.0
    zoneout = config.zoneout if train else 0.0
    if train and weight_key is not None:
        drop_key, zoneout_key = jax.random.split(weight_key)
    else:
        drop_key = zoneout_key = None
    width = x.shape[-1]
    cell = state["cell"]
    if not config.bidirectional:
        window = _window_of(layer_params["weight"], width)
        if window == 2 and config.save_prev_x and "prev_x" not in state:
            raise ValueError("this window-2 QRNN layer saves its previous input (save_prev_x), but its state "
                             "has no 'prev_x': build the state with initial_qrnn_state")
        weight = dropout.weight_drop(drop_key, layer_params["weight"], weight_p)
        outputs, last_cell, saved = run(layer_params, x, cell, state.get("prev_x"), window=window, weight=weight,
                                        zoneout=zoneout, zoneout_key=zoneout_key)
        new_state = {"cell": last_cell}
        if "prev_x" in state:
            new_state["prev_x"] = saved if saved is not None else state["prev_x"]
        return outputs, new_state
    half = cell.shape[-1] // 2
    forward, backward = layer_params["forward"], layer_params["backward"]
    window = _window_of(forward["weight"], width)
    weight = dropout.weight_drop(drop_key, forward["weight"], weight_p)
    key_of = (lambda i: None) if zoneout_key is None else (lambda i: jax.random.fold_in(zoneout_key, i))
    out_f, cell_f, _ = run(forward, x, cell[:, :half], window=window, weight=weight, zoneout=zoneout,
                           zoneout_key=key_of(0))
    out_b, cell_b, _ = run(backward, x, cell[:, half:], window=_window_of(backward["weight"], width),
                           backward=True, zoneout=zoneout, zoneout_key=key_of(1))
    return jnp.concatenate([out_f, out_b], -1), {"cell": jnp.concatenate([cell_f, cell_b], -1)}


# ----------------------------------------------------------------------------------------------
# fastai v1 weights

def _layer_keys(prefix: str, layer: int, direction: str) -> dict:
    """Our leaf name -> fastai keys (first = the one export writes; all are read and checked).

    fastai 1.0.61 keeps both `weight_raw` (the parameter) and `module.weight` (its dropped copy
    from the last forward, equal to it after `reset` in eval) in the state dict; fastai 2.0-2.3's
    AWD_QRNN kept only `weight_raw`.
    """
    base = f"{prefix}rnns.{layer}."
    if direction == "forward":
        linear = base + "layers.0.linear."
        return {"weight": [linear + "weight_raw", linear + "module.weight"], "bias": [linear + "module.bias"]}
    linear = base + "layers_bwd.0.linear."
    return {"weight": [linear + "weight"], "bias": [linear + "bias"]}


def _qrnn_shapes(config: EncoderConfig) -> list:
    """[(layer, direction, leaf, shape)] for the encoder's gate projections."""
    shapes = []
    directions = ("forward", "backward") if config.bidirectional else ("forward",)
    for layer, (n_in, n_out) in enumerate(config.layer_sizes):
        width = n_out // config.n_directions
        for direction in directions:
            shapes.append((layer, direction, "weight", (3 * width, layer_window(layer) * n_in)))
            shapes.append((layer, direction, "bias", (3 * width,)))
    return shapes


def is_qrnn_state_dict(state_dict: dict, prefix: str) -> bool:
    return any(re.fullmatch(re.escape(prefix) + r"rnns\.\d+\.layers\.0\.linear\.(weight_raw|module\.bias)", k)
               for k in state_dict)


def infer_qrnn_sizes(state_dict: dict, prefix: str, n_layers: int, emb_size: int) -> dict:
    """EncoderConfig fields of a fastai AWD-QRNN state dict, from layer 0's gate weight [3h, 2E]."""
    key = prefix + "rnns.0.layers.0.linear.weight_raw"
    if key not in state_dict:
        raise ValueError(f"not a fastai AWD-QRNN state dict: no '{key}'")
    rows, columns = state_dict[key].shape
    if rows % 3 or columns != 2 * emb_size:
        raise ValueError(f"'{key}' has shape {(rows, columns)}: an AWD-QRNN's first layer needs [3h, 2 * {emb_size}] "
                         "(output gate, window 2)")
    bidirectional = prefix + "rnns.0.layers_bwd.0.linear.weight" in state_dict
    n_hidden = rows // 3 * (2 if bidirectional else 1)
    if n_layers == 1:
        n_hidden = emb_size     # a one-layer encoder's hidden width is not stored anywhere
    return dict(arch="qrnn", n_hidden=n_hidden, bidirectional=bidirectional, save_prev_x=not bidirectional)


def import_qrnn_encoder(state_dict: dict, config: EncoderConfig, prefix: str, version: str, used: set,
                        missing: list, take) -> dict:
    """fastai AWD-QRNN encoder tensors -> our encoder params (see `convert._import_encoder`).

    `take(state_dict, keys, shape, used)` reads every key present, checks its shape, returns the
    first (None when none is present). Missing tensors are appended to `missing`.
    """
    _check_config(config)
    params = {"embed": None, "rnn": [{"forward": {}, "backward": {}} if config.bidirectional else {}
                                     for _ in range(config.n_layers)]}
    embed_keys = [prefix + "encoder.weight", prefix + "encoder_dp.emb.weight"]
    params["embed"] = take(state_dict, embed_keys, (config.vocab_size, config.emb_size), used)
    if params["embed"] is None:
        missing.append(embed_keys[0])
    for layer, direction, leaf, shape in _qrnn_shapes(config):
        keys = _layer_keys(prefix, layer, direction)[leaf]
        value = take(state_dict, keys, shape, used)
        if value is None:
            missing.append(keys[0])
        target = params["rnn"][layer]
        (target[direction] if config.bidirectional else target)[leaf] = value
    return params


def export_qrnn_encoder(params: dict, config: EncoderConfig, prefix: str) -> dict:
    """Our encoder params -> fastai 1.0.61 AWD-QRNN keys, in its state-dict order (what its
    `load_state_dict` accepts strictly: `weight_raw` and `module.weight` both written)."""
    _check_config(config)
    embed = np.asarray(params["embed"], np.float32)
    out = {prefix + "encoder.weight": embed, prefix + "encoder_dp.emb.weight": embed}
    for layer, direction, leaf, shape in _qrnn_shapes(config):
        source = params["rnn"][layer]
        value = np.asarray((source[direction] if config.bidirectional else source)[leaf], np.float32)
        if value.shape != shape:
            raise ValueError(f"rnn layer {layer} {direction} {leaf} has shape {value.shape}, the config needs {shape}")
        for key in _layer_keys(prefix, layer, direction)[leaf]:
            out[key] = value
    return out
