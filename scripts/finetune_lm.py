#!/usr/bin/env python
"""ULMFiT stage 2: fine-tune a pretrained language model on the target domain.

  python scripts/finetune_lm.py --data data/imdb --pretrained runs/lm/best --out runs/imdb_lm
  python scripts/finetune_lm.py --data data/imdb --pretrained-fastai lstm_fwd.pth \\
      --pretrained-vocab itos_wt103.pkl --out runs/imdb_lm

The pretrained model (ulmfit_jax model directory, or fastai weights + vocabulary pickle) moves to the
data's vocabulary as fastai's `match_embeds` does. The stages are `--recipe`'s (`ulmfit_jax.recipes`);
the default, fastai's tutorial: the last layer group (embedding + decoder) alone for
`--freeze-epochs` at `--frozen-lr`, then every group for `--epochs` at `--lr` (1 epoch at 1e-2,
then 10 at 1e-3 by default). Text of the train and unsup splits is used (`--include-test-text`
adds the test split's; `--max-docs N` takes N of them), labels are not; `--labelled-docs N` takes
the text of only the N labelled reviews `train_classifier.py --train-docs N` trains on. Writes `out/best`,
`out/last`, `out/encoder` (for train_classifier.py --encoder). Last stdout line: JSON.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, cli, convert, optim, parallel, recipes  # noqa: E402
from ulmfit_jax.config import LanguageModelConfig  # noqa: E402


def load_pretrained(args):
    if args.pretrained is not None:
        model = checkpoint.load_model(args.pretrained)
        if not isinstance(model["config"], LanguageModelConfig):
            raise SystemExit(f"error: {args.pretrained} is not a language model")
        return model["config"], model["params"], model["vocab"]
    if args.pretrained_fastai is None or args.pretrained_vocab is None:
        raise SystemExit("error: give --pretrained DIR, or --pretrained-fastai W.pth with --pretrained-vocab itos.pkl")
    from ulmfit_jax.text.vocab import load_vocab_pickle
    config, params = convert.import_language_model(convert.read_state_dict(args.pretrained_fastai))
    vocab = load_vocab_pickle(args.pretrained_vocab)
    if len(vocab) != config.encoder.vocab_size:
        raise SystemExit(f"error: {args.pretrained_vocab} has {len(vocab)} tokens, the weights "
                         f"{config.encoder.vocab_size}")
    return config, params, vocab


def stages_for(args, n_groups):
    """The run's stages: `--recipe`'s LM fine-tuning at `--lr` (`--frozen-lr` for a frozen stage)
    over `--epochs` (`--freeze-epochs`), under the preset's optimizer settings."""
    recipe = recipes.RECIPES[args.recipe]
    try:
        return recipes.training_stages(recipe.finetune, n_groups=n_groups, lr=args.lr, frozen_lr=args.frozen_lr,
                                       epochs=args.epochs, freeze_epochs=args.freeze_epochs,
                                       optimizer=lambda lr: cli.optimizer_config(args, lr, n_groups))
    except ValueError as error:
        raise SystemExit(f"error: --recipe {recipe.name}: {error}")


def main(argv=None):
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser, default_lr=1e-3, default_epochs=10)
    parser.add_argument("--pretrained", type=Path, help="ulmfit_jax language model directory")
    parser.add_argument("--pretrained-fastai", type=Path, help="fastai LM weights (.pth)")
    parser.add_argument("--pretrained-vocab", type=Path, help="fastai vocabulary pickle for --pretrained-fastai")
    parser.add_argument("--recipe", choices=list(recipes.RECIPES), default="fastai",
                        help="the stages (ulmfit_jax.recipes; default: fastai's tutorial)")
    parser.add_argument("--freeze-epochs", type=int, default=1, help="epochs of the recipe's frozen stage")
    parser.add_argument("--frozen-lr", type=float, default=1e-2, help="learning rate of the recipe's frozen stage")
    parser.add_argument("--max-docs", type=int, help="fine-tune on this many of the documents, chosen by --seed "
                        "(the validation split is taken from them)")
    parser.add_argument("--labelled-docs", type=int, help="fine-tune on the text of only the N labelled training "
                        "documents that train_classifier.py --train-docs N picks with the same --seed (the "
                        "paper's 'supervised' low-shot setting)")
    parser.add_argument("--include-test-text", action="store_true",
                        help="also fine-tune on the test split's text (no labels; fastai's IMDb notebooks do)")
    args = parser.parse_args(argv)
    cli.start(args)
    data = cli.load_data(args)
    pretrained_config, params, pretrained_vocab = load_pretrained(args)
    params = convert.match_embeddings(jax.tree.map(np.asarray, params), pretrained_vocab, data.vocab)
    encoder = pretrained_config.encoder
    config = cli.language_model_config(args, len(data.vocab))
    config = LanguageModelConfig(
        encoder=type(encoder)(**{**encoder.__dict__, "vocab_size": len(data.vocab),
                                 **{k: getattr(config.encoder, k) for k in ("hidden_p", "input_p", "embed_p",
                                                                             "weight_p")}}),
        output_p=config.output_p, tie_weights=pretrained_config.tie_weights, out_bias=pretrained_config.out_bias)
    if args.labelled_docs is not None:
        if args.max_docs is not None or args.include_test_text:
            raise SystemExit("error: --labelled-docs chooses the documents; it does not go with --max-docs or "
                             "--include-test-text")
        documents, _ = cli.labelled_training_documents(data, f"--labelled-docs: {args.data}", args.labelled_docs,
                                                       args.seed, "--labelled-docs")
    else:
        documents, _ = cli.split_documents(
            data, ("train", "unsup", "test") if args.include_test_text else ("train", "unsup"))
        documents, _ = cli.document_subset(documents, None, args.max_docs, args.seed, "--max-docs")
    train_docs, _, valid_docs, _ = cli.validation_split(data, documents, None, args.seed)
    stages = stages_for(args, optim.n_groups(optim.layer_group_labels(params, "lm")))
    final_params, history, throughput = cli.fit_language_model_from_args(
        args, params, config, data.vocab, train_docs, valid_docs, stages, "finetune")
    if parallel.is_main_process():
        best = checkpoint.load_model(args.out / "best") if (args.out / "best").exists() else None
        encoder_params = best["params"]["encoder"] if best else parallel.to_host(final_params["encoder"])
        checkpoint.save_encoder(args.out / "encoder", config.encoder, encoder_params, data.vocab,
                                tokenizer=cli.checked_data_tokenizer(args.data))
    final = cli.final_epoch(args.out, history)
    metrics = ("epoch", "step", "train_loss", "valid_loss", "valid_perplexity", "valid_accuracy")
    cli.finish({"stage": "finetune", "encoder": str(args.out / "encoder"), "documents": len(documents),
                **{k: final.get(k) for k in metrics}}, throughput, started)


if __name__ == "__main__":
    main()
