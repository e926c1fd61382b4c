#!/usr/bin/env python
"""The main job: ULMFiT's three stages on real data, on this machine's CPU, in about 20 minutes.

1. Pretrain a small AWD-LSTM language model on a prefix of English Wikipedia
   (`enwiki/AA.jsonl.gz`, the WikiText-103-like shard).
2. Fine-tune it on the TREC-6 training questions (vocabulary moved as fastai's `match_embeds`;
   last group frozen for the first epoch, then all; one-cycle schedules).
3. Train the TREC-6 classifier on the fine-tuned encoder with gradual unfreezing and
   discriminative learning rates (lr / 2.6 per group).

The last stdout line is JSON: {"dataset": "trec6", "test_accuracy": ..., "seconds": ..., ...} on the
500 official test questions. `--data-dir` (or $ULMFIT_DATA_DIR) points at the data folder; missing
TREC files are downloaded from their canonical URLs and kept only if their sha256 matches.
Every field of `Recipe` is a flag (`--classifier-epochs 8`); benchmarks/bench_trec_recipe.py runs
the same recipe in fastai.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, convert, metrics, models, optim, predict, train  # noqa: E402
from ulmfit_jax.cli import add_compilation_cache_flag, keep_freed_memory, use_compilation_cache  # noqa: E402
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config  # noqa: E402
from ulmfit_jax.text.datasets import read_jsonl_prefix, read_trec  # noqa: E402
from ulmfit_jax.text.download import ChecksumError, download_verified  # noqa: E402
from ulmfit_jax.text.pipeline import tokenize_corpus  # noqa: E402
from ulmfit_jax.text.vocab import make_vocab, token_to_id  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DataFile:
    description: str
    sha256: str
    url: str | None = None      # the canonical source, where there is one


DATA_FILES = {
    "trec/train_5500.label": DataFile(
        "TREC-6 training questions (Li & Roth 2002)",
        "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
        "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label"),
    "trec/TREC_10.label": DataFile(
        "TREC-6 test questions",
        "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
        "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label"),
    "enwiki/AA.jsonl.gz": DataFile(
        "English Wikipedia, 2015 dump, first shard as gzipped JSON lines {id, title, url, text}; no canonical "
        "file to download: extract one from a dump at https://dumps.wikimedia.org/ with WikiExtractor --json "
        "(any such shard works; the demo reads a prefix of its texts), or run --from-scratch",
        "25001822d64b5b602261141a4bf46b95d12c370ed81f27f90a9facf9cb1df2a5"),
}


def ensure_data(data_dir: Path, names, download: bool = True) -> None:
    """Download what is missing and has a canonical URL (sha256-checked); fail naming the rest."""
    problems = []
    for name in names:
        path, source = data_dir / name, DATA_FILES[name]
        if path.is_file():
            continue
        if download and source.url:
            print(f"downloading {source.url} -> {path}", file=sys.stderr, flush=True)
            try:
                download_verified(source.url, path, source.sha256)
                continue
            except (OSError, ChecksumError) as error:
                problems.append(f"  {path}: {source.description}\n    from {source.url} (sha256 {source.sha256})"
                                f"\n    download failed: {error}")
                continue
        where = f"\n    from {source.url} (sha256 {source.sha256})" if source.url else ""
        problems.append(f"  {path}: {source.description}{where}")
    if problems:
        raise SystemExit(f"error: data missing under {data_dir} (set --data-dir or ULMFIT_DATA_DIR):\n"
                         + "\n".join(problems))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The demo's ULMFiT recipe on TREC-6 (README "The demo" says why these values)."""
    # data
    wiki_words: int = 4_500_000          # pretraining corpus: this many words of the Wikipedia shard
    wiki_min_freq: int = 3
    max_vocab: int = 10000
    held_out_tokens: int = 20000         # the end of the last article, for validation perplexity
    trec_min_freq: int = 2
    # model
    emb_sz: int = 128
    n_hid: int = 384
    n_layers: int = 2
    bptt: int = 70
    weight_decay: float = 0.01
    lr_factor: float = 2.6               # discriminative learning rates: slice(lr / factor**4, lr)
    # stage 1: pretraining, one-cycle
    pretrain_bs: int = 64
    pretrain_epochs: int = 1
    pretrain_lr: float = 5e-3
    pretrain_drop_mult: float = 0.1
    pretrain_clip: float = 0.4
    # stage 2: LM fine-tuning, one epoch of the last group, then all groups
    finetune_bs: int = 32
    finetune_drop_mult: float = 0.3
    finetune_frozen_lr: float = 1e-2
    finetune_epochs: int = 4
    finetune_lr: float = 2e-3
    # stage 3: the classifier
    classifier_bs: int = 64
    classifier_drop_mult: float = 0.5
    classifier_lr: float = 2e-2
    classifier_epochs: int = 12          # once all groups train

    @property
    def sizes(self) -> dict:
        """The AWD-LSTM's sizes, as the config functions take them."""
        return dict(emb_size=self.emb_sz, n_hidden=self.n_hid, n_layers=self.n_layers)

    def classifier_stages(self, from_scratch: bool) -> list[tuple[int, float, int | None]]:
        """(epochs, the last group's peak learning rate, freeze_to or None for all groups) per stage:
        gradual unfreezing at lr, lr/2, lr/4, then everything at lr/4; from scratch, as many epochs
        of everything at lr/4."""
        lr = self.classifier_lr
        if from_scratch:
            return [(self.classifier_epochs + 3, lr / 4, None)]
        return [(1, lr, -1), (1, lr / 2, -2), (1, lr / 4, -3), (self.classifier_epochs, lr / 4, None)]


def log_line(stage):
    def log(record):
        print(json.dumps({"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v
                                             for k, v in record.items()}}), flush=True)
    return log


def finetune_plan(recipe: Recipe, vocab_size: int):
    """Stage 2's model and stages: (LM config, [train.Stage])."""
    lm_config = awd_lstm_lm_config(vocab_size, drop_mult=recipe.finetune_drop_mult, **recipe.sizes)
    adam = lambda lr: optim.OptimizerConfig(learning_rate=lr, weight_decay=recipe.weight_decay)
    return lm_config, [train.Stage(1, adam(recipe.finetune_frozen_lr), optim.freeze(recipe.n_layers + 1)),
                       train.Stage(recipe.finetune_epochs, adam(recipe.finetune_lr))]


def classifier_plan(recipe: Recipe, vocab_size: int, n_classes: int, from_scratch: bool):
    """Stage 3's model and stages: (classifier config, [train.Stage]), gradual unfreezing with
    discriminative learning rates slice(lr / factor**4, lr)."""
    clas_config = awd_lstm_clas_config(vocab_size, n_classes, drop_mult=recipe.classifier_drop_mult,
                                       bptt=recipe.bptt, **recipe.sizes)
    count = recipe.n_layers + 2
    stages = [train.Stage(epochs, optim.OptimizerConfig(learning_rate=optim.Slice(lr / recipe.lr_factor ** 4, lr),
                                                        weight_decay=recipe.weight_decay),
                          None if freeze_to is None else optim.freeze_to(freeze_to, count))
              for epochs, lr, freeze_to in recipe.classifier_stages(from_scratch)]
    return clas_config, stages


def pretrain_and_finetune(recipe: Recipe, wiki_texts, trec_ids, trec_vocab, seed: int, out: Path):
    """Stages 1 and 2 -> the fine-tuned encoder's parameters."""
    wiki = tokenize_corpus(wiki_texts, progress=False)
    wiki_vocab = make_vocab(wiki.counts(), min_freq=recipe.wiki_min_freq, max_vocab=recipe.max_vocab)
    wiki_ids = wiki.numericalize(token_to_id(wiki_vocab))
    held_out = wiki_ids[-1][-recipe.held_out_tokens:]
    wiki_ids[-1] = wiki_ids[-1][:-recipe.held_out_tokens]
    print(json.dumps({"stage": "data", "wiki_tokens": sum(map(len, wiki_ids)), "wiki_vocab": len(wiki_vocab),
                      "trec_vocab": len(trec_vocab)}), flush=True)
    lm_config = awd_lstm_lm_config(len(wiki_vocab), drop_mult=recipe.pretrain_drop_mult, **recipe.sizes)
    params = models.init_language_model(jax.random.PRNGKey(seed), lm_config)
    one_cycle = optim.OptimizerConfig(learning_rate=recipe.pretrain_lr, weight_decay=recipe.weight_decay,
                                      clip_norm=recipe.pretrain_clip)
    params, _, _ = train.fit_language_model(
        params, lm_config, wiki_ids, [held_out], [train.Stage(recipe.pretrain_epochs, one_cycle)],
        batch_size=recipe.pretrain_bs, bptt=recipe.bptt, seed=seed, log=log_line("pretrain"), progress=True)

    params = jax.tree.map(np.asarray, params)
    params = convert.match_embeddings(params, wiki_vocab, trec_vocab)
    lm_config, stages = finetune_plan(recipe, len(trec_vocab))
    params, _, _ = train.fit_language_model(params, lm_config, trec_ids, None, stages,
                                            batch_size=recipe.finetune_bs, bptt=recipe.bptt, seed=seed,
                                            log=log_line("finetune"), progress=True)
    params = jax.tree.map(np.asarray, params)
    checkpoint.save_model(out / "finetuned_lm", lm_config, params, trec_vocab)
    return params["encoder"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ULMFIT_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-scratch", action="store_true", help="skip stages 1-2 (the baseline)")
    parser.add_argument("--no-download", action="store_true", help="only say what is missing")
    add_compilation_cache_flag(parser)
    for field in dataclasses.fields(Recipe):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"(default {field.default})")
    args = parser.parse_args(argv)
    recipe = Recipe(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Recipe)})
    needed = [name for name in DATA_FILES if not (args.from_scratch and name.startswith("enwiki/"))]
    ensure_data(args.data_dir, needed, download=not args.no_download)
    keep_freed_memory()
    use_compilation_cache(args.compilation_cache)

    start = time.time()
    trec = read_trec(args.data_dir / "trec")
    trec_train = tokenize_corpus(trec.splits["train"].texts, progress=False)
    trec_test = tokenize_corpus(trec.splits["test"].texts, progress=False)
    classes = sorted(set(trec.splits["train"].labels))
    unknown = sorted(set(trec.splits["test"].labels) - set(classes))
    if unknown:
        raise SystemExit(f"error: test labels absent from train: {unknown}")
    trec_vocab = make_vocab(trec_train.counts(), min_freq=recipe.trec_min_freq)
    trec_index = token_to_id(trec_vocab)
    trec_ids, test_ids = trec_train.numericalize(trec_index), trec_test.numericalize(trec_index)
    train_labels = np.array([classes.index(c) for c in trec.splits["train"].labels])
    test_labels = np.array([classes.index(c) for c in trec.splits["test"].labels])

    clas_config, stages = classifier_plan(recipe, len(trec_vocab), len(classes), args.from_scratch)
    encoder_params = None
    if not args.from_scratch:
        wiki_texts = read_jsonl_prefix(args.data_dir / "enwiki/AA.jsonl.gz", recipe.wiki_words)
        encoder_params = pretrain_and_finetune(recipe, wiki_texts, trec_ids, trec_vocab, args.seed, args.out)

    # Stage 3: the classifier, gradual unfreezing with discriminative learning rates
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(args.seed + 1), clas_config)
    if encoder_params is not None:
        params["encoder"] = encoder_params
    params, batch_stats, _, _ = train.fit_classifier(params, batch_stats, clas_config, trec_ids, train_labels,
                                                     None, None, stages, batch_size=recipe.classifier_bs,
                                                     seed=args.seed, log=log_line("classifier"), progress=True)
    settings, _ = train.classifier_layout(clas_config, trec_ids, recipe.classifier_bs)
    probabilities = predict.predict_classifier(predict.classifier_predictor(clas_config), params, batch_stats,
                                               test_ids, settings)
    scores = metrics.classification_metrics(probabilities, test_labels)
    checkpoint.save_model(args.out / "classifier", clas_config, jax.tree.map(np.asarray, params), trec_vocab,
                          batch_stats=jax.tree.map(np.asarray, batch_stats), classes=classes)
    print(json.dumps({"dataset": "trec6", "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
                      "pretrained": not args.from_scratch, "seed": args.seed,
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
