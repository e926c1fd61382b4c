"""The command-line contract of scripts/convert_fastai.py and scripts/evaluate_lm.py."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastai_reference import fastai_language_model, torch
from ulmfit_jax.config import awd_lstm_lm_config

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_import_evaluate_export_round_trip(tmp_path):
    config = awd_lstm_lm_config(48, emb_size=8, n_hidden=10, n_layers=2)
    reference = fastai_language_model(config, seed=4).eval()
    torch.save({"model": reference.state_dict()}, tmp_path / "lm.pth")          # fastai's learn.save layout
    vocab = ["xxunk", "xxpad"] + [f"w{i}" for i in range(46)]
    (tmp_path / "itos.pkl").write_bytes(pickle.dumps(vocab))

    imported = json.loads(run("convert_fastai.py", "import", "--weights", tmp_path / "lm.pth",
                              "--vocab", tmp_path / "itos.pkl", "--out", tmp_path / "model").stdout.splitlines()[-1])
    assert imported["kind"] == "language_model" and imported["vocab"] == 48 and imported["n_layers"] == 2

    ids = np.random.default_rng(0).integers(0, 48, size=301)
    np.save(tmp_path / "ids.npy", ids)
    bs, bptt = 2, 7
    result = json.loads(run("evaluate_lm.py", "--model", tmp_path / "model", "--ids", tmp_path / "ids.npy",
                            "--bs", bs, "--bptt", bptt).stdout.splitlines()[-1])
    # fastai: the same rows (LMDataLoader layout), windows of bptt, state carried
    row = (len(ids) - 1) // bs
    inputs = torch.tensor(ids[:bs * row].reshape(bs, row))
    targets = torch.tensor(ids[1:bs * row + 1].reshape(bs, row))
    reference.reset()
    total = 0.0
    with torch.no_grad():
        for start in range(0, row, bptt):
            logits = reference(inputs[:, start:start + bptt])[0]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, 48), targets[:, start:start + bptt].reshape(-1),
                                                       reduction="sum").item()
    assert result["tokens"] == bs * row
    assert abs(result["loss"] - total / (bs * row)) < 1e-5
    assert abs(result["perplexity"] - np.exp(total / (bs * row))) < 1e-3

    run("convert_fastai.py", "export", "--model", tmp_path / "model", "--weights", tmp_path / "back.pth",
        "--vocab", tmp_path / "back.pkl")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(reference.state_dict())       # the order too: fastai's load_pretrained goes by position
    for key, value in reference.state_dict().items():
        assert torch.equal(back[key], value), key
    with open(tmp_path / "back.pkl", "rb") as handle:
        assert pickle.load(handle) == vocab


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_inputs_get_clear_errors(tmp_path):
    config = awd_lstm_lm_config(10, emb_size=4, n_hidden=6, n_layers=1)
    torch.save(fastai_language_model(config).state_dict(), tmp_path / "lm.pth")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Payload()]))
    result = run("convert_fastai.py", "import", "--weights", tmp_path / "lm.pth", "--vocab", tmp_path / "evil.pkl",
                 "--out", tmp_path / "model", check=False)
    assert result.returncode != 0 and "this must never run" not in result.stdout + result.stderr
    assert "vocab pickle" in result.stderr and not (tmp_path / "model").exists()

    (tmp_path / "short.pkl").write_bytes(pickle.dumps(["a", "b"]))
    result = run("convert_fastai.py", "import", "--weights", tmp_path / "lm.pth", "--vocab", tmp_path / "short.pkl",
                 "--out", tmp_path / "model", check=False)
    assert result.returncode != 0 and "has 2 tokens but the weights' embedding has 10 rows" in result.stderr
    result = run("convert_fastai.py", "import", "--weights", tmp_path / "lm.pth", "--vocab", tmp_path / "short.pkl",
                 "--out", tmp_path / "model", "--bptt", "20", check=False)
    assert result.returncode != 0 and "--bptt and --max-len are a classifier's" in result.stderr

    (tmp_path / "ok.pkl").write_bytes(pickle.dumps([f"t{i}" for i in range(10)]))
    run("convert_fastai.py", "import", "--weights", tmp_path / "lm.pth", "--vocab", tmp_path / "ok.pkl",
        "--out", tmp_path / "model")
    np.save(tmp_path / "ids.npy", np.array([1, 2, 10, 3]))
    result = run("evaluate_lm.py", "--model", tmp_path / "model", "--ids", tmp_path / "ids.npy", check=False)
    assert result.returncode != 0 and "outside the vocabulary [0, 10): [10]" in result.stderr
