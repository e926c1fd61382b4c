"""Metrics: classification scores, and training losses kept on the device until the loop reads them.

`LossBuffer` holds each step's loss as a device scalar; `read()` fetches them all in one transfer
(one host sync every `log_every` steps, not one a step) and raises `FloatingPointError` naming the
step range when any is NaN or infinite. `Throughput` counts tokens per second of training, with
compile time apart.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def macro_f1(predictions: np.ndarray, targets: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class absent from both counts 0."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((predictions == c) & (targets == c))
        fp = np.sum((predictions == c) & (targets != c))
        fn = np.sum((predictions != c) & (targets == c))
        scores.append(0.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """probabilities f32[N, C], labels int[N] -> {"loss" (mean NLL), "accuracy", "macro_f1"}."""
    predictions = probabilities.argmax(axis=1)
    labels = np.asarray(labels)
    nll = -np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12)))
    return {"loss": float(nll), "accuracy": float(np.mean(predictions == labels)),
            "macro_f1": macro_f1(predictions, labels, probabilities.shape[1])}


class LossBuffer:
    """Per-step losses left on the device until `read()`."""

    def __init__(self):
        self._pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, loss: jax.Array) -> None:
        self._pending.append((step, loss))

    def __len__(self) -> int:
        return len(self._pending)

    def read(self) -> list[float]:
        """The pending losses as floats (one transfer), emptied; FloatingPointError if any is not finite."""
        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        values = [float(v) for v in jax.device_get([loss for _, loss in self._pending])]
        self._pending.clear()
        bad = [(step, value) for step, value in zip(steps, values) if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(f"the loss is {bad[0][1]} at step {bad[0][0]} (read for steps {steps[0]}-"
                                     f"{steps[-1]}); training stopped and no checkpoint was written from it")
        return values


class Throughput:
    """Tokens per second over training steps; compile time counted apart (`compile_seconds`)."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0

    def record(self, seconds: float, tokens: int) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.nan
