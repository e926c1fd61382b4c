#!/usr/bin/env python
"""Evaluate a model on a split of prepared data: LM perplexity, or classifier metrics.

  python scripts/evaluate.py --model runs/lm/best --data data/wt2 --split test
  python scripts/evaluate.py --model runs/clas/best --data data/trec --split test
  python scripts/evaluate.py --ensemble runs/fwd/best runs/bwd/best --data data/trec --split test

`--ensemble FWD BWD` averages a forward and a backward classifier's probabilities (the backward one
reads every document reversed). The models are loaded with `ulmfit_jax.load_classifier` /
`load_language_model`; the data must have been prepared with the model's vocabulary and the
tokenizer its directory records (refused otherwise). The last stdout line is JSON of the metrics.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, cli, metrics  # noqa: E402
from ulmfit_jax.inference import load_classifier, load_language_model, model_kind  # noqa: E402
from ulmfit_jax.text.batches import concatenate_documents  # noqa: E402
from ulmfit_jax.text.datasets import load_prepared  # noqa: E402


def check_tokenizers(directories, data_folder) -> None:
    """Refuse data tokenized otherwise than a model's directory records (a directory that records
    no tokenizer is not checked: it warns when loaded)."""
    data_tokenizer = cli.data_tokenizer(data_folder)
    for directory in directories:
        recorded = checkpoint.read_tokenizer(directory)
        if recorded is not None and data_tokenizer is not None and not checkpoint.same_tokenizer(recorded,
                                                                                                  data_tokenizer):
            raise ValueError(f"{data_folder} was tokenized with {checkpoint.describe_tokenizer(data_tokenizer)}, "
                             f"the model {directory} with {checkpoint.describe_tokenizer(recorded)}: prepare the "
                             "data with the model's tokenizer")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", type=Path, help="model directory")
    models.add_argument("--ensemble", type=Path, nargs=2, metavar=("FWD", "BWD"), help="forward and backward classifiers")
    parser.add_argument("--data", type=Path, required=True, help="folder written by prepare_data.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=70, help="LM window length")
    parser.add_argument("--backwards", action="store_true", help="the model reads reversed documents")
    args = parser.parse_args(argv)
    try:
        data = load_prepared(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if args.split not in data.splits:
        raise SystemExit(f"error: {args.data} has no split {args.split!r} (it has {sorted(data.splits)})")
    split = data.splits[args.split]
    directories = args.ensemble or [args.model]
    try:
        kind = model_kind(directories[0])
        if kind == "language_model":
            if args.ensemble:
                raise SystemExit("error: --ensemble takes classifiers")
            model = load_language_model(args.model)
        else:
            model = load_classifier(directories[0], args.ensemble[1] if args.ensemble else None,
                                    backwards=args.backwards and not args.ensemble, batch_size=args.bs)
        if model.vocab != data.vocab:
            raise SystemExit("error: the model's vocabulary is not the data's: prepare the data with "
                             "--vocab MODEL/vocab.json")
        check_tokenizers(directories, args.data)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    if kind == "language_model":
        stream = concatenate_documents(split.documents, backwards=args.backwards)
        try:
            result = model.evaluate_ids(stream, batch_size=args.bs, bptt=args.bptt)
        except ValueError as error:
            raise SystemExit(f"error: {error}")
    else:
        if split.labels is None:
            raise SystemExit(f"error: split {args.split!r} has no labels")
        classes = model.model.get("classes")
        if classes is not None and data.classes is not None and classes != data.classes:
            raise SystemExit(f"error: the model's classes {classes} are not the data's {data.classes}")
        probabilities = model.probabilities(split.documents)
        result = metrics.classification_metrics(probabilities, np.asarray(split.labels))
        result["documents"] = len(split.documents)
    print(json.dumps({"split": args.split, **result}))


if __name__ == "__main__":
    main()
