#!/usr/bin/env python
"""Tokenize + numericalize throughput: ulmfit_jax (`fast`) against fastai 2.8.12 (`SpacyTokenizer`), side by side
on the same IMDb reviews and the same number of worker processes.

    python benchmarks/bench_tokenize.py --limit 10000 --repeats 3      # a quick look
    python benchmarks/bench_tokenize.py --repeats 3                    # train + test + unsup: 100,000 reviews

Each measured run is a fresh child process (so peak memory and caches are its own) that reads the texts, then
times: fastai = `tokenize_texts(texts, n_workers, tok=SpacyTokenizer())` (rules, spaCy, post-rules in a
process pool, as `TextDataLoaders` does) + `Counter` + `make_vocab` + `Numericalize` on every document;
ulmfit_jax = `tokenize_corpus(texts, n_workers, use_cache=False)` + `make_vocab` + numericalize. Reported:
median wall seconds, tokens/s, CPU seconds (parent + workers; a fairer measure when the machine is shared),
peak resident memory of the parent and of the largest worker. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_texts(limit: int | None) -> list[str]:
    from ulmfit_jax.text.datasets import data_dir, read_imdb

    dataset = read_imdb(data_dir() / "imdb")
    texts = [text for split in ("train", "test", "unsup") for text in dataset.splits[split].texts]
    if limit is not None:
        step = max(1, len(texts) // limit)
        texts = texts[::step][:limit]  # spread over the splits
    return texts


def run_ours(texts, workers):
    from ulmfit_jax.text.pipeline import tokenize_corpus
    from ulmfit_jax.text.vocab import make_vocab, token_to_id

    corpus = tokenize_corpus(texts, n_workers=workers, use_cache=False, progress=False)
    vocab = make_vocab(corpus.counts())
    documents = corpus.numericalize(token_to_id(vocab))
    return int(corpus.offsets[-1]), len(vocab), len(documents)


def run_fastai(texts, workers):
    import collections

    from fastai.text.core import SpacyTokenizer, tokenize_texts
    from fastai.text.data import Numericalize

    tokens = tokenize_texts(texts, n_workers=workers, tok=SpacyTokenizer())
    counter = collections.Counter(token for document in tokens for token in document)
    numericalize = Numericalize(min_freq=3, max_vocab=60000)
    numericalize.setups(types.SimpleNamespace(counter=counter))  # what Datasets hands over after tokenizing
    documents = [numericalize(document) for document in tokens]
    return sum(len(document) for document in tokens), len(numericalize.vocab), len(documents)


def child(which: str, limit: int | None, workers: int) -> dict:
    texts = read_texts(limit)
    function = run_ours if which == "ours" else run_fastai
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    n_tokens, vocab_size, n_documents = function(texts, workers)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    return {"which": which, "documents": n_documents, "tokens": n_tokens, "vocab": vocab_size, "wall_s": wall,
            "cpu_s": cpu, "parent_peak_mb": after[0].ru_maxrss / 1024, "worker_peak_mb": after[1].ru_maxrss / 1024}


def versions() -> dict:
    import numpy
    import spacy

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "spacy": spacy.__version__,
           "machine": platform.machine(), "processor": platform.processor() or "",
           "cores_usable": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()}
    try:
        import fastai
        out["fastai"] = fastai.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            out["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, help="number of reviews (default: all 100,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--only", choices=("ours", "fastai"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(child(args.only, args.limit, args.workers)))
        return 0
    runs: dict[str, list[dict]] = {"ours": [], "fastai": []}
    for repeat in range(args.repeats):
        for which in ("ours", "fastai"):  # interleaved, so a change in machine load hits both
            command = [sys.executable, __file__, "--only", which, "--repeats", "1", "--workers", str(args.workers)]
            if args.limit:
                command += ["--limit", str(args.limit)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            run = json.loads(result.stdout.strip().splitlines()[-1])
            runs[which].append(run)
            print(f"repeat {repeat}: {which:6s} {run['wall_s']:8.2f} s wall {run['cpu_s']:8.2f} s cpu "
                  f"{run['tokens'] / run['wall_s']:12,.0f} tokens/s", file=sys.stderr, flush=True)
    summary = {"versions": versions(), "workers": args.workers, "repeats": args.repeats}
    for which, results in runs.items():
        summary[which] = {
            "documents": results[0]["documents"], "tokens": results[0]["tokens"], "vocab": results[0]["vocab"],
            "median_wall_s": statistics.median(r["wall_s"] for r in results),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in results),
            "tokens_per_s": results[0]["tokens"] / statistics.median(r["wall_s"] for r in results),
            "parent_peak_mb": max(r["parent_peak_mb"] for r in results),
            "worker_peak_mb": max(r["worker_peak_mb"] for r in results)}
    summary["speedup_wall"] = summary["fastai"]["median_wall_s"] / summary["ours"]["median_wall_s"]
    summary["speedup_cpu"] = summary["fastai"]["median_cpu_s"] / summary["ours"]["median_cpu_s"]
    summary["same_vocab_size"] = summary["fastai"]["vocab"] == summary["ours"]["vocab"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
