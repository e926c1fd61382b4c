"""The AWD-LSTM encoder (Merity et al. 2018, fastai's `AWD_LSTM`) and BPT3C over long documents.

Parameters (mirroring fastai's state dict; `layer` as in `ulmfit_jax.lstm`, or
`{"forward": layer, "backward": layer}` when bidirectional):

    {"embed": f32[V, E], "rnn": [layer_0, ..., layer_{L-1}]}

State: one `(h, c)` pair per layer, each f32[B, H_l] with H_l the layer's output width (both
directions side by side, `[forward, backward]`). Every call takes a state and returns the next, so
BPTT windows of a stream carry it (fastai's stateful LM); `initial_state` is the reset.

Dropout (train mode, keys split by name at the top, every mask drawn before the scans):
embedding rows (`embed_p`), locked dropout on the embedded input (`input_p`), DropConnect on each
layer's `w_hh` (`weight_p`; only the forward direction's, as fastai's WeightDropout wraps
`weight_hh_l0` alone), locked dropout between layers, not after the last (`hidden_p`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ulmfit_jax import dropout, frozen
from ulmfit_jax.config import EncoderConfig
from ulmfit_jax.lstm import init_lstm_params, lstm_layer

LayerState = tuple[jax.Array, jax.Array]


def init_encoder(key: jax.Array, config: EncoderConfig) -> dict:
    """fastai's init: embedding U(-0.1, 0.1), LSTM weights U(-1/sqrt(H), 1/sqrt(H))."""
    if config.arch == "qrnn":
        from ulmfit_jax import qrnn
        return qrnn.init_qrnn_encoder(key, config)
    embed_key, *layer_keys = jax.random.split(key, config.n_layers + 1)
    layers = []
    for layer_key, (n_in, n_out) in zip(layer_keys, config.layer_sizes):
        width = n_out // config.n_directions
        if config.bidirectional:
            forward_key, backward_key = jax.random.split(layer_key)
            layers.append({"forward": init_lstm_params(forward_key, n_in, width),
                           "backward": init_lstm_params(backward_key, n_in, width)})
        else:
            layers.append(init_lstm_params(layer_key, n_in, width))
    embed = jax.random.uniform(embed_key, (config.vocab_size, config.emb_size), minval=-0.1, maxval=0.1)
    return {"embed": embed, "rnn": layers}


def initial_state(config: EncoderConfig, batch_size: int) -> list:
    """Zero state for `batch_size` streams (fastai's `reset`)."""
    if config.arch == "qrnn":
        from ulmfit_jax import qrnn
        return qrnn.initial_qrnn_state(config, batch_size)
    return [(jnp.zeros((batch_size, n_out)), jnp.zeros((batch_size, n_out)))
            for _, n_out in config.layer_sizes]


def embed_tokens(embed: jax.Array, tokens: jax.Array, *, pad_token: int, embed_p: float,
                 key: jax.Array | None) -> jax.Array:
    """tokens: int32[...] -> f32[..., E], with whole-word dropout when `key` is given.

    An id outside [0, V) gives NaN rather than a silently clamped row (check ids on the host
    with `check_token_ids` for a clear error). The padding row gets no gradient from this lookup,
    as with PyTorch's `padding_idx`.
    """
    vocab_size = embed.shape[0]
    vectors = jnp.take(embed, tokens, axis=0, mode="fill", fill_value=jnp.nan)
    if key is not None and embed_p > 0.0:
        row_mask = dropout.embedding_row_mask(key, vocab_size, embed_p)
        vectors = vectors * jnp.take(row_mask, tokens, axis=0, mode="fill", fill_value=jnp.nan)
    is_pad = (tokens == pad_token)[..., None]
    return jnp.where(is_pad, jax.lax.stop_gradient(vectors), vectors)


def check_token_ids(tokens, vocab_size: int) -> None:
    """Raise a clear error for ids outside [0, vocab_size); run on host data before a step."""
    import numpy as np
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = np.unique(tokens[(tokens < 0) | (tokens >= vocab_size)])
        raise ValueError(f"token ids outside the vocabulary [0, {vocab_size}): {bad[:10].tolist()}"
                         f"{' ...' if bad.size > 10 else ''}")


def _lstm_stack_layer(layer_params, x, state, *, config, weight_key, train, compute_dtype):
    """One (possibly bidirectional) layer. x: f32[T, B, D] -> f32[T, B, H_out]."""
    weight_p = config.weight_p if train else 0.0
    run = functools.partial(lstm_layer, unroll=config.unroll, compute_dtype=compute_dtype)
    if not config.bidirectional:
        w_hh = dropout.weight_drop(weight_key, layer_params["w_hh"], weight_p)
        return run(layer_params, x, state, w_hh=w_hh)
    h, c = state
    half = h.shape[-1] // 2
    forward = layer_params["forward"]
    w_hh = dropout.weight_drop(weight_key, forward["w_hh"], weight_p)
    out_f, (h_f, c_f) = run(forward, x, (h[:, :half], c[:, :half]), w_hh=w_hh)
    out_b, (h_b, c_b) = run(layer_params["backward"], x, (h[:, half:], c[:, half:]), reverse=True)
    return (jnp.concatenate([out_f, out_b], -1),
            (jnp.concatenate([h_f, h_b], -1), jnp.concatenate([c_f, c_b], -1)))


def encoder_apply(params: dict, tokens: jax.Array, state: list, *, config: EncoderConfig,
                  train: bool = False, key: jax.Array | None = None, compute_dtype=None,
                  backward: jax.Array | None = None) -> tuple[jax.Array, list]:
    """Run the encoder over one window.

    tokens: int32[B, T]; state: from `initial_state` or a previous call.
    Returns (outputs f32[B, T, E]: the last layer's output, no dropout after it; new state).
    `compute_dtype` (e.g. bfloat16) is the dtype of the matmuls' inputs; accumulation, the cell
    state and the outputs stay float32. `backward` (bool[1 + L], traced; `frozen.backward_flags`):
    whether the backward pass runs through the embedding and through each layer; where it does not,
    their parameters get zero gradients at no cost. The incoming `state` gets no gradient then (the
    models detach it anyway). None: plain autodiff.
    """
    if train and key is None:
        raise ValueError("train=True needs a PRNG key for the dropout masks")
    if config.arch == "qrnn":
        from ulmfit_jax import qrnn
        layer_fn = qrnn.qrnn_stack_layer
    else:
        layer_fn = _lstm_stack_layer
    if train:
        embed_key, input_key, hidden_key, weight_key = jax.random.split(key, 4)
    else:
        embed_key = input_key = hidden_key = weight_key = None

    embed = lambda table, other: embed_tokens(table, other[0], pad_token=config.pad_token,
                                              embed_p=config.embed_p, key=other[1])
    if backward is None:
        x = embed(params["embed"], (tokens.T, embed_key))                        # [T, B, E]
    else:
        x = frozen.gated(backward[0], embed, params["embed"], (tokens.T, embed_key))
    x = dropout.locked_dropout(input_key, x, config.input_p, time_axis=0)
    new_state = []
    for layer, (layer_params, layer_state) in enumerate(zip(params["rnn"], state)):
        layer_weight_key = None if weight_key is None else jax.random.fold_in(weight_key, layer)
        run = lambda differentiable, other: layer_fn(*differentiable, other[0], config=config, weight_key=other[1],
                                                     train=train, compute_dtype=compute_dtype)
        if backward is None:
            x, layer_state = run((layer_params, x), (layer_state, layer_weight_key))
        else:
            x, layer_state = frozen.gated(backward[layer + 1], run, (layer_params, x), (layer_state, layer_weight_key))
        new_state.append(layer_state)
        if layer < config.n_layers - 1 and hidden_key is not None:
            x = dropout.locked_dropout(jax.random.fold_in(hidden_key, layer), x, config.hidden_p, time_axis=0)
    return x.transpose(1, 0, 2), new_state


def fastai_windows(tokens: jax.Array, *, pad_token: int, bptt: int, max_len: int | None) -> tuple[jax.Array, jax.Array]:
    """Which rows fastai's `SentenceEncoder` feeds and keeps in each of our windows of a batch.

    tokens: int32[B, S] in `pad_input_chunk` layout (pad_first), padded to the batch's longest
    document L (fastai's own batch) or wider (our length buckets). Returns (fed, kept), each
    bool[N, B] for our N = ceil(S / bptt) windows: whether fastai's model runs row b over the
    window (fastai feeds window i to rows `b < real_bs`, real_bs the number of rows whose token at
    i is not padding), and whether the window is among the ones fastai keeps for the pooling and
    the regulariser (fastai's window i with `L - i <= max_len`; all when max_len is None).

    Computed at run time from the tokens, so one shape serves every L it holds. A row's document
    spans its first to its last non-padding token (n tokens); fastai puts it after
    `(L - n) // bptt * bptt` front pads, we after `(S - n) // bptt * bptt`: both at a window
    boundary, so row b's fastai column i is our column `i + shift_b` and fastai's windows of the row
    are ours. The shifts of two rows differ by a window when S - L is no multiple of bptt, so
    fastai's window i can be our window w for one row and w + 1 for another: fed and kept are
    decided per row, in fastai's columns.
    """
    batch, width = tokens.shape
    n_windows = -(-width // bptt)
    is_text = tokens != pad_token
    first = jnp.argmax(is_text, axis=1)
    last = width - 1 - jnp.argmax(is_text[:, ::-1], axis=1)
    lengths = jnp.where(is_text.any(axis=1), last - first + 1, 0)
    longest = lengths.max()
    shift = first - (longest - lengths) // bptt * bptt                       # [B]: ours = fastai's + shift
    starts = jnp.arange(n_windows) * bptt                                    # [N]
    # fastai's real_bs of its window j (start j * bptt): rows whose token there is not padding
    columns = starts[:, None] + shift[None, :]                               # [N, B]: our column of (j, row)
    inside = (columns >= 0) & (columns < width)
    at_start = jnp.take_along_axis(is_text.T, jnp.clip(columns, 0, width - 1), axis=0)
    real_bs = jnp.sum(at_start & inside, axis=1)                             # [N]
    # our window w of row b is fastai's column i = start_w - shift_b
    fastai_start = starts[:, None] - shift[None, :]                          # [N, B]
    in_fastai = (fastai_start >= 0) & (fastai_start < longest)
    fed = in_fastai & (jnp.arange(batch)[None, :] < real_bs[jnp.clip(fastai_start // bptt, 0, n_windows - 1)])
    kept = in_fastai if max_len is None else in_fastai & (longest - fastai_start <= max_len)
    return fed, kept


def sentence_encoder(params: dict, tokens: jax.Array, *, config: EncoderConfig, bptt: int,
                     max_len: int | None, train: bool = False, key: jax.Array | None = None,
                     compute_dtype=None, backward: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """BPT3C (fastai's `SentenceEncoder`): a document batch in windows of `bptt`, state carried.

    tokens: int32[B, S], in fastai's `pad_input_chunk` layout (sorted by length, descending; whole
    windows of padding at the front, the remainder at the end), padded to the batch's longest
    document L (fastai's batch) or to a multiple of bptt (our length buckets). Returns (outputs
    f32[B, S_kept, E], padding mask bool[B, S_kept]) for the last ceil(max_len / bptt) windows
    (all of them when max_len is None).

    As in fastai: the state starts at zero; a window feeds only the rows fastai feeds (its
    `real_bs`), other rows get zero outputs and a zero state; each window's state is detached, so
    gradients flow within a window only. fastai keeps the windows that start within max_len of its
    batch's end, L: which of ours those are depends on L, so `fastai_windows` decides it per row at
    run time, and the outputs of the windows it does not keep are zero and marked padding (the
    pooling ignores them; AR and TAR must too: `text.batches.fastai_layout_mask` with max_len).
    Static shapes: whatever L, fastai's end lies in our last window, so none of the windows before
    the last ceil(max_len / bptt) can be kept; they run first, in a scan without gradients, and a
    long document costs no backward pass before them. They are exactly the windows fastai keeps
    when max_len and S - L are multiples of bptt (fastai's own batch: S = L); otherwise a row's can
    begin with one window more, masked. Each window draws its own dropout masks, as each fastai
    module call does.
    `backward`: as `encoder_apply`'s.

    Equal to fastai's outputs at every position fastai keeps, for any bucket padding, except two of
    fastai's own padding effects when S - L is no multiple of bptt: its trailing pads beyond our
    width (padding, outside the pooling) and `masked_concat_pool`'s `last` of a row whose text
    starts in fastai's last, shorter window (fastai pools an earlier position, we the last token).
    """
    batch, length = tokens.shape
    n_full, remainder = divmod(length, bptt)
    n_windows = n_full + (remainder > 0)
    first_kept = 0 if max_len is None else max(0, n_windows - -(-max_len // bptt))
    fed, kept = fastai_windows(tokens, pad_token=config.pad_token, bptt=bptt, max_len=max_len)    # [N, B]
    full_windows = tokens[:, :n_full * bptt].reshape(batch, n_full, bptt).transpose(1, 0, 2)   # [W, B, bptt]

    def run_window(state, window_index_fed):
        window, index, rows = window_index_fed
        window_key = None if key is None else jax.random.fold_in(key, index)
        outputs, new_state = encoder_apply(params, window, state, config=config, train=train,
                                           key=window_key, compute_dtype=compute_dtype, backward=backward)
        outputs = jnp.where(rows[:, None, None], outputs, 0.0)
        new_state = jax.tree.map(lambda s: jnp.where(rows[:, None], s, 0.0), new_state)
        return jax.lax.stop_gradient(new_state), outputs

    state = initial_state(config, batch)
    if first_kept > 0:
        dropped = min(first_kept, n_full)
        state, _ = jax.lax.scan(run_window, state, (full_windows[:dropped], jnp.arange(dropped), fed[:dropped]))
        state = jax.lax.stop_gradient(state)
    outputs = []
    if n_full > first_kept:
        state, out = jax.lax.scan(run_window, state, (full_windows[first_kept:], jnp.arange(first_kept, n_full),
                                                      fed[first_kept:n_full]))
        outputs.append(out.transpose(1, 0, 2, 3).reshape(batch, -1, config.emb_size))
    if remainder:
        # The last, shorter window runs on its own: padding it to full length would change the
        # outputs of a bidirectional layer's backward direction.
        _, last = run_window(state, (tokens[:, n_full * bptt:], n_full, fed[n_full]))
        outputs.append(last)
    outputs = jnp.concatenate(outputs, axis=1)
    kept = jnp.repeat(kept[first_kept:].T, bptt, axis=1)[:, :outputs.shape[1]]                # [B, S_kept]
    outputs = jnp.where(kept[..., None], outputs, 0.0)
    return outputs, (tokens[:, first_kept * bptt:] == config.pad_token) | ~kept
