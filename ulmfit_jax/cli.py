"""What the training scripts share: flags, presets, run folders, metrics files and plots.

Presets (`--preset`):
- `fastai`: fastai 2.8.12's text recipes: one-cycle schedules (div 25, pct_start 0.25, moms
  0.8/0.7/0.8), fastai's Adam (0.9/0.99 betas under the moms schedule, eps 1e-5), weight decay 0.01,
  classifier drop_mult 0.5, LM drop_mult 1.0.
- `paper`: Howard & Ruder (2018): slanted triangular learning rates (cut_frac 0.1, ratio 32), Adam
  betas (0.7, 0.99), discriminative learning rates lr / 2.6 per group.
- `multifit`: MultiFiT (Eisenschlos et al. 2019): 4-layer QRNN, 1550 hidden, one-cycle, classifier
  label smoothing 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ulmfit_jax import config as configs
from ulmfit_jax import optim

PRESETS = ("fastai", "paper", "multifit")
COMPILATION_CACHE_ENV = "ULMFIT_COMPILATION_CACHE"


def use_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache: a rerun with the same model, stages and batch
    shapes loads its executables instead of compiling them again (the cache is keyed on the
    program, the compile options and the jax/jaxlib versions). Directory: `directory`, else
    $ULMFIT_COMPILATION_CACHE, else ~/.cache/ulmfit_jax/xla; "off" (or "") turns it off. Programs
    that compile in 0.1 s or more are kept, a run's short evaluation and prediction programs too.
    -> the directory used, or None."""
    import jax
    if directory is None:
        directory = os.environ.get(COMPILATION_CACHE_ENV, Path.home() / ".cache" / "ulmfit_jax" / "xla")
    if str(directory) in ("", "off"):
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return Path(directory)


# glibc's malloc settings that keep freed memory: (mallopt parameter from malloc.h, the environment
# variable glibc reads at start-up for it, value)
MALLOC_SETTINGS = ((-1, "MALLOC_TRIM_THRESHOLD_", 1 << 30), (-2, "MALLOC_TOP_PAD_", 256 << 20),
                   (-4, "MALLOC_MMAP_MAX_", 0))
MALLOC_ENV = "ULMFIT_MALLOC"


def glibc_version() -> str | None:
    """The C library's version ("glibc 2.36"), or None where it is not glibc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or None
    except (ValueError, OSError, AttributeError):      # the name unknown, or no confstr at all
        return None


def keep_freed_memory() -> bool:
    """Keep the memory XLA:CPU frees for its next step instead of page-faulting it back in; call it
    before anything makes JAX's backend (devices, arrays, computations).

    XLA:CPU allocates every execution's buffers afresh, the largest one block of all its
    intermediates (over 100 MB for a 128/384 LSTM layer's forward and backward at 64 x 70). With
    glibc's defaults such a block is a fresh mmap, unmapped when freed, and the next step faults
    all its pages back in. So:
    - glibc's malloc keeps what is freed (`MALLOC_SETTINGS`): up to 1 GiB at the top of the heap
      (M_TRIM_THRESHOLD), grown 256 MiB at a time (M_TOP_PAD), no block served by mmap
      (M_MMAP_MAX = 0). The cost: large blocks are no longer handed back to the kernel when
      freed, so the process stays near its peak memory;
    - single-device computations run on the calling thread (`jax_cpu_enable_async_dispatch` off,
      read when JAX makes its CPU client): on a worker thread they would allocate from that thread's
      arena, whose heaps hold at most 64 MB, and glibc serves a larger block by mmap whatever the
      settings say. A call then returns when its computation is done, so the host's work between
      steps no longer overlaps it; where JAX's backend exists already, a warning says the dispatch
      stays asynchronous.
    The process's own settings only, made at run time; a no-op where the C library is not glibc, or
    with $ULMFIT_MALLOC=default.
    -> whether glibc took the settings."""
    import ctypes
    import warnings
    if os.environ.get(MALLOC_ENV) == "default" or glibc_version() is None:
        return False
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        warnings.warn("keep_freed_memory: JAX's backend exists already, so its computations keep being "
                      "dispatched to worker threads; call it first", stacklevel=2)
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    libc = ctypes.CDLL(None)                                # the C library this process runs on
    return all(libc.mallopt(parameter, value) == 1 for parameter, _, value in MALLOC_SETTINGS)


def add_compilation_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help=f"persistent compilation cache (default ${COMPILATION_CACHE_ENV} or "
                             "~/.cache/ulmfit_jax/xla; 'off' to compile everything afresh)")


def add_common_flags(parser: argparse.ArgumentParser, *, default_lr: float, default_epochs: int) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder written by scripts/prepare_data.py")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model, checkpoints, metrics, plots")
    parser.add_argument("--preset", choices=PRESETS, default="fastai")
    parser.add_argument("--epochs", type=int, default=default_epochs)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--bs", type=int, default=64, help="batch size")
    parser.add_argument("--bptt", type=int, default=70, help="BPTT window length")
    parser.add_argument("--lr", type=float, default=default_lr, help="peak learning rate of the last group")
    parser.add_argument("--wd", type=float, default=0.01, help="weight decay (decoupled, as fastai)")
    parser.add_argument("--clip", type=float, default=None, help="clip the gradients' global norm")
    parser.add_argument("--emb-sz", type=int, default=None, help="embedding size (preset: 400)")
    parser.add_argument("--n-hid", type=int, default=None, help="hidden size (preset: 1152; multifit 1550)")
    parser.add_argument("--n-layers", type=int, default=None, help="layers (preset: 3; multifit 4)")
    parser.add_argument("--arch", choices=("lstm", "qrnn"), default=None, help="recurrent layer (preset: lstm)")
    parser.add_argument("--drop-mult", type=float, default=None, help="scale every dropout")
    parser.add_argument("--backwards", action="store_true", help="train on reversed documents")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the matmuls (bfloat16 for TPU/GPU; float32 accumulation and state)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50,
                        help="read the losses back from the device every N steps (and at each epoch's end)")
    parser.add_argument("--compile-per-stage", action="store_true",
                        help="compile a train step per unfreezing stage, differentiating only its groups "
                             "(long stages on large data); default: one step for every stage")
    parser.add_argument("--quick-compile", choices=("auto", "on", "off"), default="auto",
                        help="compile the train step for compile time rather than run time (CPU); auto: for "
                             "short runs (steps x batch x length at most 4M token positions)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh: move the checkpoints and results already in --out to "
                             "--out/previous/N (nothing is deleted)")
    parser.add_argument("--distributed", action="store_true",
                        help="one process per host (jax.distributed); --bs is the global batch")
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="--distributed outside a cluster JAX detects by itself (TPU, SLURM, Open MPI)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    add_compilation_cache_flag(parser)


# Flags that may change when a run is resumed: where and how it runs, not what it trains.
RESUMABLE_FLAGS = ("out", "no_resume", "max_steps", "log_every", "compile_per_stage", "quick_compile",
                   "compilation_cache",
                   "distributed", "coordinator_address", "num_processes", "process_id")


def start(args) -> None:
    """Set-up every training script does first: memory, compilation cache, processes, the run folder
    (`--no-resume` moves an earlier run aside; a rerun with other settings is refused)."""
    keep_freed_memory()
    use_compilation_cache(args.compilation_cache)
    if args.epochs < 1 or args.bs < 1 or args.bptt < 1 or args.lr <= 0 or args.log_every < 1:
        raise SystemExit("error: --epochs, --bs, --bptt, --lr and --log-every must be positive")
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if any(value is not None for value in cluster) and not args.distributed:
        raise SystemExit("error: --coordinator-address, --num-processes and --process-id need --distributed")
    from ulmfit_jax import parallel, runs
    if args.distributed:
        parallel.initialize_distributed(*cluster)
    main = parallel.is_main_process()
    settings = {k: v for k, v in vars(args).items() if k not in RESUMABLE_FLAGS}
    if main:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.no_resume:
            moved = runs.move_aside(args.out)
            if moved is not None:
                print(f"--no-resume: the earlier run is in {moved}", file=sys.stderr, flush=True)
    _barrier("run folder ready")
    try:
        runs.check_or_save_settings(args.out, settings, write=main)
    except runs.SettingsMismatch as error:
        raise SystemExit(f"error: {error}")


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def compute_dtype(args):
    import jax.numpy as jnp
    return None if args.compute_dtype == "float32" else jnp.bfloat16


def _architecture(args) -> dict:
    arch = args.arch or ("qrnn" if args.preset == "multifit" else "lstm")
    sizes = {"emb_size": args.emb_sz, "n_hidden": args.n_hid, "n_layers": args.n_layers}
    return {"arch": arch, **{k: v for k, v in sizes.items() if v is not None}}


def language_model_config(args, vocab_size: int, default_drop_mult: float = 1.0):
    overrides = _architecture(args)
    drop_mult = default_drop_mult if args.drop_mult is None else args.drop_mult
    if args.preset == "multifit":
        overrides.pop("arch")
        return configs.multifit_lm_config(vocab_size, drop_mult=drop_mult, **overrides)
    if overrides["arch"] == "qrnn":
        overrides.pop("arch")
        return configs.awd_qrnn_lm_config(vocab_size, drop_mult=drop_mult, **overrides)
    return configs.awd_lstm_lm_config(vocab_size, drop_mult=drop_mult, **overrides)


def classifier_config(args, vocab_size: int, n_classes: int):
    overrides = dict(_architecture(args), bptt=args.bptt)
    drop_mult = 0.5 if args.drop_mult is None else args.drop_mult
    if args.preset == "multifit":
        overrides.pop("arch")
        return configs.multifit_clas_config(vocab_size, n_classes, drop_mult=drop_mult, **overrides)
    if overrides["arch"] == "qrnn":
        overrides.pop("arch")
        return configs.awd_qrnn_clas_config(vocab_size, n_classes, drop_mult=drop_mult, **overrides)
    return configs.awd_lstm_clas_config(vocab_size, n_classes, drop_mult=drop_mult, **overrides)


def optimizer_config(args, learning_rate, n_groups: int) -> optim.OptimizerConfig:
    """`learning_rate`: a number, an `optim.Slice`, or per-group values."""
    if args.preset == "paper":
        if isinstance(learning_rate, (int, float)):
            learning_rate = optim.discriminative_lrs(learning_rate, n_groups)
        return optim.OptimizerConfig(learning_rate=learning_rate, weight_decay=args.wd, beta1=0.7, beta2=0.99,
                                     clip_norm=args.clip, schedule=optim.SlantedTriangular())
    return optim.OptimizerConfig(learning_rate=learning_rate, weight_decay=args.wd, clip_norm=args.clip)


def label_smoothing(args) -> float:
    return 0.1 if args.preset == "multifit" else 0.0


def _main_process() -> bool:
    from ulmfit_jax import parallel
    return parallel.is_main_process()


class RunLog:
    """Metrics as JSON lines in `out/metrics.jsonl` (and on stdout), PNG plots at the end; written by
    process 0 alone in a multi-process run."""

    def __init__(self, out: Path, stage: str):
        from ulmfit_jax.runs import METRICS_FILE
        self.path = out / METRICS_FILE
        self.plot_path = out / f"{stage}_metrics.png"
        self.stage = stage

    def __call__(self, record: dict) -> None:
        record = {"stage": self.stage, **record}
        if not _main_process():
            return
        line = json.dumps(record)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
        print(line, flush=True)

    def plot(self) -> Path | None:
        """Every epoch of the run in `out/metrics.jsonl`: a resumed run's earlier processes' too."""
        if not _main_process():
            return None
        epochs = epoch_records(self.path.parent)
        if not epochs:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [k for k in epochs[-1] if k.startswith(("train_", "valid_")) and isinstance(epochs[-1][k], float)]
        figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
        for axis, name in zip(axes[0], names):
            axis.plot([r["epoch"] + 1 for r in epochs], [r.get(name) for r in epochs], marker="o")
            axis.set_title(name)
            axis.set_xlabel("epoch")
        figure.tight_layout()
        figure.savefig(self.plot_path)
        plt.close(figure)
        return self.plot_path


def finish(result: dict, throughput, started: float) -> None:
    """The last stdout line of every training script (of every process): JSON of its final metrics
    (a number that is not finite, such as the throughput of a rerun that had no step left to
    train, is null: JSON has no NaN)."""
    result = dict(result, tokens_per_s=throughput.tokens_per_second, compile_seconds=throughput.compile_seconds,
                  seconds=time.time() - started)
    print(json.dumps({k: ((round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v)
                      for k, v in result.items()}, allow_nan=False), flush=True)


def epoch_records(out: Path) -> list[dict]:
    """The epoch records in `out/metrics.jsonl`, in epoch order, the newest of an epoch that was
    recorded twice (a run stopped after an epoch's record, before its checkpoint, trains it again)."""
    from ulmfit_jax.runs import METRICS_FILE
    try:
        lines = (Path(out) / METRICS_FILE).read_text().splitlines()
    except OSError:
        return []
    latest = {record["epoch"]: record for record in map(json.loads, lines) if "epoch" in record}
    return [latest[epoch] for epoch in sorted(latest)]


def final_epoch(out: Path, history: list[dict]) -> dict:
    """The run's last epoch record: this process's, or, for a rerun of a finished run (which has no
    epoch left to train), the last one in `out/metrics.jsonl`."""
    if history:
        return history[-1]
    epochs = epoch_records(out)
    return epochs[-1] if epochs else {}


# ----------------------------------------------------------------------------------------------
# Data and runs

def load_data(args):
    from ulmfit_jax.text.datasets import load_prepared
    try:
        return load_prepared(args.data)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")


def data_tokenizer(folder):
    """The tokenizer a prepared data folder was made with (its meta.json "tokenizer", the
    SentencePiece model resolved to the folder's spm.model): what the models trained on it must
    tokenize raw text with. None for a folder whose meta.json records none."""
    from ulmfit_jax import checkpoint
    meta_path = Path(folder) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not prepared data: meta.json is missing") from None
    except ValueError as error:
        raise ValueError(f"{meta_path} is not valid JSON ({error})") from None
    record = meta.get("tokenizer") if isinstance(meta, dict) else None
    if record is None:
        return None
    return checkpoint.tokenizer_from_record(record, folder, f'{meta_path} ("tokenizer")')


def checked_data_tokenizer(folder):
    """`data_tokenizer` for a script: a bad record exits with a one-line error."""
    try:
        return data_tokenizer(folder)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")


def run_data_folder(out: Path) -> Path | None:
    """The prepared data a run trains on: its `--data`, as recorded in `out/run.json` (None
    where there is no such record)."""
    from ulmfit_jax import runs
    try:
        settings = json.loads((Path(out) / runs.SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    data = settings.get("data") if isinstance(settings, dict) else None
    return Path(data) if isinstance(data, str) else None


def split_documents(data, names):
    """Concatenated documents (and labels) of the named splits that exist."""
    import numpy as np
    documents, labels = [], []
    for name in names:
        if name in data.splits:
            documents += data.splits[name].documents
            if data.splits[name].labels is not None:
                labels.append(np.asarray(data.splits[name].labels))
    return documents, (np.concatenate(labels) if labels else None)


def document_subset(documents, labels, n: int | None, seed: int, flag: str):
    """`n` of the documents chosen by `seed` (`--train-docs`, `--max-docs`: the paper's low-shot
    runs and data sets cut to a machine's size), in their original order; all of them for n None.
    With labels the choice is balanced, n // classes of each class (the first n % classes classes
    one more), so a few labelled examples cover every class. SystemExit, naming `flag`, when n is
    not positive, exceeds the documents or a class's share. -> (documents, labels or None)."""
    import numpy as np
    if n is None:
        return documents, labels
    if n < 1 or n > len(documents):
        raise SystemExit(f"error: {flag} {n}: need between 1 and the {len(documents)} documents there are")
    rng = np.random.default_rng(seed)
    if labels is None:
        chosen = np.sort(rng.choice(len(documents), size=n, replace=False))
        return [documents[i] for i in chosen], None
    classes = np.unique(labels)
    if n < len(classes):
        raise SystemExit(f"error: {flag} {n}: a balanced choice needs at least one of each of the "
                         f"{len(classes)} classes")
    chosen = []
    for position, label in enumerate(classes):
        rows = np.flatnonzero(labels == label)
        share = n // len(classes) + (position < n % len(classes))
        if share > len(rows):
            raise SystemExit(f"error: {flag} {n}: class {label} has {len(rows)} documents, a balanced choice "
                             f"needs {share}")
        chosen.append(rng.choice(rows, size=share, replace=False))
    chosen = np.sort(np.concatenate(chosen))
    return [documents[i] for i in chosen], labels[chosen]


def labelled_training_documents(data, source, n: int | None, seed: int, flag: str):
    """The labelled training documents a classifier trains on: the data's train split, `n` of them
    balanced by `seed` (`document_subset`; all for None). train_classifier.py --train-docs and
    finetune_lm.py --labelled-docs both take them here, so that the same flags pick the same
    documents. SystemExit, naming `source`, without a labelled train split.
    -> (documents, int labels)."""
    if data.classes is None or data.splits.get("train") is None or data.splits["train"].labels is None:
        raise SystemExit(f"error: {source} has no labelled train split")
    documents, labels = split_documents(data, ("train",))
    return document_subset(documents, labels, n, seed, flag)


def validation_split(data, documents, labels, seed: int, valid_pct: float = 0.1):
    """The data's 'valid' / 'dev' split, or a random `valid_pct` of the training documents (fastai's
    `valid_pct`). -> (train_documents, train_labels, valid_documents, valid_labels)."""
    import numpy as np
    for name in ("valid", "dev"):
        if name in data.splits:
            split = data.splits[name]
            return documents, labels, split.documents, split.labels
    order = np.random.default_rng(seed).permutation(len(documents))
    n_valid = max(1, int(len(documents) * valid_pct))
    valid, train = order[:n_valid], order[n_valid:]
    pick = lambda items, rows: None if items is None else [items[i] for i in rows]
    return (pick(documents, train), None if labels is None else labels[train],
            pick(documents, valid), None if labels is None else labels[valid])


def run_training(fit, log: RunLog, started: float, checkpoint_dir: Path):
    """Run `fit(checkpointer)`; on SIGINT / SIGTERM print where the checkpoint is and exit cleanly
    (status 128 + the signal's number, as a shell reports a signalled process)."""
    import sys
    from ulmfit_jax import checkpoint, train
    checkpointer = checkpoint.TrainingCheckpointer(checkpoint_dir)
    try:
        return fit(checkpointer)
    except train.Interrupted as interrupted:
        print(json.dumps({"interrupted": True, "step": interrupted.step, "checkpoint": str(checkpoint_dir),
                          "seconds": time.time() - started}), flush=True)
        sys.exit(128 + interrupted.signal_number)
    except FloatingPointError as error:
        raise SystemExit(f"error: {error}")
    finally:
        log.plot()


def fit_language_model_from_args(args, params, config, vocab, train_documents, valid_documents, stages,
                                 stage_name: str):
    """pretrain_lm.py and finetune_lm.py: fit, keep best and last, log. -> (params, history, throughput)."""
    from ulmfit_jax import train
    log = RunLog(args.out, stage_name)
    tokenizer = checked_data_tokenizer(args.data)

    def fit(checkpointer):
        return train.fit_language_model(
            params, config, train_documents, valid_documents, stages, batch_size=args.bs, bptt=args.bptt,
            seed=args.seed, backwards=args.backwards, max_steps=args.max_steps, compute_dtype=compute_dtype(args),
            checkpointer=checkpointer, log=log, progress=_main_process(), **loop_options(args),
            on_epoch_end=best_and_last(args.out, config, vocab, "valid_loss", lower_is_better=True,
                                       tokenizer=tokenizer))

    try:
        return run_training(fit, log, time.time(), args.out / "checkpoints")
    except ValueError as error:
        raise SystemExit(f"error: {error}")


def loop_options(args) -> dict:
    """The training loop's keyword arguments that come from the common flags."""
    return {"log_every": args.log_every, "share_compiles": not args.compile_per_stage,
            "quick_compile": {"auto": None, "on": True, "off": False}[args.quick_compile]}


def best_and_last(out: Path, config, vocab, metric: str, lower_is_better: bool, *, classes=None, tokenizer=None):
    """An `on_epoch_end` that keeps `out/last` and the best epoch by `metric` in `out/best` (process 0).
    The best epoch's record goes with it (`out/best/record.json`), so that a resumed run compares
    with the epochs before it too. Both model directories record `tokenizer` (the data's
    `TokenizerSettings`, SentencePiece model copied in); None: that of the run's `--data`
    (`out/run.json`, written by `start`), so that a model always says how to read raw text."""
    from ulmfit_jax import checkpoint, parallel
    record_file = out / "best" / "record.json"
    best = {"value": json.loads(record_file.read_text()).get(metric) if record_file.is_file() else None}
    if tokenizer is None and _main_process():
        data = run_data_folder(out)
        tokenizer = checked_data_tokenizer(data) if data is not None else None

    def on_epoch_end(record, params, carry):
        if not _main_process():
            return
        host = parallel.to_host(params)
        stats = parallel.to_host(carry) if classes is not None else None
        save = dict(batch_stats=stats, classes=classes, tokenizer=tokenizer)
        checkpoint.save_model(out / "last", config, host, vocab, **save)
        value = record.get(metric)
        if value is None:
            return
        if best["value"] is None or (value < best["value"] if lower_is_better else value > best["value"]):
            best["value"] = value
            checkpoint.save_model(out / "best", config, host, vocab, **save)
            checkpoint.write_json(record_file, record)
    return on_epoch_end
