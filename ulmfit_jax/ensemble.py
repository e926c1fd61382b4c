"""Forward + backward ULMFiT: the average of the two classifiers' probabilities (the paper's §5)."""

from __future__ import annotations

import numpy as np

from ulmfit_jax import predict


def classifier_probabilities(model: dict, documents, *, backwards: bool = False, batch_size: int = 64) -> np.ndarray:
    """A loaded classifier model directory (`checkpoint.load_model`) over int32 documents -> f32[N, C].

    `backwards` reverses every document, for a model trained with `--backwards`.
    """
    config = model["config"]
    settings = predict.classifier_batch_settings(config, batch_size, backwards)
    return predict.predict_classifier(predict.classifier_predictor(config), model["params"], model["batch_stats"],
                                      documents, settings)


def ensemble_probabilities(forward: dict, backward: dict, documents, batch_size: int = 64) -> np.ndarray:
    """Mean of the forward model's and the backward model's (on reversed documents) probabilities."""
    if forward["vocab"] != backward["vocab"] or forward.get("classes") != backward.get("classes"):
        raise ValueError("the forward and backward models must share the vocabulary and the classes")
    return 0.5 * (classifier_probabilities(forward, documents, batch_size=batch_size)
                  + classifier_probabilities(backward, documents, backwards=True, batch_size=batch_size))
