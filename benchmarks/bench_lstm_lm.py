"""AWD-LSTM language model training throughput: fastai 2.8.12 (PyTorch) vs ulmfit_jax, side by side.

One process, the same token windows, the same cores. Each timed step is a full training step in
train mode with fastai's default LM dropouts (output 0.1, hidden 0.15, input 0.25, embed 0.02,
weight 0.2): forward, cross-entropy + AR (alpha 2, on the dropped last-layer output) + TAR (beta 1,
on the raw one) as fastai's RNNRegularizer computes them, backward, Adam step. Hidden state is
carried from window to window on both sides (fastai's stateful LM; it detaches it itself).

- fastai: `get_language_model(AWD_LSTM, vocab, config=awd_lstm_lm_config)`, `model.train()`,
  optimizer `--torch-opt`: `torch` = torch.optim.Adam(foreach) (default, the faster of the two
  here), or `fastai` = fastai's own `Adam` (what a fastai Learner uses).
- ulmfit_jax: one jitted train step (`language_model_hidden`, loss, `optax.adam` update, buffers
  donated), the tied decoder + cross-entropy either fused and chunked (`--jax-loss fused`,
  `ulmfit_jax.losses.fused_linear_cross_entropy`) or plain (`cross_entropy(lm_logits(...))`).

Both sides run the same Adam hyper-parameters (lr 1e-3, betas 0.9/0.99, eps 1e-5, no weight decay).
Steps are interleaved (A B B A A B ...) so that both see the same machine load; medians over the
repeats; compile and warm-up are excluded and the compile time is reported apart.

    .venv/bin/python benchmarks/bench_lstm_lm.py                       # large, recipe, small
    .venv/bin/python benchmarks/bench_lstm_lm.py --configs large --repeats 20

Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from common import (ALPHA, BETA, BETAS, EPS, LR, LanguageModelRun, cpu_model, interquartile_range,  # benchmarks/
                    load_average, token_windows)                                                  # is on sys.path

N_CORES = len(os.sched_getaffinity(0))


def _set_xla_flags(n_threads: int, extra: str) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n_threads}"
    if extra:
        flags += " " + extra
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


CONFIGS = {
    # name: (vocab, emb, hidden, layers, batch, bptt)
    "large": (10_000, 400, 1152, 3, 32, 70),
    "recipe": (30_000, 200, 512, 3, 64, 70),
    "small": (2_000, 64, 128, 2, 32, 70),
    "demo": (10_008, 128, 384, 2, 64, 70),       # scripts/demo.py's pretraining
}


# ----------------------------------------------------------------------------------------- fastai
class FastaiSide:
    def __init__(self, vocab, emb, hidden, layers, windows, opt_name):
        import torch
        from fastai.text.models.awdlstm import AWD_LSTM, awd_lstm_lm_config
        from fastai.text.models.core import get_language_model

        torch.manual_seed(0)
        config = dict(awd_lstm_lm_config, emb_sz=emb, n_hid=hidden, n_layers=layers)
        self.torch = torch
        self.model = get_language_model(AWD_LSTM, vocab, config=config)
        self.model.train()
        self.model.reset()
        params = list(self.model.parameters())
        if opt_name == "fastai":
            from fastai.optimizer import Adam
            self.opt = Adam(params, lr=LR, mom=BETAS[0], sqr_mom=BETAS[1], eps=EPS, wd=0.0)
        else:
            self.opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, foreach=True)
        self.windows = [(torch.from_numpy(x.copy()), torch.from_numpy(y.copy())) for x, y in windows]
        self.i = 0
        self.vocab = vocab

    def step(self) -> float:
        torch = self.torch
        x, y = self.windows[self.i % len(self.windows)]
        self.i += 1
        t0 = time.perf_counter()
        decoded, raw, dropped = self.model(x)
        loss = torch.nn.functional.cross_entropy(decoded.view(-1, self.vocab), y.reshape(-1))
        loss = loss + ALPHA * dropped.float().pow(2).mean()
        loss = loss + BETA * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- ulmfit_jax
def bench_config(name, args):
    vocab, emb, hidden, layers, batch, bptt = CONFIGS[name]
    windows = token_windows(vocab, batch, bptt, n_windows=8)
    fa = FastaiSide(vocab, emb, hidden, layers, windows, args.torch_opt)
    t0 = time.perf_counter()
    fa.step()
    fastai_first_s = time.perf_counter() - t0
    ours = LanguageModelRun("lstm", vocab, emb, hidden, layers, windows, args.jax_loss, args.chunk_size)
    for _ in range(args.warmup):
        fa.step()
        ours.step()
    repeats = args.repeats * (3 if name == "small" else 1)
    times = {"fastai": [], "ours": []}
    for r in range(repeats):
        order = (("fastai", fa), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("fastai", fa))
        for side, runner in order:
            times[side].append(runner.step())
    tokens = batch * bptt
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each repeat times one step of each side back to back: the ratio within a pair cancels slow drifts
    # of the machine's load.
    pair_ratio = statistics.median(f / o for f, o in zip(times["fastai"], times["ours"]))
    return {
        "config": name, "vocab": vocab, "emb": emb, "hidden": hidden, "layers": layers,
        "batch": batch, "bptt": bptt, "repeats": repeats,
        "fastai_s": med["fastai"], "ours_s": med["ours"],
        "fastai_tok_s": tokens / med["fastai"], "ours_tok_s": tokens / med["ours"],
        "ratio": med["fastai"] / med["ours"], "pair_ratio": pair_ratio,
        "fastai_best_tok_s": tokens / min(times["fastai"]), "ours_best_tok_s": tokens / min(times["ours"]),
        "fastai_iqr_s": interquartile_range(times["fastai"]), "ours_iqr_s": interquartile_range(times["ours"]),
        "ours_compile_s": ours.compile_s, "fastai_first_step_s": fastai_first_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["large", "recipe", "small"], choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side (x3 for small)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=N_CORES, help="torch threads and XLA intra-op threads")
    parser.add_argument("--torch-opt", choices=["torch", "fastai"], default="torch")
    parser.add_argument("--jax-loss", choices=["fused", "plain"], default="fused")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per chunk of the fused loss")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    args = parser.parse_args(argv)

    _set_xla_flags(args.threads, args.xla_flags)
    import torch
    torch.set_num_threads(args.threads)
    import fastai
    import jax
    import jaxlib

    load_before = load_average()
    results = [bench_config(name, args) for name in args.configs]
    load_after = load_average()

    env = {
        "cpu": cpu_model(), "cores": N_CORES, "threads": args.threads,
        "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "torch": torch.__version__, "fastai": fastai.__version__,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "torch_opt": args.torch_opt, "jax_loss": args.jax_loss, "chunk_size": args.chunk_size,
        "load_avg_before": load_before, "load_avg_after": load_after,
    }
    print(f"\nMachine: {env['cpu']}, {env['cores']} cores; threads: torch {env['torch_threads']}, "
          f"XLA intra-op {args.threads}; load average {load_before} -> {load_after}")
    print(f"Versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, torch {env['torch']}, "
          f"fastai {env['fastai']}; fastai optimizer: {args.torch_opt}; ours: optax.adam, loss {args.jax_loss}"
          + (f" (chunk {args.chunk_size})" if args.jax_loss == "fused" else ""))
    print()
    print("| config | vocab | emb/hid/layers | batch x bptt | fastai tok/s | ulmfit_jax tok/s | ours/fastai "
          "| per-pair ratio | best fastai / ours tok/s | ours compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['vocab']:,} | {r['emb']}/{r['hidden']}/{r['layers']} | {r['batch']} x {r['bptt']} "
              f"| {r['fastai_tok_s']:,.0f} | {r['ours_tok_s']:,.0f} | {r['ratio']:.2f}x | {r['pair_ratio']:.2f}x "
              f"| {r['fastai_best_tok_s']:,.0f} / {r['ours_best_tok_s']:,.0f} | {r['ours_compile_s']:.1f} |")
    print("\nMedians over the repeats (interleaved steps); per-pair ratio: median over repeats of "
          "fastai step time / ours in the same repeat; best: fastest single step.")
    print(json.dumps({"env": env, "results": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
