"""Batches with fixed shapes: language-model streams (fastai's `LMDataLoader` layout) and classifier batches
(fastai's `SortedDL` order and `pad_input_chunk` padding, with lengths bucketed to a small set of shapes).

Language model (`lm_batches`). The documents of an epoch (shuffled per epoch for training) are concatenated
into one stream of `n` tokens. As in fastai 2.8.12: `corpus = round_down(n - 1, batch_size)`,
`row_length = corpus // batch_size`; row `j` of every batch reads the stream from `j * row_length`, and
batch `k` holds columns `[k * seq_len, (k + 1) * seq_len)` of every row, so each batch continues the previous
one row by row and the recurrent state can be carried. Targets are the stream shifted by one. fastai's last
batch is shorter (`row_length % seq_len` columns); here it is padded with `pad_id` up to the batch's window
length and `mask` is 0 there, so every batch has shape `(batch_size, window)` and the last one costs no
recompile. With `seq_len_choices` each window length is drawn from that small set (variable BPTT: one compile
per distinct length; scale the learning rate by `window / seq_len` as AWD-LSTM does). `backwards=True`
reverses every document (fastai's `reverse_text`), so the stream of reversed documents in reversed order is
exactly the reversed forward stream.

Classifier (`classifier_batches`). Order: validation sorted by length, longest first (stable); training as
fastai's `SortedDL.shuffle_fn`: a permutation with the longest document moved first, chunks of
`50 * batch_size` sorted by length (descending), batches of the result shuffled except the first and the last.
Padding: fastai's `pad_chunk` (pad_first): whole `seq_len` chunks of `pad_id` in front, the remainder after
the text. `bucket_multiple=None` pads to the longest document of each batch exactly as fastai's
`pad_input_chunk` (its shapes vary per batch); by default the padded length is rounded up to a multiple of
`seq_len` (at most `max_len // seq_len` + 1 shapes when `max_len` truncates). Rounding up only adds whole pad
chunks in front, but it changes fastai's trailing pad: with a multiple of `seq_len` every document gets
`(-length) % seq_len` trailing pads whatever its batch (fastai's depends on the batch maximum); `lengths` and
`token_mask` give the model what it needs to ignore padding. The last batch is filled to `batch_size` with
empty rows (`row_mask` False, length 0) so the batch dimension never changes either. `fastai_mask` marks the
positions fastai's own padding would have (`fastai_layout_mask`): the classifier's AR and TAR average over
those, not over the padding the buckets add (TREC-6's training batches: 27% of our positions are padding,
3% of fastai's).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from ulmfit_jax.text.rules import PAD_ID


# ----------------------------------------------------------------------------------------------------------
# Language model

@dataclasses.dataclass(frozen=True)
class LMBatchSettings:
    """batch_size streams, windows of seq_len tokens (or lengths drawn from seq_len_choices with
    seq_len_probabilities); shuffle documents each epoch; backwards reverses every document."""

    batch_size: int = 64
    seq_len: int = 72
    shuffle: bool = True
    backwards: bool = False
    seq_len_choices: tuple[int, ...] = ()
    seq_len_probabilities: tuple[float, ...] = ()
    pad_id: int = PAD_ID

    def __post_init__(self):
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive: {self}")
        if len(self.seq_len_choices) != len(self.seq_len_probabilities):
            raise ValueError("seq_len_choices and seq_len_probabilities must have the same length")
        if self.seq_len_choices and (min(self.seq_len_choices) < 1
                                     or abs(sum(self.seq_len_probabilities) - 1.0) > 1e-6):
            raise ValueError("seq_len_choices must be positive and their probabilities must sum to 1")


@dataclasses.dataclass(frozen=True)
class LMBatch:
    """inputs, targets: int32 (batch_size, window); mask: float32 (batch_size, window), 1 on real tokens,
    0 on the padding of the last window; length: real columns (fastai's seq_len for this batch)."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    length: int


def concatenate_documents(documents: Sequence[np.ndarray], order: Sequence[int] | None = None,
                          backwards: bool = False) -> np.ndarray:
    """The LM stream: documents in `order` (default: as given), each reversed if `backwards`; int32 (n,)."""
    if order is not None:
        documents = [documents[i] for i in order]
    if not len(documents):
        return np.zeros(0, dtype=np.int32)
    if backwards:
        documents = [np.asarray(document)[::-1] for document in documents]
    return np.concatenate([np.asarray(document, dtype=np.int32) for document in documents])


def lm_layout(n_tokens: int, batch_size: int, seq_len: int) -> tuple[int, int, int]:
    """fastai's LMDataLoader arithmetic: (row_length, n_batches, last_len) for a stream of n_tokens."""
    corpus = ((n_tokens - 1) // batch_size) * batch_size  # the -1 leaves room for the last target
    row_length = corpus // batch_size
    if row_length < 1:
        raise ValueError(f"a stream of {n_tokens} tokens is too short for batch_size {batch_size}: "
                         f"need at least {batch_size + 1} tokens")
    n_batches = row_length // seq_len + int(row_length % seq_len != 0)
    last_len = row_length - (n_batches - 1) * seq_len
    return row_length, n_batches, last_len


def draw_window_lengths(row_length: int, settings: LMBatchSettings,
                        rng: np.random.Generator | None = None) -> list[int]:
    """Window lengths covering `row_length` columns: all `seq_len` (fastai), or drawn from the choices."""
    if not settings.seq_len_choices:
        return [settings.seq_len] * (-(-row_length // settings.seq_len))
    if rng is None:
        raise ValueError("variable window lengths need an rng")
    lengths, covered = [], 0
    while covered < row_length:
        length = int(rng.choice(settings.seq_len_choices, p=settings.seq_len_probabilities))
        lengths.append(length)
        covered += length
    return lengths


def lm_batches(stream: np.ndarray, settings: LMBatchSettings,
               window_lengths: Sequence[int] | None = None) -> Iterator[LMBatch]:
    """Batches of one epoch over a stream (see the module docstring). `window_lengths` defaults to fixed
    `settings.seq_len` windows; each batch has shape (batch_size, its window length)."""
    stream = np.asarray(stream, dtype=np.int32)
    batch_size = settings.batch_size
    row_length, _, _ = lm_layout(len(stream), batch_size, settings.seq_len)
    inputs_all = stream[:batch_size * row_length].reshape(batch_size, row_length)
    targets_all = stream[1:batch_size * row_length + 1].reshape(batch_size, row_length)
    if window_lengths is None:
        window_lengths = draw_window_lengths(row_length, settings)
    start = 0
    for window in window_lengths:
        if start >= row_length:
            break
        real = min(window, row_length - start)
        inputs = np.full((batch_size, window), settings.pad_id, dtype=np.int32)
        targets = np.full((batch_size, window), settings.pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, window), dtype=np.float32)
        inputs[:, :real] = inputs_all[:, start:start + real]
        targets[:, :real] = targets_all[:, start:start + real]
        mask[:, :real] = 1.0
        yield LMBatch(inputs, targets, mask, real)
        start += real


def lm_epoch(documents: Sequence[np.ndarray], settings: LMBatchSettings,
             rng: np.random.Generator | None = None) -> Iterator[LMBatch]:
    """One epoch of LM batches: shuffle the documents (if `settings.shuffle`; needs `rng`), concatenate, batch."""
    order = None
    if settings.shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs an rng (np.random.default_rng(seed))")
        order = rng.permutation(len(documents))
    stream = concatenate_documents(documents, order, settings.backwards)
    row_length, _, _ = lm_layout(len(stream), settings.batch_size, settings.seq_len)
    return lm_batches(stream, settings, draw_window_lengths(row_length, settings, rng))


# ----------------------------------------------------------------------------------------------------------
# Classifier

def pad_chunk(sequence: np.ndarray, pad_len: int, pad_id: int = PAD_ID, pad_first: bool = True,
              seq_len: int = 72) -> np.ndarray:
    """fastai's `pad_chunk`: (pad_len,) with whole seq_len chunks of padding and the remainder after the text
    (pad_first) or all padding after the text."""
    sequence = np.asarray(sequence)
    missing = pad_len - len(sequence)
    if missing < 0:
        raise ValueError(f"sequence of length {len(sequence)} is longer than pad_len {pad_len}")
    chunk_pad = np.full((missing // seq_len) * seq_len, pad_id, dtype=sequence.dtype)
    rest_pad = np.full(missing % seq_len, pad_id, dtype=sequence.dtype)
    parts = [chunk_pad, sequence, rest_pad] if pad_first else [sequence, chunk_pad, rest_pad]
    return np.concatenate(parts)


def pad_input_chunk(sequences: Sequence[np.ndarray], pad_id: int = PAD_ID, pad_first: bool = True,
                    seq_len: int = 72, pad_len: int | None = None) -> np.ndarray:
    """fastai's `pad_input_chunk` on token sequences: (n, pad_len), pad_len defaulting to the longest."""
    if pad_len is None:
        pad_len = max(len(sequence) for sequence in sequences)
    return np.stack([pad_chunk(s, pad_len, pad_id, pad_first, seq_len) for s in sequences])


def truncate(sequence: np.ndarray, max_len: int | None, keep: str = "first") -> np.ndarray:
    """At most max_len tokens: the first ones (keep='first') or the last ones (keep='last')."""
    if max_len is None or len(sequence) <= max_len:
        return sequence
    return sequence[:max_len] if keep == "first" else sequence[len(sequence) - max_len:]


def sorted_order(lengths: Sequence[int]) -> np.ndarray:
    """Validation order of fastai's SortedDL: by length, longest first, ties in input order."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def shuffled_sorted_order(lengths: Sequence[int], batch_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Training order of fastai's `SortedDL.shuffle_fn`, drawing from `rng` exactly as fastai draws from
    `np.random` (so the same seed gives fastai's order)."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    index_of_longest = int(np.argmax(lengths))
    order = rng.permutation(n)
    where_longest = np.where(order == index_of_longest)[0][0]
    order[0], order[where_longest] = order[where_longest], order[0]
    size = batch_size * 50
    chunks = [order[i:i + size] for i in range(0, n, size)]
    chunks = [sorted(chunk, key=lambda i: lengths[i], reverse=True) for chunk in chunks]
    sorted_index = np.concatenate(chunks)
    batches = [sorted_index[i:i + batch_size] for i in range(0, len(sorted_index), batch_size)]
    middle = (np.concatenate(rng.permutation(batches[1:-1])) if len(batches) > 2
              else np.array([], dtype=int))
    if len(batches) == 1:
        return np.asarray(batches[0])
    return np.concatenate((batches[0], middle, batches[-1])).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ClassifierBatchSettings:
    """batch_size documents a batch; pad in seq_len chunks (fastai's Pad_Chunk); max_len truncates each
    document (None: no truncation) keeping its first or last tokens; bucket_multiple rounds the padded
    length up (None: fastai's exact per-batch maximum, any shape). `lengths` (from `bucket_lengths`),
    when set, are the padded lengths a batch takes: the smallest one of the same kind (one window, or
    whole windows) that holds its bucket, else the bucket itself. `bpt3c_max_len`: the classifier's
    max_len (`ClassifierConfig.max_len`, which acts in the model, not here): `fastai_mask` then marks
    only the positions of the windows fastai's SentenceEncoder keeps (None: all of fastai's)."""

    batch_size: int = 64
    seq_len: int = 72
    max_len: int | None = 72 * 20
    keep: str = "first"
    bucket_multiple: int | None = 72
    short_bucket_multiple: int | None = None
    pad_id: int = PAD_ID
    pad_first: bool = True
    backwards: bool = False
    lengths: tuple[int, ...] | None = None
    bpt3c_max_len: int | None = None

    def __post_init__(self):
        if self.lengths is not None and list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"lengths must be increasing: {self.lengths}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive: {self}")
        if self.keep not in ("first", "last"):
            raise ValueError(f"keep must be 'first' or 'last', got {self.keep!r}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError("max_len must be positive or None")
        if self.bucket_multiple is not None and self.bucket_multiple < 1:
            raise ValueError("bucket_multiple must be positive or None")
        if self.short_bucket_multiple is not None and not 1 <= self.short_bucket_multiple <= self.seq_len:
            raise ValueError("short_bucket_multiple must be in [1, seq_len] or None")


@dataclasses.dataclass(frozen=True)
class ClassifierBatch:
    """tokens: int32 (batch_size, padded_len); labels: int32 (batch_size,) (0 on empty rows);
    lengths: int32 (batch_size,) real tokens a row; token_mask: bool (batch_size, padded_len);
    row_mask: bool (batch_size,), False on the rows that only fill the last batch; indices: int64
    (batch_size,) document index a row, -1 on filling rows; fastai_mask: bool (batch_size, padded_len),
    the positions of fastai's own layout of the batch (`fastai_layout_mask`)."""

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    token_mask: np.ndarray
    row_mask: np.ndarray
    indices: np.ndarray
    fastai_mask: np.ndarray


def fastai_layout_mask(lengths: Sequence[int], width: int, seq_len: int, pad_first: bool = True,
                       max_len: int | None = None) -> np.ndarray:
    """bool[B, width]: where fastai's own `pad_input_chunk` (padding every row to the batch's longest,
    L = max(lengths)) puts each row's positions, in a batch padded to `width` >= L by `pad_chunk`.
    With `max_len` (the classifier's BPT3C max_len) only the positions of the windows fastai's
    `SentenceEncoder` keeps, those starting within max_len of L: what its AR and TAR average over.

    Row b (n tokens) takes fastai's f = ((L - n) // seq_len) * seq_len front pads and ours F = ((width
    - n) // seq_len) * seq_len: both put the text at a window boundary, so fastai's row is ours from
    column F - f on, for L columns, cut at `width` (with `pad_first=False` both start at 0). Exact
    (every fastai position present, same windows, same LSTM outputs) when width - L is a multiple of
    seq_len, which includes every batch within one window (width <= seq_len); otherwise fastai's row
    can have more trailing pads than ours, and those are missing.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    if longest > width:
        raise ValueError(f"a row of {longest} tokens does not fit a batch {width} wide")
    if pad_first:
        start = ((width - lengths) // seq_len - (longest - lengths) // seq_len) * seq_len
    else:
        start = np.zeros_like(lengths)
    columns = np.arange(width)
    kept_from = 0 if max_len is None else max(0, -(-(longest - max_len) // seq_len)) * seq_len
    return (columns >= (start + kept_from)[:, None]) & (columns < np.minimum(start + longest, width)[:, None])


def padded_length(longest: int, settings: ClassifierBatchSettings) -> int:
    width = _bucket_length(longest, settings)
    if settings.lengths is not None:
        # the same kind only (within one window, or whole windows); none large enough: its own bucket
        short = width <= settings.seq_len
        same_kind = [n for n in settings.lengths if n >= width and (n <= settings.seq_len) == short]
        return same_kind[0] if same_kind else width
    return width


# What one more batch shape costs, in token positions of training: compiling a classifier's train
# step and its evaluation forward pass takes about as long as training on this many positions
# (batch x padded length) at the sizes the scripts train on CPU. `bucket_lengths` trades it against padding.
COMPILE_COST_POSITIONS = 100_000
# A forward pass (prediction) costs about a third of a training step's forward and backward.
PREDICTION_COST = 1 / 3


def _batch_buckets(lengths, settings: ClassifierBatchSettings, train: bool) -> np.ndarray:
    """The bucket of each batch `classifier_batches` makes of documents of `lengths`: in training order
    (drawn from RandomState(0): one draw stands for every epoch's) without the last, partial batch;
    else sorted."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return lengths
    if settings.max_len is not None:
        lengths = np.minimum(lengths, settings.max_len)
    if train:
        order = shuffled_sorted_order(lengths, settings.batch_size, np.random.RandomState(0))
        order = order[:len(order) // settings.batch_size * settings.batch_size]
    else:
        order = sorted_order(lengths)
    plain = dataclasses.replace(settings, lengths=None)
    return np.array([padded_length(int(lengths[order[i:i + settings.batch_size]].max()), plain)
                     for i in range(0, len(order), settings.batch_size)], dtype=np.int64)


def bucket_lengths(document_lengths, settings: ClassifierBatchSettings, *, epochs: float = 1.0, predicted=(),
                   compile_cost: float = COMPILE_COST_POSITIONS) -> tuple[int, ...]:
    """The padded lengths a classifier's batches may take (`ClassifierBatchSettings.lengths`): the set
    that minimises `compile_cost` token positions a length (each is one more compiled train step and
    evaluation program) plus the positions, padding included, that `epochs` epochs of training over
    documents of `document_lengths` compute, and the predictions: `predicted`, pairs of (document
    lengths, times predicted), e.g. the validation set each epoch and a test set once, a position
    counting `PREDICTION_COST`. -> increasing tuple.

    The batches are those `classifier_batches` makes (training: fastai's SortedDL order, sorted by
    length within chunks of 50 batches, without a last, partial batch; predictions: sorted), each
    as wide as the bucket of its longest document (truncated to `max_len`). The candidates are
    the training batches' buckets (each length compiles a train step); a predicted batch takes the
    smallest kept length that holds it, or its own bucket past the widest. A batch is padded only
    within its kind (within one `seq_len` window, or whole windows), so each kind is chosen on its
    own, by dynamic programming over its buckets, and keeps its widest.

    Why: a small data set's epoch is a few batches, each of a different width, and a program
    compiled for a batch or two costs more than the padding it saves; a large one amortises many.
    At bs 64, bptt 70 and 4 epochs, 900 IMDb reviews (14 batches an epoch, 5,000 test reviews)
    take 5 lengths where every bucket would be 8, 22,500 take 18 of 22; TREC-6's questions over
    7 epochs take 3 of 6.
    """
    if compile_cost < 0 or epochs <= 0:
        raise ValueError(f"compile_cost must be at least 0 and epochs positive, got {compile_cost}, {epochs}")
    candidates, counts = np.unique(_batch_buckets(document_lengths, settings, train=True), return_counts=True)
    weights = epochs * counts.astype(float)
    for lengths, times in predicted:
        for bucket in _batch_buckets(lengths, settings, train=False):
            same_kind = (candidates <= settings.seq_len) == (bucket <= settings.seq_len)
            holds = np.flatnonzero(same_kind & (candidates >= bucket))
            if len(holds):
                weights[holds[0]] += times * PREDICTION_COST
    kept = []
    for is_short in (True, False):
        kind = np.flatnonzero((candidates <= settings.seq_len) == is_short)
        # best[j]: the least cost of the kind's first j buckets with bucket j - 1 kept; came_from[j]:
        # how many of them lie below the kept bucket before it (those in between pad to bucket j - 1)
        best, came_from = [0.0], [0]
        for j in range(1, len(kind) + 1):
            width = candidates[kind[j - 1]]
            costs = [best[k] + compile_cost + settings.batch_size * width * weights[kind[k:j]].sum()
                     for k in range(j)]
            came_from.append(int(np.argmin(costs)))
            best.append(costs[came_from[-1]])
        j = len(kind)
        while j > 0:
            kept.append(int(candidates[kind[j - 1]]))
            j = came_from[j]
    return tuple(sorted(kept))


def _bucket_length(longest: int, settings: ClassifierBatchSettings) -> int:
    if settings.bucket_multiple is None:
        return max(longest, 1)
    multiple = settings.bucket_multiple
    if settings.short_bucket_multiple is not None and longest <= settings.seq_len:
        # Batches of short documents (TREC questions: ~11 tokens) would waste most of a whole
        # seq_len window; one window of padding at the end changes nothing fastai computes.
        multiple = settings.short_bucket_multiple
        return min(max(-(-longest // multiple) * multiple, multiple), settings.seq_len)
    return max(-(-longest // multiple) * multiple, multiple)


def possible_shapes(settings: ClassifierBatchSettings) -> list[tuple[int, int]] | None:
    """Every batch shape when both max_len and bucket_multiple are set (None when unbounded)."""
    if settings.max_len is None or settings.bucket_multiple is None:
        return None
    return sorted({(settings.batch_size, padded_length(n, settings)) for n in range(1, settings.max_len + 1)})


def classifier_batches(documents: Sequence[np.ndarray], labels: Sequence[int] | None,
                       settings: ClassifierBatchSettings, train: bool,
                       rng: np.random.RandomState | None = None,
                       drop_last: bool | None = None) -> Iterator[ClassifierBatch]:
    """One epoch of classifier batches (see the module docstring). `train` selects fastai's shuffled
    order (needs `rng`, a np.random.RandomState) over the validation order. `drop_last` (default: `train`,
    as fastai's training DataLoader) drops a last batch smaller than batch_size instead of filling it."""
    if drop_last is None:
        drop_last = train
    documents = [truncate(np.asarray(d, dtype=np.int32), settings.max_len, settings.keep) for d in documents]
    if settings.backwards:
        documents = [d[::-1] for d in documents]
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    if train:
        if rng is None:
            raise ValueError("train=True needs rng=np.random.RandomState(seed)")
        order = shuffled_sorted_order(lengths, settings.batch_size, rng)
    else:
        order = sorted_order(lengths)
    label_array = None if labels is None else np.asarray(labels, dtype=np.int32)
    batch_size = settings.batch_size
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if drop_last and len(rows) < batch_size:
            break
        width = padded_length(int(lengths[rows].max()), settings)
        tokens = np.full((batch_size, width), settings.pad_id, dtype=np.int32)
        token_mask = np.zeros((batch_size, width), dtype=bool)
        for row, index in enumerate(rows):
            document = documents[index]
            tokens[row] = pad_chunk(document, width, settings.pad_id, settings.pad_first, settings.seq_len)
            if len(document):
                text_start = ((width - len(document)) // settings.seq_len) * settings.seq_len \
                    if settings.pad_first else 0
                token_mask[row, text_start:text_start + len(document)] = True
        batch_lengths = np.zeros(batch_size, dtype=np.int32)
        batch_lengths[:len(rows)] = lengths[rows]
        batch_labels = np.zeros(batch_size, dtype=np.int32)
        if label_array is not None:
            batch_labels[:len(rows)] = label_array[rows]
        row_mask = np.zeros(batch_size, dtype=bool)
        row_mask[:len(rows)] = True
        indices = np.full(batch_size, -1, dtype=np.int64)
        indices[:len(rows)] = rows
        fastai_mask = np.zeros((batch_size, width), dtype=bool)
        fastai_mask[:len(rows)] = fastai_layout_mask(lengths[rows], width, settings.seq_len, settings.pad_first,
                                                     settings.bpt3c_max_len)
        yield ClassifierBatch(tokens, batch_labels, batch_lengths, token_mask, row_mask, indices, fastai_mask)
