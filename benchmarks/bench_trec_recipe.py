"""The demo's ULMFiT recipe on TREC-6, end to end: fastai 2.8.12 (PyTorch CPU) vs ulmfit_jax, side by side.

Both sides run the demo's settings and stages (`ulmfit_jax.recipes.DemoSettings` and `recipes.DEMO`,
passed to the fastai side as JSON: the settings, and the stages as fastai's `freeze_to` / `unfreeze`
+ `fit_one_cycle` calls) from raw text to test accuracy, each in its own process on the same cores,
one after the other:
- ulmfit_jax: `scripts/demo.py --seed S [--from-scratch]` with an empty token cache and the
  persistent compilation cache off (`--warm-compilation-cache`: one cache shared by the runs).
- fastai: the same stages written the way a fastai user writes them: `tokenize_texts` (spaCy, fastai's
  rules), `make_vocab`, `LMDataLoader`, `get_language_model(AWD_LSTM, ...)` in a `TextLearner`
  (fastai's Adam, AR/TAR, `awd_lstm_lm_split`), `fit_one_cycle` with `GradientClip`, `match_embeds`,
  `freeze` / `unfreeze`, then `get_text_classifier` on `SortedDL` + `pad_input_chunk` batches with
  the recipe's `freeze_to(-1)`, `freeze_to(-2)`, `freeze_to(-3)`, `unfreeze` and `slice(lo, hi)`.
  Where ulmfit_jax does not validate (fine-tuning, the classifier) fastai skips validation too.

Each run is timed from outside (process start to exit, imports and compilation included) and from
inside (the script's own `seconds`, from reading the data). For every seed the pretrained (ULMFiT)
and the from-scratch classifier run on both sides; the order of the sides alternates with the seed.
Results are appended to OUT/results.jsonl as they come, and runs already there are not repeated, so
an interrupted benchmark resumes.

    .venv/bin/python benchmarks/bench_trec_recipe.py --seeds 0 1 2      # ~1.5 h on 2 cores

Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from common import cpu_model, versions  # noqa: E402  (benchmarks/ is on sys.path)


# ----------------------------------------------------------------------------------------- fastai
def run_fastai(recipe: dict, data_dir: Path, seed: int, from_scratch: bool) -> dict:
    """The recipe (`recipe_dict`) in fastai 2.8.12, in this process -> {"test_accuracy", "seconds", ...}."""
    from collections import Counter, defaultdict
    from functools import partial

    import torch
    from fastai.basics import CancelValidException, Callback, DataLoaders, set_seed
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (a Learner's default progress bar)
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
    from fastai.callback.training import GradientClip
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import Perplexity, accuracy
    from fastai.optimizer import Adam
    from fastai.text.core import tokenize_texts
    from fastai.text.data import LMDataLoader, SortedDL, pad_input_chunk
    from fastai.text.learner import TextLearner, match_embeds
    from fastai.text.models.awdlstm import (AWD_LSTM, awd_lstm_clas_config, awd_lstm_clas_split,
                                            awd_lstm_lm_config, awd_lstm_lm_split)
    from fastai.text.models.core import get_language_model, get_text_classifier
    from fastai.text.data import make_vocab

    from ulmfit_jax.text.datasets import read_jsonl_prefix, read_trec   # plain Python readers, no JAX

    class SkipValidation(Callback):
        def before_validate(self):
            raise CancelValidException()

    def numericalize(docs, vocab):
        index = defaultdict(int, {token: i for i, token in enumerate(vocab)})
        return [torch.tensor([index[token] for token in doc]) for doc in docs]

    def fit_stages(learn, stages):
        for stage in stages:
            if stage["freeze_to"] is None:
                learn.unfreeze()
            else:
                learn.freeze_to(stage["freeze_to"])
            lr = stage["lr"]
            learn.fit_one_cycle(stage["epochs"], slice(*lr["slice"]) if isinstance(lr, dict) else lr)

    r = recipe
    sizes = dict(emb_sz=r["emb_sz"], n_hid=r["n_hid"], n_layers=r["n_layers"])
    cpu = torch.device("cpu")
    start = time.time()
    set_seed(seed)
    trec = read_trec(data_dir / "trec")
    classes = sorted(set(trec.splits["train"].labels))
    trec_tokens = tokenize_texts(trec.splits["train"].texts)
    test_tokens = tokenize_texts(trec.splits["test"].texts)
    trec_vocab = make_vocab(Counter(t for doc in trec_tokens for t in doc), min_freq=r["trec_min_freq"])
    trec_ids, test_ids = numericalize(trec_tokens, trec_vocab), numericalize(test_tokens, trec_vocab)

    def learner(dls, model, splitter, **kwargs):
        return TextLearner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, splitter=splitter,
                           wd=r["weight_decay"], **kwargs)

    encoder_state = None
    if not from_scratch:
        wiki_tokens = tokenize_texts(read_jsonl_prefix(data_dir / "enwiki/AA.jsonl.gz", r["wiki_words"]))
        wiki_vocab = make_vocab(Counter(t for doc in wiki_tokens for t in doc), min_freq=r["wiki_min_freq"],
                                max_vocab=r["max_vocab"])
        wiki_ids = numericalize(wiki_tokens, wiki_vocab)
        held_out = wiki_ids[-1][-r["held_out_tokens"]:]
        wiki_ids[-1] = wiki_ids[-1][:-r["held_out_tokens"]]
        dls = DataLoaders(LMDataLoader(wiki_ids, bs=r["pretrain_bs"], seq_len=r["bptt"], shuffle=True),
                          LMDataLoader([held_out], bs=r["pretrain_bs"], seq_len=r["bptt"]), device=cpu)
        model = get_language_model(AWD_LSTM, len(wiki_vocab), config=dict(awd_lstm_lm_config, **sizes),
                                   drop_mult=r["pretrain_drop_mult"])
        learn = learner(dls, model, awd_lstm_lm_split, metrics=[accuracy, Perplexity()],
                        cbs=[GradientClip(r["pretrain_clip"])])
        learn.fit_one_cycle(r["pretrain_epochs"], r["pretrain_lr"])
        pretrain_valid = dict(zip(learn.recorder.metric_names[2:], learn.recorder.values[-1][1:]))

        weights = match_embeds(learn.model.state_dict(), wiki_vocab, trec_vocab)
        model = get_language_model(AWD_LSTM, len(trec_vocab), config=dict(awd_lstm_lm_config, **sizes),
                                   drop_mult=r["finetune_drop_mult"])
        model.load_state_dict(weights)
        dls = DataLoaders(LMDataLoader(trec_ids, bs=r["finetune_bs"], seq_len=r["bptt"], shuffle=True),
                          LMDataLoader(trec_ids[:1], bs=1, seq_len=r["bptt"]), device=cpu)
        learn = learner(dls, model, awd_lstm_lm_split, cbs=[SkipValidation()])
        fit_stages(learn, r["finetune_stages"])
        encoder_state = learn.model[0].state_dict()

    model = get_text_classifier(AWD_LSTM, len(trec_vocab), len(classes), seq_len=r["bptt"],
                                config=dict(awd_lstm_clas_config, **sizes), drop_mult=r["classifier_drop_mult"])
    if encoder_state is not None:
        model[0].module.load_state_dict(encoder_state)
    label = {c: i for i, c in enumerate(classes)}
    train_items = [(ids, label[c]) for ids, c in zip(trec_ids, trec.splits["train"].labels)]
    test_items = [(ids, label[c]) for ids, c in zip(test_ids, trec.splits["test"].labels)]
    collate = partial(pad_input_chunk, seq_len=r["bptt"])
    test_dl = SortedDL(test_items, before_batch=collate, bs=r["classifier_bs"])
    dls = DataLoaders(SortedDL(train_items, before_batch=collate, bs=r["classifier_bs"], shuffle=True,
                               drop_last=True), test_dl, device=cpu)
    skip = SkipValidation()
    learn = learner(dls, model, awd_lstm_clas_split, cbs=[skip])
    fit_stages(learn, r["classifier_stages"])
    learn.remove_cb(skip)
    probabilities, targets = learn.get_preds(dl=test_dl)
    accuracy_ = (probabilities.argmax(dim=1) == targets).float().mean().item()
    result = {"dataset": "trec6", "test_accuracy": accuracy_, "pretrained": not from_scratch, "seed": seed,
              "seconds": round(time.time() - start, 1)}
    if not from_scratch:
        result["pretrain_valid"] = {k: float(v) for k, v in pretrain_valid.items()}
    return result


# ----------------------------------------------------------------------------------------- driver
def run_one(side: str, seed: int, from_scratch: bool, args) -> dict:
    """One run in a fresh process -> its final JSON plus the wall time seen from outside."""
    with tempfile.TemporaryDirectory(prefix="bench_trec_") as scratch:
        # cold: an empty token cache, and no compilation cache unless --warm-compilation-cache
        compilation_cache = str(args.out / "compilation_cache") if args.warm_compilation_cache else "off"
        env = dict(os.environ, ULMFIT_CACHE_DIR=str(Path(scratch) / "token_cache"),
                   ULMFIT_COMPILATION_CACHE=compilation_cache)
        if side == "fastai":
            command = [sys.executable, __file__, "--run-fastai", "--seed", str(seed), "--data-dir",
                       str(args.data_dir), "--recipe", json.dumps(recipe_dict(args, from_scratch))]
        else:
            command = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--seed", str(seed), "--data-dir",
                       str(args.data_dir), "--out", str(Path(scratch) / "run"), "--no-download",
                       *recipe_flags(args)]
        if from_scratch:
            command.append("--from-scratch")
        start = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{side} seed {seed} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return dict(result, side=side, wall_seconds=round(wall, 1))


def recipe_dict(args, from_scratch: bool) -> dict:
    """The demo's settings and its stages as fastai calls (`bench_small_data.fastai_stage`: epochs,
    `freeze_to` or None for `unfreeze`, lr), for the fastai side (which does not import JAX). The
    stages are the ones scripts/demo.py builds (its `finetune_plan` and `classifier_plan`)."""
    from bench_small_data import fastai_stage
    from demo import classifier_plan, finetune_plan

    from ulmfit_jax.recipes import DemoSettings
    settings = DemoSettings(**args.recipe_overrides)
    lm_groups, clas_groups = settings.n_layers + 1, settings.n_layers + 2
    _, lm_stages = finetune_plan(settings, vocab_size=1)
    _, clas_stages = classifier_plan(settings, vocab_size=1, n_classes=2, from_scratch=from_scratch)
    return dict(dataclasses.asdict(settings),
                finetune_stages=[fastai_stage(s.epochs, s.optimizer, s.trainable, lm_groups) for s in lm_stages],
                classifier_stages=[fastai_stage(s.epochs, s.optimizer, s.trainable, clas_groups)
                                   for s in clas_stages])


def recipe_flags(args) -> list[str]:
    from ulmfit_jax import flags
    from ulmfit_jax.recipes import DemoSettings
    return flags.as_argv(DemoSettings(**args.recipe_overrides))


def summarize(results: list[dict], seeds) -> str:
    rows = ["| seed | variant | fastai acc | ulmfit_jax acc | fastai wall (s) | ulmfit_jax wall (s) | ratio |",
            "|---|---|---|---|---|---|---|"]
    summary = {}
    for variant, pretrained in (("ULMFiT", True), ("from scratch", False)):
        pairs = []
        for seed in seeds:
            by_side = {r["side"]: r for r in results if r["seed"] == seed and r["pretrained"] == pretrained}
            if len(by_side) < 2:
                continue
            f, j = by_side["fastai"], by_side["ulmfit_jax"]
            pairs.append((f, j))
            rows.append(f"| {seed} | {variant} | {f['test_accuracy']:.3f} | {j['test_accuracy']:.3f} | "
                        f"{f['wall_seconds']:.0f} | {j['wall_seconds']:.0f} | "
                        f"{j['wall_seconds'] / f['wall_seconds']:.2f}x |")
        if pairs:
            accuracy = {side: [p[k]["test_accuracy"] for p in pairs] for k, side in ((0, "fastai"), (1, "ulmfit_jax"))}
            wall = {side: statistics.median(p[k]["wall_seconds"] for p in pairs)
                    for k, side in ((0, "fastai"), (1, "ulmfit_jax"))}
            summary[variant] = {
                "seeds": len(pairs),
                "fastai_accuracy_mean": statistics.mean(accuracy["fastai"]),
                "ulmfit_jax_accuracy_mean": statistics.mean(accuracy["ulmfit_jax"]),
                "fastai_accuracy_std": statistics.pstdev(accuracy["fastai"]),
                "ulmfit_jax_accuracy_std": statistics.pstdev(accuracy["ulmfit_jax"]),
                "fastai_wall_median": wall["fastai"], "ulmfit_jax_wall_median": wall["ulmfit_jax"],
                "wall_ratio": wall["ulmfit_jax"] / wall["fastai"]}
            rows.append(f"| median / mean | {variant} | {summary[variant]['fastai_accuracy_mean']:.3f} | "
                        f"{summary[variant]['ulmfit_jax_accuracy_mean']:.3f} | {wall['fastai']:.0f} | "
                        f"{wall['ulmfit_jax']:.0f} | {wall['ulmfit_jax'] / wall['fastai']:.2f}x |")
    return "\n".join(rows), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ULMFIT_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=["pretrained", "scratch"], default=["pretrained", "scratch"])
    parser.add_argument("--sides", nargs="+", choices=["fastai", "ulmfit_jax"], default=["fastai", "ulmfit_jax"],
                        help="run only these sides (the other's results already in OUT are kept and compared)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_trec_recipe")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DemoSettings field on both sides (a smaller run: --set wiki_words=100000)")
    parser.add_argument("--warm-compilation-cache", action="store_true",
                        help="ulmfit_jax runs share a persistent compilation cache in OUT (the first run fills it)")
    parser.add_argument("--run-fastai", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--from-scratch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_fastai:
        print(json.dumps(run_fastai(json.loads(args.recipe), args.data_dir, args.seed, args.from_scratch)))
        return

    from ulmfit_jax.recipes import DemoSettings
    fields = {f.name: type(f.default) for f in dataclasses.fields(DemoSettings)}
    args.recipe_overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"error: --set {item}: DemoSettings has no field {name!r} ({', '.join(fields)})")
        args.recipe_overrides[name] = fields[name](value)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    results = [r for r in results if r.get("recipe_overrides", {}) == args.recipe_overrides
               and r.get("warm_compilation_cache", False) == args.warm_compilation_cache]
    done = {(r["side"], r["seed"], r["pretrained"]) for r in results}
    for seed in args.seeds:
        sides = ["fastai", "ulmfit_jax"] if seed % 2 == 0 else ["ulmfit_jax", "fastai"]
        for variant in args.variants:
            for side in sides:
                if side not in args.sides or (side, seed, variant == "pretrained") in done:
                    continue
                result = run_one(side, seed, variant == "scratch", args)
                result.update(recipe_overrides=args.recipe_overrides,
                              warm_compilation_cache=args.warm_compilation_cache)
                results.append(result)
                with results_path.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                print(json.dumps({k: result[k] for k in ("side", "seed", "pretrained", "test_accuracy",
                                                         "seconds", "wall_seconds")}), flush=True)
    table, summary = summarize(results, args.seeds)
    print(f"\n{cpu_model()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"{', '.join(f'{name} {version}' for name, version in versions().items())}")
    print(f"recipe: ulmfit_jax.recipes DemoSettings and DEMO{' with ' + str(args.recipe_overrides) if args.recipe_overrides else ''}\n")
    print(table)
    print(json.dumps({"benchmark": "trec_recipe", "recipe_overrides": args.recipe_overrides, **summary}))


if __name__ == "__main__":
    main()
