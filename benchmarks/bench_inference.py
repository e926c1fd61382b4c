"""Inference throughput, before and after the compiled loops: LM evaluation and generation.

Two checkouts of ulmfit_jax, the same model and inputs, each in its own process (one at a time):
`--old-root`, a checkout of the code from before evaluation and generation became single
compiled loops (e.g. `git worktree add /tmp/ulmfit_old <commit>`), and this one.

- evaluation: `ulmfit_jax.evaluation.evaluate_language_model`, what scripts/evaluate_lm.py runs,
  over one stream of `--eval-tokens` ids in `--bs` rows and windows of `--bptt` (the last one
  padded and masked). The old code dispatches one jitted window per window and reads its loss
  back each time; the new one runs all windows in one `lax.scan`. tokens/s = predicted tokens /
  wall time of one call.
- generation: `ulmfit_jax.generate.generate` of `--gen-tokens` tokens for a batch of 1 after a
  `--prompt-tokens` prompt (fewer than the 70-token window, so all of it but the last token goes
  through the single-token path), temperature 0.8 and top-k 40. The old code dispatches one jitted
  step per token; the new one a single compiled loop. tokens/s = new tokens / wall time of one call.

The model: a random-init AWD-LSTM LM (`awd_lstm_lm_config`, `--vocab`, `--emb`, `--hidden`,
`--layers`), eval mode. Each process compiles and warms up first (the first call's time is
reported apart), then times `--repeats` calls (x `--gen-factor` for generation). The processes
run `--rounds` times in the order old, new, new, old, ...; medians over all timed calls of a
side; ratio = new tokens/s / old. The report also says whether the two sides generated the same
tokens and how far apart their evaluation losses are.

    .venv/bin/python benchmarks/bench_inference.py --old-root /tmp/ulmfit_old

Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_model, interquartile_range, load_average  # benchmarks/ is on sys.path

HERE = Path(__file__).resolve().parent
NEW_ROOT = HERE.parent
N_CORES = len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------- one side
def worker(args) -> dict:
    """Runs in a subprocess with `args.root`'s ulmfit_jax first on sys.path; returns its timings."""
    sys.path.insert(0, str(Path(args.root).resolve()))
    import jax
    import numpy as np

    import ulmfit_jax
    from ulmfit_jax import generate, models
    from ulmfit_jax.config import awd_lstm_lm_config
    from ulmfit_jax.evaluation import evaluate_language_model

    location = Path(ulmfit_jax.__file__).resolve()
    if not location.is_relative_to(Path(args.root).resolve()):
        raise SystemExit(f"imported ulmfit_jax from {location}, not from {args.root}")

    config = awd_lstm_lm_config(args.vocab, emb_size=args.emb, n_hidden=args.hidden, n_layers=args.layers)
    params = models.init_language_model(jax.random.PRNGKey(0), config)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, args.vocab, size=args.eval_tokens + 1)
    prompt = rng.integers(2, args.vocab, size=(1, args.prompt_tokens))
    sampling = generate.Sampling(temperature=0.8, top_k=40)
    key = jax.random.PRNGKey(1)

    def evaluate():
        return evaluate_language_model(params, config, ids, batch_size=args.bs, bptt=args.bptt)

    def sample():
        return generate.generate(params, prompt, args.gen_tokens, key, config=config, sampling=sampling)

    def timed(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    t0 = time.perf_counter()
    result = evaluate()
    eval_first = time.perf_counter() - t0
    timed(evaluate, args.warmup)
    eval_times = timed(evaluate, args.repeats)

    t0 = time.perf_counter()
    tokens = sample()
    gen_first = time.perf_counter() - t0
    timed(sample, args.warmup)
    gen_times = timed(sample, args.repeats * args.gen_factor)
    return {"root": str(args.root), "eval_result": result, "eval_first_s": eval_first, "eval_times": eval_times,
            "gen_tokens": tokens[0].tolist(), "gen_first_s": gen_first, "gen_times": gen_times}


def run_side(root: Path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root)]
    for name in ("vocab", "emb", "hidden", "layers", "eval_tokens", "bs", "bptt", "prompt_tokens", "gen_tokens",
                 "repeats", "gen_factor", "warmup"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def summarise(runs: list[dict], args) -> dict:
    eval_times = [t for r in runs for t in r["eval_times"]]
    gen_times = [t for r in runs for t in r["gen_times"]]
    n_eval = runs[0]["eval_result"]["tokens"]
    return {
        "eval_tok_s": n_eval / statistics.median(eval_times), "eval_median_s": statistics.median(eval_times),
        "eval_iqr_s": interquartile_range(eval_times), "eval_best_tok_s": n_eval / min(eval_times),
        "eval_first_call_s": statistics.median(r["eval_first_s"] for r in runs),
        "gen_tok_s": args.gen_tokens / statistics.median(gen_times), "gen_median_s": statistics.median(gen_times),
        "gen_iqr_s": interquartile_range(gen_times), "gen_best_tok_s": args.gen_tokens / min(gen_times),
        "gen_first_call_s": statistics.median(r["gen_first_s"] for r in runs),
        "eval_timed_calls": len(eval_times), "gen_timed_calls": len(gen_times),
        "loss": runs[0]["eval_result"]["loss"], "accuracy": runs[0]["eval_result"]["accuracy"],
        "eval_tokens": n_eval,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-root", type=Path, help="checkout of the code before the change (required)")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=50_000, help="length of the evaluated stream")
    parser.add_argument("--bs", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--gen-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluation calls per process")
    parser.add_argument("--gen-factor", type=int, default=4, help="timed generation calls = repeats x this")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument("--rounds", type=int, default=2, help="process pairs, ordered old new new old ...")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.old_root is None or not (args.old_root / "ulmfit_jax" / "evaluation.py").is_file():
        raise SystemExit("error: --old-root must be a checkout of ulmfit_jax before the change "
                         "(git worktree add /tmp/ulmfit_old <commit>)")

    import jax
    import jaxlib
    load_before = load_average()
    runs = {"old": [], "new": []}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            runs[side].append(run_side(args.old_root if side == "old" else NEW_ROOT, args))
    load_after = load_average()

    old, new = summarise(runs["old"], args), summarise(runs["new"], args)
    same_tokens = all(r["gen_tokens"] == runs["old"][0]["gen_tokens"] for r in runs["old"] + runs["new"])
    loss_difference = abs(old["loss"] - new["loss"])
    ratios = {"eval": new["eval_tok_s"] / old["eval_tok_s"], "gen": new["gen_tok_s"] / old["gen_tok_s"]}
    env = {
        "cpu": cpu_model(), "cores": N_CORES, "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "backend": os.environ.get("JAX_PLATFORMS", "cpu"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_avg_before": load_before, "load_avg_after": load_after,
    }
    sizes = {k: getattr(args, k) for k in ("vocab", "emb", "hidden", "layers", "bs", "bptt", "prompt_tokens",
                                           "gen_tokens", "rounds", "repeats", "gen_factor", "warmup")}
    sizes["eval_tokens"] = new["eval_tokens"]

    print(f"\nMachine: {env['cpu']}, {env['cores']} cores; load average {load_before} -> {load_after}")
    print(f"Versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}; backend {env['backend']}")
    print(f"Model: AWD-LSTM LM, vocab {args.vocab:,}, emb {args.emb}, hidden {args.hidden}, {args.layers} layers, "
          f"random init, eval mode\n")
    print("| task | old tok/s | new tok/s | new/old | old first call (s) | new first call (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| evaluation, {new['eval_tokens']:,} tokens, bs {args.bs}, bptt {args.bptt} | {old['eval_tok_s']:,.0f} "
          f"| {new['eval_tok_s']:,.0f} | {ratios['eval']:.2f}x | {old['eval_first_call_s']:.2f} "
          f"| {new['eval_first_call_s']:.2f} |")
    print(f"| generation, {args.gen_tokens} tokens, batch 1 | {old['gen_tok_s']:,.0f} | {new['gen_tok_s']:,.0f} "
          f"| {ratios['gen']:.2f}x | {old['gen_first_call_s']:.2f} | {new['gen_first_call_s']:.2f} |")
    print(f"\nMedians over {new['eval_timed_calls']} evaluation and {new['gen_timed_calls']} generation calls per "
          f"side; first call = compile included. Same tokens generated: {same_tokens}; "
          f"|loss old - new| = {loss_difference:.2e}")
    print(json.dumps({"env": env, "sizes": sizes, "old": old, "new": new, "ratio": ratios,
                      "same_tokens": same_tokens, "loss_difference": loss_difference}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
