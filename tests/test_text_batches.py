"""LM and classifier batches against fastai's LMDataLoader / SortedDL / pad_input_chunk, and properties."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ulmfit_jax.text.batches import (PREDICTION_COST, ClassifierBatchSettings, LMBatchSettings, bucket_lengths,
                                     classifier_batches, concatenate_documents, fastai_layout_mask, lm_batches,
                                     lm_epoch, lm_layout, pad_chunk, pad_input_chunk, padded_length,
                                     possible_shapes, shuffled_sorted_order, sorted_order)

torch = pytest.importorskip("torch", reason="fastai's loaders are the reference")
fastai_data = pytest.importorskip("fastai.text.data", reason="fastai 2.8.12 is the reference")
from fastai_reference import pad_input_chunk as fastai_pad_input_chunk  # noqa: E402


def random_documents(seed: int, n: int, max_len: int = 300, vocab: int = 500) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(1, max_len)), dtype=np.int32) for _ in range(n)]


def fastai_lm_batches(documents, batch_size, seq_len):
    dataset = [fastai_data.TensorText(torch.tensor(d, dtype=torch.long)) for d in documents]
    loader = fastai_data.LMDataLoader(dataset, bs=batch_size, seq_len=seq_len, shuffle=False, num_workers=0)
    return [(x.numpy(), y.numpy()) for x, y in loader]


def test_reference_toy_layout():
    """REFERENCE.md: bs=4, seq_len=5, 100 tokens -> rows start 0, 24, 48, 72; batch 1 continues 5, 29, 53, 77."""
    batches = list(lm_batches(np.arange(100), LMBatchSettings(batch_size=4, seq_len=5, shuffle=False)))
    assert list(batches[0].inputs[:, 0]) == [0, 24, 48, 72]
    assert list(batches[1].inputs[:, 0]) == [5, 29, 53, 77]
    assert lm_layout(100, 4, 5) == (24, 5, 4)


@pytest.mark.parametrize("seed,n_docs,batch_size,seq_len", [(0, 40, 8, 72), (1, 7, 4, 5), (2, 100, 64, 70),
                                                            (3, 3, 3, 1000), (4, 30, 5, 13)])
def test_lm_batches_equal_fastai(seed, n_docs, batch_size, seq_len):
    documents = random_documents(seed, n_docs)
    expected = fastai_lm_batches(documents, batch_size, seq_len)
    settings_ = LMBatchSettings(batch_size=batch_size, seq_len=seq_len, shuffle=False)
    ours = list(lm_batches(concatenate_documents(documents), settings_))
    assert len(ours) == len(expected)
    for batch, (x, y) in zip(ours, expected):
        assert batch.inputs.shape == (batch_size, seq_len)  # fixed, also for the last batch
        real = x.shape[1]
        assert batch.length == real
        np.testing.assert_array_equal(batch.inputs[:, :real], x)
        np.testing.assert_array_equal(batch.targets[:, :real], y)
        assert batch.mask[:, :real].all() and not batch.mask[:, real:].any()
        assert (batch.inputs[:, real:] == settings_.pad_id).all()


def test_lm_epoch_with_a_given_order_equals_fastai_after_shuffle():
    """fastai shuffles documents, then lays them out: the same order gives the same batches."""
    documents = random_documents(5, 50)
    order = np.random.default_rng(0).permutation(len(documents))
    expected = fastai_lm_batches([documents[i] for i in order], 8, 20)
    ours = list(lm_batches(concatenate_documents(documents, order), LMBatchSettings(8, 20, shuffle=False)))
    for batch, (x, _) in zip(ours, expected):
        np.testing.assert_array_equal(batch.inputs[:, :x.shape[1]], x)


def test_lm_backwards_equals_fastai_reverse_text():
    documents = random_documents(6, 20)
    reversed_documents = [fastai_data.reverse_text(torch.tensor(d)).numpy() for d in documents]
    expected = fastai_lm_batches(reversed_documents, 4, 16)
    ours = list(lm_batches(concatenate_documents(documents, backwards=True), LMBatchSettings(4, 16)))
    for batch, (x, y) in zip(ours, expected):
        np.testing.assert_array_equal(batch.inputs[:, :x.shape[1]], x)
        np.testing.assert_array_equal(batch.targets[:, :y.shape[1]], y)


document_lists = st.lists(st.lists(st.integers(2, 50), min_size=1, max_size=40), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(document_lists, st.integers(1, 9), st.integers(1, 30), st.booleans())
def test_lm_batches_tile_the_stream(documents, batch_size, seq_len, variable):
    stream = concatenate_documents([np.array(d) for d in documents])
    if len(stream) < batch_size + 1:
        with pytest.raises(ValueError, match="too short"):
            lm_layout(len(stream), batch_size, seq_len)
        return
    settings_ = (LMBatchSettings(batch_size, seq_len, seq_len_choices=(seq_len, max(1, seq_len // 2)),
                                 seq_len_probabilities=(0.7, 0.3)) if variable
                 else LMBatchSettings(batch_size, seq_len))
    row_length, _, _ = lm_layout(len(stream), batch_size, seq_len)
    batches = list(lm_epoch([np.array(d) for d in documents], dataclass_replace(settings_, shuffle=False),
                            np.random.default_rng(0)))
    # Each row, read batch after batch over its real columns, is one contiguous piece of the stream.
    rows_inputs = np.concatenate([b.inputs[:, :b.length] for b in batches], axis=1)
    rows_targets = np.concatenate([b.targets[:, :b.length] for b in batches], axis=1)
    assert rows_inputs.shape == (batch_size, row_length)
    # No token lost or repeated: the rows laid end to end are the stream's first batch_size * row_length.
    np.testing.assert_array_equal(rows_inputs.reshape(-1), stream[:batch_size * row_length])
    # Targets are the inputs shifted by one along the stream.
    np.testing.assert_array_equal(rows_targets.reshape(-1), stream[1:batch_size * row_length + 1])
    # Only the drawn lengths ever appear as shapes; padding only in the last batch.
    allowed = set(settings_.seq_len_choices) or {seq_len}
    assert {b.inputs.shape[1] for b in batches} <= allowed
    assert all(b.mask.all() for b in batches[:-1])
    assert sum(b.mask.sum() for b in batches) == batch_size * row_length


def dataclass_replace(settings_, **changes):
    import dataclasses
    return dataclasses.replace(settings_, **changes)


@settings(max_examples=100, deadline=None)
@given(document_lists)
def test_backwards_stream_is_the_reversed_stream(documents):
    documents = [np.array(d) for d in documents]
    forward = concatenate_documents(documents)
    backward = concatenate_documents(documents, order=range(len(documents) - 1, -1, -1), backwards=True)
    np.testing.assert_array_equal(backward, forward[::-1])


def test_lm_shuffle_is_per_epoch_and_seeded():
    documents = random_documents(7, 30)
    settings_ = LMBatchSettings(4, 10)
    first = [b.inputs for b in lm_epoch(documents, settings_, np.random.default_rng(1))]
    again = [b.inputs for b in lm_epoch(documents, settings_, np.random.default_rng(1))]
    other = [b.inputs for b in lm_epoch(documents, settings_, np.random.default_rng(2))]
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))
    with pytest.raises(ValueError, match="rng"):
        list(lm_epoch(documents, settings_))


# ------------------------------------------------------------------ classifier

@pytest.mark.parametrize("length,pad_len,seq_len", [(3, 12, 5), (12, 12, 5), (1, 200, 72), (71, 144, 72),
                                                    (0, 7, 3)])
@pytest.mark.parametrize("pad_first", [True, False])
def test_pad_chunk_equals_fastai(length, pad_len, seq_len, pad_first):
    x = np.arange(10, 10 + length)
    expected = fastai_data.pad_chunk(torch.tensor(x), pad_idx=1, pad_first=pad_first, seq_len=seq_len,
                                     pad_len=pad_len).numpy()
    np.testing.assert_array_equal(pad_chunk(x, pad_len, 1, pad_first, seq_len), expected)


def test_pad_chunk_reference_example():
    np.testing.assert_array_equal(pad_chunk(np.array([7, 8, 9]), 12, seq_len=5), [1] * 5 + [7, 8, 9] + [1] * 4)


def test_pad_input_chunk_equals_fastai():
    documents = random_documents(8, 16, max_len=400)
    samples = [(torch.tensor(d), i % 3) for i, d in enumerate(documents)]
    expected = fastai_data.pad_input_chunk(samples, pad_idx=1, seq_len=72)
    np.testing.assert_array_equal(pad_input_chunk(documents, seq_len=72),
                                  np.stack([t.numpy() for t, _ in expected]))


def fastai_sorted_dl(documents, labels, batch_size, shuffle, seed):
    dataset = [(fastai_data.TensorText(torch.tensor(d, dtype=torch.long)), torch.tensor(l))
               for d, l in zip(documents, labels)]
    loader = fastai_data.SortedDL(dataset, bs=batch_size, shuffle=shuffle, drop_last=shuffle,
                                  before_batch=fastai_data.Pad_Chunk(seq_len=72), num_workers=0)  # no fork beside JAX
    np.random.seed(seed)
    return [(x.numpy(), y.numpy()) for x, y in loader]


@pytest.mark.parametrize("train", [False, True])
def test_classifier_batches_equal_fastai_sorted_dl(train):
    documents = random_documents(9, 1000, max_len=700)
    labels = [i % 4 for i in range(len(documents))]
    expected = fastai_sorted_dl(documents, labels, 16, shuffle=train, seed=42)
    settings_ = ClassifierBatchSettings(batch_size=16, seq_len=72, max_len=None, bucket_multiple=None)
    ours = list(classifier_batches(documents, labels, settings_, train=train, rng=np.random.RandomState(42)))
    assert len(ours) == len(expected)
    for batch, (x, y) in zip(ours, expected):
        n = len(y)
        np.testing.assert_array_equal(batch.tokens[:n], x)
        np.testing.assert_array_equal(batch.labels[:n], y)


def test_shuffled_sorted_order_matches_fastai_draws():
    lengths = np.random.default_rng(0).integers(1, 500, size=777)
    np.random.seed(3)
    documents = [np.zeros(n, dtype=np.int64) for n in lengths]
    loader = fastai_data.SortedDL([(torch.tensor(d),) for d in documents], bs=8, shuffle=True, num_workers=0)
    np.random.seed(3)
    expected = np.array(list(loader.shuffle_fn(None)))
    np.testing.assert_array_equal(shuffled_sorted_order(lengths, 8, np.random.RandomState(3)), expected)
    np.testing.assert_array_equal(sorted_order([3, 5, 5, 1]), [1, 2, 0, 3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=70), st.integers(1, 9), st.booleans())
def test_classifier_batches_bucketed_shapes_and_masks(lengths, batch_size, train):
    documents = [np.arange(3, 3 + n, dtype=np.int32) for n in lengths]
    settings_ = ClassifierBatchSettings(batch_size=batch_size, seq_len=16, max_len=100, bucket_multiple=16)
    batches = list(classifier_batches(documents, list(range(len(lengths))), settings_, train=train,
                                      rng=np.random.RandomState(0), drop_last=False))
    shapes = {b.tokens.shape for b in batches}
    assert shapes <= set(possible_shapes(settings_))
    seen = []
    for batch in batches:
        for row in range(batch_size):
            if not batch.row_mask[row]:
                assert batch.lengths[row] == 0 and batch.indices[row] == -1
                continue
            index = batch.indices[row]
            expected = documents[index][:100]
            np.testing.assert_array_equal(batch.tokens[row][batch.token_mask[row]], expected)
            assert batch.lengths[row] == len(expected) and batch.labels[row] == index
            np.testing.assert_array_equal(batch.tokens[row], pad_chunk(expected, batch.tokens.shape[1], seq_len=16))
            seen.append(index)
    assert sorted(seen) == list(range(len(lengths)))  # every document once


@pytest.mark.parametrize("seq_len, bucket_multiple, short_multiple", [(72, 72, 8), (16, 16, None), (5, 5, None)])
def test_fastai_mask_picks_fastais_own_layout_out_of_a_bucketed_batch(seq_len, bucket_multiple, short_multiple):
    """Each row's masked tokens are fastai's row for the same batch (padded to its longest document),
    all of it where the bucket is wider by whole windows or the batch fits one window (TREC-6's)."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, 500, size=int(n), dtype=np.int32) for n in rng.integers(1, 3 * seq_len, size=300)]
    settings_ = ClassifierBatchSettings(batch_size=16, seq_len=seq_len, max_len=None, bucket_multiple=bucket_multiple,
                                        short_bucket_multiple=short_multiple)
    wider, exact = 0, 0
    for batch in classifier_batches(documents, None, settings_, train=True, rng=np.random.RandomState(1)):
        rows = batch.indices[batch.row_mask]
        fastai = fastai_pad_input_chunk([documents[i] for i in rows], 1, seq_len)
        width = batch.tokens.shape[1]
        wider += width > fastai.shape[1]
        assert not batch.fastai_mask[~batch.row_mask].any()
        for row in range(len(rows)):
            kept = batch.tokens[row][batch.fastai_mask[row]]
            np.testing.assert_array_equal(kept, fastai[row][:len(kept)])
        if width <= seq_len or (width - fastai.shape[1]) % seq_len == 0:
            exact += 1
            assert batch.fastai_mask.sum() == fastai.size
    assert wider and exact       # the buckets did pad wider than fastai, and the exact cases occurred


def test_fastai_layout_mask_refuses_a_row_wider_than_the_batch():
    with pytest.raises(ValueError, match="does not fit"):
        fastai_layout_mask([10, 3], width=8, seq_len=4)


def test_classifier_compiles_a_bounded_number_of_times():
    """A jitted step sees only the bucketed shapes: count traces over an epoch of skewed lengths."""
    jax = pytest.importorskip("jax")
    traces = []

    @jax.jit
    def step(tokens, mask):
        traces.append(tokens.shape)
        return (tokens * mask).sum()

    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.3, 0.75, size=3000).astype(int) + 1, 3000)  # IMDb-like
    documents = [np.full(n, 5, dtype=np.int32) for n in lengths]
    settings_ = ClassifierBatchSettings(batch_size=64, seq_len=72, max_len=1440, bucket_multiple=72)
    for train in (True, False):
        for batch in classifier_batches(documents, None, settings_, train, np.random.RandomState(0)):
            step(batch.tokens, batch.token_mask)
    assert len(traces) <= 20 == len(possible_shapes(settings_))


def test_classifier_train_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        list(classifier_batches([np.arange(3)], [0], ClassifierBatchSettings(), train=True))


def test_a_batch_takes_the_smallest_allowed_length_of_its_kind_that_holds_it():
    settings_ = ClassifierBatchSettings(batch_size=4, seq_len=70, max_len=None, bucket_multiple=70,
                                        short_bucket_multiple=8, lengths=(16, 24, 48, 280))
    assert [padded_length(n, settings_) for n in (3, 16, 17, 25, 49, 70, 71, 141)] == [16, 16, 24, 48, 56, 70, 280, 280]
    assert padded_length(300, settings_) == 350          # longer than every allowed length: its own bucket


def _layout_cost(lengths, settings_, train, epochs, predicted, compile_cost):
    """What `bucket_lengths` minimises, counted on the batches `classifier_batches` really makes."""
    allowed = dataclasses.replace(settings_, lengths=tuple(sorted(lengths)))
    positions = lambda documents, is_train: sum(batch.tokens.size for batch in classifier_batches(
        documents, None, allowed, train=is_train, rng=np.random.RandomState(0)))
    return (compile_cost * len(lengths) + epochs * positions(train, True)
            + sum(times * PREDICTION_COST * positions(documents, False) for documents, times in predicted))


@pytest.mark.parametrize("seed", range(4))
def test_bucket_lengths_are_the_cheapest_choice_of_the_training_buckets(seed):
    """Against every subset of the training batches' buckets (the widest of each kind kept), costed
    on the batches `classifier_batches` makes (training: sorted within its one chunk, the last,
    partial batch dropped; predictions: sorted, the lengths past the widest on their own buckets)."""
    rng = np.random.default_rng(seed)
    settings_ = ClassifierBatchSettings(batch_size=4, seq_len=16, max_len=None, bucket_multiple=16,
                                        short_bucket_multiple=4)
    document = lambda n: np.arange(2, 2 + n, dtype=np.int32)
    train = [document(n) for n in rng.integers(1, 120, size=int(rng.integers(10, 40)))]
    predicted = [([document(n) for n in rng.integers(1, 150, size=20)], 1),
                 ([document(n) for n in rng.integers(1, 120, size=6)], 3)]
    epochs, compile_cost = int(rng.integers(1, 5)), float(rng.choice([0, 200, 800, 3000]))
    plain = dataclasses.replace(settings_, lengths=None)
    buckets = {batch.tokens.shape[1] for batch in classifier_batches(train, None, plain, train=True,
                                                                     rng=np.random.RandomState(0))}
    kinds = [sorted(b for b in buckets if (b <= 16) == short) for short in (True, False)]
    choices = [[(*subset, kind[-1]) for r in range(len(kind)) for subset in itertools.combinations(kind[:-1], r)]
               if kind else [()] for kind in kinds]
    cost = lambda lengths: _layout_cost(lengths, settings_, train, epochs, predicted, compile_cost)
    best = min(cost(short + whole) for short, whole in itertools.product(*choices))
    chosen = bucket_lengths([len(d) for d in train], settings_, epochs=epochs, compile_cost=compile_cost,
                            predicted=[([len(d) for d in documents], times) for documents, times in predicted])
    assert set(chosen) <= buckets
    assert cost(chosen) == pytest.approx(best)


def test_a_small_data_set_gets_fewer_lengths_than_a_large_one_of_the_same_spread():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.3, 0.75, size=25_000).astype(int) + 1, 3300)   # IMDb-like
    settings_ = ClassifierBatchSettings(batch_size=64, seq_len=70, max_len=None, bucket_multiple=70,
                                        short_bucket_multiple=8)
    small, large = bucket_lengths(lengths[:900], settings_, epochs=4), bucket_lengths(lengths, settings_, epochs=4)
    every = bucket_lengths(lengths, settings_, epochs=4, compile_cost=0)
    assert len(small) < len(large) < len(every)
    assert large[-1] == every[-1] == 3360 and small[-1] == -(-lengths[:900].max() // 70) * 70   # the widest kept
    assert bucket_lengths(lengths, settings_, compile_cost=1e12) == (70, 3360)   # one length a kind
    assert bucket_lengths([], settings_) == ()
    with pytest.raises(ValueError, match="compile_cost"):
        bucket_lengths(lengths, settings_, compile_cost=-1)


def test_bucket_lengths_keep_every_batch_of_the_data_on_an_allowed_shape():
    rng = np.random.default_rng(0)
    documents = [np.arange(2, 2 + n, dtype=np.int32) for n in rng.integers(3, 300, size=200)]
    settings_ = ClassifierBatchSettings(batch_size=8, seq_len=70, max_len=None, bucket_multiple=70,
                                        short_bucket_multiple=8)
    allowed = dataclasses.replace(settings_, lengths=bucket_lengths([len(d) for d in documents], settings_))
    shapes = {batch.tokens.shape[1] for batch in classifier_batches(documents, None, allowed, train=True,
                                                                    rng=np.random.RandomState(0))}
    assert shapes <= set(allowed.lengths)


def test_fastai_mask_with_max_len_marks_only_the_windows_fastai_keeps():
    """fastai keeps the windows starting within max_len of its batch's longest document: with 23
    tokens, windows of 5 and max_len 12, its columns 15-22. Ours are its columns shifted by whole
    windows, per row: the 23- and 17-token rows by 5 (30 wide), the 4-token row by 10, cut at 30."""
    lengths, width = [23, 17, 4], 30
    everything = fastai_layout_mask(lengths, width, 5)
    kept = fastai_layout_mask(lengths, width, 5, max_len=12)
    assert [np.flatnonzero(row).tolist() for row in kept] == [list(range(20, 28)), list(range(20, 28)),
                                                              list(range(25, 30))]
    assert np.array_equal(kept, everything & (np.arange(width) >= np.array([[20], [20], [25]])))
    assert np.array_equal(fastai_layout_mask(lengths, width, 5, max_len=23), everything)
    settings_ = ClassifierBatchSettings(batch_size=4, seq_len=5, max_len=None, bucket_multiple=5, bpt3c_max_len=12)
    documents = [np.arange(2, 2 + n, dtype=np.int32) for n in lengths]
    batch = next(classifier_batches(documents, None, dataclasses.replace(settings_, lengths=(30,)), train=False))
    assert np.array_equal(batch.fastai_mask[:3], kept) and not batch.fastai_mask[3].any()
