"""benchmarks/bench_small_data.py gives fastai the documents our scripts train on."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ulmfit_jax import cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_small_data as bench  # noqa: E402


def fake_data(seed=0):
    rng = np.random.default_rng(seed)
    split = lambda n, labelled: SimpleNamespace(
        documents=[rng.integers(0, 50, rng.integers(3, 9)).astype(np.int32) for _ in range(n)],
        labels=rng.integers(0, 3, n) if labelled else None)
    return SimpleNamespace(splits={"train": split(90, True), "unsup": split(40, False), "test": split(30, True)})


def picked(data, selection):
    return [data.splits[name].documents[i] for name, rows in selection.items() for i in rows]


def same(a, b):
    """The same documents (fastai's loaders get them grouped by split: the order is theirs)."""
    return sorted(map(tuple, a)) == sorted(map(tuple, b))


def test_the_selection_is_the_scripts_own():
    data = fake_data()
    for names, subset, labelled in [(("train", "unsup"), None, False), (("train", "unsup"), 50, False),
                                    (("train",), 30, True), (("train",), None, True)]:
        documents, labels = cli.split_documents(data, names)
        documents, labels = cli.document_subset(documents, labels if labelled else None, subset, 7, "--flag")
        train, _, valid, _ = cli.validation_split(data, documents, labels, 7)
        selection = bench.document_selection(data, names, 7, subset, labelled=labelled)
        assert same(picked(data, selection["train"]), train) and same(picked(data, selection["valid"]), valid)
        if labelled and subset:
            train_labels = [data.splits["train"].labels[i] for i in selection["train"]["train"] + selection["valid"]["train"]]
            assert np.bincount(train_labels).tolist() == [10, 10, 10]
