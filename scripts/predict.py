#!/usr/bin/env python
"""Classify raw texts: one text a line from --input (or stdin) -> JSON lines.

  echo "What is the capital of France ?" | python scripts/predict.py --model runs/clas/best
  python scripts/predict.py --model runs/fwd/best --backward-model runs/bwd/best --input texts.txt

Each output line: {"text": ..., "label": ..., "probabilities": {class: p, ...}}. The texts go through the
same tokenizer rules as prepare_data.py (the default `fast` tokenizer).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulmfit_jax import checkpoint, ensemble  # noqa: E402
from ulmfit_jax.config import ClassifierConfig  # noqa: E402
from ulmfit_jax.text.pipeline import tokenize_corpus  # noqa: E402
from ulmfit_jax.text.vocab import token_to_id  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="classifier model directory")
    parser.add_argument("--backward-model", type=Path, help="a backward classifier to ensemble with")
    parser.add_argument("--input", type=Path, help="text file, one text a line (default: stdin)")
    parser.add_argument("--bs", type=int, default=64)
    args = parser.parse_args(argv)
    forward = checkpoint.load_model(args.model)
    if not isinstance(forward["config"], ClassifierConfig):
        raise SystemExit(f"error: {args.model} is not a classifier")
    lines = (args.input.read_text(encoding="utf-8", errors="replace") if args.input else sys.stdin.read()).splitlines()
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise SystemExit("error: no text to classify")
    documents = tokenize_corpus(texts, n_workers=0, use_cache=False, progress=False).numericalize(
        token_to_id(forward["vocab"]))
    if args.backward_model is not None:
        probabilities = ensemble.ensemble_probabilities(forward, checkpoint.load_model(args.backward_model),
                                                        documents, args.bs)
    else:
        probabilities = ensemble.classifier_probabilities(forward, documents, batch_size=args.bs)
    classes = forward.get("classes") or [str(i) for i in range(probabilities.shape[1])]
    for text, row in zip(texts, probabilities):
        print(json.dumps({"text": text, "label": classes[int(row.argmax())],
                          "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}}))


if __name__ == "__main__":
    main()
