#!/usr/bin/env python
"""fastai's learning-rate finder over a model's training steps, with its plot.

  python scripts/lr_find.py --model DIR --data DIR --out DIR [--kind lm|classifier] [--bs 64 --bptt 70]

Trains from the model's weights for up to --num-it steps (default 100) while the learning rate grows
exponentially from --start-lr (1e-7) to --end-lr (10), the same for every layer group, and stops
once the smoothed loss exceeds 4x its minimum (ulmfit_jax.lr_find, fastai's `Learner.lr_find`).
The model directory is not modified. `--data` is a folder from prepare_data.py with the model's
vocabulary (its `train` split is used). Writes lr_find.png and lr_find.json (the record) to --out.
The last stdout line is JSON: {"valley", "minimum", "steep": suggested learning rates (valley is
fastai's default), "plot": path of the PNG, "steps", "stopped"}.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulmfit_jax import checkpoint, lr_find  # noqa: E402
from ulmfit_jax.config import ClassifierConfig  # noqa: E402
from ulmfit_jax.text.datasets import DataFormatError, load_prepared  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ulmfit_jax model directory")
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (prepare_data.py)")
    parser.add_argument("--out", type=Path, required=True, help="folder for lr_find.png and lr_find.json")
    parser.add_argument("--kind", choices=("lm", "classifier"), help="default: the model directory's kind")
    parser.add_argument("--bs", type=int, default=64, help="batch size")
    parser.add_argument("--bptt", type=int, default=70, help="LM window length (the classifier uses its config's)")
    parser.add_argument("--start-lr", type=float, default=1e-7)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--num-it", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backwards", action="store_true", help="a backwards model: reversed documents")
    args = parser.parse_args(argv)
    try:
        if args.bs < 1 or args.bptt < 1:
            raise ValueError("--bs and --bptt must be positive")
        finder = lr_find.FinderConfig(start_lr=args.start_lr, end_lr=args.end_lr, num_it=args.num_it)
        model = checkpoint.load_model(args.model)
        kind = "classifier" if isinstance(model["config"], ClassifierConfig) else "lm"
        if args.kind is not None and args.kind != kind:
            raise ValueError(f"--kind {args.kind}, but {args.model} holds a {kind} model")
        data = load_prepared(args.data)
        if data.vocab != model["vocab"]:
            raise ValueError(f"{args.data} and {args.model} have different vocabularies "
                             f"({len(data.vocab)} and {len(model['vocab'])} tokens)")
        if "train" not in data.splits:
            raise ValueError(f"{args.data} has no train split (splits: {sorted(data.splits)})")
        split = data.splits["train"]
        if kind == "lm":
            record = lr_find.find_language_model_lr(model["params"], model["config"], split.documents,
                                                    batch_size=args.bs, bptt=args.bptt, finder=finder,
                                                    backwards=args.backwards, seed=args.seed)
        else:
            record = lr_find.find_classifier_lr(model["params"], model["batch_stats"], model["config"],
                                                split.documents, split.labels, batch_size=args.bs, finder=finder,
                                                backwards=args.backwards, seed=args.seed)
        suggestions = lr_find.suggest(record)
    except (FileNotFoundError, ValueError, DataFormatError) as error:
        raise SystemExit(f"error: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "lr_find.png"
    lr_find.plot(record, suggestions, plot_path)
    (args.out / "lr_find.json").write_text(json.dumps({
        "lrs": record.lrs.tolist(), "losses": record.losses.tolist(), "raw_losses": record.raw_losses.tolist(),
        "stopped": record.stopped, "suggestions": suggestions}))
    print(json.dumps({**{name: lr for name, (lr, _) in suggestions.items()}, "plot": str(plot_path),
                      "steps": int(record.lrs.size), "stopped": record.stopped}))


if __name__ == "__main__":
    main()
