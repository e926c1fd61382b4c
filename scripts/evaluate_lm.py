#!/usr/bin/env python
"""Perplexity of a language model on a stream of token ids (eval mode, state carried).

  python scripts/evaluate_lm.py --model DIR --ids IDS.npy --bs 1 --bptt 70

`--ids` is a 1-D integer .npy of token ids in the model's vocabulary. The last stdout line is JSON:
{"loss": mean next-token cross-entropy, "perplexity": exp(loss), "accuracy": ..., "tokens": predicted tokens,
"seconds": wall time of the evaluation, compile included, "tokens_per_s": tokens / seconds}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ulmfit_jax import checkpoint  # noqa: E402
from ulmfit_jax.config import LanguageModelConfig  # noqa: E402
from ulmfit_jax.evaluation import evaluate_language_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ulmfit_jax language model directory")
    parser.add_argument("--ids", type=Path, required=True, help="1-D .npy of token ids")
    parser.add_argument("--bs", type=int, default=1, help="number of parallel streams (fastai's bs)")
    parser.add_argument("--bptt", type=int, default=70, help="window length")
    args = parser.parse_args(argv)
    if args.bs < 1 or args.bptt < 1:
        raise SystemExit("error: --bs and --bptt must be positive")
    model = checkpoint.load_model(args.model)
    if not isinstance(model["config"], LanguageModelConfig):
        raise SystemExit(f"error: {args.model} holds a classifier, not a language model")
    ids = np.load(args.ids, allow_pickle=False)
    if not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"error: {args.ids} holds {ids.dtype}, not integer token ids")
    try:
        start = time.perf_counter()
        result = evaluate_language_model(model["params"], model["config"], ids, batch_size=args.bs, bptt=args.bptt)
        seconds = time.perf_counter() - start
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    result.update(seconds=round(seconds, 4), tokens_per_s=round(result["tokens"] / seconds, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
