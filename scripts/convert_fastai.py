#!/usr/bin/env python
"""Convert fastai AWD-LSTM weights to a ulmfit_jax model directory and back.

  python scripts/convert_fastai.py import --weights W.pth --vocab itos.pkl --out DIR
  python scripts/convert_fastai.py import --weights W.pth --vocab itos.pkl --out DIR \
      --tokenizer sentencepiece --sentencepiece-model spm.model
  python scripts/convert_fastai.py export --model DIR --weights W.pth --vocab itos.pkl

Import reads fastai v2, v1 and 0.7 state dicts (language model or classifier; the config comes
from the shapes) and fastai's vocabulary pickle (read by a restricted unpickler that accepts only
a list of strings), AWD-LSTM or fastai v1's AWD-QRNN. Export writes a state dict fastai loads
(fastai v2's layout; fastai 1.0.61's for a QRNN, which fastai v2 no longer has) and the vocabulary
pickle. The imported directory records how its vocabulary's text is tokenized (`--tokenizer`:
fastai's rules with `fast`, equal to fastai's default spaCy tokenizer, unless told otherwise; a
SentencePiece model, as MultiFiT's, is copied into the directory). A classifier's pooled features
depend on BPT3C's window and max_len, which a state dict does not hold: `--bptt` and `--max-len`
give them (fastai's defaults, 72 and 72 * 20, unless told). The last stdout line is JSON.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulmfit_jax import checkpoint, convert  # noqa: E402
from ulmfit_jax.config import LanguageModelConfig  # noqa: E402
from ulmfit_jax.text.tokenizers import TOKENIZER_KINDS  # noqa: E402


def import_weights(args) -> dict:
    from ulmfit_jax.text.tokenizers import TokenizerSettings
    from ulmfit_jax.text.vocab import load_vocab_pickle
    if (args.tokenizer == "sentencepiece") != (args.sentencepiece_model is not None):
        raise SystemExit("error: --tokenizer sentencepiece and --sentencepiece-model go together")
    if args.sentencepiece_model is not None and not args.sentencepiece_model.is_file():
        raise SystemExit(f"error: {args.sentencepiece_model} is not a file")
    tokenizer = TokenizerSettings(kind=args.tokenizer, add_eos=args.add_eos,
                                  sentencepiece_model=None if args.sentencepiece_model is None
                                  else str(args.sentencepiece_model))
    state_dict = convert.read_state_dict(args.weights)
    _, kind = convert.detect_format(state_dict)
    vocab = load_vocab_pickle(args.vocab)
    window = {k: v for k, v in (("bptt", args.bptt), ("max_len", args.max_len)) if v is not None}
    if kind == "language_model":
        if window:
            raise SystemExit("error: --bptt and --max-len are a classifier's; the weights are a language model's")
        config, params = convert.import_language_model(state_dict)
        batch_stats = None
    else:
        config, params, batch_stats = convert.import_classifier(state_dict)
        # a state dict does not hold BPT3C's window and max_len, on which fastai's pooled features depend
        config = dataclasses.replace(config, **{k: None if v == 0 else v for k, v in window.items()})
    if len(vocab) != config.encoder.vocab_size:
        raise SystemExit(f"error: {args.vocab} has {len(vocab)} tokens but the weights' embedding has "
                         f"{config.encoder.vocab_size} rows")
    checkpoint.save_model(args.out, config, params, vocab, batch_stats=batch_stats, tokenizer=tokenizer)
    version, _ = convert.detect_format(state_dict)
    return {"kind": kind, "fastai_version": version, "vocab": len(vocab), "out": str(args.out),
            "tokenizer": tokenizer.kind, **({} if kind == "language_model" else
                                           {"bptt": config.bptt, "max_len": config.max_len}),
            "emb_size": config.encoder.emb_size, "n_hidden": config.encoder.n_hidden,
            "n_layers": config.encoder.n_layers, "bidirectional": config.encoder.bidirectional}


def export_weights(args) -> dict:
    model = checkpoint.load_model(args.model)
    config = model["config"]
    if isinstance(config, LanguageModelConfig):
        state_dict = convert.export_language_model(model["params"], config)
        kind = "language_model"
    else:
        state_dict = convert.export_classifier(model["params"], model["batch_stats"], config)
        kind = "classifier"
    for path in (args.weights, args.vocab):
        path.parent.mkdir(parents=True, exist_ok=True)
    convert.write_state_dict(state_dict, args.weights)
    convert.write_vocab_pickle(model["vocab"], args.vocab)
    return {"kind": kind, "weights": str(args.weights), "vocab": len(model["vocab"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_ours = commands.add_parser("import", help="fastai .pth + vocab pickle -> ulmfit_jax model directory")
    to_ours.add_argument("--weights", type=Path, required=True, help="fastai state dict (.pth)")
    to_ours.add_argument("--vocab", type=Path, required=True, help="fastai vocabulary pickle (itos)")
    to_ours.add_argument("--out", type=Path, required=True, help="model directory to write")
    to_ours.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="fast",
                         help="how the vocabulary's text was tokenized (default fast: fastai's spaCy tokens)")
    to_ours.add_argument("--sentencepiece-model", type=Path, help="the SentencePiece model (--tokenizer sentencepiece)")
    to_ours.add_argument("--add-eos", action="store_true", help="the texts ended with xxeos (fastai's add_eos)")
    to_ours.add_argument("--bptt", type=int, help="a classifier's BPT3C window, as it was trained (default fastai's 72)")
    to_ours.add_argument("--max-len", type=int,
                         help="a classifier's BPT3C max_len, 0 for none (default fastai's 72 * 20)")
    to_fastai = commands.add_parser("export", help="ulmfit_jax model directory -> fastai v2 .pth + vocab pickle")
    to_fastai.add_argument("--model", type=Path, required=True, help="ulmfit_jax model directory")
    to_fastai.add_argument("--weights", type=Path, required=True, help="fastai state dict to write (.pth)")
    to_fastai.add_argument("--vocab", type=Path, required=True, help="vocabulary pickle to write")
    args = parser.parse_args(argv)
    try:
        result = import_weights(args) if args.command == "import" else export_weights(args)
    except (convert.WeightsError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
