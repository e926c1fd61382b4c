"""Saving and loading: model directories (portable, no pickle) and training checkpoints (orbax).

A model directory holds

    config.json   {"kind": "language_model" | "classifier", "config": {...}}
    params.npz    every parameter leaf, keyed by its tree path ("encoder/rnn/0/w_ih"); classifier
                  batch-norm statistics under "batch_stats/..."; an empty dict or list in the tree
                  (a tied decoder without an output bias: `{"decoder": {}}`) as a zero-length
                  array under its path plus "/__empty_dict__" or "/__empty_list__"
    vocab.json    the vocabulary, a JSON list of token strings (index = id)
    classes.json  classifier only: the class names (index = label id)
    tokenizer.json  how raw text became the vocabulary's tokens: `TokenizerSettings` as JSON (kind,
                  pre- and post-rules by name, add_eos, ...), the layout of the prepared data's
                  `meta.json` "tokenizer"; for SentencePiece its "sentencepiece_model" is
                  "spm.model", a file name in this directory
    spm.model     SentencePiece only: the trained model itself, copied in, so that the directory
                  tokenizes text without the data folder it was trained from

A directory written before tokenizer.json existed loads with `tokenizer` None; `load_tokenizer`
then gives the default tokenizer and says so on stderr (one line).

`.npz` files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ulmfit_jax.config import ClassifierConfig, EncoderConfig, LanguageModelConfig
from ulmfit_jax.text.tokenizers import TokenizerSettings

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "spm.model"


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

# An empty container has no leaves, so it would vanish from a flat {path: array} mapping and the
# loaded tree would lack it (a tied decoder without an output bias is `{}`; code that indexes
# `params["decoder"]` then fails). It is written as one zero-length array under a reserved last
# path part instead. Files written before these markers existed simply have none, and load as
# they always did; parameter names never start with "__".
EMPTY_DICT = "__empty_dict__"
EMPTY_LIST = "__empty_list__"
_MARKERS = {EMPTY_DICT: dict, EMPTY_LIST: list}


def flatten_tree(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts and lists -> {"a/0/b": array}; an empty dict or list -> {"a/__empty_dict__": []}.

    A key must contain no "/" and be no marker name: either would make the path ambiguous, so the
    tree would not come back unchanged from `unflatten_tree`.
    """
    if isinstance(tree, dict):
        items = tree.items()
        for name in tree:
            if "/" in str(name) or str(name) in _MARKERS:
                raise ValueError(f"cannot store the tree key {name!r} under {prefix or '(the root)'}: a key "
                                 f"must contain no '/' and be none of {sorted(_MARKERS)}")
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    if not tree:
        marker = EMPTY_DICT if isinstance(tree, dict) else EMPTY_LIST
        return {f"{prefix}/{marker}" if prefix else marker: np.zeros(0, np.uint8)}
    flat = {}
    for name, value in items:
        flat.update(flatten_tree(value, f"{prefix}/{name}" if prefix else str(name)))
    return flat


def unflatten_tree(flat: dict[str, np.ndarray]):
    """Inverse of `flatten_tree`: path parts that are all digits become list indices, and the
    empty-container markers become `{}` or `[]` again."""
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
        if len(node) == 1 and next(iter(node)) in _MARKERS:
            return _MARKERS[next(iter(node))]()
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


# The process's umask, read once at import: `mkstemp` creates files readable by their owner only,
# and a model directory or run.json should get the permissions any other new file would.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """JSON written atomically (a temporary file renamed)."""
    _atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))


# ----------------------------------------------------------------------------------------------
# Tokenizer settings <-> JSON (a model directory's tokenizer.json, a prepared data folder's meta.json)

def tokenizer_record(settings: TokenizerSettings) -> dict:
    """`TokenizerSettings` -> JSON-able dict; a SentencePiece model is named by its file name in the
    folder that holds the record ("spm.model"), not by the path it was read from."""
    record = dataclasses.asdict(settings)
    record["pre_rules"], record["post_rules"] = list(settings.pre_rules), list(settings.post_rules)
    if settings.kind == "sentencepiece":
        record["sentencepiece_model"] = SENTENCEPIECE_FILE
    else:
        record["sentencepiece_model"] = None
    return record


def tokenizer_from_record(record, folder, source: str = "") -> TokenizerSettings:
    """A tokenizer record (`tokenizer_record`'s layout) -> `TokenizerSettings`, its SentencePiece
    model resolved inside `folder`. `source` names the file in errors. ValueError for anything
    that is not such a record (unknown keys, kinds or rule names, a SentencePiece model outside
    the folder); FileNotFoundError when the SentencePiece model it names is missing."""
    folder = Path(folder)
    source = source or str(folder)
    if not isinstance(record, dict):
        raise ValueError(f"{source}: the tokenizer settings must be a JSON object, got {type(record).__name__}")
    known = {field.name for field in dataclasses.fields(TokenizerSettings)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"{source}: unknown tokenizer settings {unknown} (known: {sorted(known)})")
    fields = dict(record)
    for name in ("pre_rules", "post_rules"):
        if name in fields:
            if not isinstance(fields[name], list) or not all(isinstance(rule, str) for rule in fields[name]):
                raise ValueError(f"{source}: {name} must be a list of rule names, got {fields[name]!r}")
            fields[name] = tuple(fields[name])
    model = fields.get("sentencepiece_model")
    if fields.get("kind") == "sentencepiece":
        if not isinstance(model, str) or not model or Path(model).name != model:
            raise ValueError(f"{source}: a SentencePiece tokenizer names its model as a file name in {folder}, "
                             f"got {model!r}")
        path = folder / model
        if not path.is_file():
            raise FileNotFoundError(f"{source} names the SentencePiece model {model}, which is missing from {folder}")
        fields["sentencepiece_model"] = str(path)
    else:
        fields["sentencepiece_model"] = None
    try:
        return TokenizerSettings(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


def same_tokenizer(a: TokenizerSettings, b: TokenizerSettings) -> bool:
    """Whether two settings give the same tokens: the same kind, rules and add_eos and, for
    SentencePiece, a model file of the same bytes (wherever each lies)."""
    tokens = ("kind", "pre_rules", "post_rules", "add_eos")      # the rest only trains a SentencePiece model
    if any(getattr(a, name) != getattr(b, name) for name in tokens):
        return False
    if a.kind != "sentencepiece":
        return True
    return Path(a.sentencepiece_model).read_bytes() == Path(b.sentencepiece_model).read_bytes()


def describe_tokenizer(settings: TokenizerSettings) -> str:
    """One line for messages: the kind and what differs from the defaults."""
    default = tokenizer_record(TokenizerSettings(kind=settings.kind))
    changed = {k: v for k, v in tokenizer_record(settings).items() if default.get(k) != v}
    return settings.kind + (f" {changed}" if changed else "")


# ----------------------------------------------------------------------------------------------
# Model directories

def save_model(directory, config, params, vocab: list[str], *, batch_stats=None, classes=None,
               tokenizer: TokenizerSettings | None = None) -> None:
    """Write a model directory (layout in the module docstring). `tokenizer`: the settings the
    vocabulary's text was tokenized with (a prepared data folder's, `cli.data_tokenizer`); for
    SentencePiece its model file is copied into the directory. None writes no tokenizer.json
    (and removes one left by an earlier model in the same directory)."""
    directory = Path(directory)
    spm_bytes = None
    if tokenizer is not None and tokenizer.kind == "sentencepiece":
        if tokenizer.sentencepiece_model is None:
            raise ValueError("a SentencePiece tokenizer without its model cannot be saved: "
                             "settings.sentencepiece_model is None")
        spm_bytes = Path(tokenizer.sentencepiece_model).read_bytes()
    for stale, keep in ((TOKENIZER_FILE, tokenizer is not None), (SENTENCEPIECE_FILE, spm_bytes is not None)):
        if not keep:
            (directory / stale).unlink(missing_ok=True)
    flat = flatten_tree(params)
    if batch_stats is not None:
        flat.update({f"batch_stats/{k}": v for k, v in flatten_tree(batch_stats).items()})
    _atomic_write(directory / "params.npz", lambda handle: np.savez(handle, **flat))
    write_json(directory / "vocab.json", list(vocab))
    if classes is not None:
        write_json(directory / "classes.json", list(classes))
    if spm_bytes is not None:
        _atomic_write(directory / SENTENCEPIECE_FILE, lambda handle: handle.write(spm_bytes))
    if tokenizer is not None:
        write_json(directory / TOKENIZER_FILE, tokenizer_record(tokenizer))
    write_json(directory / "config.json", config_to_dict(config))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def read_tokenizer(directory) -> TokenizerSettings | None:
    """The tokenizer a model directory records (tokenizer.json), or None for a directory without one."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    return tokenizer_from_record(_read_json(path), directory, str(path))


def load_tokenizer(directory) -> TokenizerSettings:
    """The tokenizer to read raw text for a model directory with: the one it records, else (a
    directory written before tokenizer.json existed) the default `TokenizerSettings()`, with a
    one-line warning on stderr."""
    settings = read_tokenizer(directory)
    if settings is None:
        settings = TokenizerSettings()
        print(f"warning: {directory} records no tokenizer (no {TOKENIZER_FILE}): using the default, "
              f"{describe_tokenizer(settings)} with fastai's rules", file=sys.stderr, flush=True)
    return settings


def load_model(directory) -> dict:
    """-> {"config", "params", "vocab", "tokenizer" (TokenizerSettings, or None where the directory
    records none), "batch_stats" (classifier), "classes" (classifier)}."""
    directory = Path(directory)
    for name in ("config.json", "params.npz", "vocab.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a ulmfit_jax model directory: {name} is missing")
    config = config_from_dict(_read_json(directory / "config.json"))
    try:
        with np.load(directory / "params.npz", allow_pickle=False) as archive:
            flat = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{directory / 'params.npz'} is corrupt or partial ({type(error).__name__}: {error})") \
            from error
    stats = {k[len("batch_stats/"):]: v for k, v in flat.items() if k.startswith("batch_stats/")}
    params = unflatten_tree({k: v for k, v in flat.items() if not k.startswith("batch_stats/")})
    vocab = _read_json(directory / "vocab.json")
    vocab_size = (config if isinstance(config, EncoderConfig) else config.encoder).vocab_size
    if len(vocab) != vocab_size:
        raise ValueError(f"{directory}: vocab.json has {len(vocab)} tokens, the model {vocab_size}")
    model = {"config": config, "params": params, "vocab": vocab, "tokenizer": read_tokenizer(directory)}
    if isinstance(config, ClassifierConfig):
        model["batch_stats"] = unflatten_tree(stats)
        classes_file = directory / "classes.json"
        model["classes"] = _read_json(classes_file) if classes_file.is_file() else None
    return model


def save_encoder(directory, config: EncoderConfig, encoder_params, vocab: list[str], *,
                 tokenizer: TokenizerSettings | None = None) -> None:
    """fastai's `save_encoder`: the part of a model that moves into a new one (embedding + RNN),
    with the vocabulary's tokenizer."""
    save_model(directory, config, encoder_params, vocab, tokenizer=tokenizer)


def load_encoder(directory) -> tuple[EncoderConfig, dict, list[str]]:
    """fastai's `load_encoder`, from an encoder directory or any model directory (its encoder part).
    Its tokenizer: `read_tokenizer(directory)`."""
    model = load_model(directory)
    config = model["config"]
    if isinstance(config, EncoderConfig):
        return config, model["params"], model["vocab"]
    return config.encoder, model["params"]["encoder"], model["vocab"]


# ----------------------------------------------------------------------------------------------
# Training checkpoints (orbax)

class TrainingCheckpointer:
    """orbax `CheckpointManager` over the training loop's tree (`{"params", "opt_state", "carry", "step"}`).

    orbax writes each step to a temporary folder and renames it when complete, so a crash leaves
    the previous checkpoints intact; `restore` falls back to an older step when the newest cannot
    be read.

    Several JAX processes (`jax.distributed`): every process constructs the checkpointer and calls
    `save` and `restore` together, in the same order, on the same folder (one that all of them
    see) and with the same global arrays. orbax divides the work itself: each process writes the
    shards it holds, process 0 (orbax's primary host) creates the folders, commits each step and
    deletes old ones, and barriers keep the processes together; that is why nothing here may skip
    a call on some processes. The only things this wrapper does on one process are its warnings
    (process 0 prints them, once for the run); and `restore` checks that every process restored
    the same step, as a process that failed to read a step would otherwise go on from an older one
    than the rest.
    """

    def __init__(self, directory, max_to_keep: int = 2):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False))

    def save(self, step: int, tree) -> None:
        """Write `tree` as checkpoint `step` and wait until it is committed (all processes call this)."""
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, target):
        """-> (step, tree) from the newest readable checkpoint, or (None, None) when there is none.

        `target` says what was saved and where the restored arrays go: a tree of the saved
        structure (arrays or ShapeDtypeStructs; a jax.Array's sharding is the restored copy's), or
        a callable `target(step)` giving that tree for a step, for runs whose tree changes
        structure between steps (an optimizer state per stage). All processes call this together.
        """
        import jax
        errors, found = [], None
        for step in sorted(self.manager.all_steps(), reverse=True):
            tree = target(step) if callable(target) else target
            try:
                abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, tree)
                found = step, self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
                break
            except Exception as error:  # a corrupt or partial step: say so, try the one before
                errors.append(f"step {step}: {type(error).__name__}: {error}")
                if jax.process_index() == 0:
                    print(f"warning: checkpoint step {step} in {self.directory} is unreadable, trying an older one",
                          flush=True)
        _same_step_on_every_process(None if found is None else found[0], self.directory)
        if found is not None:
            self._move_aside_newer_than(found[0])
            return found
        if errors:
            raise RuntimeError("no readable checkpoint in " + str(self.directory) + ":\n" + "\n".join(errors))
        return None, None


    def _move_aside_newer_than(self, step: int) -> None:
        """The unreadable steps newer than the one restored go to `<directory>.unreadable/<step>`
        (kept, not deleted): orbax would refuse to save those steps again when the run gets there."""
        import jax
        newer = [s for s in self.manager.all_steps() if s > step]
        if not newer:
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".unreadable")
            aside.mkdir(exist_ok=True)
            for bad in newer:
                target = aside / str(bad)
                suffix = 1
                while target.exists():
                    target, suffix = aside / f"{bad}.{suffix}", suffix + 1
                os.rename(self.directory / str(bad), target)
                print(f"warning: moved the unreadable checkpoint step {bad} to {target}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("unreadable checkpoints moved aside")
        self.manager.reload()


def _same_step_on_every_process(step: int | None, directory: Path) -> None:
    """Raise on every process when the processes restored different steps (None: nothing).

    The steps are listed from the shared folder, so the processes try the same ones in the same
    order; they part only when a step reads on some processes and fails on others, and training
    on from different states would be silently wrong. One process: nothing to compare. (This
    catches the processes that fail a step and read an older one. A process that reads no step
    at all never reaches orbax's barrier at the end of a restore, so the processes that did read
    one wait there until orbax's barrier times out.)
    """
    import jax
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    steps = np.asarray(multihost_utils.process_allgather(np.int32(-1 if step is None else step))).ravel()
    if len(set(steps.tolist())) > 1:
        named = ", ".join(f"process {i}: {'none' if s < 0 else f'step {s}'}" for i, s in enumerate(steps.tolist()))
        raise RuntimeError(f"the processes restored different checkpoints from {directory} ({named}); "
                           "check that every process sees the same folder, or start afresh with --no-resume")
