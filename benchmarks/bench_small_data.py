"""ULMFiT stages 2-3 on a small labelled set, time to result: our scripts vs fastai 2.8.12.

What a user runs after pretraining: LM fine-tuning (`scripts/finetune_lm.py`), then the classifier
(`scripts/train_classifier.py --encoder ...`), each a fresh process, against the same recipe written
with fastai's own API in its own processes (two as well: fine-tuning, then the classifier).

Both sides start from one pretrained 128/384/2 AWD-LSTM LM: `scripts/pretrain_lm.py` on a prefix of
`enwiki/AA.jsonl.gz` (`--wiki-words`, one epoch, the demo's pretraining settings), made once and
kept in OUT/pretrain; `scripts/convert_fastai.py export` gives fastai its `.pth` and vocabulary
pickle, which fastai loads with `language_model_learner(..., pretrained=False)` +
`Learner.load_pretrained` (its `match_embeds` onto the data's vocabulary, as `finetune_lm.py` does).

One source of truth for the recipe: the flags below are parsed by our scripts' own parsers, and
the fastai side gets what our scripts derive from them: the model configs (`cli.language_model_config`
and `cli.classifier_config`: dropouts, head, bptt, max_len), the classifier's stages
(`stages_for(args, n_groups, from_scratch)` of scripts/train_classifier.py, the `--recipe`'s
stages from `ulmfit_jax.recipes`, each translated into `freeze_to` / `unfreeze` +
`fit_one_cycle(epochs, slice(lo, hi), div, div_final, pct_start, moms, wd)`), fine-tuning's stages
the same way (`stages_for(args, n_groups)` of scripts/finetune_lm.py: `--freeze-epochs` at
`--frozen-lr` with the last group alone (`freeze()`), then `--epochs` at `--lr` unfrozen), and the validation split
(`cli.validation_split`: the data's 'valid' / 'dev' split, else 10% of train by seed). Both sides
read the same prepared ids and vocabulary (`scripts/prepare_data.py`; fastai gets the ids, not its
own tokenizer). fastai keeps the best fine-tuned epoch by validation loss (`SaveModelCallback`, as
finetune_lm.py keeps `out/best` for the encoder), validates every epoch (loss, accuracy, and
perplexity for the LM) and predicts the test set with its last classifier, as our scripts do.

The recipe (defaults): fine-tuning `--freeze-epochs 1 --epochs 4 --bs 32` at finetune_lm.py's
default learning rates; the classifier `--epochs 4 --bs 64` at train_classifier.py's default lr
(gradual unfreezing, then 4 epochs of all groups); bptt 70. `--quick`: 1 epoch where the recipe
has 4 (a smoke test, not the recipe). `--datasets imdb1000` (not in the default set): IMDb at
1,000 labels, semi-supervised, the paper's low-shot point with experiments/lowshot_imdb.py's recipe
(`DATASET_FLAGS`: `--max-docs`, `--train-docs` and `--test-docs` subsets, which the fastai side takes
as our scripts choose them).

Cold caches: every run of ours gets a fresh, empty `--compilation-cache` folder (shared by its two
scripts). `--warm` reruns ours right after each cold run with that folder kept, for the wall time
a user sees on a rerun. Each script run is timed from outside, process start to exit. The sides
alternate which goes first with the seed. Each run also records its CPU seconds and the load
average before it: other processes on the same cores can slow the two sides unequally (their
thread pools wait in different ways), so a run with a high load before it is no clean measurement.
Our scripts set glibc's malloc to keep freed memory (`cli.keep_freed_memory`); fastai's processes
run with glibc's defaults, as a fastai user's do, or with `--fastai-malloc kept` with the same
settings (`cli.MALLOC_SETTINGS` as glibc's environment variables, from which PyTorch's steps gain
too; only fastai's runs with the chosen settings are reused and compared). Results are appended
to OUT/results.jsonl as they come and runs already there are not repeated (so `--sides fastai`
reruns one side, and an interrupted benchmark resumes; `--fresh` repeats them); OUT/results.json
and OUT/results.md hold the summary, the last stdout line too.

    .venv/bin/python benchmarks/bench_small_data.py --seeds 0 1 2 --warm
    .venv/bin/python benchmarks/bench_small_data.py --datasets trec6 --seeds 0 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))

from common import git_state, machine, timed_run, versions  # noqa: E402  (benchmarks/ is on sys.path)

DATASETS = {"trec6": ("trec", "trec6"), "sst2": ("sst", "sst2"),    # name -> (folder in the data dir, --format)
            "imdb1000": ("imdb", "imdb")}
# IMDb at 1,000 labels, semi-supervised (the paper's low-shot point; experiments/lowshot_imdb.py's recipe
# at 1,000): the LM fine-tuned on 6,000 train + unsup reviews, the classifier trained on 1,000 labelled
# reviews and tested on a fixed 5,000; a vocabulary of the pretrained LM's size. Not in the default set.
PREPARE_FLAGS = {"imdb1000": ["--max-vocab", "10000"]}


def imdb_flags(epochs: int = 1) -> dict[str, list[str]]:
    """The IMDb recipe of experiments/imdb.py, lowshot_imdb.py and `imdb1000`: LM fine-tuning 1 frozen
    epoch + `epochs`, the classifier's gradual unfreezing + `epochs` of all groups; bs 64, bptt 70."""
    common = ["--bs", "64", "--bptt", "70"]
    return {"finetune": ["--freeze-epochs", "1", "--epochs", str(epochs), *common],
            "classifier": ["--epochs", str(epochs), *common]}


DATASET_FLAGS = {"imdb1000": {"finetune": ["--max-docs", "6000", *imdb_flags()["finetune"]],
                              "classifier": ["--train-docs", "1000", "--test-docs", "5000",
                                             *imdb_flags()["classifier"]]}}
SIDES = ("ours", "fastai")
# The pretrained LM both sides start from: the demo's pretraining settings (ulmfit_jax.recipes.DemoSettings).
PRETRAIN_FLAGS = ["--emb-sz", "128", "--n-hid", "384", "--n-layers", "2", "--epochs", "1", "--bs", "64",
                  "--lr", "5e-3", "--drop-mult", "0.1", "--clip", "0.4", "--seed", "0"]
PRETRAIN_VOCAB = ["--max-vocab", "10000", "--min-freq", "3"]


def finetune_flags(quick: bool, name: str | None = None) -> list[str]:
    if name in DATASET_FLAGS:
        return DATASET_FLAGS[name]["finetune"]
    return ["--freeze-epochs", "1", "--epochs", "1" if quick else "4", "--bs", "32", "--bptt", "70"]


def classifier_flags(quick: bool, name: str | None = None) -> list[str]:
    if name in DATASET_FLAGS:
        return DATASET_FLAGS[name]["classifier"]
    return ["--epochs", "1" if quick else "4", "--bs", "64", "--bptt", "70"]


# ----------------------------------------------------------------------------------------------
# Data and the pretrained LM (made once, kept in OUT)

def python() -> str:
    return sys.executable


def prepare_dataset(args, name: str) -> Path:
    folder, data_format = DATASETS[name]
    out = args.out / "data" / name
    if not (out / "meta.json").exists():
        timed_run([python(), SCRIPTS / "prepare_data.py", "--input", args.data_dir / folder, "--format", data_format,
                   "--out", out, "--no-cache", "--no-progress", *PREPARE_FLAGS.get(name, [])],
                  log_path=args.out / f"prepare_{name}.log")
    return out


def pretrained_lm(args) -> dict:
    """Pretrain once (OUT/pretrain/words_N) -> {"model": our model dir, "weights", "vocab": fastai's files}."""
    folder = args.out / "pretrain" / f"words_{args.wiki_words}"
    done = folder / "pretrain.json"
    paths = {"model": folder / "lm" / "best", "weights": folder / "fastai" / "lm.pth",
             "vocab": folder / "fastai" / "lm.pkl"}
    if done.exists():
        return dict(paths, **json.loads(done.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus" / "train.jsonl"
    if not corpus.exists():
        from ulmfit_jax.text.datasets import read_jsonl_prefix
        texts = read_jsonl_prefix(args.data_dir / "enwiki" / "AA.jsonl.gz", args.wiki_words)
        corpus.parent.mkdir(exist_ok=True)
        corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    prepared = timed_run([python(), SCRIPTS / "prepare_data.py", "--input", corpus, "--format", "jsonl",
                          "--label-field", "", "--out", folder / "data", "--no-cache", "--no-progress",
                          *PRETRAIN_VOCAB], log_path=folder / "prepare.log").result
    print(json.dumps({"pretrain_data": prepared}), flush=True)
    fresh(folder / "lm")         # no resuming a half-done run: its metrics would cover only the rest
    wall, _, result = timed_run([python(), SCRIPTS / "pretrain_lm.py", "--data", folder / "data", "--out",
                                 folder / "lm", "--compilation-cache", "off", *PRETRAIN_FLAGS],
                                log_path=folder / "pretrain.log")
    paths["weights"].parent.mkdir(exist_ok=True)
    timed_run([python(), SCRIPTS / "convert_fastai.py", "export", "--model", paths["model"],
               "--weights", paths["weights"], "--vocab", paths["vocab"]], log_path=folder / "export.log")
    record = {"wiki_words": args.wiki_words, "tokens": prepared.get("tokens"), "vocab_size": prepared.get("vocab"),
              "wall_seconds": round(wall, 1), "valid_perplexity": result.get("valid_perplexity"),
              "tokens_per_s": result.get("tokens_per_s"), "flags": PRETRAIN_FLAGS}
    done.write_text(json.dumps(record))
    print(json.dumps({"pretrain": record}), flush=True)
    return dict(paths, **record)


# ----------------------------------------------------------------------------------------------
# The recipe for fastai, derived from our scripts

class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def script_args(script: str, argv: list[str]):
    """`argv` parsed by the script's own parser (its `main` stops right after parsing)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = capture
    try:
        module.main([str(a) for a in argv])
    except _Parsed as parsed:
        return module, parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{script}: main() returned without parsing its arguments")


def fastai_stage(stage_epochs: int, optimizer, trainable, n_groups: int) -> dict:
    """One of our stages (epochs, `optim.OptimizerConfig`, trainable groups) -> fastai's calls:
    `freeze_to(n)` (None: `unfreeze()`) and `fit_one_cycle`'s arguments."""
    from ulmfit_jax import optim
    schedule = optimizer.schedule
    if not isinstance(schedule, optim.OneCycle):
        raise ValueError(f"fastai's fit_one_cycle runs a one-cycle schedule, the stage has {schedule}")
    if not optimizer.decouple_weight_decay or not optimizer.train_bn:
        raise ValueError("fastai's Learner decouples weight decay and trains batch norm in frozen groups")
    if not isinstance(optimizer.weight_decay, (int, float)):
        raise ValueError(f"one weight decay for every group expected, got {optimizer.weight_decay}")
    lr = optimizer.learning_rate
    if isinstance(lr, optim.Slice):
        lr = {"slice": [lr.start, lr.stop]}
    elif not isinstance(lr, (int, float)):
        lr = {"per_group": list(lr)}
    freeze_to = None
    if trainable is not None:
        first = min(trainable)
        if set(trainable) != set(range(first, n_groups)):
            raise ValueError(f"trainable groups {sorted(trainable)} are not the last ones: no fastai freeze_to")
        freeze_to = first - n_groups
    return {"epochs": stage_epochs, "lr": lr, "freeze_to": freeze_to, "wd": optimizer.weight_decay,
            "div": schedule.div, "div_final": schedule.div_final, "pct_start": schedule.pct_start,
            "moms": list(schedule.moms) if schedule.moms else None, "beta1": optimizer.beta1,
            "beta2": optimizer.beta2, "eps": optimizer.eps, "clip": optimizer.clip_norm}


def document_selection(data, split_names, seed: int, subset=None, labelled: bool = False) -> dict:
    """Our scripts' documents as (split, index) lists for fastai: `cli.document_subset` (`subset`: the
    script's --max-docs / --train-docs, balanced over the labels when `labelled`), then
    `cli.validation_split`, each over row numbers in place of the documents."""
    from ulmfit_jax import cli
    refs = [(name, i) for name in split_names if name in data.splits
            for i in range(len(data.splits[name].documents))]
    labels = cli.split_documents(data, split_names)[1] if labelled else None
    rows, labels = cli.document_subset(list(range(len(refs))), labels, subset, seed, "subset")
    train_rows, _, valid_rows, _ = cli.validation_split(data, rows, labels, seed)
    named = [name for name, split in data.splits.items() if valid_rows is split.documents]
    if not named and not all(isinstance(row, int) for row in valid_rows):     # a named split, copied
        named = [name for name in ("valid", "dev") if name in data.splits][:1]
    valid = ([(named[0], i) for i in range(len(valid_rows))] if named else [refs[i] for i in valid_rows])
    group = lambda pairs: {name: [i for n, i in pairs if n == name] for name in dict.fromkeys(n for n, _ in pairs)}
    return {"train": group([refs[i] for i in train_rows]), "valid": group(valid), "valid_split": named[0] if named
            else f"{len(valid)} of the training documents (seed {seed})"}


def fastai_plan(args, name: str, data_dir: Path, pretrained: dict, seed: int, run: Path) -> dict:
    """Everything the fastai processes need, from our scripts' flags and our library."""
    import dataclasses

    import jax

    from ulmfit_jax import checkpoint, cli, models, optim
    from ulmfit_jax.text.datasets import load_prepared

    data = load_prepared(data_dir)
    lm_argv = ["--data", data_dir, "--pretrained", pretrained["model"], "--out", run / "lm", "--seed", seed,
               *finetune_flags(args.quick, name)]
    clas_argv = ["--data", data_dir, "--encoder", run / "lm" / "encoder", "--out", run / "classifier",
                 "--seed", seed, *classifier_flags(args.quick, name)]
    lm_module, lm_args = script_args("finetune_lm.py", lm_argv)
    clas_module, clas_args = script_args("train_classifier.py", clas_argv)
    if lm_args.labelled_docs is not None or lm_args.include_test_text:
        raise ValueError("the fastai side fine-tunes on the train and unsup text (--max-docs), not "
                         "--labelled-docs or --include-test-text")

    pretrained_config = checkpoint.load_model(pretrained["model"])["config"]
    encoder = pretrained_config.encoder
    sizes = dict(emb_sz=encoder.emb_size, n_hid=encoder.n_hidden, n_layers=encoder.n_layers,
                 pad_token=encoder.pad_token, bidir=encoder.bidirectional)
    dropouts = lambda e: {k: getattr(e, k) for k in ("hidden_p", "input_p", "embed_p", "weight_p")}

    # stage 2, finetune_lm.py's own stages
    lm_config = cli.language_model_config(lm_args, len(data.vocab))
    lm_params = jax.eval_shape(lambda: models.init_language_model(jax.random.PRNGKey(0), dataclasses.replace(
        lm_config, encoder=dataclasses.replace(encoder, vocab_size=len(data.vocab)))))
    lm_groups = optim.n_groups(optim.layer_group_labels(lm_params, "lm"))
    lm_stages = [fastai_stage(s.epochs, s.optimizer, s.trainable, lm_groups)
                 for s in lm_module.stages_for(lm_args, lm_groups)]

    # stage 3, train_classifier.py's own stages
    clas_config = cli.classifier_config(clas_args, len(data.vocab), len(data.classes))
    clas_config = dataclasses.replace(clas_config, encoder=dataclasses.replace(
        encoder, vocab_size=len(data.vocab), **dropouts(clas_config.encoder)))
    clas_params, _ = jax.eval_shape(lambda: models.init_classifier(jax.random.PRNGKey(0), clas_config))
    clas_groups = optim.n_groups(optim.layer_group_labels(clas_params, "classifier"))
    clas_stages = [fastai_stage(s.epochs, s.optimizer, s.trainable, clas_groups)
                   for s in clas_module.stages_for(clas_args, clas_groups, from_scratch=False)]

    return {
        "dataset": name, "data": str(data_dir), "seed": seed, "run": str(run),
        "pretrained_weights": str(pretrained["weights"]), "pretrained_vocab": str(pretrained["vocab"]),
        "lm": {"bs": lm_args.bs, "bptt": lm_args.bptt, "n_groups": lm_groups, "stages": lm_stages,
               "config": dict(sizes, **dropouts(lm_config.encoder), output_p=lm_config.output_p,
                              tie_weights=pretrained_config.tie_weights, out_bias=pretrained_config.out_bias),
               "documents": document_selection(data, ("train", "unsup"), seed, lm_args.max_docs)},
        "classifier": {"bs": clas_args.bs, "n_groups": clas_groups, "stages": clas_stages,
                       "seq_len": clas_config.bptt, "max_len": clas_config.max_len,
                       "lin_ftrs": list(clas_config.hidden_sizes), "ps": list(clas_config.head_ps[1:]),
                       "config": dict(sizes, **dropouts(clas_config.encoder), output_p=clas_config.head_ps[0]),
                       "documents": document_selection(data, ("train",), seed, clas_args.train_docs, labelled=True),
                       "test_rows": np.asarray(cli.document_subset(
                           list(range(len(data.splits["test"].documents))), np.asarray(data.splits["test"].labels),
                           clas_args.test_docs, clas_module.TEST_SUBSET_SEED, "--test-docs")[0]).tolist()},
        "argv": {"finetune_lm.py": [str(a) for a in lm_argv], "train_classifier.py": [str(a) for a in clas_argv]},
    }


# ----------------------------------------------------------------------------------------------
# The fastai side (its own processes; imports no JAX)

def _fastai_common(plan: dict, part: str):
    import fastai.text.all  # noqa: F401  (what a fastai user's script imports: every callback and patch)
    import torch
    from fastai.torch_core import set_seed

    from ulmfit_jax.text.datasets import load_prepared     # numpy only
    set_seed(plan["seed"])
    data = load_prepared(plan["data"])
    selection = plan[part]["documents"]

    def docs(which):
        return [(name, i, torch.from_numpy(np.asarray(data.splits[name].documents[i], dtype=np.int64)))
                for name, rows in selection[which].items() for i in rows]
    return data, docs


def _fit_stages(learn, stages: list[dict], n_groups: int) -> None:
    """Our stages as fastai calls."""
    assert len(learn.splitter(learn.model)) == n_groups, "fastai's splitter and ours disagree on the layer groups"
    for stage in stages:
        if stage["freeze_to"] is None:
            learn.unfreeze()
        else:
            learn.freeze_to(stage["freeze_to"])
        lr = stage["lr"]
        if isinstance(lr, dict):
            lr = slice(*lr["slice"]) if "slice" in lr else np.array(lr["per_group"])
        learn.fit_one_cycle(stage["epochs"], lr, div=stage["div"], div_final=stage["div_final"],
                            pct_start=stage["pct_start"], wd=stage["wd"],
                            moms=tuple(stage["moms"]) if stage["moms"] else None)


def _opt_func_and_callbacks(stages: list[dict]):
    from functools import partial

    from fastai.callback.training import GradientClip
    from fastai.optimizer import Adam
    settings = {(s["beta1"], s["beta2"], s["eps"], s["clip"]) for s in stages}
    if len(settings) != 1:
        raise ValueError("fastai's Learner has one optimizer for all stages; ours differ between stages")
    beta1, beta2, eps, clip = settings.pop()
    moms_scheduled = all(s["moms"] for s in stages)
    opt_func = partial(Adam, sqr_mom=beta2, eps=eps) if moms_scheduled else partial(Adam, mom=beta1, sqr_mom=beta2,
                                                                                       eps=eps)
    return opt_func, ([GradientClip(clip)] if clip else [])


def fastai_finetune(plan: dict) -> dict:
    started = time.time()
    from fastai.callback.tracker import SaveModelCallback
    from fastai.data.core import DataLoaders
    from fastai.metrics import Perplexity, accuracy
    from fastai.text.data import LMDataLoader
    from fastai.text.learner import language_model_learner
    from fastai.text.models.awdlstm import AWD_LSTM

    lm = plan["lm"]
    data, docs = _fastai_common(plan, "lm")
    train = [t for _, _, t in docs("train")]
    valid = [t for _, _, t in docs("valid")]
    run = Path(plan["run"])
    dls = DataLoaders(LMDataLoader(train, bs=lm["bs"], seq_len=lm["bptt"], shuffle=True),
                      LMDataLoader(valid, bs=lm["bs"], seq_len=lm["bptt"]), path=run, device="cpu")
    dls.vocab = data.vocab
    opt_func, callbacks = _opt_func_and_callbacks(lm["stages"])
    # the best epoch by validation loss over both stages, as finetune_lm.py's out/best
    best = SaveModelCallback(monitor="valid_loss", fname="finetune_best", reset_on_fit=False)
    learn = language_model_learner(dls, AWD_LSTM, config=dict(lm["config"]), drop_mult=1.0, pretrained=False,
                                   opt_func=opt_func, metrics=[accuracy, Perplexity()], cbs=[best, *callbacks])
    learn.load_pretrained(plan["pretrained_weights"], plan["pretrained_vocab"])
    _fit_stages(learn, lm["stages"], lm["n_groups"])
    learn.save_encoder("finetuned_encoder")
    last = dict(zip(learn.recorder.metric_names[1:-1], map(float, learn.recorder.values[-1])))
    return {"stage": "finetune", "best_valid_loss": float(best.best), **{f"last_{k}": v for k, v in last.items()},
            "seconds": time.time() - started}


def fastai_classifier(plan: dict) -> dict:
    started = time.time()
    from functools import partial

    import torch
    from fastai.data.core import DataLoaders
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.text.data import SortedDL, pad_input_chunk
    from fastai.text.learner import text_classifier_learner
    from fastai.text.models.awdlstm import AWD_LSTM

    clas = plan["classifier"]
    data, docs = _fastai_common(plan, "classifier")
    label = lambda name, i: int(data.splits[name].labels[i])
    train = [(t, label(n, i)) for n, i, t in docs("train")]
    valid = [(t, label(n, i)) for n, i, t in docs("valid")]
    test_split = data.splits["test"]
    test = [(torch.from_numpy(np.asarray(test_split.documents[i], dtype=np.int64)), int(test_split.labels[i]))
            for i in clas["test_rows"]]
    collate = partial(pad_input_chunk, pad_idx=clas["config"]["pad_token"], seq_len=clas["seq_len"])
    # fastai's TextDataLoaders for classification: SortedDL, shuffled and drop_last for training
    dls = DataLoaders(SortedDL(train, before_batch=collate, bs=clas["bs"], shuffle=True, drop_last=True),
                      SortedDL(valid, before_batch=collate, bs=clas["bs"]), path=Path(plan["run"]), device="cpu")
    dls.vocab = data.vocab
    opt_func, callbacks = _opt_func_and_callbacks(clas["stages"])
    learn = text_classifier_learner(dls, AWD_LSTM, seq_len=clas["seq_len"], config=dict(clas["config"]),
                                    drop_mult=1.0, pretrained=False, n_out=len(data.classes),
                                    lin_ftrs=clas["lin_ftrs"], ps=clas["ps"], max_len=clas["max_len"],
                                    loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy,
                                    cbs=callbacks)
    learn.load_encoder("finetuned_encoder")
    _fit_stages(learn, clas["stages"], clas["n_groups"])
    last = dict(zip(learn.recorder.metric_names[1:-1], map(float, learn.recorder.values[-1])))
    test_dl = SortedDL(test, before_batch=collate, bs=clas["bs"])
    probabilities, targets = learn.get_preds(dl=test_dl)
    return {"stage": "classifier", "test_accuracy": (probabilities.argmax(dim=1) == targets).float().mean().item(),
            **{f"last_{k}": v for k, v in last.items()}, "seconds": time.time() - started}


# ----------------------------------------------------------------------------------------------
# The driver

def walls(finetune, classifier) -> dict:
    """Wall and CPU seconds of the two script runs, as measured from outside."""
    return {"finetune_wall": round(finetune.wall, 2), "classifier_wall": round(classifier.wall, 2),
            "wall_seconds": round(finetune.wall + classifier.wall, 2),
            "cpu_seconds": round(finetune.cpu + classifier.cpu, 2)}


def run_ours(args, name: str, data_dir: Path, pretrained: dict, seed: int, run: Path, cache: Path) -> dict:
    """finetune_lm.py then train_classifier.py, each timed from outside, with `cache` as the
    persistent compilation cache."""
    common = ["--data", data_dir, "--seed", seed, "--compilation-cache", cache]
    finetune = timed_run([python(), SCRIPTS / "finetune_lm.py", *common, "--pretrained", pretrained["model"],
                          "--out", run / "lm", *finetune_flags(args.quick, name)], log_path=run / "finetune.log")
    classifier = timed_run([python(), SCRIPTS / "train_classifier.py", *common, "--encoder", run / "lm" / "encoder",
                            "--out", run / "classifier", *classifier_flags(args.quick, name)],
                           log_path=run / "classifier.log")
    lm, clas = finetune.result, classifier.result
    return {**walls(finetune, classifier),
            "finetune_compile_seconds": lm.get("compile_seconds"), "classifier_compile_seconds": clas.get("compile_seconds"),
            "compile_seconds": round((lm.get("compile_seconds") or 0) + (clas.get("compile_seconds") or 0), 2),
            "finetune_seconds": lm.get("seconds"), "classifier_seconds": clas.get("seconds"),
            "finetune_valid_loss": lm.get("valid_loss"), "test_accuracy": clas.get("test_accuracy"),
            "valid_accuracy": clas.get("valid_accuracy")}


def run_fastai(args, name: str, data_dir: Path, pretrained: dict, seed: int, run: Path) -> dict:
    plan = fastai_plan(args, name, data_dir, pretrained, seed, run)
    plan_path = run / "fastai_plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))
    from ulmfit_jax import cli
    env = None if args.fastai_malloc == "default" else {
        **os.environ, **{variable: str(value) for _, variable, value in cli.MALLOC_SETTINGS}}
    timed = {part: timed_run([python(), Path(__file__).resolve(), "--fastai-part", part, "--plan", plan_path],
                             log_path=run / f"{part}.log", env=env) for part in ("finetune", "classifier")}
    results = {part: t.result for part, t in timed.items()}
    return {**walls(timed["finetune"], timed["classifier"]),
            "finetune_seconds": results["finetune"]["seconds"], "classifier_seconds": results["classifier"]["seconds"],
            "finetune_valid_loss": results["finetune"]["best_valid_loss"],
            "test_accuracy": results["classifier"]["test_accuracy"],
            "valid_accuracy": results["classifier"].get("last_accuracy"),
            "valid_split": plan["classifier"]["documents"]["valid_split"], "malloc": args.fastai_malloc}


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value) -> str:
    return "" if value is None else f"{value:.1f}"


def summarize(results: list[dict], datasets, seeds) -> tuple[str, dict]:
    header = ["| data set | seed | side | stage 2 wall (s) | stage 3 wall (s) | total wall (s) | CPU (s) | compile (s) "
              "| test accuracy | load before |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows, summary = list(header), {}
    labels = {"ours": "ulmfit_jax", "ours_warm": "ulmfit_jax, warm cache", "fastai": "fastai"}
    for name in datasets:
        per_side = {}
        for seed in seeds:
            for key in ("fastai", "ours", "ours_warm"):
                side, mode = ("ours", "warm") if key == "ours_warm" else (key, "cold")
                found = [r for r in results if r["dataset"] == name and r["seed"] == seed and r["side"] == side
                         and r["mode"] == mode]
                if not found:
                    continue
                r = found[-1]
                per_side.setdefault(key, []).append(r)
                compile_s = fmt(r.get("compile_seconds"))
                rows.append(f"| {name} | {seed} | {labels[key]} | {r['finetune_wall']:.1f} | {r['classifier_wall']:.1f} "
                            f"| {r['wall_seconds']:.1f} | {fmt(r.get('cpu_seconds'))} | {compile_s} | {r['test_accuracy']:.4f} "
                            f"| {r['load_average_before'].split()[0]} |")
        entry = {}
        for key, runs in per_side.items():
            entry[key] = {"seeds": [r["seed"] for r in runs],
                          "wall_median": median(r["wall_seconds"] for r in runs),
                          "cpu_median": median(r.get("cpu_seconds") for r in runs),
                          "finetune_wall_median": median(r["finetune_wall"] for r in runs),
                          "classifier_wall_median": median(r["classifier_wall"] for r in runs),
                          "compile_median": median(r.get("compile_seconds") for r in runs),
                          "test_accuracy_median": median(r["test_accuracy"] for r in runs),
                          "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in runs)}
            compile_s = entry[key]["compile_median"]
            rows.append(f"| {name} | median | {labels[key]} | {entry[key]['finetune_wall_median']:.1f} | "
                        f"{entry[key]['classifier_wall_median']:.1f} | {entry[key]['wall_median']:.1f} | "
                        f"{fmt(entry[key]['cpu_median'])} | {fmt(compile_s)} | "
                        f"{entry[key]['test_accuracy_median']:.4f} | |")
        if "fastai" in entry:
            for key in ("ours", "ours_warm"):
                if key in entry:
                    entry[f"{key}_over_fastai_wall"] = round(entry[key]["wall_median"] / entry["fastai"]["wall_median"], 3)
        if entry:
            summary[name] = entry
    return "\n".join(rows), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ULMFIT_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_small_data")
    parser.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=["trec6", "sst2"])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="run only these sides (the other's results already in OUT are kept and compared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warm", action="store_true",
                        help="after each cold run of ours, rerun it with its compilation cache kept")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch where the recipe has 4 (fine-tuning's unfrozen stage, the classifier's last)")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun the selected runs even where OUT has results (the newest result is reported)")
    parser.add_argument("--fastai-malloc", choices=("default", "kept"), default="default",
                        help="fastai's processes with glibc's malloc defaults, or keeping freed memory as ours do")
    parser.add_argument("--wiki-words", type=int, default=1_500_000,
                        help="words of enwiki/AA.jsonl.gz to pretrain on (once; kept in OUT/pretrain)")
    parser.add_argument("--fastai-part", choices=("finetune", "classifier"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.fastai_part:
        plan = json.loads(args.plan.read_text())
        run = fastai_finetune if args.fastai_part == "finetune" else fastai_classifier
        print(json.dumps(run(plan)))
        return

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = "quick" if args.quick else "issue"
    results_path = args.out / "results.jsonl"
    results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    results = [r for r in results if r["recipe"] == recipe and r["wiki_words"] == args.wiki_words
               and (r["side"] != "fastai" or r.get("malloc", "default") == args.fastai_malloc)]
    done = set() if args.fresh else {(r["dataset"], r["side"], r["mode"], r["seed"]) for r in results}
    data_dirs = {name: prepare_dataset(args, name) for name in args.datasets}
    pretrained = pretrained_lm(args)

    def record(result, **fields):
        result = dict(fields, **result, recipe=recipe, wiki_words=args.wiki_words, git=git_state(ROOT),
                      load_average_after=machine()["load_average"])
        results.append(result)
        with results_path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps({k: result.get(k) for k in ("dataset", "side", "mode", "seed", "wall_seconds",
                                                     "compile_seconds", "test_accuracy")}), flush=True)

    for name in args.datasets:
        for seed in args.seeds:
            order = SIDES if seed % 2 == 0 else SIDES[::-1]
            for side in order:
                if side not in args.sides:
                    continue
                runs = args.out / "runs" / f"{name}_seed{seed}_{recipe}"
                if side == "fastai" and (name, "fastai", "cold", seed) not in done:
                    load = machine()["load_average"]
                    run = fresh(runs / "fastai")
                    record(run_fastai(args, name, data_dirs[name], pretrained, seed, run), dataset=name, side="fastai",
                           mode="cold", seed=seed, load_average_before=load)
                if side != "ours":
                    continue
                cache = runs / "ours_compilation_cache"
                if (name, "ours", "cold", seed) not in done:
                    fresh(cache)
                    load = machine()["load_average"]
                    record(run_ours(args, name, data_dirs[name], pretrained, seed, fresh(runs / "ours"), cache),
                           dataset=name, side="ours", mode="cold", seed=seed, load_average_before=load)
                if args.warm and (name, "ours", "warm", seed) not in done:
                    if not cache.exists():
                        raise SystemExit(f"error: --warm needs the cold run's cache {cache}")
                    load = machine()["load_average"]
                    record(run_ours(args, name, data_dirs[name], pretrained, seed, fresh(runs / "ours_warm"), cache),
                           dataset=name, side="ours", mode="warm", seed=seed, load_average_before=load)

    table, summary = summarize(results, args.datasets, args.seeds)
    info = {"benchmark": "small_data", "recipe": recipe, "wiki_words": args.wiki_words,
            "flags": {name: {"finetune_lm.py": finetune_flags(args.quick, name),
                             "train_classifier.py": classifier_flags(args.quick, name)} for name in args.datasets},
            "pretrained": {k: v for k, v in pretrained.items() if k not in ("model", "weights", "vocab")},
            "machine": machine(), "versions": versions(("jax", "jaxlib", "torch", "fastai")), "git": git_state(ROOT)}
    (args.out / "results.json").write_text(json.dumps({**info, "summary": summary, "runs": results}, indent=1))
    m, v = info["machine"], info["versions"]
    header = (f"{m['cpu']}, {m['cores']} cores, load average {m['load_average']}; "
              + ", ".join(f"{k} {val}" for k, val in v.items())
              + f"; commit {info['git']['commit']}{' (modified: ' + ', '.join(info['git']['modified']) + ')' if info['git']['modified'] else ''}\n"
              + "".join(f"{name}: finetune_lm.py {' '.join(flags['finetune_lm.py'])}; train_classifier.py "
                        f"{' '.join(flags['train_classifier.py'])}\n" for name, flags in info["flags"].items())
              + f"recipe: {recipe}; pretrained on {args.wiki_words:,} words\n\n")
    (args.out / "results.md").write_text(header + table + "\n")
    print(header + table)
    print(json.dumps({**info, "summary": summary}))


if __name__ == "__main__":
    main()
