"""Compiling ahead: jitted functions compiled for known argument shapes in a background thread,
while the main thread trains on what is already compiled.

A fit knows every program it will run before its first step: one train step (every stage shares
it) for each batch shape, and the evaluation forward pass for each. `Compiler.submit` queues them (which
also fills `jax.jit`'s own cache, so a plain call of `fn` with such arguments compiles nothing);
`Compiler.call(fn, *args)` runs the executable for those arguments' shapes, waiting for its
compile if it is in flight and compiling it in the caller's thread if it was never submitted (a
submitted compile not yet started is taken over, never compiled twice). The time the caller waited
for compiles is `wait_seconds` (the loop leaves it out of its throughput).

Tracing happens in the worker thread, so thread-local JAX settings (`jax.default_matmul_precision`
as a context manager) do not reach it; set them globally (`jax.config.update`).

`QUICK_COMPILE_CPU_OPTIONS` / `quick_compile_options()`: XLA:CPU's settings for a shorter compile,
which short runs' train steps and every classifier prediction program use.
"""

from __future__ import annotations

import concurrent.futures
import time
import warnings

import jax


# XLA:CPU options that trade run time for compile time: optimisation level 1 and the classic fusion
# emitters. A classifier's forward pass runs as fast with them and compiles in half the time; a
# language model's evaluation runs a third slower (its decoder and softmax), and a train step
# compiles faster and runs slower (`train.QUICK_COMPILE_MAX_POSITIONS`).
QUICK_COMPILE_CPU_OPTIONS = (("xla_backend_optimization_level", 1), ("xla_cpu_use_fusion_emitters", False))


def quick_compile_options() -> dict | None:
    """`QUICK_COMPILE_CPU_OPTIONS` as `jax.jit`'s `compiler_options` where JAX computes on the CPU,
    else None (other backends know no such options)."""
    return dict(QUICK_COMPILE_CPU_OPTIONS) if jax.default_backend() == "cpu" else None


def signature(args) -> tuple:
    """What selects an executable: the tree structure and every leaf's shape and dtype (shardings are
    the loop's business: an executable refuses arguments placed otherwise than it was compiled for)."""
    leaves, structure = jax.tree.flatten(args)
    return structure, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


def spec(tree):
    """Every `jax.Array` leaf as a `jax.ShapeDtypeStruct` with its sharding (its buffer may be donated
    before the compile starts); host arrays and specs as they are, so that the compile is the one a
    call with such arguments would make."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
                        if isinstance(leaf, jax.Array) else leaf, tree)


class Compiler:
    """Executables of jitted functions by argument signature, compiled ahead in one background thread."""

    def __init__(self, background: bool = True):
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead") \
            if background else None
        self._futures: dict = {}
        self._compiled: dict = {}
        self.wait_seconds = 0.0

    @staticmethod
    def _compile(fn, args):
        return fn.lower(*args).compile()

    def submit(self, fn, *args, key=None) -> None:
        """Queue `fn`'s compile for `args` (arrays or `spec`s); a no-op when known or without a thread.
        `key`: what tells these arguments' signature apart from the others `fn` is called with (default
        `signature(args)`; a loop whose state keeps its shapes passes the batch's shapes, cheaper)."""
        key = (fn, signature(args) if key is None else key)
        if self._executor is None or key in self._futures or key in self._compiled:
            return
        self._futures[key] = self._executor.submit(self._compile, fn, spec(args))

    def executable(self, fn, *args, key=None):
        key = (fn, signature(args) if key is None else key)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        start = time.perf_counter()
        future = self._futures.pop(key, None)
        if future is not None and not future.cancel():
            try:
                compiled = future.result()
            except Exception as error:      # the real error, if any, comes from compiling here
                warnings.warn(f"compiling ahead failed ({error!r}); compiling in the training loop")
        if compiled is None:
            compiled = self._compile(fn, args)
        self.wait_seconds += time.perf_counter() - start
        self._compiled[key] = compiled
        return compiled

    def call(self, fn, *args, key=None):
        """`fn(*args)` through its executable for these arguments' signature (`key` as for `submit`)."""
        return self.executable(fn, *args, key=key)(*args)

    def close(self, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(cancel=exc_type is not None)
