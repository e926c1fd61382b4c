#!/usr/bin/env python
"""Perplexity of a language model on a stream of token ids or on raw text (eval mode, state carried).

  python scripts/evaluate_lm.py --model DIR --ids IDS.npy --bs 1 --bptt 70
  python scripts/evaluate_lm.py --model DIR --text texts.txt

`--ids` is a 1-D integer .npy of token ids in the model's vocabulary; `--text` a UTF-8 file of one
document a line (blank lines skipped), tokenized with the tokenizer the model directory records
and streamed one document after another (`ulmfit_jax.load_language_model(DIR).evaluate`). The last
stdout line is JSON: {"loss": mean next-token cross-entropy, "perplexity": exp(loss), "accuracy":
..., "tokens": predicted tokens, "seconds": wall time of the evaluation, compile included (and
tokenization, with --text), "tokens_per_s": tokens / seconds}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ulmfit_jax.inference import load_language_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ulmfit_jax language model directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", type=Path, help="1-D .npy of token ids")
    source.add_argument("--text", type=Path, help="raw text file, one document a line")
    parser.add_argument("--bs", type=int, default=1, help="number of parallel streams (fastai's bs)")
    parser.add_argument("--bptt", type=int, default=70, help="window length")
    parser.add_argument("--backwards", action="store_true", help="a backwards LM (--text: documents reversed)")
    args = parser.parse_args(argv)
    if args.bs < 1 or args.bptt < 1:
        raise SystemExit("error: --bs and --bptt must be positive")
    try:
        model = load_language_model(args.model)
        if args.ids is not None:
            ids = np.load(args.ids, allow_pickle=False)
            if not np.issubdtype(ids.dtype, np.integer):
                raise SystemExit(f"error: {args.ids} holds {ids.dtype}, not integer token ids")
            start = time.perf_counter()
            result = model.evaluate_ids(ids, batch_size=args.bs, bptt=args.bptt)
        else:
            texts = [line for line in args.text.read_text(encoding="utf-8", errors="replace").splitlines()
                     if line.strip()]
            if not texts:
                raise SystemExit(f"error: {args.text} has no text")
            start = time.perf_counter()
            result = model.evaluate(texts, batch_size=args.bs, bptt=args.bptt, backwards=args.backwards)
        seconds = time.perf_counter() - start
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")
    result.update(seconds=round(seconds, 4), tokens_per_s=round(result["tokens"] / seconds, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
