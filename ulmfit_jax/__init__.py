"""ULMFiT in JAX. The inference API is exported here (`load_classifier`, `load_language_model`,
from `ulmfit_jax.inference`); it is imported on first use, so that `import ulmfit_jax.text` (the
tokenizer's worker processes) does not load JAX."""

__all__ = ["load_classifier", "load_language_model"]


def __getattr__(name):
    if name in __all__:
        from ulmfit_jax import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'ulmfit_jax' has no attribute {name!r}")
