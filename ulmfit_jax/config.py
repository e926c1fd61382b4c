"""Model configurations as frozen dataclasses, with presets equal to fastai's.

Frozen dataclasses are hashable, so a config can be a static argument of `jax.jit`.
`drop_mult` scales every dropout probability of the encoder and of the first head layer, as
fastai's `get_language_model` / `get_text_classifier` do (the classifier's inner head dropouts,
0.1 by default, are not scaled).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """AWD-LSTM / AWD-QRNN encoder.

    Layer `l` maps `emb_size if l == 0 else n_hidden` features to `n_hidden if l < n_layers - 1
    else emb_size`; a bidirectional layer gives each direction half of its output width.
    """

    vocab_size: int
    emb_size: int = 400
    n_hidden: int = 1152
    n_layers: int = 3
    pad_token: int = 1
    bidirectional: bool = False
    hidden_p: float = 0.15   # locked dropout between layers
    input_p: float = 0.25    # locked dropout on the embedded tokens
    embed_p: float = 0.02    # whole-word dropout on embedding rows
    weight_p: float = 0.2    # DropConnect on each layer's hidden-to-hidden weight
    arch: str = "lstm"       # "lstm" or "qrnn"
    unroll: int = 1          # lax.scan unroll; 1 is fastest on CPU

    def __post_init__(self):
        if self.vocab_size < 1 or self.emb_size < 1 or self.n_hidden < 1 or self.n_layers < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.arch not in ("lstm", "qrnn"):
            raise ValueError(f"arch must be 'lstm' or 'qrnn', got {self.arch!r}")
        for name in ("hidden_p", "input_p", "embed_p", "weight_p"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.bidirectional:
            for l in range(self.n_layers):
                if self.layer_sizes[l][1] % 2:
                    raise ValueError(
                        f"a bidirectional layer needs an even output width, layer {l} has "
                        f"{self.layer_sizes[l][1]}")

    @property
    def n_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def layer_sizes(self) -> tuple[tuple[int, int], ...]:
        """(input width, output width) of each layer, output summed over directions."""
        return tuple(
            (self.emb_size if l == 0 else self.n_hidden,
             self.n_hidden if l < self.n_layers - 1 else self.emb_size)
            for l in range(self.n_layers))


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig:
    encoder: EncoderConfig
    output_p: float = 0.1    # locked dropout before the decoder
    tie_weights: bool = True
    out_bias: bool = True


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Encoder + BPT3C + fastai's PoolingLinearClassifier.

    Head widths are `[3 * emb_size, *hidden_sizes, n_classes]`; dropouts `head_ps`, one per
    linear block (fastai: `[output_p] + [0.1] * len(lin_ftrs)`).
    """

    encoder: EncoderConfig
    n_classes: int
    hidden_sizes: tuple[int, ...] = (50,)
    head_ps: tuple[float, ...] = (0.4, 0.1)
    bptt: int = 72
    max_len: int | None = 72 * 20
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def __post_init__(self):
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {self.n_classes}")
        if len(self.head_ps) != len(self.hidden_sizes) + 1:
            raise ValueError(
                f"head_ps needs one dropout per linear block ({len(self.hidden_sizes) + 1}), "
                f"got {self.head_ps}")
        if self.max_len is not None and self.max_len < self.bptt:
            raise ValueError(f"max_len ({self.max_len}) must be at least bptt ({self.bptt}): BPT3C keeps whole windows")

    @property
    def head_sizes(self) -> tuple[int, ...]:
        return (3 * self.encoder.emb_size, *self.hidden_sizes, self.n_classes)


# fastai 2.8.12 text/models/awdlstm.py
_LM_DROPOUTS = dict(output_p=0.1, hidden_p=0.15, input_p=0.25, embed_p=0.02, weight_p=0.2)
_CLAS_DROPOUTS = dict(output_p=0.4, hidden_p=0.3, input_p=0.4, embed_p=0.05, weight_p=0.5)
_ENCODER_DROPOUTS = ("hidden_p", "input_p", "embed_p", "weight_p")


def _scaled(dropouts: dict, drop_mult: float, overrides: dict) -> dict:
    probs = {k: v * drop_mult for k, v in dropouts.items()}
    probs.update({k: overrides.pop(k) for k in list(overrides) if k in probs})
    return probs


def awd_lstm_lm_config(vocab_size: int, drop_mult: float = 1.0, **overrides) -> LanguageModelConfig:
    """fastai's `awd_lstm_lm_config` (emb 400, hidden 1152, 3 layers), dropouts times `drop_mult`.

    `overrides` sets any EncoderConfig or LanguageModelConfig field, e.g. `n_layers=2`.
    """
    probs = _scaled(_LM_DROPOUTS, drop_mult, overrides)
    lm_fields = {k: overrides.pop(k) for k in ("tie_weights", "out_bias") if k in overrides}
    encoder = EncoderConfig(vocab_size=vocab_size, **{k: probs[k] for k in _ENCODER_DROPOUTS}, **overrides)
    return LanguageModelConfig(encoder=encoder, output_p=probs["output_p"], **lm_fields)


def awd_lstm_clas_config(vocab_size: int, n_classes: int, drop_mult: float = 1.0,
                         **overrides) -> ClassifierConfig:
    """fastai's `awd_lstm_clas_config` inside `get_text_classifier` (seq_len 72, max_len 72*20).

    `overrides` sets any EncoderConfig or ClassifierConfig field.
    """
    probs = _scaled(_CLAS_DROPOUTS, drop_mult, overrides)
    clas_fields = {k: overrides.pop(k) for k in ("hidden_sizes", "bptt", "max_len", "bn_momentum", "bn_eps")
                   if k in overrides}
    hidden_sizes = clas_fields.get("hidden_sizes", (50,))
    head_ps = overrides.pop("head_ps", (probs["output_p"],) + (0.1,) * len(hidden_sizes))
    encoder = EncoderConfig(vocab_size=vocab_size, **{k: probs[k] for k in _ENCODER_DROPOUTS}, **overrides)
    return ClassifierConfig(encoder=encoder, n_classes=n_classes, head_ps=tuple(head_ps), **clas_fields)
