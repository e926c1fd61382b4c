"""fastai 1.0.61's QRNN as the reference: a script that tests/test_qrnn.py runs in a subprocess.

fastai 1.0.61 (the last fastai with a QRNN) and fastai 2.8.12 share the package name `fastai`, so
1.0.61 lives in its own target directory (`.venv/fastai1`, see the Makefile) and runs here with
that directory first on PYTHONPATH:

    PYTHONPATH=.venv/fastai1 .venv/bin/python tests/fastai1_qrnn_reference.py jobs.json OUT_DIR

One change to fastai, and only one: `QRNNLayer.forward` activates the gate chunks in place
(`z_gate.tanh_()`, `f_gate.sigmoid_()`) on views returned by `chunk`, which PyTorch 2 refuses for
autograd ("Output 0 of SplitBackward0 is a view and is being modified inplace"). It is replaced
by `_out_of_place_forward` below, written from the layer's equations and otherwise line for line
fastai's (same source windowing, same zoneout, fastai's own `forget_mult_CPU`, same saved input and
returned cell).

Jobs (a JSON list):
- {"kind": "lm", "name", "seed", "config": get_language_model config, "tokens": npz path with
  `stream` int64[B, W*bptt + 1], "bptt", "n_windows", "init_scale"}: builds `get_language_model(
  AWD_LSTM, V, config)` (config has qrnn=True), redraws its parameters from U(-init_scale, init_scale)
  (fastai's own init gives logits too small to tell models apart), writes `NAME.pth` (its state dict) and `NAME.npz` with
  `logits_w` (eval mode, state carried across the W windows) and `grad/KEY` (train mode with every
  dropout set to 0: state carried through W windows, loss = cross-entropy + AR + TAR on the last).
- {"kind": "layer", "name", "seed", "input_size", "hidden_size", "bidirectional", "window",
  "save_prev_x", "inputs": npz path with `x` f32[B, W*T, D], `cotangents` f32[B, W*T, H_out],
  `hidden_cotangent` f32[n_dir, B, H], "n_windows"}: a one-layer `QRNN`, hidden passed from window
  to window (not detached), writes `NAME.pth` and `NAME.npz` with `output_w`, `hidden_w` and
  `grad/KEY`, `grad_x` for loss = sum_w <output_w, cotangent_w> + <last hidden, hidden_cotangent>.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastai.text.learner import get_language_model  # noqa: E402
from fastai.text.models import qrnn as fastai_qrnn  # noqa: E402
from fastai.text.models.awd_lstm import AWD_LSTM, dropout_mask  # noqa: E402

torch.set_num_threads(1)


def _out_of_place_forward(self, inp, hid=None):
    """fastai 1.0.61's `QRNNLayer.forward` with `tanh_()` / `sigmoid_()` made out of place."""
    y = self.linear(self._get_source(inp))
    if self.output_gate:
        z_gate, f_gate, o_gate = y.chunk(3, dim=2)
    else:
        z_gate, f_gate = y.chunk(2, dim=2)
    z_gate = torch.tanh(z_gate)
    f_gate = torch.sigmoid(f_gate)
    if self.zoneout and self.training:
        mask = dropout_mask(f_gate, f_gate.size(), self.zoneout).requires_grad_(False)
        f_gate = f_gate * mask
    z_gate, f_gate = z_gate.contiguous(), f_gate.contiguous()
    c_gate = fastai_qrnn.forget_mult_CPU(z_gate, f_gate, hid, self.batch_first, backward=self.backward)
    output = torch.sigmoid(o_gate) * c_gate if self.output_gate else c_gate
    if self.window > 1 and self.save_prev_x:
        if self.backward:
            self.prevX = (inp[:, :1] if self.batch_first else inp[:1]).detach()
        else:
            self.prevX = (inp[:, -1:] if self.batch_first else inp[-1:]).detach()
    idx = 0 if self.backward else -1
    return output, (c_gate[:, idx] if self.batch_first else c_gate[idx])


fastai_qrnn.QRNNLayer.forward = _out_of_place_forward


def _gradients(model) -> dict:
    return {f"grad/{k}": v.grad.numpy().copy() for k, v in model.state_dict(keep_vars=True).items()
            if getattr(v, "grad", None) is not None}


def _zero_dropouts(model) -> None:
    encoder, decoder = model[0], model[1]
    encoder.encoder_dp.embed_p = 0.0
    encoder.input_dp.p = 0.0
    for hidden_dp in encoder.hidden_dps:
        hidden_dp.p = 0.0
    for rnn in encoder.rnns:
        rnn.layers[0].linear.weight_p = 0.0
    decoder.output_dp.p = 0.0


def run_language_model(job, out_dir: Path) -> None:
    torch.manual_seed(job["seed"])
    config = dict(job["config"])
    model = get_language_model(AWD_LSTM, job["vocab_size"], config=config)
    # fastai's init makes tiny logits (embedding U(-0.1, 0.1)), so that even a wrong model can come
    # within the tolerances: draw every parameter from U(-scale, scale) instead, padding row zero.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-job["init_scale"], job["init_scale"])
        model[0].encoder.weight[config["pad_token"]] = 0.0
    torch.save(model.state_dict(), out_dir / f"{job['name']}.pth")
    stream = np.load(job["tokens"])["stream"]
    bptt, n_windows = job["bptt"], job["n_windows"]
    windows = [torch.tensor(stream[:, w * bptt:(w + 1) * bptt]) for w in range(n_windows)]
    results = {}

    model.eval()
    model.reset()
    with torch.no_grad():
        for w, tokens in enumerate(windows):
            results[f"logits_{w}"] = model(tokens)[0].numpy().copy()

    model.train()
    _zero_dropouts(model)
    model.reset()
    for tokens in windows[:-1]:
        model(tokens)            # carries (and detaches) the hidden state and the saved input
    decoded, raw_outputs, outputs = model(windows[-1])
    targets = torch.tensor(stream[:, (n_windows - 1) * bptt + 1:n_windows * bptt + 1])
    raw = raw_outputs[-1]
    loss = torch.nn.functional.cross_entropy(decoded.reshape(-1, decoded.shape[-1]), targets.reshape(-1))
    loss = loss + job["alpha"] * raw.pow(2).mean() + job["beta"] * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    loss.backward()
    results["loss"] = np.float64(loss.item())
    results.update(_gradients(model))
    np.savez(out_dir / f"{job['name']}.npz", **results)


def run_layer(job, out_dir: Path) -> None:
    torch.manual_seed(job["seed"])
    layer = fastai_qrnn.QRNN(job["input_size"], job["hidden_size"], n_layers=1, bidirectional=job["bidirectional"],
                             save_prev_x=job["save_prev_x"], window=job["window"], output_gate=True)
    torch.save(layer.state_dict(), out_dir / f"{job['name']}.pth")
    data = np.load(job["inputs"])
    x = torch.tensor(data["x"], requires_grad=True)
    cotangents = torch.tensor(data["cotangents"])
    steps = x.shape[1] // job["n_windows"]
    n_dir = 2 if job["bidirectional"] else 1
    hidden = torch.zeros(n_dir, x.shape[0], job["hidden_size"])
    layer.reset()
    results, loss = {}, 0.0
    for w in range(job["n_windows"]):
        output, hidden = layer(x[:, w * steps:(w + 1) * steps], hidden)
        results[f"output_{w}"] = output.detach().numpy().copy()
        results[f"hidden_{w}"] = hidden.detach().numpy().copy()
        loss = loss + (output * cotangents[:, w * steps:(w + 1) * steps]).sum()
    loss = loss + (hidden * torch.tensor(data["hidden_cotangent"])).sum()
    loss.backward()
    results.update(_gradients(layer))
    results["grad_x"] = x.grad.numpy().copy()
    np.savez(out_dir / f"{job['name']}.npz", **results)


def main(jobs_path: str, out_dir: str) -> None:
    import fastai
    assert fastai.__version__ == "1.0.61", f"expected fastai 1.0.61, got {fastai.__version__}"
    out = Path(out_dir)
    for job in json.loads(Path(jobs_path).read_text()):
        {"lm": run_language_model, "layer": run_layer}[job["kind"]](job, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
