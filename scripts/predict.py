#!/usr/bin/env python
"""Classify raw texts: one text a line from --input (or stdin) -> JSON lines.

  echo "What is the capital of France ?" | python scripts/predict.py --model runs/clas/best
  python scripts/predict.py --model runs/fwd/best --backward-model runs/bwd/best --input texts.txt

Each output line: {"text": ..., "label": ..., "probabilities": {class: p, ...}}, for every non-blank
input line in order. The texts are read with the tokenizer the model directory records (the one
its data was prepared with: rules, `fast` / `spacy` / SentencePiece with its own model file); a
directory without one gets the default and a warning on stderr. This is `ulmfit_jax.load_classifier`
and its `predict`; the compiled forward passes (one per length bucket) are kept in the persistent
compilation cache (`--compilation-cache`), so a second run loads them.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulmfit_jax import cli  # noqa: E402
from ulmfit_jax.inference import load_classifier  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="classifier model directory")
    parser.add_argument("--backward-model", type=Path, help="a backward classifier to ensemble with")
    parser.add_argument("--input", type=Path, help="text file, one text a line (default: stdin)")
    parser.add_argument("--bs", type=int, default=64)
    cli.add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    cli.use_compilation_cache(args.compilation_cache)
    try:
        classifier = load_classifier(args.model, args.backward_model, batch_size=args.bs)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    try:
        lines = (args.input.read_text(encoding="utf-8", errors="replace") if args.input
                 else sys.stdin.read()).splitlines()
    except OSError as error:
        raise SystemExit(f"error: {error}")
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise SystemExit("error: no text to classify")
    labels, probabilities = classifier.predict(texts)
    classes = classifier.classes
    sys.stdout.write("".join(
        json.dumps({"text": text, "label": label,
                    "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}}) + "\n"
        for text, label, row in zip(texts, labels, probabilities)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
