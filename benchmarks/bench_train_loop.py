#!/usr/bin/env python
"""Training-loop throughput, this checkout against an older one (default: the commit before the
TrainState loop), side by side in one run: steps per second of `train.fit_language_model` and
`train.fit_classifier`, compile time excluded (the loops' own `Throughput`), at the demo's sizes and
at a tiny size where the step's compute is negligible, so that its time per step is the loop's
per-step overhead (dispatch, batch layout, host syncs). Both sides compile with XLA's full
optimisation (the new loop's `quick_compile=False`), so the steps' programs are alike.

  python benchmarks/bench_train_loop.py                     # makes a git worktree of --old at /tmp
  python benchmarks/bench_train_loop.py --old-root ../old   # an existing checkout

Each (side, case) runs in its own process, the sides interleaved (old, new, new, old, ...);
medians over --repeats processes. The last stdout line is JSON.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_model, load_average  # noqa: E402

CASES = {
    # name: (kind, vocab, emb, hidden, layers, batch, bptt or document length range, steps)
    "lm_demo": ("lm", 10000, 128, 384, 2, 64, 70, 40),
    "classifier_demo": ("classifier", 10000, 128, 384, 2, 64, (5, 40), 80),
    "lm_tiny": ("lm", 100, 8, 12, 2, 4, 5, 400),
    "classifier_tiny": ("classifier", 100, 8, 12, 2, 8, (3, 8), 400),
}

RUN = r'''
import json, sys, time
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from ulmfit_jax import models, optim, train
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
kind, vocab, emb, hidden, layers, batch, length, steps = json.loads(sys.argv[2])
import inspect
rng = np.random.default_rng(0)
# the old loop compiled these single-stage fits with XLA's full optimisation; so does the new one here
options = {"quick_compile": False} if "quick_compile" in inspect.signature(train.fit_classifier).parameters else {}
sizes = dict(emb_size=emb, n_hidden=hidden, n_layers=layers)
stage = lambda trainable: train.Stage(1, optim.OptimizerConfig(learning_rate=1e-3), trainable)
if kind == "lm":
    config = awd_lstm_lm_config(vocab, **sizes)
    documents = [rng.integers(2, vocab, 200).astype(np.int32) for _ in range(batch * length * (steps + 2) // 200 + 1)]
    params = models.init_language_model(jax.random.PRNGKey(0), config)
    fit = lambda: train.fit_language_model(params, config, documents, None, [stage(None)], batch_size=batch,
                                           bptt=length, max_steps=steps, **options)
else:
    config = awd_lstm_clas_config(vocab, 6, bptt=70, **sizes)
    documents = [rng.integers(2, vocab, rng.integers(*length)).astype(np.int32) for _ in range(batch * (steps + 1))]
    labels = rng.integers(0, 6, len(documents))
    params, stats = models.init_classifier(jax.random.PRNGKey(0), config)
    fit = lambda: train.fit_classifier(params, stats, config, documents, labels, None, None,
                                       [stage(None)], batch_size=batch, max_steps=steps, **options)
throughput = fit()[-1]
# both loops count tokens over their timed steps only (compile excluded): steps/s from the mean step size
tokens_per_step = batch * length if kind == "lm" else batch * float(np.mean([len(d) for d in documents]))
print(json.dumps({"steps_per_s": throughput.tokens_per_second / tokens_per_step,
                  "tokens_per_s": throughput.tokens_per_second, "compile_seconds": throughput.compile_seconds}))
'''


def run_case(root: Path, case) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ULMFIT_COMPILATION_CACHE="off")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", RUN, str(root), json.dumps(case)], capture_output=True,
                            text=True, env=env, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"{root}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="67dba78", help="git revision to compare with")
    parser.add_argument("--old-root", type=Path, default=None, help="an existing checkout of the old code")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    worktree = None
    old_root = args.old_root
    if old_root is None:
        worktree = Path(tempfile.mkdtemp(prefix="ulmfit_old_")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.old],
                       check=True, capture_output=True)
        old_root = worktree
    try:
        results = {case: {"old": [], "new": []} for case in args.cases}
        for repeat in range(args.repeats):
            for case in args.cases:
                order = ("old", "new") if repeat % 2 == 0 else ("new", "old")
                for side in order:
                    out = run_case(old_root if side == "old" else ROOT, CASES[case])
                    results[case][side].append(out)
                    print(json.dumps({"case": case, "side": side, **out}), flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    summary = {}
    for case, sides in results.items():
        median = {side: statistics.median(r["steps_per_s"] for r in runs) for side, runs in sides.items()}
        compile_median = {side: statistics.median(r["compile_seconds"] for r in runs) for side, runs in sides.items()}
        summary[case] = {"old_steps_per_s": round(median["old"], 2), "new_steps_per_s": round(median["new"], 2),
                         "new_over_old": round(median["new"] / median["old"], 3),
                         "old_ms_per_step": round(1000 / median["old"], 2),
                         "new_ms_per_step": round(1000 / median["new"], 2),
                         "old_compile_s": round(compile_median["old"], 2),
                         "new_compile_s": round(compile_median["new"], 2)}
    import jax
    print(json.dumps({"machine": f"{cpu_model()}, {os.cpu_count()} cores, load {load_average()}",
                      "python": platform.python_version(), "jax": jax.__version__, "old": args.old,
                      "repeats": args.repeats, "results": summary}))


if __name__ == "__main__":
    main()
