"""One LSTM layer and the tied decoder + cross-entropy, forward + backward: torch vs ulmfit_jax.

The two parts of the demo's pretraining step (`scripts/demo.py`: 128/384/2, vocab 10,008, batch
64 x 70), timed apart, in one process, calls interleaved (torch, ours, ours, torch, ...), medians:
- LSTM: `torch.nn.LSTM(D, H)` (one layer, what fastai's AWD_LSTM runs; oneDNN on CPU) against
  `ulmfit_jax.lstm.lstm_layer`, loss sum(outputs^2), gradients for the weights and the input.
- decoder + cross-entropy: `F.cross_entropy(F.linear(h, W, b), y)` against
  `ulmfit_jax.losses.fused_linear_cross_entropy`, gradients for h, W and b.
- one matrix product as large as the 128 -> 384 layer's products taken together
  ([4480, 512] x [512, 1536], forward only): the rate this machine's matrix products reach,
  against which the other rows' rates (their matrix products' FLOPs over their time) compare.

    .venv/bin/python benchmarks/bench_lstm_layer.py --repeats 15

Prints a markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from common import cpu_model  # benchmarks/ is on sys.path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from ulmfit_jax import cli
    malloc = "kept" if cli.keep_freed_memory() else "default"    # as the training scripts ($ULMFIT_MALLOC=default)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from ulmfit_jax import losses, lstm
    torch.set_num_threads(args.threads)
    steps, batch, vocab = 70, 64, 10_008
    rng = np.random.default_rng(0)
    cases = {}
    for n_in, n_out in ((128, 384), (384, 128)):
        x = rng.standard_normal((steps, batch, n_in), dtype=np.float32)
        layer = torch.nn.LSTM(n_in, n_out)
        x_torch = torch.tensor(x, requires_grad=True)

        def torch_lstm(layer=layer, x_torch=x_torch):
            outputs, _ = layer(x_torch)
            (outputs * outputs).sum().backward()

        params = {name: jnp.asarray(value.detach().numpy()) for name, value in
                  (("w_ih", layer.weight_ih_l0), ("w_hh", layer.weight_hh_l0), ("b_ih", layer.bias_ih_l0),
                   ("b_hh", layer.bias_hh_l0))}
        state = (jnp.zeros((batch, n_out)), jnp.zeros((batch, n_out)))
        grad = jax.jit(jax.grad(lambda p, x, state=state: jnp.sum(lstm.lstm_layer(p, x, state)[0] ** 2),
                                argnums=(0, 1)))
        products = 2 * steps * batch * (n_in + n_out) * 4 * n_out          # the forward's; backward twice that
        cases[f"LSTM {n_in} -> {n_out}"] = (torch_lstm, lambda grad=grad, p=params, x=jnp.asarray(x):
                                            jax.block_until_ready(grad(p, x)), 3 * products)
    hidden = rng.standard_normal((steps * batch, 128), dtype=np.float32)
    weight = 0.01 * rng.standard_normal((vocab, 128), dtype=np.float32)
    targets = rng.integers(0, vocab, steps * batch)
    h_t, w_t = torch.tensor(hidden, requires_grad=True), torch.tensor(weight, requires_grad=True)
    b_t, y_t = torch.zeros(vocab, requires_grad=True), torch.tensor(targets)

    def torch_loss():
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(h_t, w_t, b_t), y_t).backward()

    loss_grad = jax.jit(jax.grad(lambda h, w, b: losses.fused_linear_cross_entropy(h, w, b, jnp.asarray(targets)),
                                 argnums=(0, 1, 2)))
    arrays = (jnp.asarray(hidden), jnp.asarray(weight), jnp.zeros(vocab))
    cases["decoder + cross-entropy"] = (torch_loss, lambda: jax.block_until_ready(loss_grad(*arrays)),
                                        3 * 2 * steps * batch * 128 * vocab)
    left = rng.standard_normal((steps * batch, 128 + 384), dtype=np.float32)
    right = rng.standard_normal((128 + 384, 4 * 384), dtype=np.float32)
    left_t, right_t = torch.tensor(left), torch.tensor(right)
    product = jax.jit(jnp.matmul)
    left_j, right_j = jnp.asarray(left), jnp.asarray(right)
    cases["one matrix product, 4480 x 512 x 1536 (forward)"] = (
        lambda: left_t @ right_t, lambda: jax.block_until_ready(product(left_j, right_j)),
        2 * left.shape[0] * left.shape[1] * right.shape[1])

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows, results = [], []
    for name, (theirs, ours, flops) in cases.items():
        theirs(), ours(), theirs(), ours()                        # warm-up and compile
        times = {"torch": [], "ours": []}
        for repeat in range(args.repeats):
            order = ("torch", "ours") if repeat % 2 == 0 else ("ours", "torch")
            for side in order:
                times[side].append(timed(theirs if side == "torch" else ours))
        medians = {side: statistics.median(values) * 1000 for side, values in times.items()}
        rates = {side: flops / ms / 1e6 for side, ms in medians.items()}
        results.append({"case": name, "torch_ms": medians["torch"], "ours_ms": medians["ours"], "gflop": flops / 1e9,
                        "torch_gflop_per_s": rates["torch"], "ours_gflop_per_s": rates["ours"]})
        rows.append(f"| {name} | {medians['torch']:.1f} | {medians['ours']:.1f} | "
                    f"{medians['torch'] / medians['ours']:.2f}x | {rates['torch']:.0f} | {rates['ours']:.0f} |")
    env = {"cpu": cpu_model(), "threads": args.threads, "python": platform.python_version(),
           "jax": jax.__version__, "torch": torch.__version__, "malloc": malloc}
    print(f"{env}\n\n| forward + backward, 70 x 64 | torch (ms) | ulmfit_jax (ms) | ours' speed (torch ms / ours ms) "
          f"| torch GFLOP/s | ulmfit_jax GFLOP/s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps({"benchmark": "lstm_layer", "env": env, "results": results}))


if __name__ == "__main__":
    main()
