#!/usr/bin/env python
"""ULMFiT stage 1: pretrain a language model on a general corpus.

  python scripts/prepare_data.py --input ../shared/data/wikitext2 --format wikitext --out data/wt2
  python scripts/pretrain_lm.py --data data/wt2 --out runs/lm --epochs 10

Trains on the 'train' (and 'unsup') documents, validates each epoch on 'valid' / 'dev' (or 10% of
train). Writes `out/last` and `out/best` (model directories), `out/checkpoints` (orbax; a rerun
resumes from there), `out/metrics.jsonl` and a plot. The last stdout line is JSON.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from ulmfit_jax import cli, models, optim, train  # noqa: E402


def main(argv=None):
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, default_lr=2e-3, default_epochs=1)
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="initialise the embedding from word vectors (GloVe / word2vec text format)")
    args = parser.parse_args(argv)
    cli.start(args)
    data = cli.load_data(args)
    documents, _ = cli.split_documents(data, ("train", "unsup"))
    if not documents:
        raise SystemExit(f"error: {args.data} has no training documents")
    train_docs, _, valid_docs, _ = cli.validation_split(data, documents, None, args.seed)
    config = cli.language_model_config(args, len(data.vocab))
    params = models.init_language_model(jax.random.PRNGKey(args.seed), config)
    if args.embeddings is not None:
        from ulmfit_jax.embeddings import load_word_vectors
        params["encoder"]["embed"] = load_word_vectors(args.embeddings, data.vocab, params["encoder"]["embed"])
    n_groups = optim.n_groups(optim.layer_group_labels(params, "lm"))
    stages = [train.Stage(args.epochs, cli.optimizer_config(args, args.lr, n_groups))]
    _, history, throughput = cli.fit_language_model_from_args(
        args, params, config, data.vocab, train_docs, valid_docs, stages, "pretrain")
    final = cli.final_epoch(args.out, history)
    cli.finish({"stage": "pretrain", "model": str(args.out / "best"), **{k: final.get(k) for k in (
        "epoch", "step", "train_loss", "valid_loss", "valid_perplexity", "valid_accuracy")}}, throughput, started)


if __name__ == "__main__":
    main()
