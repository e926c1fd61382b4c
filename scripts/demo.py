#!/usr/bin/env python
"""The main job: ULMFiT's three stages on real data, on this machine's CPU, in about 20 minutes.

1. Pretrain a small AWD-LSTM language model on a prefix of English Wikipedia
   (`enwiki/AA.jsonl.gz`, the WikiText-103-like shard).
2. Fine-tune it on the TREC-6 training questions (vocabulary moved as fastai's `match_embeds`;
   last group frozen for the first epoch, then all; one-cycle schedules).
3. Train the TREC-6 classifier on the fine-tuned encoder with gradual unfreezing and
   discriminative learning rates (lr / 2.6 per group).

The last stdout line is JSON: {"dataset": "trec6", "test_accuracy": ..., "seconds": ..., ...} on the
500 official test questions. `--data-dir` (or $ULMFIT_DATA_DIR) points at the data folder.
"""

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, convert, models, optim, train  # noqa: E402
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config  # noqa: E402
from ulmfit_jax.text.datasets import read_trec  # noqa: E402
from ulmfit_jax.text.pipeline import tokenize_corpus  # noqa: E402
from ulmfit_jax.text.vocab import make_vocab, token_to_id  # noqa: E402

SOURCES = {
    "enwiki/AA.jsonl.gz": "English Wikipedia 2015 dump, shard AA (see ../shared/data/README.md)",
    "trec/train_5500.label": "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label",
    "trec/TREC_10.label": "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label",
}


def check_data(data_dir: Path) -> None:
    missing = [name for name in SOURCES if not (data_dir / name).is_file()]
    if missing:
        lines = "\n".join(f"  {data_dir / name}: {SOURCES[name]}" for name in missing)
        raise SystemExit(f"error: data missing under {data_dir} (set --data-dir or ULMFIT_DATA_DIR):\n{lines}")


def read_wikipedia_prefix(path: Path, max_words: int) -> list[str]:
    """The first articles of the shard, up to about `max_words` whitespace-separated words."""
    texts, words = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            words += len(texts[-1].split())
            if words >= max_words:
                break
    return texts


def log_line(stage):
    def log(record):
        print(json.dumps({"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v
                                             for k, v in record.items()}}), flush=True)
    return log


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ULMFIT_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--wiki-words", type=int, default=1_500_000, help="pretraining corpus size (words)")
    parser.add_argument("--max-vocab", type=int, default=10000)
    parser.add_argument("--emb-sz", type=int, default=128)
    parser.add_argument("--n-hid", type=int, default=384)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--pretrain-lr", type=float, default=5e-3)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--classifier-epochs", type=int, default=12, help="epochs once all groups train")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-scratch", action="store_true", help="skip stages 1-2 (the baseline)")
    args = parser.parse_args(argv)
    check_data(args.data_dir)
    start = time.time()
    trec = read_trec(args.data_dir / "trec")
    trec_train = tokenize_corpus(trec.splits["train"].texts, progress=False)
    trec_test = tokenize_corpus(trec.splits["test"].texts, progress=False)
    classes = sorted(set(trec.splits["train"].labels))
    unknown = sorted(set(trec.splits["test"].labels) - set(classes))
    if unknown:
        raise SystemExit(f"error: test labels absent from train: {unknown}")
    trec_vocab = make_vocab(trec_train.counts(), min_freq=2)
    trec_index = token_to_id(trec_vocab)
    trec_ids, test_ids = trec_train.numericalize(trec_index), trec_test.numericalize(trec_index)
    train_labels = np.array([classes.index(c) for c in trec.splits["train"].labels])
    test_labels = np.array([classes.index(c) for c in trec.splits["test"].labels])
    sizes = dict(emb_size=args.emb_sz, n_hidden=args.n_hid, n_layers=args.n_layers)

    encoder_params = None
    if not args.from_scratch:
        # Stage 1: pretraining on Wikipedia
        wiki = tokenize_corpus(read_wikipedia_prefix(args.data_dir / "enwiki/AA.jsonl.gz", args.wiki_words),
                               progress=False)
        wiki_vocab = make_vocab(wiki.counts(), min_freq=3, max_vocab=args.max_vocab)
        wiki_ids = wiki.numericalize(token_to_id(wiki_vocab))
        held_out = wiki_ids[-1][-20000:]
        wiki_ids[-1] = wiki_ids[-1][:-20000]
        print(json.dumps({"stage": "data", "wiki_tokens": sum(map(len, wiki_ids)), "wiki_vocab": len(wiki_vocab),
                          "trec_vocab": len(trec_vocab), "seconds": round(time.time() - start, 1)}), flush=True)
        lm_config = awd_lstm_lm_config(len(wiki_vocab), drop_mult=0.1, **sizes)
        params = models.init_language_model(jax.random.PRNGKey(args.seed), lm_config)
        one_cycle = optim.OptimizerConfig(learning_rate=args.pretrain_lr, weight_decay=0.01, clip_norm=0.4)
        params, _, _ = train.fit_language_model(
            params, lm_config, wiki_ids, [held_out], [train.Stage(args.pretrain_epochs, one_cycle)],
            batch_size=args.bs, bptt=args.bptt, seed=args.seed, log=log_line("pretrain"),
            progress=True)

        # Stage 2: fine-tuning on the TREC questions, vocabulary moved as fastai's match_embeds
        params = jax.tree.map(np.asarray, params)
        params = convert.match_embeddings(params, wiki_vocab, trec_vocab)
        lm_config = awd_lstm_lm_config(len(trec_vocab), drop_mult=0.3, **sizes)
        count = len(params["encoder"]["rnn"]) + 1
        stages = [train.Stage(1, optim.OptimizerConfig(learning_rate=1e-2, weight_decay=0.01),
                              optim.freeze(count)),
                  train.Stage(args.finetune_epochs, optim.OptimizerConfig(learning_rate=2e-3, weight_decay=0.01))]
        params, _, _ = train.fit_language_model(params, lm_config, trec_ids, None, stages,
                                                batch_size=32, bptt=args.bptt, seed=args.seed,
                                                log=log_line("finetune"), progress=True)
        encoder_params = jax.tree.map(np.asarray, params["encoder"])
        checkpoint.save_model(args.out / "finetuned_lm", lm_config, params, trec_vocab)

    # Stage 3: the classifier, gradual unfreezing with discriminative learning rates
    clas_config = awd_lstm_clas_config(len(trec_vocab), len(classes), drop_mult=0.5, bptt=args.bptt, **sizes)
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(args.seed + 1), clas_config)
    if encoder_params is not None:
        params["encoder"] = encoder_params
    count = args.n_layers + 2
    lr = 2e-2
    stage = lambda epochs, lr, trainable: train.Stage(
        epochs, optim.OptimizerConfig(learning_rate=optim.Slice(lr / 2.6 ** 4, lr), weight_decay=0.01), trainable)
    stages = [stage(1, lr, optim.freeze_to(-1, count)), stage(1, lr / 2, optim.freeze_to(-2, count)),
              stage(1, lr / 4, optim.freeze_to(-3, count)), stage(args.classifier_epochs, lr / 4, None)]
    if args.from_scratch:
        stages = [stage(args.classifier_epochs + 3, lr / 4, None)]
    params, batch_stats, _, _ = train.fit_classifier(params, batch_stats, clas_config, trec_ids, train_labels,
                                                     None, None, stages, batch_size=args.bs, seed=args.seed,
                                                     log=log_line("classifier"), progress=True)
    probabilities = train.predict_classifier(train.classifier_predictor(clas_config), params, batch_stats,
                                             test_ids, train.classifier_batch_settings(clas_config, args.bs))
    metrics = train.classification_metrics(probabilities, test_labels)
    checkpoint.save_model(args.out / "classifier", clas_config, jax.tree.map(np.asarray, params), trec_vocab,
                          batch_stats=jax.tree.map(np.asarray, batch_stats), classes=classes)
    print(json.dumps({"dataset": "trec6", "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                      "pretrained": not args.from_scratch, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
