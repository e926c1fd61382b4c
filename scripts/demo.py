#!/usr/bin/env python
"""The main job: ULMFiT's three stages on real data, on a CPU, in about ten minutes on 2 cores.

1. Pretrain a small AWD-LSTM language model on a prefix of English Wikipedia
   (`enwiki/AA.jsonl.gz`, the WikiText-103-like shard).
2. Fine-tune it on the TREC-6 training questions (vocabulary moved as fastai's `match_embeds`;
   last group frozen for the first epoch, then all; one-cycle schedules).
3. Train the TREC-6 classifier on the fine-tuned encoder with gradual unfreezing and
   discriminative learning rates.

The stages are `ulmfit_jax.recipes.DEMO` (`--recipe` picks another of `recipes.RECIPES`), the
settings `ulmfit_jax.recipes.DemoSettings`, each of whose fields is a flag (`--classifier-epochs 8`);
benchmarks/bench_trec_recipe.py runs the same recipe in fastai. The last stdout line is JSON:
{"dataset": "trec6", "test_accuracy": ..., "seconds": ..., ...} on the 500 official test questions.
`--data-dir` (or $ULMFIT_DATA_DIR) points at the data folder; missing TREC files are downloaded
from their canonical URLs and kept only if their sha256 matches (`ulmfit_jax.text.download`).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, convert, flags, metrics, models, optim, predict, recipes, train  # noqa: E402
from ulmfit_jax.cli import add_compilation_cache_flag, keep_freed_memory, use_compilation_cache  # noqa: E402
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config  # noqa: E402
from ulmfit_jax.recipes import DemoSettings  # noqa: E402
from ulmfit_jax.text.datasets import read_jsonl_prefix, read_trec  # noqa: E402
from ulmfit_jax.text.download import DATA_FILES, MissingData, ensure_data  # noqa: E402
from ulmfit_jax.text.pipeline import tokenize_corpus  # noqa: E402
from ulmfit_jax.text.tokenizers import TokenizerSettings  # noqa: E402
from ulmfit_jax.text.vocab import make_vocab, token_to_id  # noqa: E402


def sizes(settings: DemoSettings) -> dict:
    """The AWD-LSTM's sizes, as the config functions take them."""
    return dict(emb_size=settings.emb_sz, n_hidden=settings.n_hid, n_layers=settings.n_layers)


def log_line(stage):
    def log(record):
        print(json.dumps({"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v
                                             for k, v in record.items()}}), flush=True)
    return log


def finetune_plan(settings: DemoSettings, vocab_size: int, recipe: recipes.Recipe = recipes.DEMO):
    """Stage 2's model and stages: (LM config, [train.Stage])."""
    lm_config = awd_lstm_lm_config(vocab_size, drop_mult=settings.finetune_drop_mult, **sizes(settings))
    stages = recipes.training_stages(
        recipes.with_factor(recipe.finetune, settings.lr_factor), n_groups=settings.n_layers + 1,
        optimizer=optim.OptimizerConfig(weight_decay=settings.weight_decay), lr=settings.finetune_lr,
        frozen_lr=settings.finetune_frozen_lr, epochs=settings.finetune_epochs, freeze_epochs=1)
    return lm_config, stages


def classifier_plan(settings: DemoSettings, vocab_size: int, n_classes: int, from_scratch: bool,
                    recipe: recipes.Recipe = recipes.DEMO):
    """Stage 3's model and stages: (classifier config, [train.Stage])."""
    clas_config = awd_lstm_clas_config(vocab_size, n_classes, drop_mult=settings.classifier_drop_mult,
                                       bptt=settings.bptt, **sizes(settings))
    stages = recipes.training_stages(
        recipes.with_factor(recipe.from_scratch if from_scratch else recipe.classifier, settings.lr_factor),
        n_groups=settings.n_layers + 2, optimizer=optim.OptimizerConfig(weight_decay=settings.weight_decay),
        lr=settings.classifier_lr, epochs=settings.classifier_epochs)
    return clas_config, stages


def pretrain_and_finetune(settings: DemoSettings, recipe: recipes.Recipe, wiki_texts, trec_ids, trec_vocab,
                          seed: int, out: Path):
    """Stages 1 and 2 -> the fine-tuned encoder's parameters."""
    wiki = tokenize_corpus(wiki_texts, progress=False)
    wiki_vocab = make_vocab(wiki.counts(), min_freq=settings.wiki_min_freq, max_vocab=settings.max_vocab)
    wiki_ids = wiki.numericalize(token_to_id(wiki_vocab))
    held_out = wiki_ids[-1][-settings.held_out_tokens:]
    wiki_ids[-1] = wiki_ids[-1][:-settings.held_out_tokens]
    print(json.dumps({"stage": "data", "wiki_tokens": sum(map(len, wiki_ids)), "wiki_vocab": len(wiki_vocab),
                      "trec_vocab": len(trec_vocab)}), flush=True)
    lm_config = awd_lstm_lm_config(len(wiki_vocab), drop_mult=settings.pretrain_drop_mult, **sizes(settings))
    params = models.init_language_model(jax.random.PRNGKey(seed), lm_config)
    one_cycle = optim.OptimizerConfig(learning_rate=settings.pretrain_lr, weight_decay=settings.weight_decay,
                                      clip_norm=settings.pretrain_clip)
    params, _, _ = train.fit_language_model(
        params, lm_config, wiki_ids, [held_out], [train.Stage(settings.pretrain_epochs, one_cycle)],
        batch_size=settings.pretrain_bs, bptt=settings.bptt, seed=seed, log=log_line("pretrain"), progress=True)

    params = jax.tree.map(np.asarray, params)
    params = convert.match_embeddings(params, wiki_vocab, trec_vocab)
    lm_config, stages = finetune_plan(settings, len(trec_vocab), recipe)
    params, _, _ = train.fit_language_model(params, lm_config, trec_ids, None, stages,
                                            batch_size=settings.finetune_bs, bptt=settings.bptt, seed=seed,
                                            log=log_line("finetune"), progress=True)
    params = jax.tree.map(np.asarray, params)
    checkpoint.save_model(out / "finetuned_lm", lm_config, params, trec_vocab, tokenizer=TokenizerSettings())
    return params["encoder"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ULMFIT_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-scratch", action="store_true", help="skip stages 1-2 (the baseline)")
    parser.add_argument("--no-download", action="store_true", help="only say what is missing")
    parser.add_argument("--recipe", choices=list(recipes.RECIPES), default="demo",
                        help="the stages (ulmfit_jax.recipes; default: demo)")
    add_compilation_cache_flag(parser)
    flags.add_flags(parser, DemoSettings)
    args = parser.parse_args(argv)
    settings, recipe = flags.from_args(DemoSettings, args), recipes.RECIPES[args.recipe]
    needed = [name for name in DATA_FILES if not (args.from_scratch and name.startswith("enwiki/"))]
    try:
        ensure_data(args.data_dir, needed, download=not args.no_download,
                    log=lambda message: print(message, file=sys.stderr, flush=True))
    except MissingData as error:
        raise SystemExit(f"error: {error}\n(set --data-dir or ULMFIT_DATA_DIR)")
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
    trec_vocab = make_vocab(trec_train.counts(), min_freq=settings.trec_min_freq)
    trec_index = token_to_id(trec_vocab)
    trec_ids, test_ids = trec_train.numericalize(trec_index), trec_test.numericalize(trec_index)
    train_labels = np.array([classes.index(c) for c in trec.splits["train"].labels])
    test_labels = np.array([classes.index(c) for c in trec.splits["test"].labels])

    clas_config, stages = classifier_plan(settings, len(trec_vocab), len(classes), args.from_scratch, recipe)
    encoder_params = None
    if not args.from_scratch:
        wiki_texts = read_jsonl_prefix(args.data_dir / "enwiki/AA.jsonl.gz", settings.wiki_words)
        encoder_params = pretrain_and_finetune(settings, recipe, wiki_texts, trec_ids, trec_vocab, args.seed,
                                               args.out)

    # Stage 3: the classifier, gradual unfreezing with discriminative learning rates
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(args.seed + 1), clas_config, encoder_params)
    layout, _ = train.classifier_layout(clas_config, trec_ids, settings.classifier_bs,
                                        epochs=sum(stage.epochs for stage in stages), predict_documents=test_ids)
    params, batch_stats, _, _ = train.fit_classifier(params, batch_stats, clas_config, trec_ids, train_labels,
                                                     None, None, stages, batch_size=settings.classifier_bs,
                                                     seed=args.seed, log=log_line("classifier"), progress=True,
                                                     predict_documents=test_ids, layout=layout)
    probabilities = predict.predict_classifier(predict.classifier_predictor(clas_config), params, batch_stats,
                                               test_ids, layout)
    scores = metrics.classification_metrics(probabilities, test_labels)
    checkpoint.save_model(args.out / "classifier", clas_config, jax.tree.map(np.asarray, params), trec_vocab,
                          batch_stats=jax.tree.map(np.asarray, batch_stats), classes=classes,
                          tokenizer=TokenizerSettings())
    print(json.dumps({"dataset": "trec6", "test_accuracy": scores["accuracy"], "test_macro_f1": scores["macro_f1"],
                      "pretrained": not args.from_scratch, "seed": args.seed,
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
