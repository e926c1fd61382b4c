"""Readers for the usual text data sets, and the reader of prepared (numericalized) data.

Every reader returns a `RawDataset`: `splits`, an ordered dict split name -> `RawSplit(texts, labels)`
(labels: list of str, or None for unlabelled splits), plus `decode_replacements`, the number of undecodable
byte sequences replaced by U+FFFD (never a crash). Split names: 'train', 'valid' / 'dev', 'test', 'unsup'.

| format     | input                                             | splits (labels)                               |
|------------|---------------------------------------------------|-----------------------------------------------|
| imdb       | folder of train/test/unsup.jsonl[.gz] or aclImdb/ | train, test (neg/pos), unsup (None)            |
| trec6/50   | folder with train_5500.label, TREC_10.label       | train, test (coarse / 'COARSE:fine')           |
| sst2/sst5  | folder with stsa.{binary,fine}.{train,dev,test}   | train, dev, test ('0'/'1' or '0'..'4')         |
| mr         | folder with rt-polarity.pos/.neg (Windows-1252)   | train (neg/pos; no official split)             |
| wikitext   | folder or file wiki.{train,valid,test}.tokens      | one document an article (' = Title = ' lines)  |
| jsonl      | file (.jsonl/.jsonl.gz) or folder of split files   | per file; fields text/label by default         |
| csv        | file (.csv/.tsv) or folder of split files          | per file; columns text/label by default        |
| text       | folder of .txt files                              | split folders train/valid/dev/test/unsup if present, label = class folder name if files sit in class folders |

Encodings: UTF-8 unless the format says otherwise (TREC train ISO-8859-1, MR Windows-1252).

Prepared data (written by `scripts/prepare_data.py`, read by `load_prepared`), in one folder, no pickles:
- `vocab.json`: JSON list of token strings, index = id (ids 0..8 the special tokens, 'xxpad' = 1).
- `{split}.ids.npy`: int32 (total tokens,), the documents' ids one after another, in input order.
- `{split}.offsets.npy`: int64 (documents + 1,), document i is `ids[offsets[i]:offsets[i + 1]]`.
- `{split}.labels.npy`: int32 (documents,), class ids (only for labelled splits).
- `classes.json`: JSON list of class names, index = class id (sorted, from the training labels).
- `meta.json`: format version, source, tokenizer settings, vocab settings, per split counts (documents,
  tokens, empty documents, decode replacements), and `spm.model` when the tokenizer is sentencepiece.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import pathlib
import re
from typing import Iterator, Sequence

import numpy as np

DATA_DIR_ENV = "ULMFIT_DATA_DIR"
PREPARED_FORMAT = "ulmfit_jax.prepared/1"
SPLIT_NAMES = ("train", "valid", "dev", "test", "unsup")
FORMATS = ("imdb", "trec6", "trec50", "sst2", "sst5", "mr", "wikitext", "jsonl", "csv", "text")


def data_dir() -> pathlib.Path:
    """The shared data folder: `$ULMFIT_DATA_DIR`, else `../shared/data` relative to the repository root."""
    if os.environ.get(DATA_DIR_ENV):
        return pathlib.Path(os.environ[DATA_DIR_ENV])
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclasses.dataclass
class RawSplit:
    texts: list[str]
    labels: list[str] | None


@dataclasses.dataclass
class RawDataset:
    splits: dict[str, RawSplit]
    decode_replacements: int = 0
    source: str = ""


class DataFormatError(ValueError):
    """The input does not have the layout, fields or columns its format needs."""


def decode(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Bytes -> (text, number of undecodable sequences replaced by U+FFFD)."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        already = data.decode(encoding, errors="ignore").count("\ufffd")
        return text, text.count("\ufffd") - already


def _open_bytes(path: pathlib.Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_text_file(path: pathlib.Path, encoding: str = "utf-8") -> tuple[str, int]:
    with _open_bytes(path) as handle:
        return decode(handle.read(), encoding)


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def iter_jsonl(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[tuple[int, dict, int]]:
    """(line number from 1, record, replaced sequences) for each non-blank line of a .jsonl[.gz] file."""
    path = pathlib.Path(path)
    with _open_bytes(path) as handle:
        for number, raw in enumerate(handle, 1):
            line, replaced = decode(raw, encoding)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{number}: a JSON lines record must be an object")
            yield number, record, replaced


def read_jsonl(path: str | os.PathLike, text_field: str = "text", label_field: str | None = "label",
               limit: int | None = None, every: int = 1) -> tuple[RawSplit, int]:
    """One JSON lines file -> (RawSplit, replaced sequences). Labels are read if `label_field` is given and
    present in the first record; then every record must have it. Non-string text or labels are refused
    (labels that are numbers are turned into strings). `every`/`limit` take every n-th record, at most limit."""
    texts: list[str] = []
    labels: list[str] | None = None
    replacements = 0
    for position, (number, record, replaced) in enumerate(iter_jsonl(path)):
        if position % every:
            continue
        if limit is not None and len(texts) >= limit:
            break
        replacements += replaced
        if text_field not in record:
            raise DataFormatError(f"{path}:{number}: no field {text_field!r} (fields: {sorted(record)}); "
                                  f"choose one with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataFormatError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not text")
        if not texts and label_field is not None and label_field in record:
            labels = []
        if labels is not None:
            if label_field not in record:
                raise DataFormatError(f"{path}:{number}: no label field {label_field!r} "
                                      f"(fields: {sorted(record)})")
            labels.append(_label_string(record[label_field], f"{path}:{number}"))
        texts.append(text)
    return RawSplit(texts, labels), replacements


def _label_string(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{where}: label {value!r} is not a string or an integer")
    return str(value)


def read_csv(path: str | os.PathLike, text_field: str = "text", label_field: str | None = "label",
             delimiter: str | None = None, encoding: str = "utf-8") -> tuple[RawSplit, int]:
    """A CSV (or TSV: .tsv / .tab, tab-delimited) file with a header row naming the columns."""
    path = pathlib.Path(path)
    if delimiter is None:
        delimiter = "\t" if path.name.endswith((".tsv", ".tsv.gz", ".tab")) else ","
    content, replacements = _read_text_file(path, encoding)
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}: empty file, no header row")
    if text_field not in header:
        raise DataFormatError(f"{path}: no column {text_field!r} (columns: {header}); choose one with "
                              f"--text-field")
    text_column = header.index(text_field)
    label_column = header.index(label_field) if label_field is not None and label_field in header else None
    texts: list[str] = []
    labels: list[str] | None = [] if label_column is not None else None
    for number, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{path}: row {number} has {len(row)} fields, the header has {len(header)}")
        texts.append(row[text_column])
        if labels is not None:
            labels.append(row[label_column])
    return RawSplit(texts, labels), replacements


def _split_name(path: pathlib.Path) -> str | None:
    stem = path.name.split(".")[0]
    return stem if stem in SPLIT_NAMES else None


def _split_files(folder: pathlib.Path, suffixes: Sequence[str]) -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        name = _split_name(path)
        if name is not None and path.name.endswith(tuple(suffixes)):
            if name in files:
                raise DataFormatError(f"{folder}: two files for split {name!r}: {files[name].name}, {path.name}")
            files[name] = path
    if not files:
        raise DataFormatError(f"{folder}: no split files named {{{','.join(SPLIT_NAMES)}}}"
                              f"{{{','.join(suffixes)}}}")
    return dict(sorted(files.items(), key=lambda item: SPLIT_NAMES.index(item[0])))


def read_generic(path: str | os.PathLike, kind: str, text_field: str = "text",
                 label_field: str | None = "label") -> RawDataset:
    """'jsonl' or 'csv': one file (split 'train'), or a folder of split files (train.jsonl, test.csv, ...)."""
    path = _require(pathlib.Path(path), kind)
    suffixes = (".jsonl", ".jsonl.gz", ".json", ".json.gz") if kind == "jsonl" else (
        ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".tab")
    files = _split_files(path, suffixes) if path.is_dir() else {"train": path}
    reader = read_jsonl if kind == "jsonl" else read_csv
    dataset = RawDataset({}, 0, str(path))
    for name, file in files.items():
        split, replaced = reader(file, text_field=text_field, label_field=label_field)
        dataset.splits[name] = split
        dataset.decode_replacements += replaced
    return dataset


_ACL_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")


def read_imdb(path: str | os.PathLike, splits: Sequence[str] = ("train", "test", "unsup")) -> RawDataset:
    """IMDb: the JSON lines files of ../shared/data/imdb or the original `aclImdb/` tree (same order: neg
    then pos, by review id). 'unsup' has no labels."""
    path = _require(pathlib.Path(path), "imdb")
    if (path / "aclImdb").is_dir():
        path = path / "aclImdb"
    dataset = RawDataset({}, 0, str(path))
    for split in splits:
        jsonl = [path / f"{split}.jsonl.gz", path / f"{split}.jsonl"]
        found = next((p for p in jsonl if p.exists()), None)
        if found is not None:
            raw, replaced = read_jsonl(found, "text", "label")
            if split == "unsup":
                raw.labels = None
            dataset.splits[split] = raw
            dataset.decode_replacements += replaced
            continue
        classes = ("unsup",) if split == "unsup" else ("neg", "pos")
        folders = [path / split / name for name in classes]
        if not all(folder.is_dir() for folder in folders):
            raise DataFormatError(f"imdb: {path} has neither {split}.jsonl[.gz] nor the aclImdb folders "
                                  f"{[str(f) for f in folders]}")
        texts, labels = [], []
        for folder, name in zip(folders, classes):
            named = []
            for file in folder.iterdir():
                match = _ACL_FILE.match(file.name)
                if match:
                    named.append((int(match.group(1)), file))
            for _, file in sorted(named):
                text, replaced = _read_text_file(file)
                dataset.decode_replacements += replaced
                texts.append(text)
                labels.append(name)
        dataset.splits[split] = RawSplit(texts, None if split == "unsup" else labels)
    return dataset


def _lines(path: pathlib.Path, encoding: str) -> tuple[list[str], int]:
    text, replaced = _read_text_file(path, encoding)
    return [line for line in text.splitlines() if line.strip()], replaced


def read_trec(path: str | os.PathLike, fine: bool = False) -> RawDataset:
    """TREC question classification: 'COARSE:fine question ...' a line; train is ISO-8859-1. Labels are the
    coarse class (TREC-6) or the whole 'COARSE:fine' (TREC-50)."""
    path = _require(pathlib.Path(path), "trec")
    files = {"train": (path / "train_5500.label", "iso-8859-1"), "test": (path / "TREC_10.label", "iso-8859-1")}
    if path.is_file():
        files = {"train": (path, "iso-8859-1")}
    dataset = RawDataset({}, 0, str(path))
    for split, (file, encoding) in files.items():
        lines, replaced = _lines(_require(file, "trec"), encoding)
        dataset.decode_replacements += replaced
        texts, labels = [], []
        for number, line in enumerate(lines, 1):
            label, _, text = line.partition(" ")
            if ":" not in label or not text:
                raise DataFormatError(f"{file}: line {number} is not 'COARSE:fine question': {line[:60]!r}")
            labels.append(label if fine else label.split(":")[0])
            texts.append(text)
        dataset.splits[split] = RawSplit(texts, labels)
    return dataset


def read_jsonl_prefix(path: str | os.PathLike, max_words: int, text_field: str = "text") -> list[str]:
    """The first records' texts of a (gzipped) JSON-lines file, stopping once they hold at least
    `max_words` whitespace-separated words (a corpus prefix, e.g. of `enwiki/AA.jsonl.gz`)."""
    texts, words = [], 0
    for number, record, _ in iter_jsonl(path):
        if text_field not in record:
            raise DataFormatError(f"{path}:{number}: the record has no {text_field!r} field")
        texts.append(record[text_field])
        words += len(texts[-1].split())
        if words >= max_words:
            break
    return texts


def read_sst(path: str | os.PathLike, fine: bool = False) -> RawDataset:
    """SST-2 (stsa.binary.*) or SST-5 (stsa.fine.*): '<label> <sentence>' a line."""
    path = _require(pathlib.Path(path), "sst")
    prefix = "stsa.fine" if fine else "stsa.binary"
    dataset = RawDataset({}, 0, str(path))
    for split in ("train", "dev", "test"):
        file = path / f"{prefix}.{split}"
        if not file.exists():
            if split == "train":
                raise FileNotFoundError(f"sst: {file} does not exist")
            continue
        lines, replaced = _lines(file, "utf-8")
        dataset.decode_replacements += replaced
        texts, labels = [], []
        for number, line in enumerate(lines, 1):
            label, _, text = line.partition(" ")
            if not label.isdigit():
                raise DataFormatError(f"{file}: line {number} does not start with a label: {line[:60]!r}")
            labels.append(label)
            texts.append(text)
        dataset.splits[split] = RawSplit(texts, labels)
    return dataset


def read_mr(path: str | os.PathLike) -> RawDataset:
    """MR sentence polarity: rt-polarity.neg then rt-polarity.pos (Windows-1252), one split 'train'."""
    path = _require(pathlib.Path(path), "mr")
    texts, labels, replacements = [], [], 0
    for name in ("neg", "pos"):
        lines, replaced = _lines(_require(path / f"rt-polarity.{name}", "mr"), "cp1252")
        replacements += replaced
        texts.extend(line.strip() for line in lines)
        labels.extend([name] * len(lines))
    return RawDataset({"train": RawSplit(texts, labels)}, replacements, str(path))


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def split_wikitext_articles(text: str) -> list[str]:
    """WikiText token file -> articles: a new article starts at each ' = Title = ' line (not ' = = ...')."""
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if _WIKITEXT_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [text for text in ("\n".join(lines).strip() for lines in articles) if text]


def read_wikitext(path: str | os.PathLike) -> RawDataset:
    """WikiText-2/103 token files (wiki.{train,valid,test}.tokens) or one such file; a document an article."""
    path = _require(pathlib.Path(path), "wikitext")
    files = {}
    if path.is_file():
        files[_split_name(pathlib.Path(path.name.replace("wiki.", ""))) or "train"] = path
    else:
        for split in ("train", "valid", "test"):
            for name in (f"wiki.{split}.tokens", f"{split}.txt"):
                if (path / name).exists():
                    files[split] = path / name
                    break
        if not files:
            raise DataFormatError(f"wikitext: no wiki.{{train,valid,test}}.tokens in {path}")
    dataset = RawDataset({}, 0, str(path))
    for split, file in files.items():
        text, replaced = _read_text_file(file)
        dataset.decode_replacements += replaced
        dataset.splits[split] = RawSplit(split_wikitext_articles(text), None)
    return dataset


def read_text_folder(path: str | os.PathLike, encoding: str = "utf-8") -> RawDataset:
    """Folders of .txt files. Split folders (train/valid/dev/test/unsup) if present, else one split 'train';
    inside a split, files in sub-folders are labelled with the sub-folder name, loose files are unlabelled
    (a split must not mix both)."""
    path = _require(pathlib.Path(path), "text")
    split_folders = {name: path / name for name in SPLIT_NAMES if (path / name).is_dir()}
    if not split_folders:
        split_folders = {"train": path}
    dataset = RawDataset({}, 0, str(path))
    for split, folder in split_folders.items():
        files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
        if not files:
            raise DataFormatError(f"text: no .txt files under {folder}")
        labelled = [p.parent != folder for p in files]
        if any(labelled) and not all(labelled):
            raise DataFormatError(f"text: {folder} mixes loose .txt files and class folders")
        texts, labels = [], []
        for file in files:
            text, replaced = _read_text_file(file, encoding)
            dataset.decode_replacements += replaced
            texts.append(text)
            labels.append(file.relative_to(folder).parts[0])
        dataset.splits[split] = RawSplit(texts, labels if all(labelled) else None)
    return dataset


def read_dataset(kind: str, path: str | os.PathLike, text_field: str = "text",
                 label_field: str | None = "label") -> RawDataset:
    """Dispatch on the `--format` names of scripts/prepare_data.py."""
    if kind not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {kind!r}")
    if kind == "imdb":
        return read_imdb(path)
    if kind in ("trec6", "trec50"):
        return read_trec(path, fine=kind == "trec50")
    if kind in ("sst2", "sst5"):
        return read_sst(path, fine=kind == "sst5")
    if kind == "mr":
        return read_mr(path)
    if kind == "wikitext":
        return read_wikitext(path)
    if kind == "text":
        return read_text_folder(path)
    return read_generic(path, kind, text_field, label_field)


# ----------------------------------------------------------------------------------------------------------
# Prepared data

@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """documents: list of int32 arrays (views into one memory-mapped array); labels: int32 (n,) or None."""

    documents: list[np.ndarray]
    labels: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class PreparedData:
    vocab: list[str]
    classes: list[str] | None
    splits: dict[str, PreparedSplit]
    meta: dict


def save_split(folder: pathlib.Path, name: str, documents: Sequence[np.ndarray],
               labels: np.ndarray | None) -> None:
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    ids = np.concatenate(documents).astype(np.int32) if documents else np.zeros(0, np.int32)
    np.save(folder / f"{name}.ids.npy", ids, allow_pickle=False)
    np.save(folder / f"{name}.offsets.npy", offsets, allow_pickle=False)
    if labels is not None:
        np.save(folder / f"{name}.labels.npy", np.asarray(labels, dtype=np.int32), allow_pickle=False)


def load_prepared(folder: str | os.PathLike, mmap: bool = True) -> PreparedData:
    """Read a folder written by scripts/prepare_data.py (layout in the module docstring)."""
    from ulmfit_jax.text.vocab import load_vocab_json

    folder = pathlib.Path(folder)
    meta_path = _require(folder / "meta.json", "prepared data")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != PREPARED_FORMAT:
        raise DataFormatError(f"{folder}: format {meta.get('format')!r}, expected {PREPARED_FORMAT!r}")
    vocab = load_vocab_json(folder / "vocab.json")
    classes = None
    if (folder / "classes.json").exists():
        classes = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    splits = {}
    for name in meta["splits"]:
        ids = np.load(folder / f"{name}.ids.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        offsets = np.load(folder / f"{name}.offsets.npy", allow_pickle=False)
        if offsets[-1] != len(ids) or ids.dtype != np.int32:
            raise DataFormatError(f"{folder}: {name}.offsets.npy does not match {name}.ids.npy")
        if len(ids) and (int(ids.max()) >= len(vocab) or int(ids.min()) < 0):
            raise DataFormatError(f"{folder}: {name} has ids outside the vocabulary of {len(vocab)}")
        labels_path = folder / f"{name}.labels.npy"
        labels = np.load(labels_path, allow_pickle=False) if labels_path.exists() else None
        documents = [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        splits[name] = PreparedSplit(documents, labels)
    return PreparedData(vocab, classes, splits, meta)
