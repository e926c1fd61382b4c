"""Howard & Ruder 2018's classifier fine-tuning ablation (their Table 7) at CPU scale, on TREC-6.

Which part of ULMFiT's classifier recipe matters: training every layer group from the start
("full"), the head alone ("last"), chain-thaw, or gradual unfreezing; each with and without
discriminative learning rates; and for gradual unfreezing with discriminative rates, slanted
triangular learning rates (STLR) against fastai's one-cycle. Every scheme starts from the same
fine-tuned language model, so the schemes differ in the classifier's training alone.

The pipeline, each step a run of the project's scripts in a fresh process (as
benchmarks/bench_small_data.py runs them, whose helpers and settings this reuses):
- a Wikipedia LM pretrained once: `scripts/pretrain_lm.py` on a prefix of `enwiki/AA.jsonl.gz`
  (`--wiki-words`, bench_small_data's PRETRAIN_FLAGS), kept in OUT/pretrain and reused; or an
  existing LM model directory given as `--pretrained DIR`;
- TREC-6 prepared with its own vocabulary (`scripts/prepare_data.py`, as bench_small_data does);
- per seed, the LM fine-tuned once with the default recipe (`scripts/finetune_lm.py`,
  bench_small_data's fine-tuning flags);
- per seed and scheme, `scripts/train_classifier.py --encoder` on that fine-tuned encoder with the
  scheme's `--recipe` (`ulmfit_jax.recipes`: `full`, `last`, `chain-thaw`, `fastai`),
  `--no-discriminative`, and `--preset paper` for STLR (which also sets the paper's Adam betas
  0.7/0.99). Classifier settings are bench_small_data's (`--epochs 4 --bs 64 --bptt 70`, lr 2e-2):
  gradual unfreezing is 3 epochs of one group more each, then 4 of every group; "full" and "last"
  train as many epochs (7) in one stage; chain-thaw takes one epoch per group and then the same 4.
  "last" is run once: with one group training, discriminative rates make no difference.

Every run compiles cold (`--compilation-cache off`), so the wall times of the schemes compare.
Results are appended to OUT/results.jsonl as each run ends, and runs already there (same settings)
are not repeated, so a stopped experiment resumes where it stopped. At the end: OUT/results.json,
OUT/results.md (per scheme: mean and standard deviation over seeds of the test error, the number of
seeds, the mean wall time of a classifier run), OUT/ablation_trec.png (the error per scheme, each
seed a point); the last stdout line is JSON.

`--max-steps N` caps every fine-tuning and classifier run (a smoke test, not the experiment). After
smoke runs at two or more values of N in one OUT, the script fits wall time against steps for the
two kinds of run and prints an estimate of the full experiment's duration.

    .venv/bin/python experiments/ablation_trec.py --seeds 0 1 2
    .venv/bin/python experiments/ablation_trec.py --pretrained runs/bench_final/pretrain/words_1500000/lm/best
    .venv/bin/python experiments/ablation_trec.py --out runs/ablation_trec_smoke --seeds 0 \\
        --schemes full+discr --max-steps 8        # then again with --max-steps 120: the estimate
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_small_data as bench  # noqa: E402  (benchmarks/: its pretraining, data and flags)
from common import git_state, machine, timed_run, versions  # noqa: E402

DATASET = "trec6"

# scheme -> (what it is, train_classifier.py flags); the paper's Table 7 names in brackets
SCHEMES = {
    "full": ("every group from the start, one rate for all [Full]", ["--recipe", "full", "--no-discriminative"]),
    "full+discr": ("every group from the start, discriminative rates [Full + discr]", ["--recipe", "full"]),
    "last": ("the head alone [Last]", ["--recipe", "last"]),
    "chain-thaw": ("chain-thaw, one rate for all groups", ["--recipe", "chain-thaw", "--no-discriminative"]),
    "chain-thaw+discr": ("chain-thaw, discriminative rates [Chain-thaw]", ["--recipe", "chain-thaw"]),
    "gradual": ("gradual unfreezing, one rate for all, one-cycle [Freez]",
                ["--recipe", "fastai", "--no-discriminative"]),
    "gradual+discr": ("gradual unfreezing, discriminative rates, one-cycle (fastai's default) [Freez + discr]",
                      ["--recipe", "fastai"]),
    "gradual+discr+stlr": ("gradual unfreezing, discriminative rates, STLR, Adam 0.7/0.99 (--preset paper) "
                           "[Freez + discr + stlr: ULMFiT]", ["--recipe", "fastai", "--preset", "paper"]),
}


def python() -> str:
    return sys.executable


def setup_key(args, pretrained_model: Path) -> dict:
    """What makes two runs the same run: resumption skips a (scheme, seed) only under equal settings."""
    return {"pretrained": str(pretrained_model), "finetune_flags": bench.finetune_flags(False),
            "classifier_flags": bench.classifier_flags(False), "max_steps": args.max_steps}


def setup_tag(setup: dict) -> str:
    digest = hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]
    return f"steps{setup['max_steps']}_{digest}" if setup["max_steps"] else f"full_{digest}"


def pretrained_model(args) -> tuple[Path, dict]:
    """(the LM model directory, what is known of its pretraining)."""
    if args.pretrained is not None:
        if not (args.pretrained / "config.json").exists():
            raise SystemExit(f"error: {args.pretrained} is no model directory (no config.json)")
        record = args.pretrained.resolve().parent.parent / "pretrain.json"     # bench_small_data's layout
        return args.pretrained.resolve(), (json.loads(record.read_text()) if record.exists() else {})
    info = bench.pretrained_lm(args)                                           # once, in OUT/pretrain
    return Path(info["model"]), {k: v for k, v in info.items() if k not in ("model", "weights", "vocab")}


def finetune(args, data_dir: Path, model: Path, seed: int, run: Path) -> dict:
    flags = ["--max-steps", args.max_steps] if args.max_steps else []
    timed = timed_run([python(), SCRIPTS / "finetune_lm.py", "--data", data_dir, "--pretrained", model, "--out",
                       run, "--seed", seed, "--compilation-cache", "off", *bench.finetune_flags(False), *flags],
                      log_path=run.parent / "finetune.log")
    r = timed.result
    return {"wall_seconds": round(timed.wall, 2), "cpu_seconds": round(timed.cpu, 2), "steps": r.get("step"),
            "compile_seconds": r.get("compile_seconds"), "valid_loss": r.get("valid_loss"),
            "valid_perplexity": r.get("valid_perplexity"), "encoder": str(run / "encoder")}


def classify(args, data_dir: Path, encoder: Path, scheme: str, seed: int, run: Path) -> dict:
    flags = ["--max-steps", args.max_steps] if args.max_steps else []
    argv = ["--data", data_dir, "--encoder", encoder, "--out", run, "--seed", seed, "--compilation-cache", "off",
            *bench.classifier_flags(False), *SCHEMES[scheme][1], *flags]
    timed = timed_run([python(), SCRIPTS / "train_classifier.py", *argv], log_path=run.parent / f"{scheme}.log")
    r = timed.result
    accuracy = r.get("test_accuracy")
    return {"wall_seconds": round(timed.wall, 2), "cpu_seconds": round(timed.cpu, 2), "steps": r.get("step"),
            "epochs": None if r.get("epoch") is None else r["epoch"] + 1, "compile_seconds": r.get("compile_seconds"),
            "valid_accuracy": r.get("valid_accuracy"), "test_accuracy": accuracy,
            "test_error": None if accuracy is None else round(1 - accuracy, 6),
            "test_macro_f1": r.get("test_macro_f1"), "flags": SCHEMES[scheme][1]}


# ----------------------------------------------------------------------------------------------
# Summary, table, plot, estimate

def summarize(results: list[dict], schemes: list[str]) -> dict:
    summary = {}
    for scheme in schemes:
        runs = sorted((r for r in results if r["kind"] == "classifier" and r["scheme"] == scheme),
                      key=lambda r: r["seed"])
        errors = [r["test_error"] for r in runs if r.get("test_error") is not None]
        if not runs:
            continue
        summary[scheme] = {
            "what": SCHEMES[scheme][0], "n_seeds": len(errors), "seeds": [r["seed"] for r in runs],
            "test_errors": errors, "test_error_mean": statistics.mean(errors) if errors else None,
            "test_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
            "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in runs),
            "epochs": runs[0].get("epochs"), "steps": runs[0].get("steps")}
    lm = [r for r in results if r["kind"] == "finetune"]
    if lm:
        summary["lm-finetune"] = {"n_seeds": len(lm),
                                  "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in lm),
                                  "valid_perplexity": [r.get("valid_perplexity") for r in lm]}
    return summary


def table(summary: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
    rows = ["| scheme | what | test error % (mean ± std) | n seeds | epochs | classifier wall s (mean) |",
            "|---|---|---|---|---|---|"]
    for scheme, s in summary.items():
        if scheme == "lm-finetune":
            continue
        spread = f" ± {pct(s['test_error_std'])}" if s["test_error_std"] is not None else ""
        rows.append(f"| {scheme} | {s['what']} | {pct(s['test_error_mean'])}{spread} | {s['n_seeds']} | "
                    f"{s['epochs']} | {s['wall_seconds_mean']:.1f} |")
    if "lm-finetune" in summary:
        s = summary["lm-finetune"]
        rows.append(f"\nLM fine-tuning (once per seed, shared by the schemes): {s['n_seeds']} run(s), "
                    f"mean wall {s['wall_seconds_mean']:.1f} s.")
    return "\n".join(rows)


def plot(summary: dict, path: Path, title: str) -> Path | None:
    schemes = [s for s in summary if s != "lm-finetune" and summary[s]["test_errors"]]
    if not schemes:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(schemes) + 1.5))
    for y, scheme in enumerate(schemes):
        s = summary[scheme]
        errors = [100 * e for e in s["test_errors"]]
        axes.scatter(errors, [y] * len(errors), color="tab:blue", alpha=0.6, s=25, zorder=3)
        axes.errorbar(100 * s["test_error_mean"], y, xerr=100 * (s["test_error_std"] or 0), fmt="D", color="black",
                      capsize=4, zorder=4)
    axes.set_yticks(range(len(schemes)), schemes)
    axes.invert_yaxis()
    axes.set_xlabel("test error % (points: seeds; diamond: mean ± std)")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def full_run_steps(data_dir: Path, model: Path, schemes: list[str], seed: int) -> dict:
    """Steps of the uncapped runs: the classifier's from its training documents (after the
    validation split the scripts make) and each scheme's epochs, fine-tuning's from its tokens."""
    from ulmfit_jax import checkpoint, cli, optim, recipes
    from ulmfit_jax.text.datasets import load_prepared
    data = load_prepared(data_dir)
    documents, labels = cli.split_documents(data, ("train",))
    train_docs, *_ = cli.validation_split(data, documents, labels, seed)
    lm_docs, _ = cli.split_documents(data, ("train", "unsup"))
    lm_train, *_ = cli.validation_split(data, lm_docs, None, seed)
    value = lambda flags, name: int(flags[flags.index(name) + 1])
    clas, lm = bench.classifier_flags(False), bench.finetune_flags(False)
    n_groups = checkpoint.load_model(model)["config"].encoder.n_layers + 2     # embedding, layers, head
    steps = {"finetune": (value(lm, "--freeze-epochs") + value(lm, "--epochs"))
             * round(sum(len(d) for d in lm_train) / value(lm, "--bs") / value(lm, "--bptt"))}
    for scheme in schemes:
        flags = SCHEMES[scheme][1]
        stages = recipes.training_stages(recipes.RECIPES[flags[flags.index("--recipe") + 1]].classifier,
                                         n_groups=n_groups, optimizer=optim.OptimizerConfig(), lr=1.0,
                                         epochs=value(clas, "--epochs"))
        steps[scheme] = sum(s.epochs for s in stages) * (len(train_docs) // value(clas, "--bs"))
    return steps


def estimate(all_results: list[dict], pretrained: Path, steps: dict, schemes: list[str], seeds: list[int],
             pretrain: dict, pretrain_reused: bool) -> dict | None:
    """The full experiment's duration from capped runs: wall = overhead + seconds per step * steps,
    fitted by least squares for fine-tuning and for the classifier over capped runs at two or more
    step counts (the classifier's per-step cost from whichever schemes ran capped: all groups
    training, as in "full", is the dearest). The same fit of CPU seconds tells a wall time inflated by
    other processes on the cores from the work itself."""
    capped = [r for r in all_results if r["setup"]["max_steps"] and r["setup"]["pretrained"] == str(pretrained)
              and r.get("steps")]
    fits = {}
    for measure in ("wall_seconds", "cpu_seconds"):
        for kind in ("finetune", "classifier"):
            points = [(r["steps"], r[measure]) for r in capped if r["kind"] == kind]
            if len({x for x, _ in points}) < 2:
                return None
            mx, my = statistics.mean(x for x, _ in points), statistics.mean(y for _, y in points)
            slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
            fits[measure, kind] = (my - slope * mx, slope)
    totals = {}
    for measure in ("wall_seconds", "cpu_seconds"):
        cost = lambda kind, n: fits[measure, kind][0] + fits[measure, kind][1] * n
        totals[measure] = len(seeds) * (cost("finetune", steps["finetune"])
                                        + sum(cost("classifier", steps[scheme]) for scheme in schemes))
    if not pretrain_reused and pretrain.get("wall_seconds"):
        totals["wall_seconds"] += pretrain["wall_seconds"]
    return {"fits": {f"{kind} {measure}": {"overhead": round(a, 2), "per_step": round(b, 4)}
                     for (measure, kind), (a, b) in fits.items()},
            "full_run_steps": steps,
            "load_average_during_capped_runs": sorted({r["load_average_before"] for r in capped}),
            "total_seconds": round(totals["wall_seconds"]), "total_minutes": round(totals["wall_seconds"] / 60, 1),
            "total_cpu_seconds": round(totals["cpu_seconds"]),
            "includes_pretraining": not pretrain_reused and bool(pretrain.get("wall_seconds")),
            "pretraining_seconds_when_not_reused": pretrain.get("wall_seconds")}


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("ULMFIT_DATA_DIR", ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation_trec")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schemes", nargs="+", choices=tuple(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--wiki-words", type=int, default=1_500_000,
                        help="words of enwiki/AA.jsonl.gz to pretrain on (once; kept in OUT/pretrain)")
    parser.add_argument("--pretrained", type=Path,
                        help="an existing LM model directory to start from instead (e.g. bench_small_data's "
                             "OUT/pretrain/words_1500000/lm/best)")
    parser.add_argument("--max-steps", type=int, help="cap every run at this many steps (a smoke test)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    data_dir = bench.prepare_dataset(args, DATASET)            # OUT/data/trec6, its own vocabulary
    pretrained_reused = args.pretrained is not None or (
        args.out / "pretrain" / f"words_{args.wiki_words}" / "pretrain.json").exists()
    model, pretrain = pretrained_model(args)
    setup = setup_key(args, model)
    runs = args.out / "runs" / setup_tag(setup)
    results_path = args.out / "results.jsonl"
    all_results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    results = [r for r in all_results if r["setup"] == setup]

    def done(kind, seed, scheme=None):
        return next((r for r in results if r["kind"] == kind and r["seed"] == seed and r.get("scheme") == scheme), None)

    def record(result, **fields):
        result = dict(fields, **result, setup=setup, git=git_state(ROOT), load_average_after=machine()["load_average"])
        results.append(result)
        all_results.append(result)
        with results_path.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps({k: result.get(k) for k in ("kind", "scheme", "seed", "steps", "wall_seconds",
                                                     "test_error", "valid_perplexity")}), flush=True)
        return result

    for seed in args.seeds:
        lm = done("finetune", seed)
        if lm is None or not Path(lm["encoder"]).exists():
            load = machine()["load_average"]
            lm_run = bench.fresh(runs / f"seed{seed}" / "lm")
            lm = record(finetune(args, data_dir, model, seed, lm_run), kind="finetune", seed=seed, scheme=None,
                        load_average_before=load)
        for scheme in args.schemes:
            if done("classifier", seed, scheme) is not None:
                continue
            load = machine()["load_average"]
            run = bench.fresh(runs / f"seed{seed}" / scheme)
            record(classify(args, data_dir, Path(lm["encoder"]), scheme, seed, run), kind="classifier",
                   scheme=scheme, seed=seed, load_average_before=load)

    selected = [r for r in results
                if r["seed"] in args.seeds and (r["kind"] == "finetune" or r["scheme"] in args.schemes)]
    summary = summarize(selected, args.schemes)
    info = {"experiment": "ablation_trec", "setup": setup, "seeds": args.seeds, "schemes": args.schemes,
            "pretrained": {"model": str(model), **pretrain}, "machine": machine(),
            "versions": versions(("jax", "jaxlib", "optax")), "git": git_state(ROOT)}
    m = info["machine"]
    capped = f"; every run capped at {args.max_steps} steps (a smoke test)" if args.max_steps else ""
    header = (f"# Fine-tuning ablation on TREC-6 (Howard & Ruder 2018, Table 7, at CPU scale)\n\n"
              f"{m['cpu']}, {m['cores']} cores, load average {m['load_average']}; "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
              + f"; commit {info['git']['commit']}\n"
              f"pretrained LM: {model}; LM fine-tuning: finetune_lm.py {' '.join(setup['finetune_flags'])}; "
              f"classifier: train_classifier.py {' '.join(setup['classifier_flags'])} + the scheme's flags; "
              f"seeds {' '.join(map(str, args.seeds))}{capped}\n\n")
    text = header + table(summary) + "\n"
    (args.out / "results.md").write_text(text)
    figure = plot(summary, args.out / "ablation_trec.png",
                  f"TREC-6 fine-tuning ablation, seeds {', '.join(map(str, args.seeds))}{capped}")
    guess = None
    if args.max_steps:
        steps = full_run_steps(data_dir, model, list(SCHEMES), args.seeds[0])
        guess = estimate(all_results, model, steps, list(SCHEMES), [0, 1, 2], pretrain, pretrained_reused)
    (args.out / "results.json").write_text(json.dumps({**info, "summary": summary, "estimate": guess,
                                                       "runs": selected}, indent=1))
    print(text)
    if args.max_steps:
        print("estimated full run (--seeds 0 1 2, every scheme): "
              + (f"{guess['total_minutes']} min of wall time at the capped runs' load (load averages "
                 f"{guess['load_average_during_capped_runs']}), {guess['total_cpu_seconds']} CPU seconds; "
                 f"fits {json.dumps(guess['fits'])}" if guess else
                 "needs capped runs at two --max-steps values in this OUT"))
    print(json.dumps({**info, "summary": summary, "estimate": guess,
                      "files": {"results": str(args.out / "results.json"), "table": str(args.out / "results.md"),
                                "plot": str(figure) if figure else None}}))


if __name__ == "__main__":
    main()
