"""fastai's LR finder (ulmfit_jax.lr_find, scripts/lr_find.py) against fastai 2.8.12's own functions."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ulmfit_jax import checkpoint, lr_find, models, optim
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
from ulmfit_jax.text.datasets import PREPARED_FORMAT, save_split
from ulmfit_jax.text.rules import SPECIAL_TOKENS

torch = pytest.importorskip("torch")
schedule = pytest.importorskip("fastai.callback.schedule")
from fastai.learner import AvgSmoothLoss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _curve(seed, n=90):
    """A finder-like record: falling, flat, then rising smoothed losses with noise, f32."""
    rng = np.random.default_rng(seed)
    lrs = (1e-7 * (10 / 1e-7) ** (np.arange(n) / 100)).astype(np.float32)
    x = np.log10(lrs)
    losses = 4 - 1.5 / (1 + np.exp(-(x + 4) * 2)) + np.maximum(x + 1.5, 0) ** 2 + rng.normal(0, 0.03, n)
    return lrs, losses.astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_suggestions_equal_fastai(seed):
    lrs, losses = _curve(seed)
    for name in lr_find.SUGGESTIONS:
        expected_lr, (point_lr, point_loss) = getattr(schedule, name)(torch.tensor(lrs), torch.tensor(losses), 100)
        lr, point = lr_find.SUGGESTION_FUNCTIONS[name](lrs, losses)
        assert lr == pytest.approx(expected_lr, rel=1e-6), name
        assert point == pytest.approx((float(point_lr), float(point_loss)), rel=1e-6), name


def test_exponential_schedule_equals_fastai_sched_exp():
    expected = schedule.SchedExp(1e-7, 10.0)
    ours = optim.exponential(1e-7, 10.0, 100)
    steps = np.arange(100)
    np.testing.assert_allclose(np.asarray(jax.vmap(ours)(steps)), [expected(t / 100) for t in steps], rtol=2e-6)
    # per group through OptimizerConfig, as fastai's LRFinder does with a list of start / end lrs
    config = optim.OptimizerConfig(schedule=optim.Exponential((1e-6, 1e-5, 1e-4), (1.0, 2.0, 3.0)))
    for group, (start, end) in enumerate(zip((1e-6, 1e-5, 1e-4), (1.0, 2.0, 3.0))):
        values = jax.vmap(optim.learning_rate_schedules(config, 3, 50)[group])(np.arange(50))
        np.testing.assert_allclose(values, [schedule.SchedExp(start, end)(t / 50) for t in range(50)], rtol=2e-6)


def _fake_step(raw):
    """A `step` whose loss at call i is raw[i] (carry counts the calls)."""
    return lambda count, _batch: (count + 1, raw[count])


def _fastai_smoothed(raw):
    metric, out = AvgSmoothLoss(), []

    class Learn:
        pass

    learn = Learn()
    for loss in raw:
        learn.loss = torch.tensor(loss, dtype=torch.float32)
        metric.accumulate(learn)
        out.append(float(metric.value))
    return np.asarray(out, np.float32)


def test_smoothing_and_stop_at_divergence():
    finder = lr_find.FinderConfig(num_it=60)
    falling = list(np.linspace(5.0, 2.0, 30)) + list(2.0 * 1.25 ** np.arange(1, 31))
    record = lr_find.run_finder(_fake_step(falling), 0, iter(range(1000)), finder, lambda i: 1e-7 * 10 ** (i / 7))
    expected = _fastai_smoothed(falling)
    # fastai's LRFinder.after_batch: best tracked, stop after the first step with smoothed > 4 * best
    stop = next(i for i in range(60) if expected[i] > 4 * expected[:i + 1].min())
    assert record.stopped == "diverged" and record.lrs.size == stop + 1
    np.testing.assert_allclose(record.losses, expected[:stop + 1], rtol=1e-6)
    np.testing.assert_allclose(record.raw_losses, np.float32(falling[:stop + 1]))
    np.testing.assert_allclose(record.lrs, [1e-7 * 10 ** (i / 7) for i in range(stop + 1)])

    steady = lr_find.run_finder(_fake_step([1.0] * 100), 0, iter(range(1000)), finder, float)
    assert steady.stopped == "num_it" and steady.lrs.size == 60
    tiny = lr_find.run_finder(_fake_step([1.0] * 10), 0, iter(range(1000)), lr_find.FinderConfig(num_it=2), float)
    assert tiny.lrs.size == 6                                      # fastai's LRFinder runs at least 6
    with pytest.raises(ValueError, match="ran out after 3 batches"):
        lr_find.run_finder(_fake_step([1.0] * 10), 0, iter(range(3)), finder, float)


def test_nan_stops_and_the_window_is_fastais():
    raw = list(np.linspace(5.0, 3.0, 40)) + [float("nan")] * 60
    record = lr_find.run_finder(_fake_step(raw), 0, iter(range(1000)), lr_find.FinderConfig(), float)
    assert record.stopped == "non-finite" and record.lrs.size == 41
    # fastai would have recorded NaN to step 100: window [10:95], cut at the first NaN -> [10:40]
    lrs, losses = lr_find.suggestion_window(record)
    np.testing.assert_array_equal(lrs, np.arange(10, 40, dtype=np.float32))
    assert not np.isnan(losses).any()
    short = lr_find.run_finder(_fake_step([1.0, 1.0, 100.0]), 0, iter(range(9)), lr_find.FinderConfig(), float)
    with pytest.raises(ValueError, match="too few points"):
        lr_find.suggest(short)


# ----------------------------------------------------------------------------------------------
# Real training steps


WORDS = [f"w{i}" for i in range(31)]
VOCAB = list(SPECIAL_TOKENS) + WORDS      # 40 tokens


def _prepared(folder, n_docs=40, labels=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    documents = [np.concatenate([[2], rng.integers(9, 40, rng.integers(8, 30))]).astype(np.int32)
                 for _ in range(n_docs)]
    doc_labels = rng.integers(0, 2, n_docs) if labels else None
    save_split(folder, "train", documents, doc_labels)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "meta.json").write_text(json.dumps({"format": PREPARED_FORMAT, "splits": {"train": {}}}))
    return documents, doc_labels


def _script():
    spec = importlib.util.spec_from_file_location("lr_find_script", ROOT / "scripts" / "lr_find.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_language_model_script(tmp_path, capsys):
    config = awd_lstm_lm_config(len(VOCAB), emb_size=8, n_hidden=12, n_layers=2)
    params = models.init_language_model(jax.random.PRNGKey(0), config)
    checkpoint.save_model(tmp_path / "lm", config, params, VOCAB)
    before = (tmp_path / "lm" / "params.npz").read_bytes()
    _prepared(tmp_path / "data")

    _script().main(["--model", str(tmp_path / "lm"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                    "--bs", "4", "--bptt", "10", "--num-it", "40", "--start-lr", "1e-4", "--end-lr", "1e3"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) >= {"valley", "minimum", "steep", "plot", "stopped"}
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    steps = len(saved["lrs"])
    np.testing.assert_allclose(saved["lrs"], [1e-4 * 1e7 ** (i / 40) for i in range(steps)], rtol=2e-6)
    assert out["stopped"] == "diverged" and steps < 40              # lr up to 1e3 blows up
    assert 1e-4 <= out["valley"] <= 1e3
    assert (tmp_path / "lm" / "params.npz").read_bytes() == before

    for args, message in ((("--model", tmp_path / "none"), "not a ulmfit_jax"),
                          (("--model", tmp_path / "lm", "--kind", "classifier"), "holds a lm"),
                          (("--model", tmp_path / "lm", "--bs", "100"), "too few")):
        with pytest.raises(SystemExit, match=message):
            _script().main([*(str(a) for a in args), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])


def test_classifier_finder_leaves_the_model_unchanged():
    config = awd_lstm_clas_config(len(VOCAB), 2, emb_size=8, n_hidden=12, n_layers=2, bptt=8, max_len=32)
    params, stats = models.init_classifier(jax.random.PRNGKey(1), config)
    copies = jax.tree.map(np.array, (params, stats))
    rng = np.random.default_rng(0)
    documents = [rng.integers(9, 40, rng.integers(3, 8)).astype(np.int32) for _ in range(24)]
    record = lr_find.find_classifier_lr(params, stats, config, documents, rng.integers(0, 2, 24), batch_size=8,
                                        finder=lr_find.FinderConfig(num_it=8))
    assert record.lrs.size == 8 and np.isfinite(record.losses).all()
    jax.tree.map(np.testing.assert_array_equal, (params, stats), copies)
    with pytest.raises(ValueError, match="one label per"):
        lr_find.find_classifier_lr(params, stats, config, documents, None, batch_size=8)
