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
    zoneout: float = 0.0     # QRNN: zoneout on the forget gate, fastai's semantics (ulmfit_jax.qrnn)
    save_prev_x: bool = True  # QRNN: carry layer 0's last input across windows (not with bidirectional)
    forget_mult: str = "scan"  # QRNN: "scan" (custom VJP, default) or "associative" (lax.associative_scan)

    def __post_init__(self):
        if self.vocab_size < 1 or self.emb_size < 1 or self.n_hidden < 1 or self.n_layers < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.arch not in ("lstm", "qrnn"):
            raise ValueError(f"arch must be 'lstm' or 'qrnn', got {self.arch!r}")
        for name in ("hidden_p", "input_p", "embed_p", "weight_p"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if not 0.0 <= self.zoneout < 1.0:
            raise ValueError(f"zoneout must be in [0, 1), got {self.zoneout}")
        if self.forget_mult not in ("scan", "associative"):
            raise ValueError(f"forget_mult must be 'scan' or 'associative', got {self.forget_mult!r}")
        if self.arch == "qrnn" and self.bidirectional and self.save_prev_x:
            raise ValueError("a bidirectional QRNN cannot save the previous input (fastai's QRNN asserts the same): "
                             "pass save_prev_x=False")
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


# ----------------------------------------------------------------------------------------------
# QRNN presets (ulmfit_jax.qrnn)

def awd_qrnn_lm_config(vocab_size: int, drop_mult: float = 1.0, **overrides) -> LanguageModelConfig:
    """fastai's `awd_qrnn_lm_config` (fastai 2.0-2.3, before the QRNN was removed in 2.4): an
    AWD-QRNN with emb 400, hidden 1552, 4 layers and the LSTM LM's dropouts, times `drop_mult`.

    fastai 1.0.61 has no separate QRNN preset: there a QRNN LM is `awd_lstm_lm_config` with
    `qrnn=True` (400/1152/3), here `awd_lstm_lm_config(vocab_size, arch="qrnn")`. Either way layer 0
    has window 2 and saves its last input across windows, and weight drop acts on each layer's
    gate projection.
    """
    return awd_lstm_lm_config(vocab_size, drop_mult, **{"arch": "qrnn", "n_hidden": 1552, "n_layers": 4, **overrides})


def awd_qrnn_clas_config(vocab_size: int, n_classes: int, drop_mult: float = 1.0,
                         **overrides) -> ClassifierConfig:
    """fastai's `awd_qrnn_clas_config` (fastai 2.0-2.3): emb 400, hidden 1552, 4 layers, the LSTM
    classifier's dropouts, times `drop_mult` (fastai 1.0.61: `awd_lstm_clas_config` with `qrnn=True`)."""
    return awd_lstm_clas_config(vocab_size, n_classes, drop_mult,
                                **{"arch": "qrnn", "n_hidden": 1552, "n_layers": 4, **overrides})


# n-waves/multifit multifit/configurations.py, `multifit_paper_version`
_MULTIFIT_DROPOUTS = dict(output_p=0.25, hidden_p=0.1, input_p=0.2, embed_p=0.02, weight_p=0.15)
_MULTIFIT_ARCH = dict(arch="qrnn", emb_size=400, n_hidden=1550, n_layers=4)


def multifit_lm_config(vocab_size: int = 15_000, drop_mult: float = 1.0, **overrides) -> LanguageModelConfig:
    """MultiFiT's language model (Eisenschlos et al. 2019, `multifit_paper_version`): a 4-layer
    AWD-QRNN, emb 400, hidden 1550, dropouts output 0.25, hidden 0.1, input 0.2, embed 0.02,
    weight 0.15, times `drop_mult`, over a SentencePiece vocabulary of 15k pieces.

    MultiFiT's drop_mult: 0.0 for pretraining, 0.3 for LM fine-tuning. Its training settings (not
    part of the model): Adam betas (0.8, 0.99), clip 0.12, 1cycle; pretraining 10 epochs lr 5e-3
    bs 50 bptt 70 wd 1e-7; fine-tuning 20 epochs lr 1e-3 bs 20.
    """
    probs = _scaled(_MULTIFIT_DROPOUTS, drop_mult, overrides)
    return awd_lstm_lm_config(vocab_size, 1.0, **{**probs, **_MULTIFIT_ARCH, **overrides})


def multifit_clas_config(vocab_size: int, n_classes: int, drop_mult: float = 1.0,
                         **overrides) -> ClassifierConfig:
    """MultiFiT's classifier: the MultiFiT encoder (see `multifit_lm_config`) with fastai's pooling
    head, the same dropouts times `drop_mult` (MultiFiT fine-tunes the classifier with 0.5).

    Label smoothing 0.1 is a training setting, not a model one: MultiFiT trains the classifier with
    `cross_entropy(..., label_smoothing=0.1)` (ulmfit_jax.losses), 8 epochs, bs 18, 1cycle.
    """
    probs = _scaled(_MULTIFIT_DROPOUTS, drop_mult, overrides)
    return awd_lstm_clas_config(vocab_size, n_classes, 1.0, **{**probs, **_MULTIFIT_ARCH, **overrides})
