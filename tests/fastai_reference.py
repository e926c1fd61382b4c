"""The PyTorch reference for golden tests: fastai 2.8.12's own modules, built from our configs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the golden tests need torch 2.13.0 (make test installs it)")
awdlstm = pytest.importorskip("fastai.text.models.awdlstm", reason="the golden tests need fastai 2.8.12")
fastai_core = pytest.importorskip("fastai.text.models.core")

torch.set_num_threads(1)


def encoder_kwargs(config) -> dict:
    return dict(emb_sz=config.emb_size, n_hid=config.n_hidden, n_layers=config.n_layers,
                pad_token=config.pad_token, bidir=config.bidirectional, hidden_p=config.hidden_p,
                input_p=config.input_p, embed_p=config.embed_p, weight_p=config.weight_p)


def fastai_language_model(config, seed: int = 0):
    """fastai's `get_language_model(AWD_LSTM, ...)` for an ulmfit_jax LanguageModelConfig."""
    torch.manual_seed(seed)
    model_config = dict(encoder_kwargs(config.encoder), output_p=config.output_p,
                        tie_weights=config.tie_weights, out_bias=config.out_bias)
    return fastai_core.get_language_model(awdlstm.AWD_LSTM, config.encoder.vocab_size, config=model_config)


def fastai_classifier(config, seed: int = 0):
    """fastai's `get_text_classifier(AWD_LSTM, ...)` for an ulmfit_jax ClassifierConfig."""
    torch.manual_seed(seed)
    model_config = dict(encoder_kwargs(config.encoder), output_p=config.head_ps[0])
    return fastai_core.get_text_classifier(
        awdlstm.AWD_LSTM, config.encoder.vocab_size, config.n_classes, seq_len=config.bptt, config=model_config,
        lin_ftrs=list(config.hidden_sizes), ps=list(config.head_ps[1:]), pad_idx=config.encoder.pad_token,
        max_len=config.max_len)


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def gradient_dict(model) -> dict[str, np.ndarray]:
    """{state-dict key: gradient} (tied tensors appear under every key they have)."""
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if getattr(tensor, "grad", None) is not None:
            out[key] = tensor.grad.numpy().copy()
        elif key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[key] = tensor.detach().numpy().copy()
    return out


def pad_input_chunk(docs: list[np.ndarray], pad_token: int, bptt: int) -> np.ndarray:
    """fastai's own `pad_input_chunk` over docs sorted by length, descending -> int64[B, S]."""
    from fastai.text.data import pad_input_chunk as fastai_pad
    samples = [(torch.tensor(d), 0) for d in docs]
    return np.stack([np.asarray(x) for x, _ in fastai_pad(samples, pad_idx=pad_token, seq_len=bptt)])
