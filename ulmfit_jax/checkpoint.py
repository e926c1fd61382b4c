"""Saving and loading: model directories (portable, no pickle) and training checkpoints (orbax).

A model directory holds

    config.json   {"kind": "language_model" | "classifier", "config": {...}}
    params.npz    every parameter leaf, keyed by its tree path ("encoder/rnn/0/w_ih"); classifier
                  batch-norm statistics under "batch_stats/..."
    vocab.json    the vocabulary, a JSON list of token strings (index = id)
    classes.json  classifier only: the class names (index = label id)

`.npz` files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ulmfit_jax.config import ClassifierConfig, EncoderConfig, LanguageModelConfig


# ----------------------------------------------------------------------------------------------
# Configs <-> JSON

def config_to_dict(config) -> dict:
    kind = {LanguageModelConfig: "language_model", ClassifierConfig: "classifier", EncoderConfig: "encoder"}
    if isinstance(config, EncoderConfig):
        return {"kind": "encoder", "config": {"encoder": dataclasses.asdict(config)}}
    return {"kind": kind[type(config)], "config": dataclasses.asdict(config)}


def config_from_dict(data: dict):
    fields = dict(data["config"])
    encoder = EncoderConfig(**fields.pop("encoder"))
    if data["kind"] == "encoder":
        return encoder
    if data["kind"] == "language_model":
        return LanguageModelConfig(encoder=encoder, **fields)
    if data["kind"] == "classifier":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return ClassifierConfig(encoder=encoder, **fields)
    raise ValueError(f"unknown model kind {data['kind']!r}")


# ----------------------------------------------------------------------------------------------
# Pytrees <-> flat {path: array}

def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts and lists -> {"a/0/b": array}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    flat = {}
    for name, value in items:
        flat.update(flatten_tree(value, f"{prefix}/{name}" if prefix else str(name)))
    return flat


def unflatten_tree(flat: dict[str, np.ndarray]):
    """Inverse of `flatten_tree`: path parts that are all digits become list indices."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data) -> None:
    _atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))


# ----------------------------------------------------------------------------------------------
# Model directories

def save_model(directory, config, params, vocab: list[str], *, batch_stats=None, classes=None) -> None:
    directory = Path(directory)
    flat = flatten_tree(params)
    if batch_stats is not None:
        flat.update({f"batch_stats/{k}": v for k, v in flatten_tree(batch_stats).items()})
    _atomic_write(directory / "params.npz", lambda handle: np.savez(handle, **flat))
    _write_json(directory / "vocab.json", list(vocab))
    if classes is not None:
        _write_json(directory / "classes.json", list(classes))
    _write_json(directory / "config.json", config_to_dict(config))


def load_model(directory) -> dict:
    """-> {"config", "params", "vocab", "batch_stats" (classifier), "classes" (classifier)}."""
    directory = Path(directory)
    for name in ("config.json", "params.npz", "vocab.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a ulmfit_jax model directory: {name} is missing")
    config = config_from_dict(json.loads((directory / "config.json").read_text()))
    try:
        with np.load(directory / "params.npz", allow_pickle=False) as archive:
            flat = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{directory / 'params.npz'} is corrupt or partial ({type(error).__name__}: {error})") \
            from error
    stats = {k[len("batch_stats/"):]: v for k, v in flat.items() if k.startswith("batch_stats/")}
    params = unflatten_tree({k: v for k, v in flat.items() if not k.startswith("batch_stats/")})
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab_size = (config if isinstance(config, EncoderConfig) else config.encoder).vocab_size
    if len(vocab) != vocab_size:
        raise ValueError(f"{directory}: vocab.json has {len(vocab)} tokens, the model {vocab_size}")
    model = {"config": config, "params": params, "vocab": vocab}
    if isinstance(config, ClassifierConfig):
        model["batch_stats"] = unflatten_tree(stats)
        classes_file = directory / "classes.json"
        model["classes"] = json.loads(classes_file.read_text()) if classes_file.is_file() else None
    return model


def save_encoder(directory, config: EncoderConfig, encoder_params, vocab: list[str]) -> None:
    """fastai's `save_encoder`: the part of a model that moves into a new one (embedding + RNN)."""
    save_model(directory, config, encoder_params, vocab)


def load_encoder(directory) -> tuple[EncoderConfig, dict, list[str]]:
    """fastai's `load_encoder`, from an encoder directory or any model directory (its encoder part)."""
    model = load_model(directory)
    config = model["config"]
    if isinstance(config, EncoderConfig):
        return config, model["params"], model["vocab"]
    return config.encoder, model["params"]["encoder"], model["vocab"]


# ----------------------------------------------------------------------------------------------
# Training checkpoints (orbax)

class TrainingCheckpointer:
    """orbax `CheckpointManager` over `{"params", "opt_state", "carry", "step"}`.

    orbax writes each step to a temporary folder and renames it when complete, so a crash leaves
    the previous checkpoints intact; `restore` falls back to an older step when the newest cannot
    be read. The optimizer state's structure depends on the stage, so restoring needs a target
    tree of the right structure (`abstract`).
    """

    def __init__(self, directory, max_to_keep: int = 2):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False))

    def save(self, step: int, tree) -> None:
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, target_for_step):
        """-> (step, tree) from the newest readable checkpoint, or (None, None) when there is none.

        `target_for_step(step)` gives a tree of the structure saved at that step (arrays or
        ShapeDtypeStructs).
        """
        import jax
        errors = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target_for_step(step))
                return step, self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
            except Exception as error:  # a corrupt or partial step: say so, try the one before
                errors.append(f"step {step}: {type(error).__name__}: {error}")
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable, trying an older one",
                      flush=True)
        if errors:
            raise RuntimeError("no readable checkpoint in " + str(self.directory) + ":\n" + "\n".join(errors))
        return None, None
