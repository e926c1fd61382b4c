"""Classifying raw texts: scripts/predict.py against fastai 2.8.12's `learn.predict` loop and
`learn.get_preds` on a `test_dl`, on the same texts and the same weights.

The texts: `--n-texts` raw reviews of IMDb's test split (`--dataset imdb`, a fixed random choice,
read where they lie in the data folder and piped to the script, never copied), or TREC-6's
questions (`--dataset trec`, train then test, at most 5,952). The model: an AWD-LSTM classifier of
`--emb/--hidden/--layers` (128/384/2 by default), random-init with seed 0 on a vocabulary made from
the texts by our pipeline (`fast` tokenizer, min_freq 3, at most 10,000 words), two classes, saved
as a model directory with its tokenizer and exported to fastai with `scripts/convert_fastai.py
export`. Throughput does not depend on what the weights learned; both sides load the same ones,
and the report gives the largest difference of their probabilities.

- ours, `scripts/predict.py --model DIR` with the texts on stdin, one process per run, timed from
  outside, start to exit (imports, loading, tokenizing, compiling, predicting, printing one JSON
  line a text). `cold`: an empty persistent compilation cache for each run; `warm`: the cache the
  cold run left, as a user's second run finds it.
- fastai, in its own process (no JAX): a `Learner` from `text_classifier_learner(dls, AWD_LSTM,
  config=..., pretrained=False)` over `TextDataLoaders` with our vocabulary and fastai's default
  spaCy tokenizer (made from 64 of the texts: the Learner needs DataLoaders to know its
  tokenizer), the exported state dict loaded with `load_state_dict`. `get_preds`: `dls.test_dl(texts)`
  (tokenizing them) and `learn.get_preds(dl=...)`, timed together; `predict loop`: `learn.predict(text)`
  for each of the first `--loop-texts` texts (all by default), as a user classifying one text at a
  time does. Process start-up and the Learner's construction are not in fastai's times.

Each side runs `--repeats` times (the predict loop once), ours and fastai alternating; texts/s =
texts / median wall seconds. Results go to OUT/results.json; the last stdout line is that JSON.

    .venv/bin/python benchmarks/bench_predict.py                          # 10,000 IMDb reviews
    .venv/bin/python benchmarks/bench_predict.py --n-texts 500 --repeats 1 # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import git_state, machine, versions  # noqa: E402  (benchmarks/ is on sys.path)


def read_texts(data_dir: Path, dataset: str, n_texts: int) -> list[str]:
    """The benchmark's texts, the same on both sides: newlines turned into spaces (predict.py reads
    one text a line)."""
    from ulmfit_jax.text.datasets import read_imdb, read_trec
    if dataset == "imdb":
        texts = read_imdb(data_dir / "imdb", splits=("test",)).splits["test"].texts
        chosen = np.sort(np.random.default_rng(0).choice(len(texts), size=min(n_texts, len(texts)), replace=False))
        texts = [texts[i] for i in chosen]
    else:
        dataset_ = read_trec(data_dir / "trec")
        texts = (dataset_.splits["train"].texts + dataset_.splits["test"].texts)[:n_texts]
    return [" ".join(text.split()) for text in texts]


# ----------------------------------------------------------------------------------------------
# The model, made once in OUT

def make_model(args, texts: list[str]) -> dict:
    import jax

    from ulmfit_jax import checkpoint, models
    from ulmfit_jax.config import awd_lstm_clas_config
    from ulmfit_jax.text.pipeline import tokenize_corpus
    from ulmfit_jax.text.tokenizers import TokenizerSettings
    from ulmfit_jax.text.vocab import make_vocab

    model = args.out / "model"
    paths = {"model": model, "weights": args.out / "fastai" / "clas.pth", "vocab": args.out / "fastai" / "itos.pkl"}
    corpus = tokenize_corpus(texts, TokenizerSettings(), n_workers=0, use_cache=False, progress=False)
    vocab = make_vocab(corpus.counts(), min_freq=3, max_vocab=10_000)
    config = awd_lstm_clas_config(len(vocab), 2, emb_size=args.emb, n_hidden=args.hidden, n_layers=args.layers)
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(0), config)
    checkpoint.save_model(model, config, jax.tree.map(np.asarray, params), vocab,
                          batch_stats=jax.tree.map(np.asarray, batch_stats), classes=["neg", "pos"],
                          tokenizer=TokenizerSettings())
    subprocess.run([sys.executable, ROOT / "scripts" / "convert_fastai.py", "export", "--model", model, "--weights",
                    paths["weights"], "--vocab", paths["vocab"]], check=True, capture_output=True)
    return {**paths, "config": checkpoint.config_to_dict(config)["config"], "vocab_size": len(vocab),
            "tokens": int(corpus.offsets[-1])}


# ----------------------------------------------------------------------------------------------
# Ours

def run_ours(args, texts: list[str], model: Path, cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    command = [sys.executable, str(ROOT / "scripts" / "predict.py"), "--model", str(model), "--bs", str(args.bs),
               "--compilation-cache", str(cache)]
    start = time.perf_counter()
    done = subprocess.run(command, input="\n".join(texts) + "\n", capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"predict.py failed:\n{done.stderr[-4000:]}")
    lines = done.stdout.splitlines()
    if len(lines) != len(texts):
        raise SystemExit(f"predict.py printed {len(lines)} lines for {len(texts)} texts")
    probabilities = np.array([[json.loads(line)["probabilities"][c] for c in ("neg", "pos")] for line in lines])
    return {"wall_s": wall, "probabilities": probabilities}


# ----------------------------------------------------------------------------------------------
# fastai (its own process; imports no JAX)

def fastai_worker(plan: dict) -> dict:
    import pandas as pd
    import torch
    from fastai.text.all import AWD_LSTM, TextDataLoaders, text_classifier_learner
    from ulmfit_jax.text.vocab import load_vocab_pickle

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    texts = read_texts(Path(plan["data_dir"]), plan["dataset"], plan["n_texts"])
    vocab = load_vocab_pickle(plan["vocab"])
    config = plan["config"]
    encoder = config["encoder"]
    frame = pd.DataFrame({"text": texts[:64], "label": ["neg", "pos"] * 32})
    dls = TextDataLoaders.from_df(frame, text_col="text", label_col="label", valid_pct=0.25, seed=0,
                                  text_vocab=vocab, bs=plan["bs"], seq_len=config["bptt"], device="cpu")
    # the sizes; the dropouts stay fastai's (eval mode runs none, but a zero one drops its module,
    # which moves the head's keys)
    fastai_config = dict(emb_sz=encoder["emb_size"], n_hid=encoder["n_hidden"], n_layers=encoder["n_layers"],
                         pad_token=encoder["pad_token"], bidir=encoder["bidirectional"])
    learn = text_classifier_learner(dls, AWD_LSTM, config=fastai_config, pretrained=False, drop_mult=1.0,
                                    seq_len=config["bptt"], max_len=config["max_len"],
                                    lin_ftrs=list(config["hidden_sizes"]))
    assert list(dls.vocab[0]) == vocab and list(dls.vocab[1]) == ["neg", "pos"]
    learn.model.load_state_dict(torch.load(plan["weights"], weights_only=True))
    learn.model.eval()

    result = {"get_preds_s": []}
    for _ in range(plan["repeats"]):
        start = time.perf_counter()
        probabilities, _ = learn.get_preds(dl=learn.dls.test_dl(texts, bs=plan["bs"]))
        result["get_preds_s"].append(time.perf_counter() - start)
    result["probabilities"] = probabilities.numpy().tolist()
    loop = texts[:plan["loop_texts"]]
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        for text in loop:
            learn.predict(text)
    result.update(loop_s=time.perf_counter() - start, loop_texts=len(loop))
    return result


def run_fastai(args, model: dict, repeats: int) -> dict:
    plan = {"data_dir": str(args.data_dir), "dataset": args.dataset, "n_texts": args.n_texts, "bs": args.bs,
            "repeats": repeats, "loop_texts": args.loop_texts, "weights": str(model["weights"]),
            "vocab": str(model["vocab"]), "config": model["config"]}
    plan_path = args.out / "fastai_plan.json"
    plan_path.write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--fastai-plan", str(plan_path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the fastai worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    from ulmfit_jax.text.datasets import data_dir
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    parser.add_argument("--dataset", choices=("imdb", "trec"), default="imdb")
    parser.add_argument("--n-texts", type=int, default=10_000)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-texts", type=int, default=None, help="texts of fastai's predict loop (default all)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_predict")
    parser.add_argument("--fastai-plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fastai_plan is not None:
        print(json.dumps(fastai_worker(json.loads(args.fastai_plan.read_text()))))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    texts = read_texts(args.data_dir, args.dataset, args.n_texts)
    args.n_texts = len(texts)
    args.loop_texts = min(args.loop_texts or len(texts), len(texts))
    model = make_model(args, texts)
    started = {"machine": machine()}

    cold, warm, fastai_runs = [], [], []
    for repeat in range(args.repeats):
        cache = args.out / "xla_cache"
        shutil.rmtree(cache, ignore_errors=True)
        cold.append(run_ours(args, texts, model["model"], cache))
        warm.append(run_ours(args, texts, model["model"], cache))
        print(json.dumps({"repeat": repeat, "ours_cold_s": round(cold[-1]["wall_s"], 2),
                          "ours_warm_s": round(warm[-1]["wall_s"], 2)}), flush=True)
    fastai = run_fastai(args, model, args.repeats)
    print(json.dumps({"fastai_get_preds_s": [round(s, 2) for s in fastai["get_preds_s"]],
                      "fastai_loop_s": round(fastai["loop_s"], 2)}), flush=True)

    n = len(texts)
    median = lambda runs: statistics.median(r["wall_s"] for r in runs)
    ours_fastai_gap = float(np.abs(cold[0]["probabilities"] - np.asarray(fastai["probabilities"])).max())
    result = {
        "texts": n, "dataset": args.dataset, "tokens": model["tokens"], "vocab": model["vocab_size"],
        "model": f"AWD-LSTM classifier {args.emb}/{args.hidden}/{args.layers}, bptt {model['config']['bptt']}",
        "bs": args.bs, "repeats": args.repeats,
        "ours_cold": {"median_s": median(cold), "texts_per_s": n / median(cold), "runs_s": [r["wall_s"] for r in cold]},
        "ours_warm": {"median_s": median(warm), "texts_per_s": n / median(warm), "runs_s": [r["wall_s"] for r in warm]},
        "fastai_get_preds": {"median_s": statistics.median(fastai["get_preds_s"]),
                             "texts_per_s": n / statistics.median(fastai["get_preds_s"]),
                             "runs_s": fastai["get_preds_s"]},
        "fastai_predict_loop": {"texts": fastai["loop_texts"], "seconds": fastai["loop_s"],
                                "texts_per_s": fastai["loop_texts"] / fastai["loop_s"]},
        "max_abs_probability_difference": ours_fastai_gap,
        "machine_before": started["machine"], "machine_after": machine(),
        "versions": versions(("jax", "jaxlib", "torch", "fastai", "spacy")), "git": git_state(ROOT),
        "command": " ".join(["benchmarks/bench_predict.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\n| {n:,} {args.dataset} texts, {result['model']} | wall s (median) | texts/s |")
    print("|---|---|---|")
    for name, key in (("scripts/predict.py, cold compilation cache", "ours_cold"),
                      ("scripts/predict.py, warm compilation cache", "ours_warm"),
                      ("fastai test_dl + get_preds", "fastai_get_preds")):
        print(f"| {name} | {result[key]['median_s']:.1f} | {result[key]['texts_per_s']:,.0f} |")
    loop = result["fastai_predict_loop"]
    print(f"| fastai learn.predict loop ({loop['texts']:,} texts) | {loop['seconds']:.1f} | {loop['texts_per_s']:,.1f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
