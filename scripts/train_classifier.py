#!/usr/bin/env python
"""ULMFiT stage 3: a classifier on the fine-tuned encoder, with gradual unfreezing.

  python scripts/train_classifier.py --data data/trec --encoder runs/trec_lm/encoder --out runs/trec_clas

The stages are `--recipe`'s (`ulmfit_jax.recipes`). The default, fastai's tutorial: gradual
unfreezing, the head alone for one epoch at `--lr`, then the last two groups at lr/2, the last
three at lr/4, each for one epoch with discriminative rates `slice(lr_k / 2.6**(groups-1), lr_k)`,
then every group for `--epochs` at lr/20; `--recipe chain-thaw` (or `--chain-thaw`), `paper`,
`multifit`, `demo`, `full`, `last` for the others; `--no-discriminative` trains every group at the
stage's rate. Schedules: one-cycle (`--preset fastai`) or STLR (`--preset
paper`) unless the recipe sets its own. Without `--encoder` the classifier trains from scratch
(the fastai recipe: every group, `--epochs` + 3 epochs at lr/4). Validation on
'valid' / 'dev' (or 10% of train), test metrics at the end when the data has a test split.
`--train-docs N` trains on N labelled documents, balanced over the classes (low-shot runs);
`--test-docs N` tests on a fixed balanced N of the test documents. Writes
`out/best`, `out/last`, metrics and plots; last stdout line JSON.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, cli, metrics, models, optim, parallel, predict, recipes, train  # noqa: E402


def stages_for(args, n_groups, from_scratch):
    """The run's stages: `--recipe`'s classifier (from scratch without `--encoder`) at `--lr` over
    `--epochs`, under the preset's optimizer settings."""
    recipe = recipes.RECIPES["chain-thaw" if args.chain_thaw else args.recipe]
    stages = recipe.from_scratch if from_scratch else recipe.classifier
    if args.no_discriminative:
        stages = recipes.without_discriminative(stages)
    try:
        return recipes.training_stages(stages,
                                       n_groups=n_groups, lr=args.lr, epochs=args.epochs,
                                       optimizer=lambda lr: cli.optimizer_config(args, lr, n_groups))
    except ValueError as error:
        raise SystemExit(f"error: --recipe {recipe.name}: {error}")


TEST_SUBSET_SEED = 0     # --test-docs: one subset for every --seed, so that runs compare on the same documents


def main(argv=None):
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, default_lr=2e-2, default_epochs=2)
    parser.add_argument("--encoder", type=Path, help="fine-tuned encoder (finetune_lm.py's out/encoder)")
    parser.add_argument("--recipe", choices=list(recipes.RECIPES), default="fastai",
                        help="the stages (ulmfit_jax.recipes; default: fastai's tutorial)")
    parser.add_argument("--chain-thaw", action="store_true", help="the same as --recipe chain-thaw")
    parser.add_argument("--train-docs", type=int, help="train on this many of the labelled training documents, "
                        "balanced over the classes and chosen by --seed (the validation split is taken from them)")
    parser.add_argument("--test-docs", type=int, help="test metrics on this many of the test documents, balanced "
                        "over the classes and the same for every --seed (a fixed test subset)")
    parser.add_argument("--no-discriminative", action="store_true",
                        help="every group at the stage's rate (recipes.without_discriminative)")
    args = parser.parse_args(argv)
    if args.no_discriminative and args.preset == "paper":
        raise SystemExit("error: --no-discriminative does not go with --preset paper, whose optimizer spreads "
                         "every rate over the groups")
    if args.chain_thaw and args.recipe not in ("fastai", "chain-thaw"):
        raise SystemExit(f"error: --chain-thaw is --recipe chain-thaw; it does not go with --recipe {args.recipe}")
    cli.start(args)
    data = cli.load_data(args)
    documents, labels = cli.labelled_training_documents(data, args.data, args.train_docs, args.seed, "--train-docs")
    if not documents:
        raise SystemExit(f"error: {args.data}: the training set is empty")
    train_docs, train_labels, valid_docs, valid_labels = cli.validation_split(data, documents, labels, args.seed)
    config = cli.classifier_config(args, len(data.vocab), len(data.classes))
    encoder_params = None
    if args.encoder is not None:
        encoder_config, encoder_params, encoder_vocab = checkpoint.load_encoder(args.encoder)
        if encoder_vocab != data.vocab:
            raise SystemExit(f"error: the encoder's vocabulary ({len(encoder_vocab)} tokens) is not the data's "
                             f"({len(data.vocab)}): prepare the data with --vocab {args.encoder}/vocab.json")
        given = {"--emb-sz": (args.emb_sz, encoder_config.emb_size), "--n-hid": (args.n_hid, encoder_config.n_hidden),
                 "--n-layers": (args.n_layers, encoder_config.n_layers), "--arch": (args.arch, encoder_config.arch)}
        differing = [f"{flag} {value} (the encoder's: {actual})" for flag, (value, actual) in given.items()
                     if value is not None and value != actual]
        if differing:
            raise SystemExit(f"error: the encoder's architecture is fixed by {args.encoder}; drop or correct "
                             + ", ".join(differing))
        config = type(config)(**{**config.__dict__, "encoder": type(encoder_config)(**{
            **encoder_config.__dict__, **{k: getattr(config.encoder, k) for k in (
                "hidden_p", "input_p", "embed_p", "weight_p")}})})
    params, batch_stats = models.init_classifier(jax.random.PRNGKey(args.seed), config, encoder_params)
    n_groups = optim.n_groups(optim.layer_group_labels(params, "classifier"))
    stages = stages_for(args, n_groups, from_scratch=args.encoder is None)
    log = cli.RunLog(args.out, "classifier")
    regularization = train.RegularizationConfig(label_smoothing=cli.label_smoothing(args))

    test = data.splits.get("test")
    test_documents, test_labels = [], None
    if test is not None and test.labels is not None:
        test_documents, test_labels = cli.document_subset(test.documents, np.asarray(test.labels), args.test_docs,
                                                          TEST_SUBSET_SEED, "--test-docs")
    elif args.test_docs is not None:
        raise SystemExit(f"error: --test-docs: {args.data} has no labelled test split")

    # the test set is predicted through the fit's programs: the same layout
    layout, _ = train.classifier_layout(config, train_docs, args.bs, args.backwards,
                                        sum(stage.epochs for stage in stages), valid_docs, test_documents)

    def fit(checkpointer):
        return train.fit_classifier(
            params, batch_stats, config, train_docs, train_labels, valid_docs, valid_labels, stages,
            batch_size=args.bs, seed=args.seed, backwards=args.backwards, regularization=regularization,
            max_steps=args.max_steps, compute_dtype=cli.compute_dtype(args), checkpointer=checkpointer, log=log,
            progress=parallel.is_main_process(), **cli.loop_options(args), predict_documents=test_documents,
            layout=layout,
            on_epoch_end=cli.best_and_last(args.out, config, data.vocab, "valid_accuracy", lower_is_better=False,
                                           classes=data.classes, tokenizer=cli.data_tokenizer(args.data)))

    try:
        final_params, final_stats, history, throughput = cli.run_training(fit, log, started, args.out / "checkpoints")
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    final = cli.final_epoch(args.out, history)
    result = {"stage": "classifier", "model": str(args.out / "last"), **{k: final.get(k) for k in (
        "epoch", "step", "train_loss", "valid_loss", "valid_accuracy", "valid_macro_f1")}}
    if test_documents:
        probabilities = predict.predict_classifier(predict.classifier_predictor(config),
                                                   *parallel.local_copy((final_params, final_stats)),
                                                   test_documents, layout)
        scores = metrics.classification_metrics(probabilities, test_labels)
        result.update({"test_documents": len(test_documents), **{f"test_{k}": v for k, v in scores.items()}})
    cli.finish(result, throughput, started)


if __name__ == "__main__":
    main()
