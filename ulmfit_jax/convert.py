"""fastai <-> ulmfit_jax weights.

Reads the state dicts of fastai v2 (`lstm_fwd.pth`, `learn.save`: bare or `{"model": ...}`), fastai
v1 (which keeps a duplicate `module.weight_hh_l0` beside `weight_hh_l0_raw`) and fastai 0.7
(`0.encoder_with_dropout.embed.weight`, no decoder bias), for language models and classifiers;
infers the config from the tensor shapes; writes fastai v2 state dicts back. Keys are matched by
name with strict checks (unknown and missing keys listed, a shape mismatch names the tensor and
both shapes); fastai itself loads pretrained weights by position.

Everything here works on `{name: numpy array}` dicts; `read_state_dict` / `write_state_dict`
are the only functions that need torch, which they import lazily (`weights_only=True`: a `.pth`
never runs code when read).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ulmfit_jax.config import ClassifierConfig, EncoderConfig, LanguageModelConfig


class WeightsError(ValueError):
    """A state dict that does not fit: wrong shapes, unknown or missing keys."""


# ----------------------------------------------------------------------------------------------
# Reading and writing .pth files

def read_state_dict(path) -> dict[str, np.ndarray]:
    """A fastai `.pth` -> {key: float32 array}. Unwraps `{"model": state_dict}` (fastai's `save`)."""
    import torch
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise WeightsError(f"{path}: not a state dict (got {type(loaded).__name__})")
    return {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "detach")}


def write_state_dict(state_dict: dict[str, np.ndarray], path) -> None:
    import torch
    # a copy: arrays from JAX (or a memory map) are read-only, which torch.from_numpy warns about
    torch.save({k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in state_dict.items()}, path)


def write_vocab_pickle(vocab: list[str], path) -> None:
    """fastai's vocabulary file (`itos.pkl`): a pickled list of strings, the format fastai reads.
    Read it back with `ulmfit_jax.text.vocab.load_vocab_pickle`, which accepts nothing else."""
    import pickle
    if not all(isinstance(token, str) for token in vocab):
        raise ValueError("a vocabulary is a list of strings")
    with open(path, "wb") as handle:
        pickle.dump(list(vocab), handle, protocol=2)


# ----------------------------------------------------------------------------------------------
# Key layouts

_LSTM_NAMES = {"w_ih": "weight_ih_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}


def detect_format(state_dict: dict) -> tuple[str, str]:
    """-> (fastai version "v2" | "v1" | "0.7", model kind "language_model" | "classifier")."""
    keys = set(state_dict)
    if any(k.startswith("0.module.") for k in keys) and any(k.startswith("1.layers.") for k in keys):
        kind, prefix = "classifier", "0.module."
    elif "0.encoder.weight" in keys:
        kind, prefix = "language_model", "0."
    else:
        raise WeightsError("not a fastai AWD-LSTM state dict: no '0.encoder.weight' or "
                           f"'0.module.encoder.weight' (first keys: {sorted(keys)[:5]})")
    if prefix + "encoder_with_dropout.embed.weight" in keys:
        return "0.7", kind
    # v1 keeps the dropped copy of a weight-dropped tensor: LSTM `module.weight_hh_l0`, QRNN `linear.module.weight`
    if any(re.fullmatch(re.escape(prefix) + r"rnns\.\d+\.(module\.weight_hh_l0|layers\.0\.linear\.module\.weight)", k)
           for k in keys):
        return "v1", kind
    return "v2", kind


def _encoder_keys(prefix: str, n_layers: int, bidirectional: bool, version: str) -> dict:
    """Our encoder leaf path -> fastai keys, in the order of fastai's own `state_dict()`.

    The order matters: fastai's `Learner.load_pretrained` (behind `language_model_learner(...,
    pretrained_fnames=...)`) copies tensors by position (`load_ignore_keys`), not by name. In an
    AWD_LSTM each layer is a WeightDropout, whose own parameter `weight_hh_l0_raw` comes before its
    submodule's, the wrapped nn.LSTM's `module.*` tensors: `weight_ih_l0, bias_ih_l0, bias_hh_l0`,
    then the reverse direction's four in nn.LSTM's order (`weight_hh_l0_reverse` second)."""
    dropout_embedding = "encoder_with_dropout.embed.weight" if version == "0.7" else "encoder_dp.emb.weight"
    keys = {("embed",): [prefix + "encoder.weight", prefix + dropout_embedding]}
    raw_hh = "module.weight_hh_l0_raw" if version == "0.7" else "weight_hh_l0_raw"
    for layer in range(n_layers):
        base = f"{prefix}rnns.{layer}."
        forward = ("rnn", layer) + (("forward",) if bidirectional else ())
        keys[forward + ("w_hh",)] = [base + raw_hh] + ([base + "module.weight_hh_l0"] if version == "v1" else [])
        for ours, theirs in _LSTM_NAMES.items():
            keys[forward + (ours,)] = [base + "module." + theirs]
        if bidirectional:
            backward = ("rnn", layer, "backward")
            for ours, theirs in (("w_ih", "weight_ih_l0"), ("w_hh", "weight_hh_l0"),
                                 ("b_ih", "bias_ih_l0"), ("b_hh", "bias_hh_l0")):
                keys[backward + (ours,)] = [base + "module." + theirs + "_reverse"]
    return keys


def _head_keys(state_dict: dict) -> list[dict]:
    """fastai's head blocks. v2 LinBnDrop: `1.layers.{i}.{0: BN, 1 or 2: Linear}`; v1 bn_drop_lin is
    one flat Sequential (`1.layers.{j}`, Linear with a bias)."""
    head = sorted(k[len("1.layers."):] for k in state_dict if k.startswith("1.layers."))
    bn_modules = sorted({k.rsplit(".", 1)[0] for k in head if k.endswith("running_mean")},
                        key=lambda m: [int(p) for p in m.split(".")])
    linear_modules = sorted({k.rsplit(".", 1)[0] for k in head if k.endswith("weight")} - set(bn_modules),
                            key=lambda m: [int(p) for p in m.split(".")])
    if len(bn_modules) != len(linear_modules):
        raise WeightsError(f"classifier head: {len(bn_modules)} batch norms but {len(linear_modules)} linear layers")
    blocks = []
    for bn, linear in zip(bn_modules, linear_modules):
        block = {"bn_scale": f"1.layers.{bn}.weight", "bn_bias": f"1.layers.{bn}.bias",
                 "mean": f"1.layers.{bn}.running_mean", "var": f"1.layers.{bn}.running_var",
                 "weight": f"1.layers.{linear}.weight"}
        if f"1.layers.{linear}.bias" in state_dict:
            block["bias"] = f"1.layers.{linear}.bias"
        blocks.append(block)
    return blocks


# ----------------------------------------------------------------------------------------------
# Import

def infer_encoder_config(state_dict: dict, **overrides) -> EncoderConfig:
    """Sizes from the shapes; dropouts from `overrides` (a state dict holds none)."""
    version, kind = detect_format(state_dict)
    prefix = "0.module." if kind == "classifier" else "0."
    vocab_size, emb_size = state_dict[prefix + "encoder.weight"].shape
    layers = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(re.escape(prefix) + r"rnns\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise WeightsError(f"rnn layers are not numbered 0..L-1: {layers}")
    from ulmfit_jax import qrnn
    if qrnn.is_qrnn_state_dict(state_dict, prefix):
        try:
            sizes = qrnn.infer_qrnn_sizes(state_dict, prefix, len(layers), emb_size)
        except ValueError as error:
            raise WeightsError(str(error)) from None
        if len(layers) == 1:
            sizes["n_hidden"] = overrides.pop("n_hidden", sizes["n_hidden"])
        return EncoderConfig(vocab_size=vocab_size, emb_size=emb_size, n_layers=len(layers), **{**sizes, **overrides})
    bidirectional = prefix + "rnns.0.module.weight_ih_l0_reverse" in state_dict
    first_hh = state_dict[prefix + ("rnns.0.module.weight_hh_l0_raw" if version == "0.7" else "rnns.0.weight_hh_l0_raw")]
    n_hidden = first_hh.shape[1] * (2 if bidirectional else 1)
    if len(layers) == 1:
        n_hidden = overrides.pop("n_hidden", n_hidden)
    return EncoderConfig(vocab_size=vocab_size, emb_size=emb_size, n_hidden=n_hidden, n_layers=len(layers),
                         bidirectional=bidirectional, **overrides)


def _take(state_dict: dict, keys: list[str], expected_shape: tuple, used: set) -> np.ndarray:
    value = None
    for key in keys:
        if key not in state_dict:
            continue
        used.add(key)
        if tuple(state_dict[key].shape) != tuple(expected_shape):
            raise WeightsError(f"tensor '{key}' has shape {tuple(state_dict[key].shape)}, the model needs "
                               f"{tuple(expected_shape)}")
        if value is None:
            value = np.asarray(state_dict[key], dtype=np.float32)
    return value


def _set(tree, path, value):
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def _expected_encoder(config: EncoderConfig) -> dict:
    """Our encoder leaf path -> shape."""
    shapes = {("embed",): (config.vocab_size, config.emb_size)}
    for layer, (n_in, n_out) in enumerate(config.layer_sizes):
        width = n_out // config.n_directions
        for direction in (("forward", "backward") if config.bidirectional else (None,)):
            path = ("rnn", layer) + ((direction,) if direction else ())
            shapes.update({path + ("w_ih",): (4 * width, n_in), path + ("w_hh",): (4 * width, width),
                           path + ("b_ih",): (4 * width,), path + ("b_hh",): (4 * width,)})
    return shapes


def _empty_encoder(config: EncoderConfig) -> dict:
    layer = lambda: {"forward": {}, "backward": {}} if config.bidirectional else {}
    return {"embed": None, "rnn": [layer() for _ in range(config.n_layers)]}


def _check_all_used(state_dict, used, missing):
    ignorable = {k for k in state_dict if k.endswith("num_batches_tracked")}
    unknown = sorted(set(state_dict) - used - ignorable)
    if missing or unknown:
        raise WeightsError("state dict does not fit the model:"
                           + (f"\n  missing keys: {missing}" if missing else "")
                           + (f"\n  unknown keys: {unknown}" if unknown else ""))


def _import_encoder(state_dict, config: EncoderConfig, prefix: str, version: str, used: set, missing: list):
    if config.arch != "lstm":
        from ulmfit_jax import qrnn
        return qrnn.import_qrnn_encoder(state_dict, config, prefix, version, used, missing, _take)
    params = _empty_encoder(config)
    key_map = _encoder_keys(prefix, config.n_layers, config.bidirectional, version)
    for path, shape in _expected_encoder(config).items():
        value = _take(state_dict, key_map[path], shape, used)
        if value is None:
            missing.append(key_map[path][0])
        _set(params, path, value)
    return params


def import_language_model(state_dict: dict, config: LanguageModelConfig | None = None,
                          **encoder_overrides) -> tuple[LanguageModelConfig, dict]:
    """A fastai LM state dict -> (config, params). Without `config`, it is inferred from the shapes
    (dropouts from `encoder_overrides`, else fastai's LM defaults)."""
    version, kind = detect_format(state_dict)
    if kind != "language_model":
        raise WeightsError(f"expected a language model state dict, got a {kind}")
    if config is None:
        from ulmfit_jax.config import awd_lstm_lm_config
        encoder = infer_encoder_config(state_dict, **encoder_overrides)
        tied = ("1.decoder.weight" not in state_dict
                or np.array_equal(state_dict["1.decoder.weight"], state_dict["0.encoder.weight"]))
        defaults = awd_lstm_lm_config(encoder.vocab_size)
        dropouts = {k: getattr(defaults.encoder, k) for k in ("hidden_p", "input_p", "embed_p", "weight_p")}
        dropouts.update({k: v for k, v in encoder_overrides.items() if k in dropouts})
        encoder = dataclasses.replace(encoder, **dropouts)
        config = LanguageModelConfig(encoder=encoder, output_p=defaults.output_p, tie_weights=tied,
                                     out_bias="1.decoder.bias" in state_dict)
    encoder = config.encoder
    used, missing = set(), []
    params = {"encoder": _import_encoder(state_dict, encoder, "0.", version, used, missing), "decoder": {}}
    vocab_shape = (encoder.vocab_size,)
    if config.out_bias:
        bias = _take(state_dict, ["1.decoder.bias"], vocab_shape, used)
        if bias is None:
            missing.append("1.decoder.bias")
        params["decoder"]["bias"] = bias
    decoder_weight = _take(state_dict, ["1.decoder.weight"], (encoder.vocab_size, encoder.emb_size), used)
    if not config.tie_weights:
        if decoder_weight is None:
            missing.append("1.decoder.weight")
        params["decoder"]["weight"] = decoder_weight
    _check_all_used(state_dict, used, missing)
    return config, params


def import_classifier(state_dict: dict, config: ClassifierConfig | None = None, *, n_classes: int | None = None,
                      **encoder_overrides) -> tuple[ClassifierConfig, dict, list]:
    """A fastai classifier state dict -> (config, params, batch_stats)."""
    version, kind = detect_format(state_dict)
    if kind != "classifier":
        raise WeightsError(f"expected a classifier state dict, got a {kind}")
    blocks = _head_keys(state_dict)
    if config is None:
        from ulmfit_jax.config import awd_lstm_clas_config
        encoder = infer_encoder_config(state_dict, **encoder_overrides)
        sizes = [state_dict[b["weight"]].shape[0] for b in blocks]
        config = awd_lstm_clas_config(encoder.vocab_size, sizes[-1], hidden_sizes=tuple(sizes[:-1]))
        config = dataclasses.replace(config, encoder=dataclasses.replace(
            encoder, **{k: getattr(config.encoder, k) for k in ("hidden_p", "input_p", "embed_p", "weight_p")
                        if k not in encoder_overrides}))
    if n_classes is not None and n_classes != config.n_classes:
        raise WeightsError(f"the weights have {config.n_classes} classes, {n_classes} were asked for")
    used, missing = set(), []
    encoder_params = _import_encoder(state_dict, config.encoder, "0.module.", version, used, missing)
    if len(blocks) != len(config.head_sizes) - 1:
        raise WeightsError(f"classifier head has {len(blocks)} blocks, the config {len(config.head_sizes) - 1}")
    head, stats = [], []
    for block, n_in, n_out in zip(blocks, config.head_sizes[:-1], config.head_sizes[1:]):
        shapes = {"bn_scale": (n_in,), "bn_bias": (n_in,), "mean": (n_in,), "var": (n_in,),
                  "weight": (n_out, n_in), "bias": (n_out,)}
        values = {name: _take(state_dict, [key], shapes[name], used) for name, key in block.items()}
        head.append({k: values[k] for k in ("bn_scale", "bn_bias", "weight", "bias") if k in values})
        stats.append({"mean": values["mean"], "var": values["var"]})
    _check_all_used(state_dict, used, missing)
    return config, {"encoder": encoder_params, "head": head}, stats


# ----------------------------------------------------------------------------------------------
# Export (fastai v2 layout)

def _export_encoder(params: dict, config: EncoderConfig, prefix: str) -> dict:
    if config.arch != "lstm":
        from ulmfit_jax import qrnn
        return qrnn.export_qrnn_encoder(params, config, prefix)
    out = {}
    for path, keys in _encoder_keys(prefix, config.n_layers, config.bidirectional, "v2").items():
        value = params
        for part in path:
            value = value[part]
        for key in keys:
            out[key] = np.asarray(value, dtype=np.float32)
    return out


def export_language_model(params: dict, config: LanguageModelConfig) -> dict[str, np.ndarray]:
    """-> a fastai v2 LM state dict that `get_language_model` loads strictly, its keys in the order of
    fastai's own state dict (encoder, then decoder), which `Learner.load_pretrained` relies on."""
    out = _export_encoder(params["encoder"], config.encoder, "0.")
    embed = out["0.encoder.weight"]
    out["1.decoder.weight"] = embed if config.tie_weights else np.asarray(params["decoder"]["weight"], np.float32)
    if config.out_bias:
        out["1.decoder.bias"] = np.asarray(params["decoder"]["bias"], np.float32)
    return out


def export_classifier(params: dict, batch_stats: list, config: ClassifierConfig) -> dict[str, np.ndarray]:
    """-> a fastai v2 classifier state dict (LinBnDrop: Linear at index 2, or 1 without dropout)."""
    out = _export_encoder(params["encoder"], config.encoder, "0.module.")
    for index, (block, stats, p) in enumerate(zip(params["head"], batch_stats, config.head_ps)):
        if "bias" in block:
            raise WeightsError("fastai v2's LinBnDrop has no linear bias; this head (from fastai v1) has one")
        bn, linear = f"1.layers.{index}.0", f"1.layers.{index}.{2 if p > 0 else 1}"
        out.update({f"{bn}.weight": block["bn_scale"], f"{bn}.bias": block["bn_bias"],
                    f"{bn}.running_mean": stats["mean"], f"{bn}.running_var": stats["var"],
                    f"{bn}.num_batches_tracked": np.zeros((), np.int64), f"{linear}.weight": block["weight"]})
    return {k: np.asarray(v) if v.dtype == np.int64 else np.asarray(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Vocabulary transfer

def match_embeddings(params: dict, old_vocab: list[str], new_vocab: list[str]) -> dict:
    """fastai's `match_embeds`: move an LM to a new vocabulary.

    Rows of tokens the old vocabulary has are copied; the others get the mean row (and the mean
    decoder bias). Returns new params; the rest of the tree is shared.
    """
    old_index = {token: i for i, token in enumerate(old_vocab)}
    found = np.array([old_index.get(token, -1) for token in new_vocab])

    def remap(matrix):
        matrix = np.asarray(matrix)
        mean = matrix.mean(axis=0)
        return np.where((found >= 0).reshape(-1, *([1] * (matrix.ndim - 1))), matrix[np.maximum(found, 0)], mean)

    encoder = dict(params["encoder"], embed=remap(params["encoder"]["embed"]))
    decoder = {name: remap(value) for name, value in params.get("decoder", {}).items()}
    return dict(params, encoder=encoder, decoder=decoder)
