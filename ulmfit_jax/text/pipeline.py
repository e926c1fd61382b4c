"""From raw texts to numericalized data: parallel tokenization with an on-disk cache, vocab, labels, output.

`tokenize_corpus` tokenizes a list of texts over worker processes (in order, with a progress bar) into a
`TokenizedCorpus`: the distinct tokens in first-seen order, and every document as ids into that list.
This form is independent of any vocabulary, so it is what the cache stores: a second run with other
`--min-freq` / `--max-vocab` / `--vocab` reuses it. The cache key is a SHA-256 of the texts themselves and
of the tokenizer settings (plus the spaCy tables version / the SentencePiece model bytes), so a changed
file or setting never hits a stale entry. Cache folder: `$ULMFIT_CACHE_DIR`, else
`~/.cache/ulmfit_jax/tokens`; entries are plain `.npy` and `.json` files, never pickles.

`prepare` is the whole of `scripts/prepare_data.py`: read, tokenize, build or reuse the vocab, map labels to
class ids, and write the folder that `ulmfit_jax.text.datasets.load_prepared` reads.

Bad input: empty or whitespace-only documents are kept (fastai keeps them too: they become the single
token 'xxbos', so document order and labels stay aligned) and counted per split in meta.json and on
stderr; undecodable bytes are replaced by U+FFFD and counted; labels of other splits missing from the
training labels raise a `DataFormatError` naming them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Iterable, Sequence

import numpy as np

from ulmfit_jax.text import datasets as text_datasets
from ulmfit_jax.text.rules import apply_rules
from ulmfit_jax.text.tokenizers import TextTokenizer, TokenizerSettings, train_sentencepiece
from ulmfit_jax.text.vocab import load_vocab, make_vocab, save_vocab_json, token_to_id

CACHE_ENV = "ULMFIT_CACHE_DIR"
_CACHE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """tokens: the distinct tokens in first-seen order; ids: int32 (total,), every document's tokens as
    indices into `tokens`, one document after another; offsets: int64 (documents + 1,)."""

    tokens: list[str]
    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> dict[str, int]:
        """Token counts in first-seen order (the order make_vocab breaks ties with)."""
        counts = np.bincount(self.ids, minlength=len(self.tokens))
        return dict(zip(self.tokens, counts.tolist()))

    def document_tokens(self, index: int) -> list[str]:
        return [self.tokens[i] for i in self.ids[self.offsets[index]:self.offsets[index + 1]]]

    def numericalize(self, index: dict[str, int]) -> list[np.ndarray]:
        """Documents as int32 arrays of vocabulary ids (unknown tokens -> 0)."""
        lookup = np.array([index.get(token, 0) for token in self.tokens], dtype=np.int32)
        ids = lookup[self.ids] if len(self.ids) else np.zeros(0, np.int32)
        return [ids[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self))]


# ------------------------------------------------------------------ workers

_worker_tokenizer: TextTokenizer | None = None
_worker_vocabulary: dict[str, int] = {}  # this worker's token -> its own id, kept across batches
_worker_sent = 0                         # how many of those tokens the parent has been sent


def _init_worker(settings: TokenizerSettings) -> None:
    global _worker_tokenizer, _worker_vocabulary, _worker_sent
    _worker_tokenizer = TextTokenizer(settings)
    _worker_vocabulary, _worker_sent = {}, 0


def _tokenize_batch(texts: Sequence[str]) -> tuple[int, list[str], np.ndarray, np.ndarray]:
    """(worker id, tokens new to this worker since its last batch, ids in the worker's own numbering,
    tokens per document). The parent rebuilds each worker's numbering from the new tokens in order."""
    global _worker_sent
    tokenizer = _worker_tokenizer
    vocabulary = _worker_vocabulary
    ids: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    token_ids = tokenizer.token_ids
    for position, text in enumerate(texts):
        document = token_ids(text, vocabulary)
        lengths[position] = len(document)
        ids.extend(document)
    new_tokens = list(itertools.islice(vocabulary, _worker_sent, None))
    _worker_sent = len(vocabulary)
    return os.getpid(), new_tokens, np.asarray(ids, dtype=np.int32), lengths


def _merge(results: Iterable[tuple[int, list[str], np.ndarray, np.ndarray]], n_documents: int) -> TokenizedCorpus:
    """Renumber every batch's ids into one numbering in first-seen order over the whole corpus (batches
    arrive in corpus order; each worker's new tokens arrive in the order it numbered them)."""
    index: dict[str, int] = {}
    setdefault = index.setdefault
    worker_tokens: dict[int, list[str]] = {}
    worker_to_global: dict[int, np.ndarray] = {}
    id_parts, length_parts = [], []
    for worker, new_tokens, batch_ids, lengths in results:
        tokens = worker_tokens.setdefault(worker, [])
        tokens.extend(new_tokens)
        mapping = worker_to_global.get(worker, np.zeros(0, np.int64))
        if len(mapping) < len(tokens):
            mapping = np.concatenate([mapping, np.full(len(tokens) - len(mapping), -1, np.int64)])
        if len(batch_ids):
            distinct, first_position = np.unique(batch_ids, return_index=True)
            unmapped = mapping[distinct] < 0
            # tokens this corpus has not numbered yet, in the order they first appear in this batch
            for worker_id in distinct[unmapped][np.argsort(first_position[unmapped], kind="stable")]:
                mapping[worker_id] = setdefault(tokens[worker_id], len(index))
            id_parts.append(mapping[batch_ids].astype(np.int32))
        worker_to_global[worker] = mapping
        length_parts.append(lengths)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    assert len(lengths) == n_documents
    offsets = np.zeros(n_documents + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
    return TokenizedCorpus(list(index), ids.astype(np.int32, copy=False), offsets)


def _start_method() -> str | None:
    """fork starts workers in milliseconds, but forking a process in which JAX (multithreaded) is loaded can
    deadlock; then forkserver (a clean server process forks the workers)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "jax" not in sys.modules:
        return "fork"
    return "forkserver" if "forkserver" in methods else None


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------ cache

def cache_dir() -> pathlib.Path:
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    return pathlib.Path.home() / ".cache" / "ulmfit_jax" / "tokens"


def cache_key(texts: Sequence[str], settings: TokenizerSettings) -> str:
    digest = hashlib.sha256()
    described = dataclasses.asdict(settings)
    if settings.kind == "sentencepiece" and settings.sentencepiece_model:
        described["sentencepiece_model"] = hashlib.sha256(
            pathlib.Path(settings.sentencepiece_model).read_bytes()).hexdigest()
        # the path itself does not matter, only the model's bytes
    if settings.kind == "fast":
        from ulmfit_jax.text._spacy_en_tables import TABLES
        described["tables"] = TABLES["spacy_version"]
    digest.update(json.dumps([_CACHE_VERSION, described], sort_keys=True).encode())
    digest.update(len(texts).to_bytes(8, "little"))
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:32]


def _load_cached(folder: pathlib.Path, key: str) -> TokenizedCorpus | None:
    paths = [folder / f"{key}.{suffix}" for suffix in ("tokens.json", "ids.npy", "offsets.npy")]
    if not all(path.exists() for path in paths):
        return None
    try:
        tokens = json.loads(paths[0].read_text(encoding="utf-8"))
        ids = np.load(paths[1], allow_pickle=False)
        offsets = np.load(paths[2], allow_pickle=False)
    except (OSError, ValueError):
        return None  # a damaged entry is re-made, never trusted
    if offsets[-1] != len(ids) or (len(ids) and int(ids.max()) >= len(tokens)):
        return None
    return TokenizedCorpus(tokens, ids, offsets)


def _save_cached(folder: pathlib.Path, key: str, corpus: TokenizedCorpus) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename, so a concurrent reader never sees half a file.
    for suffix, write in (("ids.npy", lambda f: np.save(f, corpus.ids, allow_pickle=False)),
                          ("offsets.npy", lambda f: np.save(f, corpus.offsets, allow_pickle=False)),
                          ("tokens.json", lambda f: f.write(json.dumps(corpus.tokens, ensure_ascii=False)
                                                            .encode("utf-8")))):
        handle = tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".tmp")
        with handle:
            write(handle)
        os.replace(handle.name, folder / f"{key}.{suffix}")


# ------------------------------------------------------------------ tokenization

def tokenize_corpus(texts: Sequence[str], settings: TokenizerSettings = TokenizerSettings(),
                    n_workers: int | None = None, use_cache: bool = True, progress: bool = True,
                    batch_documents: int = 500, description: str = "tokenizing") -> TokenizedCorpus:
    """Tokenize `texts` (in order) over `n_workers` processes (default: the usable cores; 0 = in this
    process), reusing the on-disk cache when the same texts were tokenized with the same settings."""
    key = cache_key(texts, settings) if use_cache else None
    if key is not None:
        cached = _load_cached(cache_dir(), key)
        if cached is not None and len(cached) == len(texts):
            return cached
    if n_workers is None:
        n_workers = default_workers()
    batches = [texts[i:i + batch_documents] for i in range(0, len(texts), batch_documents)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(texts), desc=description, unit="doc", file=sys.stderr, leave=False)

    def tick(results):
        for result in results:
            if bar is not None:
                bar.update(len(result[3]))
            yield result

    if n_workers <= 1 or len(batches) <= 1:
        _init_worker(settings)
        corpus = _merge(tick(map(_tokenize_batch, batches)), len(texts))
    else:
        context = multiprocessing.get_context(_start_method())
        with context.Pool(n_workers, initializer=_init_worker, initargs=(settings,)) as pool:
            corpus = _merge(tick(pool.imap(_tokenize_batch, batches)), len(texts))
    if bar is not None:
        bar.close()
    if key is not None:
        _save_cached(cache_dir(), key, corpus)
    return corpus


# ------------------------------------------------------------------ prepare

@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """Everything `prepare` needs besides the input: the format, vocab and tokenizer settings."""

    format: str
    tokenizer: TokenizerSettings = TokenizerSettings()
    max_vocab: int = 60000
    min_freq: int = 3
    text_field: str = "text"
    label_field: str = "label"
    n_workers: int | None = None
    use_cache: bool = True
    progress: bool = True


def vocab_splits(split_names: Sequence[str]) -> list[str]:
    """The splits the vocabulary is counted on: 'train' (and 'unsup', unlabelled in-domain text) when
    present, else all splits."""
    chosen = [name for name in ("train", "unsup") if name in split_names]
    return chosen or list(split_names)


def class_list(dataset: text_datasets.RawDataset, classes: Sequence[str] | None = None) -> list[str] | None:
    """Sorted training labels (fastai's CategoryMap), or the given classes; unknown labels -> error."""
    labelled = {name: split.labels for name, split in dataset.splits.items() if split.labels is not None}
    if not labelled:
        return None
    if classes is None:
        source = "train" if "train" in labelled else next(iter(labelled))
        classes = sorted(set(labelled[source]))
    known = set(classes)
    for name, labels in labelled.items():
        unknown = sorted(set(labels) - known)
        if unknown:
            raise text_datasets.DataFormatError(
                f"split {name!r} has labels that are not among the {len(classes)} training classes: "
                f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    return list(classes)


def prepare(input_path: str | os.PathLike, out_dir: str | os.PathLike, settings: PrepareSettings,
            vocab_path: str | os.PathLike | None = None, classes_path: str | os.PathLike | None = None,
            dump_tokens: str | os.PathLike | None = None) -> dict:
    """Read, tokenize, numericalize and write (layout: `ulmfit_jax.text.datasets`). Returns the summary
    `{"docs", "tokens", "vocab", "seconds", ...}`."""
    started = time.perf_counter()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = text_datasets.read_dataset(settings.format, input_path, settings.text_field,
                                         settings.label_field or None)
    classes = None
    if classes_path is not None:
        classes = json.loads(pathlib.Path(classes_path).read_text(encoding="utf-8"))
    classes = class_list(dataset, classes)
    tokenizer_settings = settings.tokenizer
    if tokenizer_settings.kind == "sentencepiece" and tokenizer_settings.sentencepiece_model is None:
        training_texts = [text for name in vocab_splits(list(dataset.splits))
                          for text in dataset.splits[name].texts]
        rules = tokenizer_settings.pre_rule_functions()
        model = train_sentencepiece([apply_rules(text, rules) for text in training_texts], str(out / "spm"),
                                    tokenizer_settings.sentencepiece_vocab_size,
                                    tokenizer_settings.sentencepiece_max_vocab_size,
                                    tokenizer_settings.sentencepiece_character_coverage)
        tokenizer_settings = dataclasses.replace(tokenizer_settings, sentencepiece_model=str(model))
    elif tokenizer_settings.kind == "sentencepiece":
        shutil.copyfile(tokenizer_settings.sentencepiece_model, out / "spm.model")

    corpora = {}
    for name, split in dataset.splits.items():
        corpora[name] = tokenize_corpus(split.texts, tokenizer_settings, settings.n_workers, settings.use_cache,
                                        settings.progress, description=f"tokenizing {name}")
    if vocab_path is not None:
        vocab = load_vocab(vocab_path)
    else:
        counts: dict[str, int] = {}
        for name in vocab_splits(list(corpora)):
            for token, count in corpora[name].counts().items():
                counts[token] = counts.get(token, 0) + count
        vocab = make_vocab(counts, min_freq=settings.min_freq, max_vocab=settings.max_vocab)
    index = token_to_id(vocab)
    class_index = {name: i for i, name in enumerate(classes)} if classes is not None else None

    split_meta = {}
    for name, split in dataset.splits.items():
        documents = corpora[name].numericalize(index)
        labels = None
        if split.labels is not None:
            labels = np.array([class_index[label] for label in split.labels], dtype=np.int32)
        text_datasets.save_split(out, name, documents, labels)
        empty = sum(1 for text in split.texts if not text.strip())
        n_tokens = int(corpora[name].offsets[-1])
        unknown = int(sum(int((d == 0).sum()) for d in documents))
        split_meta[name] = {"documents": len(documents), "tokens": n_tokens, "unknown_tokens": unknown,
                            "empty_documents": empty, "labelled": labels is not None}
        if empty:
            print(f"prepare_data: {empty} empty or whitespace-only documents in split {name!r} "
                  f"(kept as the single token 'xxbos')", file=sys.stderr)
    if dataset.decode_replacements:
        print(f"prepare_data: {dataset.decode_replacements} undecodable byte sequences replaced by U+FFFD",
              file=sys.stderr)
    save_vocab_json(vocab, out / "vocab.json")
    if classes is not None:
        (out / "classes.json").write_text(json.dumps(classes, ensure_ascii=False), encoding="utf-8")
    elif (out / "classes.json").exists():
        (out / "classes.json").unlink()
    tokenizer_meta = dataclasses.asdict(tokenizer_settings)
    if tokenizer_settings.kind == "sentencepiece":
        tokenizer_meta["sentencepiece_model"] = "spm.model"
    meta = {
        "format": text_datasets.PREPARED_FORMAT,
        "source": {"format": settings.format, "path": str(pathlib.Path(input_path).resolve())},
        "tokenizer": tokenizer_meta,
        "vocab": {"size": len(vocab), "min_freq": settings.min_freq, "max_vocab": settings.max_vocab,
                  "reused_from": str(vocab_path) if vocab_path is not None else None,
                  "counted_on": vocab_splits(list(corpora)) if vocab_path is None else None},
        "splits": split_meta,
        "decode_replacements": dataset.decode_replacements,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    if dump_tokens is not None:
        with open(dump_tokens, "w", encoding="utf-8") as handle:
            for corpus in corpora.values():
                for i in range(len(corpus)):
                    handle.write(json.dumps(corpus.document_tokens(i), ensure_ascii=False) + "\n")
    return {"docs": sum(m["documents"] for m in split_meta.values()),
            "tokens": sum(m["tokens"] for m in split_meta.values()),
            "vocab": len(vocab), "seconds": round(time.perf_counter() - started, 3),
            "splits": {name: m["documents"] for name, m in split_meta.items()},
            "empty_documents": sum(m["empty_documents"] for m in split_meta.values()),
            "decode_replacements": dataset.decode_replacements}
