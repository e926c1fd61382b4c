#!/usr/bin/env python
"""Tokenize and numericalize a text data set for ulmfit_jax (output layout: ulmfit_jax/text/datasets.py).

    python scripts/prepare_data.py --input ../shared/data/imdb --format imdb --out data/imdb

The last line on stdout is JSON: {"docs": ..., "tokens": ..., "vocab": ..., "seconds": ..., ...}.
Warnings (empty documents, replaced bytes) and the progress bar go to stderr. Exit status 2 with a one-line
error on bad input (missing files, fields or columns, labels unknown to the training split).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ulmfit_jax.text.datasets import FORMATS, DataFormatError  # noqa: E402
from ulmfit_jax.text.pipeline import PrepareSettings, prepare  # noqa: E402
from ulmfit_jax.text.tokenizers import TOKENIZER_KINDS, TokenizerSettings  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="file or folder of the data set")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vocab", help="reuse this vocabulary (vocab.json, or a fastai vocab .pkl)")
    parser.add_argument("--classes", help="reuse this classes.json (labels must be among them)")
    parser.add_argument("--max-vocab", type=int, default=60000)
    parser.add_argument("--min-freq", type=int, default=3)
    parser.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="fast")
    parser.add_argument("--sentencepiece-model", help="a trained SentencePiece model (default: train one)")
    parser.add_argument("--sentencepiece-vocab-size", type=int)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label", help="'' for none")
    parser.add_argument("--dump-tokens", help="write one JSON list of tokens a line per document")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: usable cores)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the token cache")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = TokenizerSettings(kind=args.tokenizer, sentencepiece_model=args.sentencepiece_model,
                                  sentencepiece_vocab_size=args.sentencepiece_vocab_size)
    settings = PrepareSettings(format=args.format, tokenizer=tokenizer, max_vocab=args.max_vocab,
                               min_freq=args.min_freq, text_field=args.text_field,
                               label_field=args.label_field, n_workers=args.workers,
                               use_cache=not args.no_cache, progress=not args.no_progress)
    try:
        summary = prepare(args.input, args.out, settings, vocab_path=args.vocab, classes_path=args.classes,
                          dump_tokens=args.dump_tokens)
    except (DataFormatError, FileNotFoundError, ValueError) as error:
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
