"""IMDb end to end as Howard & Ruder 2018 run it, cut to a CPU's size: a forward and a backward
Wikipedia LM, each fine-tuned on IMDb's review text, a classifier on each with gradual unfreezing
and BPT3C over whole reviews, and the test error of each direction and of their ensemble (the
mean of the two classifiers' probabilities) on all 25,000 test reviews.

Each step runs the project's scripts in a fresh process:
- the LMs: `--pretrained DIR`, a forward LM pretrained by benchmarks/bench_small_data.py (OUT of
  that benchmark / pretrain / words_N / lm / best), whose prepared Wikipedia data (words_N / data)
  the backward LM is pretrained on here with the same flags and `--backwards`; without
  `--pretrained`, bench_small_data's pretraining runs first, into OUT/pretrain;
- IMDb prepared once (`scripts/prepare_data.py --format imdb`: train, test and unsup) with a
  vocabulary of at most `--max-vocab` words (10,000, the pretrained LMs' size: the decoder's cost
  grows with it);
- per direction, `scripts/finetune_lm.py` on `--lm-docs` documents of the train and unsup text
  (chosen by seed; `--max-docs`), then `scripts/train_classifier.py --encoder` on `--train-docs`
  labelled training reviews (balanced, chosen by seed; `--train-docs`), which also evaluates its
  direction on the test reviews; then `scripts/evaluate.py --ensemble` for the pair. With
  `--lms-from` an earlier run's prepared data and fine-tuned LMs are reused, and only the
  classifiers and the ensemble run (e.g. on more labelled reviews).

What is cut to fit (the paper: 400/1150/3 on WikiText-103, fine-tuning on all 75,000 train and
unsup reviews, a classifier on all 25,000 training reviews for many epochs) is in the JSON and
the markdown. Every step's result is kept in OUT/steps/<step>.json as it ends, and a rerun skips
the steps already there, so a stopped experiment resumes (a step that was running starts again;
its scripts resume from their own checkpoints). OUT/results.json and OUT/results.md hold the
summary, also the last stdout line.

    .venv/bin/python experiments/imdb.py --pretrained runs/bench_small_data/pretrain/words_1500000/lm/best
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_small_data as bench  # noqa: E402  (benchmarks/: its pretraining and settings)
from common import git_state, machine, timed_run, versions  # noqa: E402

from ulmfit_jax.text.datasets import data_dir  # noqa: E402

DIRECTIONS = ("forward", "backward")


def step_record(args, name: str) -> Path:
    """Where `step` keeps step `name`'s result: OUT/steps/name.json."""
    return args.out / "steps" / f"{name}.json"


def step(args, name: str, command: list) -> dict:
    """Run one script (unless OUT/steps/name.json records it done) -> its last JSON line, with the
    wall and CPU seconds."""
    record = step_record(args, name)
    if record.exists():
        return json.loads(record.read_text())
    (args.out / "logs").mkdir(exist_ok=True)
    timed = timed_run([sys.executable, *command], log_path=args.out / "logs" / f"{name}.log")
    result = {**timed.result, "wall_seconds": round(timed.wall, 1), "cpu_seconds": round(timed.cpu, 1)}
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps(result))
    print(json.dumps({name: result}), flush=True)
    return result


def pretrained_models(args) -> dict[str, Path]:
    """The forward LM (given or pretrained by bench_small_data) and its backward twin."""
    if args.pretrained is None:
        forward = Path(bench.pretrained_lm(args)["model"])
    else:
        forward = args.pretrained.resolve()
    wiki = forward.parent.parent / "data"
    if not (wiki / "meta.json").exists():
        raise SystemExit(f"error: {wiki} (the forward LM's Wikipedia data, bench_small_data's layout) is missing")
    backward_out = args.out / "pretrain_backward"
    step(args, "pretrain_backward", [SCRIPTS / "pretrain_lm.py", "--data", wiki, "--out", backward_out,
                                     "--backwards", "--compilation-cache", "off", *bench.PRETRAIN_FLAGS])
    return {"forward": forward, "backward": backward_out / "best"}


def lms_from(args) -> Path:
    """The earlier run whose data and fine-tuned LMs `--lms-from` reuses, checked to be finished and to
    have the same LM settings (the pretrained LMs it started from are in its results.json)."""
    earlier = args.lms_from.resolve()
    try:
        settings = json.loads((earlier / "results.json").read_text())["settings"]
    except FileNotFoundError:
        raise SystemExit(f"error: --lms-from {earlier}: no results.json, that run has not finished") from None
    for name in ("lm_docs", "max_vocab", "seed", "wiki_words", "pretrained"):
        asked = getattr(args, name)
        if isinstance(asked, Path):                                     # --pretrained: the same folder
            same = Path(settings[name]).resolve() == asked.resolve()
        else:
            same = settings[name] == str(asked)
        if not same:
            raise SystemExit(f"error: --lms-from {earlier} ran with --{name.replace('_', '-')} {settings[name]}, "
                             f"this run asks for {asked}")
    return earlier


def summary_table(result: dict) -> str:
    rows = [f"| {name} | {result['test_error'][name]:.4f} |" for name in (*DIRECTIONS, "ensemble")]
    walls = [f"| {name} | {seconds:.0f} |" for name, seconds in result["wall_seconds"].items()]
    return "\n".join([
        "# IMDb end to end at CPU scale", "", result["cut"], "",
        f"Test reviews: {result['test_reviews']:,}.", "",
        "| classifier | test error |", "|---|---|", *rows, "",
        "| step | wall s |", "|---|---|", *walls, ""])


def plot(result: dict, path: Path) -> None:
    """The three test errors as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [*DIRECTIONS, "ensemble"]
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.bar(names, [100 * result["test_error"][name] for name in names], color=["C0", "C1", "C2"])
    axis.set_ylabel("test error (%)")
    axis.set_title(f"IMDb, {result['test_reviews']:,} test reviews")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "imdb")
    parser.add_argument("--pretrained", type=Path, help="a forward LM pretrained by bench_small_data.py")
    parser.add_argument("--wiki-words", type=int, default=1_500_000, help="pretraining words without --pretrained")
    parser.add_argument("--max-vocab", type=int, default=10_000)
    parser.add_argument("--lm-docs", type=int, default=6_000, help="train + unsup reviews for LM fine-tuning")
    parser.add_argument("--train-docs", type=int, default=2_500, help="labelled training reviews, balanced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lms-from", type=Path, help="an earlier OUT of this experiment (same --pretrained, "
                        "--wiki-words, --lm-docs, --max-vocab and --seed) whose prepared data and fine-tuned LMs "
                        "the classifiers start from")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    lms = args.out if args.lms_from is None else lms_from(args)
    data = lms / "data"
    if args.lms_from is None:
        models = pretrained_models(args)
        step(args, "prepare", [SCRIPTS / "prepare_data.py", "--input", args.data_dir / "imdb", "--format", "imdb",
                               "--out", data, "--max-vocab", args.max_vocab, "--no-progress"])
    classifiers, results = {}, {"prepare": json.loads((lms / "steps" / "prepare.json").read_text())}
    for direction in DIRECTIONS:
        flags = ["--seed", args.seed, *(["--backwards"] if direction == "backward" else [])]
        if args.lms_from is None:
            step(args, f"finetune_{direction}", [
                SCRIPTS / "finetune_lm.py", "--data", data, "--pretrained", models[direction], "--out",
                args.out / f"lm_{direction}", "--max-docs", args.lm_docs, *bench.imdb_flags()["finetune"], *flags])
        results[f"finetune_{direction}"] = json.loads((lms / "steps" / f"finetune_{direction}.json").read_text())
        results[f"classifier_{direction}"] = step(args, f"classifier_{direction}", [
            SCRIPTS / "train_classifier.py", "--data", data, "--encoder", lms / f"lm_{direction}" / "encoder",
            "--out", args.out / f"clas_{direction}", "--train-docs", args.train_docs, *bench.imdb_flags()["classifier"],
            *flags])
        classifiers[direction] = args.out / f"clas_{direction}" / "last"
    results["ensemble"] = step(args, "ensemble", [SCRIPTS / "evaluate.py", "--ensemble", classifiers["forward"],
                                                  classifiers["backward"], "--data", data, "--split", "test"])
    result = {
        "experiment": "imdb",
        "cut": (f"Cut to fit a 2-core CPU: 128/384/2 LMs pretrained on {args.wiki_words:,} Wikipedia words (one "
                f"epoch); a {args.max_vocab:,}-word IMDb vocabulary; LM fine-tuning on {args.lm_docs:,} of the 75,000 "
                f"train and unsup reviews (1 epoch of the last group, 1 of all); classifiers on {args.train_docs:,} "
                "of the 25,000 labelled training reviews (balanced; 10% of them for validation), gradual unfreezing "
                "one epoch per stage and one epoch of all groups; bptt 70, BPT3C max_len 1,440 (the last 21 "
                "windows of a review carry gradients)." +
                ("" if args.lms_from is None else f" The data and fine-tuned LMs are those of {args.lms_from}.")),
        "test_reviews": results["ensemble"].get("documents"),
        "test_error": {"forward": 1 - results["classifier_forward"]["test_accuracy"],
                       "backward": 1 - results["classifier_backward"]["test_accuracy"],
                       "ensemble": 1 - results["ensemble"]["accuracy"]},
        "wall_seconds": {name: r["wall_seconds"] for name, r in results.items()},
        "steps": results, "settings": {k: str(v) for k, v in vars(args).items()},
        "machine": machine(), "versions": versions(("jax", "jaxlib")), "git": git_state(ROOT),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(summary_table(result))
    plot(result, args.out / "imdb.png")
    print(summary_table(result))
    print(json.dumps({k: result[k] for k in ("test_reviews", "test_error", "wall_seconds")}))


if __name__ == "__main__":
    main()
