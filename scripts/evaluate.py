#!/usr/bin/env python
"""Evaluate a model on a split of prepared data: LM perplexity, or classifier metrics.

  python scripts/evaluate.py --model runs/lm/best --data data/wt2 --split test
  python scripts/evaluate.py --model runs/clas/best --data data/trec --split test
  python scripts/evaluate.py --ensemble runs/fwd/best runs/bwd/best --data data/trec --split test

`--ensemble FWD BWD` averages a forward and a backward classifier's probabilities (the backward one
reads every document reversed). The last stdout line is JSON of the metrics.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint, ensemble, metrics  # noqa: E402
from ulmfit_jax.config import LanguageModelConfig  # noqa: E402
from ulmfit_jax.evaluation import evaluate_language_model  # noqa: E402
from ulmfit_jax.text.batches import concatenate_documents  # noqa: E402
from ulmfit_jax.text.datasets import load_prepared  # noqa: E402


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
    data = load_prepared(args.data)
    if args.split not in data.splits:
        raise SystemExit(f"error: {args.data} has no split {args.split!r} (it has {sorted(data.splits)})")
    split = data.splits[args.split]
    loaded = [checkpoint.load_model(p) for p in (args.ensemble or [args.model])]
    for model in loaded:
        if model["vocab"] != data.vocab:
            raise SystemExit("error: the model's vocabulary is not the data's: prepare the data with "
                             "--vocab MODEL/vocab.json")
    first = loaded[0]
    if isinstance(first["config"], LanguageModelConfig):
        if args.ensemble:
            raise SystemExit("error: --ensemble takes classifiers")
        stream = concatenate_documents(split.documents, backwards=args.backwards)
        result = evaluate_language_model(first["params"], first["config"], stream, batch_size=args.bs, bptt=args.bptt)
    else:
        if split.labels is None:
            raise SystemExit(f"error: split {args.split!r} has no labels")
        if first.get("classes") is not None and data.classes is not None and first["classes"] != data.classes:
            raise SystemExit(f"error: the model's classes {first['classes']} are not the data's {data.classes}")
        if args.ensemble:
            probabilities = ensemble.ensemble_probabilities(loaded[0], loaded[1], split.documents, args.bs)
        else:
            probabilities = ensemble.classifier_probabilities(first, split.documents, backwards=args.backwards,
                                                              batch_size=args.bs)
        result = metrics.classification_metrics(probabilities, np.asarray(split.labels))
        result["documents"] = len(split.documents)
    print(json.dumps({"split": args.split, **result}))


if __name__ == "__main__":
    main()
