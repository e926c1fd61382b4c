"""The paper's low-shot curve (Howard & Ruder 2018, Figure 3) on IMDb, cut to a CPU's size: test
error against the number of labelled training reviews for three classifiers of one architecture:
- "from scratch": `scripts/train_classifier.py` without an encoder (every weight random);
- "supervised": the Wikipedia LM fine-tuned on the text of only the labelled reviews the classifier
  then trains on (`scripts/finetune_lm.py --labelled-docs N`), then ULMFiT's classifier;
- "semi-supervised": the LM fine-tuned on unlabelled reviews (`--semi-supervised`, the forward
  `lm_forward/encoder` of experiments/imdb.py: 6,000 of IMDb's train and unsup reviews).

Every run trains on N labelled training reviews (`--train-docs N`, balanced, chosen by the seed; 10%
of them for validation) and is tested on one balanced subset of the test reviews, the same for every
run (`--test-docs`, 5,000 by default). Fewer reviews get more epochs, so that the small runs take
more than a handful of steps: the classifier's last stage and the LM fine-tuning's unfrozen stage run
`epochs(N) = clip(ceil(1000 / N), 1, 10)` epochs (10 at 100 reviews, 1 from 1,000); the recipe is
otherwise the one of experiments/imdb.py (fastai's gradual unfreezing, bs 64, bptt 70, BPT3C
max_len 1,440). Runs go seed by seed, size by size, so that a stopped experiment leaves whole points;
every run's result is kept in OUT/steps/ and a rerun skips the runs there. OUT/results.json,
OUT/results.md and OUT/lowshot.png hold the summary.

    .venv/bin/python experiments/lowshot_imdb.py --pretrained runs/bench_s9/pretrain/words_1500000/lm/best \\
        --imdb runs/imdb --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from imdb import ROOT, SCRIPTS, bench, step, step_record  # experiments/imdb.py: resumable script runs, bench_small_data

from common import git_state, machine, versions  # noqa: E402  (benchmarks/, on sys.path through imdb)
from ulmfit_jax import checkpoint  # noqa: E402

VARIANTS = ("from scratch", "supervised", "semi-supervised")


def epochs(n: int) -> int:
    return min(10, max(1, math.ceil(1000 / n)))


def architecture(pretrained: Path) -> list:
    """The from-scratch classifier's sizes: the pretrained LM's, so that only the initialisation differs."""
    encoder = checkpoint.load_model(pretrained)["config"].encoder
    return ["--emb-sz", encoder.emb_size, "--n-hid", encoder.n_hidden, "--n-layers", encoder.n_layers]


def point_steps(seed: int, n: int) -> dict[str, str]:
    """The names of the point's steps (and of their run folders in OUT), at n labelled reviews and `seed`."""
    return {kind: f"{kind}_n{n}_seed{seed}" for kind in ("scratch", "lm_supervised", "supervised", "semi")}


def ran(args, seed: int, n: int) -> bool:
    """Whether every step of the point is recorded in OUT/steps."""
    return all(step_record(args, name).exists() for name in point_steps(seed, n).values())


def run_point(args, seed: int, n: int) -> dict:
    """The three variants' test errors at n labelled reviews and one seed."""
    flags = bench.imdb_flags(epochs(n))
    common = ["--data", args.imdb / "data", "--train-docs", n, "--test-docs", args.test_docs, "--seed", seed,
              *flags["classifier"]]
    names = point_steps(seed, n)
    scratch = step(args, names["scratch"], [SCRIPTS / "train_classifier.py", *common, *architecture(args.pretrained),
                                            "--out", args.out / names["scratch"]])
    lm = step(args, names["lm_supervised"], [
        SCRIPTS / "finetune_lm.py", "--data", args.imdb / "data", "--pretrained", args.pretrained, "--out",
        args.out / names["lm_supervised"], "--labelled-docs", n, "--seed", seed, *flags["finetune"]])
    supervised = step(args, names["supervised"], [SCRIPTS / "train_classifier.py", *common, "--encoder",
                                                  lm["encoder"], "--out", args.out / names["supervised"]])
    semi = step(args, names["semi"], [SCRIPTS / "train_classifier.py", *common, "--encoder", args.semi_supervised,
                                      "--out", args.out / names["semi"]])
    return {"from scratch": scratch, "supervised": supervised, "semi-supervised": semi, "lm_supervised": lm}


def summarize(points: dict) -> dict:
    """{variant: {n: {"errors": [...], "mean", "std"}}} over the seeds that ran (the sample standard
    deviation; 0 for one seed)."""
    summary = {}
    for variant in VARIANTS:
        for n, runs in sorted(points.items()):
            errors = [1 - run[variant]["test_accuracy"] for run in runs.values()]
            summary.setdefault(variant, {})[n] = {"errors": errors, "mean": float(np.mean(errors)),
                                                  "std": float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
                                                  "seeds": sorted(runs)}
    return summary


def table(summary: dict, test_docs: int) -> str:
    sizes = sorted(summary["from scratch"])
    header = "| labelled reviews | " + " | ".join(VARIANTS) + " | seeds |"
    rows = []
    for n in sizes:
        cells = [f"{100 * summary[v][n]['mean']:.2f}" + (f" ± {100 * summary[v][n]['std']:.2f}"
                                                          if len(summary[v][n]["errors"]) > 1 else "")
                 for v in VARIANTS]
        rows.append(f"| {n:,} | " + " | ".join(cells) + f" | {len(summary['from scratch'][n]['errors'])} |")
    return "\n".join(["# IMDb low-shot curve at CPU scale", "",
                      f"Test error (%) on a fixed balanced subset of {test_docs:,} test reviews; mean ± std "
                      "over seeds where more than one ran.", "", header, "|---|---|---|---|---|", *rows, ""])


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for variant in VARIANTS:
        sizes = sorted(summary[variant])
        means = [100 * summary[variant][n]["mean"] for n in sizes]
        stds = [100 * summary[variant][n]["std"] for n in sizes]
        axis.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=variant)
    axis.set_xscale("log")
    axis.set_xlabel("labelled training reviews")
    axis.set_ylabel("test error (%)")
    axis.set_title("IMDb, low-shot")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imdb", type=Path, default=ROOT / "runs" / "imdb",
                        help="experiments/imdb.py's OUT: its prepared data and forward fine-tuned LM")
    parser.add_argument("--pretrained", type=Path, required=True, help="the forward Wikipedia LM (model directory)")
    parser.add_argument("--semi-supervised", type=Path,
                        help="the encoder fine-tuned on unlabelled reviews (default: IMDB/lm_forward/encoder)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lowshot_imdb")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500, 1000, 2500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-docs", type=int, default=5000)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the sizes and seeds whose steps OUT already records")
    args = parser.parse_args(argv)
    args.semi_supervised = args.semi_supervised or args.imdb / "lm_forward" / "encoder"
    for path in (args.imdb / "data" / "meta.json", args.pretrained, args.semi_supervised):
        if not path.exists():
            raise SystemExit(f"error: {path} is missing (run experiments/imdb.py first)")
    args.out.mkdir(parents=True, exist_ok=True)

    points = {}
    for seed in args.seeds:
        for n in args.sizes:
            if not args.report_only or ran(args, seed, n):
                points.setdefault(n, {})[seed] = run_point(args, seed, n)
    if not points:
        raise SystemExit(f"error: {args.out / 'steps'} records no point of these sizes and seeds")
    summary = summarize(points)
    result = {
        "experiment": "lowshot_imdb", "test_docs": args.test_docs, "epochs": {n: epochs(n) for n in args.sizes},
        "summary": summary, "runs": points, "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": machine(), "versions": versions(("jax", "jaxlib")), "git": git_state(ROOT),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(table(summary, args.test_docs))
    plot(summary, args.out / "lowshot.png")
    print(table(summary, args.test_docs))
    print(json.dumps({v: {n: round(s["mean"], 4) for n, s in summary[v].items()} for v in VARIANTS}))


if __name__ == "__main__":
    main()
