"""cli: the set-up the scripts share."""

import json
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ulmfit_jax import cli


@pytest.mark.skipif(cli.glibc_version() is None, reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_malloc_unless_turned_off(monkeypatch):
    import jax
    monkeypatch.setenv(cli.MALLOC_ENV, "default")
    assert cli.keep_freed_memory() is False
    monkeypatch.delenv(cli.MALLOC_ENV)
    dispatch = jax.config.values["jax_cpu_enable_async_dispatch"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # this process's backend may exist already
            assert cli.keep_freed_memory() is True         # glibc accepted every value (mallopt returned 1)
        assert jax.config.values["jax_cpu_enable_async_dispatch"] is False
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", dispatch)    # the other tests' setting


_FAULTS_PER_CALL = """
import ctypes, resource
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE: 4 KiB pages whatever the host's huge-page setting
import jax, jax.numpy as jnp
from ulmfit_jax import cli, lstm
cli.keep_freed_memory()
params, x = lstm.init_lstm_params(jax.random.key(0), 128, 384), jnp.ones((70, 64, 128))
state = (jnp.zeros((64, 384)), jnp.zeros((64, 384)))
step = jax.jit(jax.grad(lambda params: lstm.lstm_layer(params, x, state)[0].sum()))
temp = step.lower(params).compile().memory_analysis().temp_size_in_bytes
assert temp > 64 << 20, temp              # over what a worker thread's arena can hold
shares = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(params))
    shares.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (temp / 4096))
print(sorted(shares)[4])                  # the median call's page faults / the buffer's pages
"""


@pytest.mark.skipif(cli.glibc_version() is None, reason="mallopt is glibc's")
def test_keep_freed_memory_stops_each_step_faulting_its_buffers_back_in():
    """An LSTM layer's gradient, whose intermediates need over 64 MB, run again and again in a fresh
    process: with the settings their pages are faulted in once, not on every call as with glibc's
    defaults."""
    import os
    import subprocess
    import sys

    def faulted_share(malloc):
        env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, cli.MALLOC_ENV: malloc,
               "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    assert faulted_share("default") > 0.5
    assert faulted_share("keep") < 0.25        # a few pages of other buffers may fault, not the block


def test_document_subset_is_balanced_seeded_and_keeps_the_order():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    documents = [np.array([i]) for i in range(100)]
    chosen, chosen_labels = cli.document_subset(documents, labels, 10, seed=3, flag="--train-docs")
    assert np.bincount(chosen_labels).tolist() == [4, 3, 3]                # 10 // 3 each, the first class one more
    rows = [int(d[0]) for d in chosen]
    assert rows == sorted(rows) and (labels[rows] == chosen_labels).all()
    again, _ = cli.document_subset(documents, labels, 10, seed=3, flag="--train-docs")
    other, _ = cli.document_subset(documents, labels, 10, seed=4, flag="--train-docs")
    assert [int(d[0]) for d in again] == rows != [int(d[0]) for d in other]
    unlabelled, none = cli.document_subset(documents, None, 7, seed=0, flag="--max-docs")
    assert none is None and len({int(d[0]) for d in unlabelled}) == 7
    every, every_label = cli.document_subset(documents, labels, None, seed=0, flag="--train-docs")
    assert every is documents and every_label is labels


@pytest.mark.parametrize("n, message", [(0, "between 1 and the 100"), (101, "between 1 and the 100"),
                                        (2, "at least one of each of the 3 classes"),
                                        (70, "class 2 has 20 documents, a balanced choice needs 23")])
def test_document_subset_refuses_what_it_cannot_choose(n, message):
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    with pytest.raises(SystemExit, match=message):
        cli.document_subset([np.array([i]) for i in range(100)], labels, n, seed=0, flag="--train-docs")


def test_labelled_training_documents_are_the_train_split_subset_or_refused():
    labels = np.array([0, 1] * 10)
    train = SimpleNamespace(documents=[np.array([i]) for i in range(20)], labels=labels)
    data = SimpleNamespace(classes=["neg", "pos"], splits={"train": train, "unsup": SimpleNamespace(
        documents=[np.array([99])], labels=None)})
    chosen, chosen_labels = cli.labelled_training_documents(data, "data/x", 6, 4, "--train-docs")
    expected, expected_labels = cli.document_subset(train.documents, labels, 6, 4, "--train-docs")
    assert [int(d[0]) for d in chosen] == [int(d[0]) for d in expected]          # the train split's, not unsup's
    assert chosen_labels.tolist() == expected_labels.tolist() and sorted(chosen_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(SystemExit, match="--labelled-docs: data/y has no labelled train split"):
        cli.labelled_training_documents(SimpleNamespace(classes=None, splits={"unsup": data.splits["unsup"]}),
                                        "--labelled-docs: data/y", 6, 4, "--labelled-docs")


def test_finish_prints_strict_json_and_final_epoch_reads_a_finished_run(tmp_path, capsys):
    cli.finish({"stage": "pretrain", "valid_loss": 1.25}, SimpleNamespace(tokens_per_second=math.nan,
                                                                        compile_seconds=0.0), time.time())
    printed = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert printed["tokens_per_s"] is None and printed["valid_loss"] == 1.25
    assert cli.final_epoch(tmp_path, [{"epoch": 3}]) == {"epoch": 3}
    assert cli.final_epoch(tmp_path, []) == {}                               # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "step": 5}\n{"epoch": 1, "step": 9}\n'
                                            '{"resumed_from_step": 9}\n')
    assert cli.final_epoch(tmp_path, []) == {"epoch": 1, "step": 9}


def test_a_resumed_runs_plot_has_every_epoch_once(tmp_path, monkeypatch):
    """The first process recorded epochs 0 and 1 and was stopped before epoch 1's checkpoint; the
    rerun trains epoch 1 again and epoch 2: the plot shows epochs 1, 2, 3, epoch 2's newest loss."""
    import matplotlib.axes
    (tmp_path / "metrics.jsonl").write_text('{"stage": "finetune", "epoch": 0, "train_loss": 3.0}\n'
                                            '{"stage": "finetune", "epoch": 1, "train_loss": 2.5}\n')
    log = cli.RunLog(tmp_path, "finetune")
    log({"resumed_from_step": 10})
    log({"epoch": 1, "train_loss": 2.25})
    log({"epoch": 2, "train_loss": 2.0})
    plotted = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda axis, x, y, **_: plotted.append((list(x), list(y))))
    assert log.plot() == tmp_path / "finetune_metrics.png" and log.plot_path.exists()
    assert plotted == [([1, 2, 3], [3.0, 2.25, 2.0])]
    assert [r["epoch"] for r in cli.epoch_records(tmp_path)] == [0, 1, 2]
