"""AWD-QRNN vs AWD-LSTM language-model training throughput, and the two forget-mult implementations.

Part 1, `lm`: ulmfit_jax's AWD-QRNN and AWD-LSTM language models at equal sizes (the same vocab,
embedding, hidden width, layers, batch and BPTT), one jitted training step each: forward in train
mode with fastai's LM dropouts, cross-entropy (the fused chunked decoder + loss by default, the same
for both) + AR (alpha 2) + TAR (beta 1), backward, optax Adam update, hidden state carried. Steps
of the two models are interleaved (A B B A ...) so that both see the same machine load; medians
over the repeats; compile and warm-up excluded.

Part 2, `forget_mult`: `forget_mult_scan` (lax.scan, custom VJP) vs `forget_mult_associative`
(lax.associative_scan) over a grid of (T, B, H): jitted forward, and forward + backward of
`sum(cells * w)`, medians of repeats.

    .venv/bin/python benchmarks/bench_qrnn.py                       # both parts
    .venv/bin/python benchmarks/bench_qrnn.py --parts lm --lm-configs paper --repeats 8

Prints markdown tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from common import LanguageModelRun, cpu_model, interquartile_range, load_average, token_windows  # benchmarks/ is on sys.path

N_CORES = len(os.sched_getaffinity(0))

LM_CONFIGS = {
    # name: (vocab, emb, hidden, layers, batch, bptt)
    "paper": (10_000, 400, 1152, 3, 32, 70),      # fastai's AWD-LSTM size (awd_lstm_lm_config)
    "multifit": (15_000, 400, 1550, 4, 32, 70),   # MultiFiT's QRNN size
    "small": (2_000, 64, 128, 2, 32, 70),
}
GRID = [(70, 16, 256), (70, 64, 1152), (500, 16, 256), (500, 64, 1152), (2000, 8, 256)]


# ----------------------------------------------------------------------------------------------
# Part 1: language models


def bench_language_models(name, args):
    vocab, emb, hidden, layers, batch, bptt = LM_CONFIGS[name]
    windows = token_windows(vocab, batch, bptt, n_windows=4)
    runs = {arch: LanguageModelRun(arch, vocab, emb, hidden, layers, windows, args.loss, args.chunk_size)
            for arch in ("lstm", "qrnn")}
    for _ in range(args.warmup):
        for run in runs.values():
            run.step()
    repeats = args.repeats * (3 if name == "small" else 1)
    times = {arch: [] for arch in runs}
    for r in range(repeats):
        for arch in (("lstm", "qrnn") if r % 2 == 0 else ("qrnn", "lstm")):
            times[arch].append(runs[arch].step())
    tokens = batch * bptt
    medians = {arch: statistics.median(t) for arch, t in times.items()}
    return {
        "config": name, "vocab": vocab, "emb": emb, "hidden": hidden, "layers": layers, "batch": batch,
        "bptt": bptt, "repeats": repeats,
        **{f"{arch}_s": medians[arch] for arch in runs},
        **{f"{arch}_tok_s": tokens / medians[arch] for arch in runs},
        **{f"{arch}_iqr_s": interquartile_range(times[arch]) for arch in runs},
        **{f"{arch}_compile_s": runs[arch].compile_s for arch in runs},
        **{f"{arch}_params": runs[arch].n_params for arch in runs},
        "qrnn_over_lstm": medians["lstm"] / medians["qrnn"],
    }


# ----------------------------------------------------------------------------------------------
# Part 2: forget-mult

def bench_forget_mult(steps, batch, hidden, repeats):
    import jax
    import jax.numpy as jnp

    from ulmfit_jax import qrnn

    key = jax.random.PRNGKey(0)
    z = jnp.tanh(jax.random.normal(key, (steps, batch, hidden)))
    f = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(key, 1), (steps, batch, hidden)))
    c0 = jnp.zeros((batch, hidden))
    weights = jax.random.normal(jax.random.fold_in(key, 2), (steps, batch, hidden))
    row = {"T": steps, "B": batch, "H": hidden}
    for method in qrnn.FORGET_MULT_METHODS:
        forward = jax.jit(lambda z, f, c: qrnn.forget_mult(z, f, c, method=method))
        backward = jax.jit(jax.grad(lambda z, f, c, w: jnp.sum(qrnn.forget_mult(z, f, c, method=method) * w),
                                    argnums=(0, 1, 2)))
        for label, fn, args in (("fwd", forward, (z, f, c0)), ("fwd_bwd", backward, (z, f, c0, weights))):
            jax.block_until_ready(fn(*args))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - t0)
            row[f"{method}_{label}_ms"] = 1e3 * statistics.median(times)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["lm", "forget_mult"], choices=["lm", "forget_mult"])
    parser.add_argument("--lm-configs", nargs="+", default=["paper", "small"], choices=list(LM_CONFIGS))
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per model (x3 for small)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grid-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=N_CORES, help="XLA intra-op threads")
    parser.add_argument("--loss", choices=["fused", "plain"], default="fused")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + f" --xla_cpu_multi_thread_eigen=true "
                               f"intra_op_parallelism_threads={args.threads}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jaxlib

    load_before = load_average()
    lm_results = [bench_language_models(name, args) for name in args.lm_configs] if "lm" in args.parts else []
    grid_results = ([bench_forget_mult(*point, args.grid_repeats) for point in GRID]
                    if "forget_mult" in args.parts else [])
    load_after = load_average()

    env = {"cpu": cpu_model(), "cores": N_CORES, "threads": args.threads, "python": platform.python_version(),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
           "loss": args.loss, "load_avg_before": load_before, "load_avg_after": load_after}
    print(f"\nMachine: {env['cpu']}, {env['cores']} cores, XLA intra-op threads {args.threads}, backend "
          f"{env['backend']}; load average {load_before} -> {load_after}")
    print(f"Versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}; loss {args.loss}")
    if lm_results:
        print("\n| config | vocab | emb/hid/layers | batch x bptt | AWD-LSTM tok/s | AWD-QRNN tok/s | QRNN/LSTM "
              "| LSTM step (s) | QRNN step (s) | params LSTM / QRNN | compile LSTM / QRNN (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in lm_results:
            print(f"| {r['config']} | {r['vocab']:,} | {r['emb']}/{r['hidden']}/{r['layers']} | {r['batch']} x {r['bptt']} "
                  f"| {r['lstm_tok_s']:,.0f} | {r['qrnn_tok_s']:,.0f} | {r['qrnn_over_lstm']:.2f}x "
                  f"| {r['lstm_s']:.3f} | {r['qrnn_s']:.3f} | {r['lstm_params'] / 1e6:.1f}M / "
                  f"{r['qrnn_params'] / 1e6:.1f}M | {r['lstm_compile_s']:.1f} / {r['qrnn_compile_s']:.1f} |")
    if grid_results:
        print("\n| T | B | H | scan fwd (ms) | assoc fwd (ms) | assoc/scan fwd | scan fwd+bwd (ms) "
              "| assoc fwd+bwd (ms) | assoc/scan fwd+bwd |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in grid_results:
            print(f"| {r['T']} | {r['B']} | {r['H']} | {r['scan_fwd_ms']:.2f} | {r['associative_fwd_ms']:.2f} "
                  f"| {r['associative_fwd_ms'] / r['scan_fwd_ms']:.1f}x | {r['scan_fwd_bwd_ms']:.2f} "
                  f"| {r['associative_fwd_bwd_ms']:.2f} | {r['associative_fwd_bwd_ms'] / r['scan_fwd_bwd_ms']:.1f}x |")
    print(json.dumps({"env": env, "lm": lm_results, "forget_mult": grid_results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
