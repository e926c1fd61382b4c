#!/usr/bin/env python
"""Compiles and padding of one IMDb classifier epoch: ulmfit_jax's batch layout beside fastai 2.8.12's.

XLA compiles a program per input shape, so the number of distinct batch shapes of an epoch is the
number of train-step compiles it costs (ulmfit_jax compiles one per shape of its layout ahead, before
the first step, and one program serves every stage). fastai retraces nothing, but its per-batch shapes
show how much padding it computes. Both sides lay out the same documents:

- the documents: IMDb's 25,000 training reviews (and its 25,000 test reviews, for the validation /
  prediction layout), read where they lie (`../shared/data/imdb`, or `$ULMFIT_DATA_DIR/imdb`) and
  tokenized with ulmfit_jax's tokenizer (`tokenize_corpus`, default settings; its on-disk token
  cache makes a rerun skip this), numericalized over a vocabulary counted on the training reviews
  (fastai's `make_vocab`: min_freq 3, max 60,000). Only the lengths matter for shapes and padding.
- ulmfit_jax: what `train.fit_classifier` does with `bs` 64: `train.classifier_layout` (the bucket
  lengths `text.batches.bucket_lengths` chooses for `--epochs` epochs over the training reviews and
  one prediction of the test reviews, widths multiples of bptt, or of 8 within one window),
  `classifier_batches(train=True)` with the RandomState of `[seed, epoch]`, full documents (no
  truncation: BPT3C's max_len 1440 acts in the model). Compiles: the train-step programs `fit_classifier` compiles ahead (one per entry of `settings.lengths`), the
  distinct shapes the epochs actually use, and the evaluation programs it compiles for the test
  reviews (one per `padded_length` of a document). Also: epoch 0 by width (batches, share of the
  positions, padding), and its shapes and padding with every bucket its own length (`lengths=None`).
- fastai: `SortedDL` (its sortish `shuffle_fn`, bs 64, drop_last for training) with
  `Pad_Chunk(seq_len)`, the `before_batch` of `TextBlock`, over the same id tensors; the validation
  loader unshuffled (sorted by length, longest first), bs 64, no drop_last. Its training order is
  drawn from `np.random` seeded with the same `[seed, epoch]` state, so both sides batch the same
  documents (checked: each batch's longest document is the same).

Reported for each side and split: batches, distinct shapes, padding share of the batch tensors
(padding positions / all positions), and the share of padding among the positions the LSTM
computes: fastai's `SentenceEncoder` feeds window i only the rows whose token at i is not padding
(`real_bs`), so the whole windows of front padding cost it nothing; ulmfit_jax computes every row of
every window of its fixed-shape batches; the ratio of the two sides' LSTM positions in epoch 0 is
the extra recurrent work of the fixed shapes (forward; the backward pass covers only BPT3C's kept
windows on both sides). Medians of the padded widths and the documents' lengths,
the machine and versions. Prints a table and, last, one JSON line.

    .venv/bin/python benchmarks/bench_imdb_shapes.py                 # bptt 70 and 72, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import git_state, machine, versions  # noqa: E402

PAD = 1


def read_documents(workers: int | None):
    """-> (train documents, train labels, test documents, test labels, seconds, tokens)."""
    from ulmfit_jax.text.datasets import data_dir, read_imdb
    from ulmfit_jax.text.pipeline import tokenize_corpus
    from ulmfit_jax.text.vocab import make_vocab, token_to_id

    folder = data_dir() / "imdb"
    if not (folder / "train.jsonl.gz").exists() or not (folder / "test.jsonl.gz").exists():
        raise SystemExit(f"bench_imdb_shapes: IMDb not found at {folder} (set ULMFIT_DATA_DIR)")
    started = time.perf_counter()
    dataset = read_imdb(folder, splits=("train", "test"))
    corpora = {name: tokenize_corpus(dataset.splits[name].texts, n_workers=workers, progress=False)
               for name in ("train", "test")}
    index = token_to_id(make_vocab(corpora["train"].counts()))
    out = []
    for name in ("train", "test"):
        labels = dataset.splits[name].labels
        classes = sorted(set(labels))
        out += [corpora[name].numericalize(index), np.array([classes.index(x) for x in labels], np.int32)]
    return (*out, time.perf_counter() - started, {name: int(c.offsets[-1]) for name, c in corpora.items()})


def computed_positions(tokens: np.ndarray, seq_len: int) -> tuple[int, int]:
    """(positions, padding positions) fastai's SentenceEncoder feeds the LSTM for a batch in its
    layout: window i takes the rows `:real_bs`, real_bs = rows whose token at i is not padding."""
    total = pad = 0
    for start in range(0, tokens.shape[1], seq_len):
        real_bs = int((tokens[:, start] != PAD).sum())
        window = tokens[:real_bs, start:start + seq_len]
        total += window.size
        pad += int((window == PAD).sum())
    return total, pad


def summarize(shapes: list[tuple[int, int]], positions: int, pads: int, computed: int, computed_pads: int) -> dict:
    widths = [w for _, w in shapes]
    distinct = sorted({w for _, w in shapes})
    return {"batches": len(shapes), "distinct_shapes": len(set(shapes)),
            "widths": distinct if len(distinct) <= 40 else f"{len(distinct)} widths, {distinct[0]}-{distinct[-1]}",
            "median_width": statistics.median(widths),
            "positions": positions, "padding_share": round(pads / positions, 4),
            "lstm_positions": computed, "lstm_padding_share": round(computed_pads / computed, 4)}


def ours(train_docs, train_labels, test_docs, bptt: int, bs: int, seed: int, epochs: int) -> dict:
    """ulmfit_jax's layout, as `train.fit_classifier` makes it."""
    import dataclasses

    from ulmfit_jax import train
    from ulmfit_jax.config import awd_lstm_clas_config
    from ulmfit_jax.text.batches import classifier_batches, padded_length

    config = awd_lstm_clas_config(60_000, 2, bptt=bptt)
    settings, steps_per_epoch = train.classifier_layout(config, train_docs, bs, epochs=epochs,
                                                        predict_documents=test_docs)
    result = {"bptt": bptt, "max_len": config.max_len, "bucket_lengths": list(settings.lengths),
              "train_step_programs": len(settings.lengths), "steps_per_epoch": steps_per_epoch}
    epoch_shapes, union, per_batch_longest = [], set(), []
    for epoch in range(epochs):
        shapes, positions, pads = [], 0, 0
        rng = np.random.RandomState([seed, epoch])        # as fit_classifier's epoch_batches
        for batch in classifier_batches(train_docs, train_labels, settings, train=True, rng=rng):
            shapes.append(batch.tokens.shape)
            positions += batch.tokens.size
            pads += int((~batch.token_mask).sum())
            if epoch == 0:
                per_batch_longest.append(int(batch.lengths.max()))
        summary = summarize(shapes, positions, pads, positions, pads)     # the LSTM runs every position
        epoch_shapes.append(summary)
        union |= set(shapes)
    result["train_epochs"] = epoch_shapes
    result["train_distinct_shapes_all_epochs"] = len(union)
    result["per_batch_longest_epoch0"] = per_batch_longest

    every_bucket = dataclasses.replace(settings, lengths=None)
    shapes, positions, pads, per_width = [], 0, 0, {}
    for batch in classifier_batches(train_docs, train_labels, settings, train=True,
                                    rng=np.random.RandomState([seed, 0])):
        row = per_width.setdefault(batch.tokens.shape[1], {"batches": 0, "positions": 0, "padding": 0})
        row["batches"] += 1
        row["positions"] += batch.tokens.size
        row["padding"] += int((~batch.token_mask).sum())
    result["train_epoch0_by_width"] = {w: {**r, "padding_share": round(r["padding"] / r["positions"], 4)}
                                       for w, r in sorted(per_width.items())}
    for batch in classifier_batches(train_docs, train_labels, every_bucket, train=True,
                                    rng=np.random.RandomState([seed, 0])):
        shapes.append(batch.tokens.shape)
        positions += batch.tokens.size
        pads += int((~batch.token_mask).sum())
    result["train_epoch0_every_bucket"] = summarize(shapes, positions, pads, positions, pads)

    shapes, positions, pads = [], 0, 0
    for batch in classifier_batches(test_docs, None, settings, train=False):
        shapes.append(batch.tokens.shape)
        positions += batch.tokens.size
        pads += int((~batch.token_mask).sum())
    result["test"] = summarize(shapes, positions, pads, positions, pads)
    result["evaluation_programs"] = len({padded_length(len(d), settings) for d in test_docs})
    return result


def fastai_side(train_docs, train_labels, test_docs, test_labels, seq_len: int, bs: int, seed: int,
                epochs: int) -> dict:
    """fastai 2.8.12's SortedDL + Pad_Chunk over the same documents."""
    import torch
    from fastai.text.data import Pad_Chunk, SortedDL, TensorText
    from fastai.torch_core import TensorCategory

    def items(docs, labels):
        return [(TensorText(torch.from_numpy(np.asarray(d, dtype=np.int64))), TensorCategory(int(y)))
                for d, y in zip(docs, labels)]

    def measure(loader, widths=None):
        shapes, positions, pads, computed, computed_pads = [], 0, 0, 0, 0
        for xb, _ in loader:
            tokens = xb.numpy()
            shapes.append(tokens.shape)
            positions += tokens.size
            pads += int((tokens == PAD).sum())
            c, cp = computed_positions(tokens, seq_len)
            computed += c
            computed_pads += cp
            if widths is not None:
                widths.append(tokens.shape[1])
        return summarize(shapes, positions, pads, computed, computed_pads)

    train_items = items(train_docs, train_labels)
    lengths = [len(d) for d in train_docs]
    train_dl = SortedDL(train_items, res=lengths, before_batch=Pad_Chunk(seq_len=seq_len), bs=bs, shuffle=True,
                        drop_last=True, device=torch.device("cpu"))
    result = {"seq_len": seq_len, "train_epochs": []}
    widths = []                            # every training batch's width, epoch after epoch
    for epoch in range(epochs):
        np.random.set_state(np.random.RandomState([seed, epoch]).get_state())
        result["train_epochs"].append(measure(train_dl, widths))
    result["train_distinct_shapes_all_epochs"] = len(set(widths))
    result["per_batch_longest_epoch0"] = widths[:result["train_epochs"][0]["batches"]]
    test_dl = SortedDL(items(test_docs, test_labels), res=[len(d) for d in test_docs],
                       before_batch=Pad_Chunk(seq_len=seq_len), bs=bs, shuffle=False, drop_last=False,
                       device=torch.device("cpu"))
    result["test"] = measure(test_dl)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bptt", type=int, nargs="+", default=[70, 72], help="ours: bptt; fastai: seq_len")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs laid out (shapes over all of them)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: the usable cores)")
    args = parser.parse_args()

    train_docs, train_labels, test_docs, test_labels, read_s, tokens = read_documents(args.workers)
    lengths = np.array([len(d) for d in train_docs])
    data = {"train_documents": len(train_docs), "test_documents": len(test_docs), "tokens": tokens,
            "read_and_tokenize_s": round(read_s, 1),
            "train_length": {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                             "max": int(lengths.max()), "share_over_1440": round(float((lengths > 1440).mean()), 4)}}
    sides = []
    for bptt in args.bptt:
        started = time.perf_counter()
        mine = ours(train_docs, train_labels, test_docs, bptt, args.bs, args.seed, args.epochs)
        theirs = fastai_side(train_docs, train_labels, test_docs, test_labels, bptt, args.bs, args.seed, args.epochs)
        same = mine.pop("per_batch_longest_epoch0") == theirs.pop("per_batch_longest_epoch0")
        theirs_positions = theirs["train_epochs"][0]["lstm_positions"]
        ratio = {"chosen": mine["train_epochs"][0]["positions"] / theirs_positions,
                 "every_bucket": mine["train_epoch0_every_bucket"]["positions"] / theirs_positions}
        sides.append({"lstm_positions_ours_over_fastai_epoch0": {k: round(v, 3) for k, v in ratio.items()},
                      "bptt": bptt, "ours": mine, "fastai": theirs, "same_batches_epoch0": same,
                      "seconds": round(time.perf_counter() - started, 1)})

    print(f"IMDb classifier epoch, bs {args.bs}: {data['train_documents']:,} training reviews "
          f"(median {data['train_length']['median']:.0f} tokens, max {data['train_length']['max']:,}, "
          f"{data['train_length']['share_over_1440']:.1%} over 1440), {data['test_documents']:,} test reviews")
    print("| bptt | side | split | batches | distinct shapes (compiles) | median width | padding share | "
          "LSTM-computed padding share |")
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        for name in ("ours", "fastai"):
            record = side[name]
            epoch = record["train_epochs"][0]
            shapes = epoch["distinct_shapes"]
            if name == "ours":
                shapes = f"{shapes} used / {record['train_step_programs']} compiled ahead"
            print(f"| {side['bptt']} | {name} | train epoch 0 | {epoch['batches']} | {shapes} | "
                  f"{epoch['median_width']:.0f} | {epoch['padding_share']:.1%} | {epoch['lstm_padding_share']:.1%} |")
            test = record["test"]
            shapes = test["distinct_shapes"]
            if name == "ours":
                shapes = f"{shapes} ({record['evaluation_programs']} evaluation programs compiled)"
            print(f"| {side['bptt']} | {name} | test | {test['batches']} | {shapes} | {test['median_width']:.0f} | "
                  f"{test['padding_share']:.1%} | {test['lstm_padding_share']:.1%} |")
    for side in sides:
        every = side["ours"]["train_epoch0_every_bucket"]
        print(f"bptt {side['bptt']}: ours with every bucket (lengths=None): {every['distinct_shapes']} shapes, "
              f"padding {every['padding_share']:.1%}, {every['positions']:,} positions; as trained: "
              f"{side['ours']['train_epochs'][0]['positions']:,} positions; LSTM positions of epoch 0, ours / fastai's: "
              f"{side['lstm_positions_ours_over_fastai_epoch0']['chosen']:.2f} with the chosen lengths, "
              f"{side['lstm_positions_ours_over_fastai_epoch0']['every_bucket']:.2f} with every bucket; ours by width: "
              + ", ".join(f"{w}: {r['batches']} batches, {r['positions'] / side['ours']['train_epochs'][0]['positions']:.0%}"
                          f" of positions, {r['padding_share']:.0%} padding"
                          for w, r in side["ours"]["train_epoch0_by_width"].items()))
    print(json.dumps({"benchmark": "imdb_shapes", "env": {**machine(), "versions": versions(), **git_state(ROOT)},
                      "settings": vars(args), "data": data, "results": sides}))


if __name__ == "__main__":
    main()
