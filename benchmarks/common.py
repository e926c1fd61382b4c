"""What the benchmarks share: the machine they ran on, package versions, timed script runs,
statistics, and ulmfit_jax's side of an LM train-step comparison (one jitted step: train-mode
dropouts, cross-entropy + AR + TAR, Adam)."""

import os
import platform
import statistics
import time
from typing import NamedTuple

LR, BETAS, EPS = 1e-3, (0.9, 0.99), 1e-5    # Adam, the same on both sides of a comparison
ALPHA, BETA = 2.0, 1.0                      # AR / TAR, as fastai's RNNRegularizer


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def versions(names=("jax", "jaxlib", "optax", "flax", "torch", "fastai", "spacy")) -> dict[str, str]:
    """{distribution: installed version} of the packages a comparison depends on."""
    import importlib.metadata as metadata
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict:
    """The CPU, the cores this process may use and the load average, for a benchmark's record."""
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "load_average": load_average(),
            "python": platform.python_version()}


def git_state(root) -> dict:
    """The commit a benchmark ran at and the tracked files that differed from it (a run in a
    checkout others are changing should say so)."""
    import subprocess
    def git(*args):
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None
    changed = git("diff", "--name-only", "HEAD")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": changed.splitlines() if changed else []}


class Timed(NamedTuple):
    wall: float           # seconds from start to exit
    cpu: float            # user + system CPU seconds of the process and its children
    result: dict          # its last stdout line, as JSON


def timed_run(command, log_path=None, env=None) -> Timed:
    """Run `command` in a fresh process and time it from outside. The CPU time beside the wall time
    tells a slow machine (other processes on the cores) from slow work. stdout and stderr go to
    `log_path` when given; a failure raises with stderr's tail."""
    import json
    import resource
    import subprocess
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if log_path is not None:
        with open(log_path, "w") as handle:
            handle.write(f"$ {' '.join(map(str, command))}\n{completed.stdout}\n--- stderr ---\n{completed.stderr}")
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({completed.returncode}):\n"
                           f"{completed.stderr[-4000:]}")
    lines = completed.stdout.strip().splitlines()
    try:
        return Timed(wall, cpu, json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{' '.join(map(str, command))}: the last stdout line is not JSON: "
                           f"{lines[-1:] or '(no output)'}") from None


def interquartile_range(values) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def token_windows(vocab: int, batch: int, bptt: int, n_windows: int, seed: int = 0):
    """n_windows consecutive (input, target) windows of a [batch, n_windows * bptt + 1] stream."""
    import numpy as np
    rng = np.random.default_rng(seed)
    stream = rng.integers(2, vocab, size=(batch, n_windows * bptt + 1), dtype=np.int64)
    return [(stream[:, w * bptt:(w + 1) * bptt], stream[:, w * bptt + 1:(w + 1) * bptt + 1])
            for w in range(n_windows)]


class LanguageModelRun:
    """One jitted train step of an ulmfit_jax LM (`arch` "lstm" or "qrnn")."""

    def __init__(self, arch, vocab, emb, hidden, layers, windows, loss_kind, chunk_size):
        import jax
        import jax.numpy as jnp
        import optax

        from ulmfit_jax import encoder, heads, losses, models
        from ulmfit_jax.config import awd_lstm_lm_config

        config = awd_lstm_lm_config(vocab, emb_size=emb, n_hidden=hidden, n_layers=layers, arch=arch)
        batch = windows[0][0].shape[0]
        optimizer = optax.adam(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS)

        def loss_fn(params, tokens, targets, state, key):
            dropped, new_state, (raw, _) = models.language_model_hidden(params, tokens, state, config=config,
                                                                        train=True, key=key)
            if loss_kind == "fused":
                ce = losses.fused_linear_cross_entropy(dropped, heads.decoder_weight(params, config),
                                                       params["decoder"]["bias"], targets, chunk_size=chunk_size)
            else:
                ce = losses.cross_entropy(heads.lm_logits(params, dropped, config), targets)
            loss = (ce + losses.activation_regularization(dropped, ALPHA)
                    + losses.temporal_activation_regularization(raw, BETA))
            return loss, new_state

        def train_step(params, opt_state, state, tokens, targets, key):
            key, step_key = jax.random.split(key)
            (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, tokens, targets, state, step_key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(new_state), key, loss

        self.params = models.init_language_model(jax.random.PRNGKey(0), config)
        self.n_params = sum(x.size for x in jax.tree.leaves(self.params))
        self.opt_state = optimizer.init(self.params)
        self.state = encoder.initial_state(config.encoder, batch)
        self.key = jax.random.PRNGKey(1)
        self.windows = [(jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)) for x, y in windows]
        t0 = time.perf_counter()
        self.compiled = jax.jit(train_step, donate_argnums=(0, 1, 2, 5)).lower(
            self.params, self.opt_state, self.state, *self.windows[0], self.key).compile()
        self.compile_s = time.perf_counter() - t0
        self.i = 0
        self.losses = []

    def step(self) -> float:
        x, y = self.windows[self.i % len(self.windows)]
        self.i += 1
        t0 = time.perf_counter()
        self.params, self.opt_state, self.state, self.key, loss = self.compiled(
            self.params, self.opt_state, self.state, x, y, self.key)
        loss.block_until_ready()
        self.losses.append(float(loss))
        return time.perf_counter() - t0
