"""Encoder behaviour beyond the golden tests: train-mode dropout, bad ids, BPT3C gradients; and BPT3C
at length, golden against fastai 2.8.12 on real IMDb reviews longer than max_len."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ulmfit_jax import convert, encoder, models, predict
from ulmfit_jax.config import EncoderConfig, awd_lstm_clas_config
from ulmfit_jax.text.batches import classifier_batches
from ulmfit_jax.text.datasets import data_dir, read_jsonl
from ulmfit_jax.text.tokenizers import TextTokenizer, TokenizerSettings
from ulmfit_jax.text.vocab import count_tokens, make_vocab, numericalize, token_to_id

CONFIG = EncoderConfig(vocab_size=30, emb_size=6, n_hidden=8, n_layers=2, hidden_p=0.0, input_p=0.0,
                       embed_p=0.0, weight_p=0.0)


def test_embedding_dropout_drops_whole_words(key):
    embed = jax.random.normal(key, (30, 6))
    tokens = jnp.array([[3, 4, 3, 3, 5, 4, 3]])
    p = 0.5
    vectors = np.asarray(encoder.embed_tokens(embed, tokens, pad_token=1, embed_p=p, key=jax.random.PRNGKey(2)))
    for token in (3, 4, 5):
        rows = vectors[0][np.asarray(tokens[0]) == token]
        np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
        scale = rows[0] / np.asarray(embed[token])
        assert np.allclose(scale, 0.0) or np.allclose(scale, 1 / (1 - p), rtol=1e-6)


def test_padding_row_gets_no_gradient_from_the_lookup(key):
    embed = jax.random.normal(key, (30, 6))
    tokens = jnp.array([[1, 2, 1, 3]])
    gradient = jax.grad(lambda e: jnp.sum(encoder.embed_tokens(e, tokens, pad_token=1, embed_p=0.0, key=None)))(embed)
    assert np.all(np.asarray(gradient[1]) == 0) and np.all(np.asarray(gradient[2]) == 1)


def test_ids_outside_the_vocabulary_are_refused_not_clamped(key):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30\): \[30, 99\]"):
        encoder.check_token_ids(np.array([[0, 30, 99]]), 30)
    params = encoder.init_encoder(key, CONFIG)
    outputs, _ = encoder.encoder_apply(params, jnp.array([[2, 30]]), encoder.initial_state(CONFIG, 1), config=CONFIG)
    assert np.isnan(np.asarray(outputs)[0, 1]).all()      # never a silently clamped row


def test_weight_drop_in_train_mode_leaves_raw_weight_with_gradients(key):
    config = EncoderConfig(vocab_size=30, emb_size=6, n_hidden=8, n_layers=2, hidden_p=0.0, input_p=0.0,
                           embed_p=0.0, weight_p=0.5)
    params = encoder.init_encoder(key, config)
    before = jax.tree.map(np.array, params)
    tokens = jnp.array([[2, 3, 4, 5]])

    def loss(params, dropout_key):
        outputs, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(config, 1), config=config,
                                           train=True, key=dropout_key)
        return jnp.sum(outputs ** 2)

    gradients = jax.grad(loss)(params, jax.random.PRNGKey(5))
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert all(np.abs(np.asarray(layer["w_hh"])).sum() > 0 for layer in gradients["rnn"])
    # a different key draws a different mask; the same key the same one
    assert loss(params, jax.random.PRNGKey(5)) == loss(params, jax.random.PRNGKey(5))
    assert loss(params, jax.random.PRNGKey(5)) != loss(params, jax.random.PRNGKey(6))
    # eval mode ignores weight_p: equal to a model with weight_p 0
    evaluated, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(config, 1), config=config)
    reference, _ = encoder.encoder_apply(params, tokens, encoder.initial_state(CONFIG, 1), config=CONFIG)
    np.testing.assert_array_equal(evaluated, reference)


def test_train_mode_needs_a_key(key):
    params = encoder.init_encoder(key, CONFIG)
    with pytest.raises(ValueError, match="PRNG key"):
        encoder.encoder_apply(params, jnp.array([[2]]), encoder.initial_state(CONFIG, 1), config=CONFIG, train=True)


def test_bpt3c_carries_state_but_no_gradient_into_windows_before_max_len(key):
    params = encoder.init_encoder(key, CONFIG)
    bptt, max_len = 3, 6
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12, 13]])    # windows [5 6 7] (dropped), [8 9 10], [11 12 13]

    def pooled(params, tokens):
        outputs, is_pad = encoder.sentence_encoder(params, tokens, config=CONFIG, bptt=bptt, max_len=max_len)
        assert outputs.shape == (1, 6, 6) and not bool(is_pad.any())
        return jnp.sum(outputs)

    gradient = jax.grad(pooled)(params, tokens)["embed"]
    assert np.all(np.asarray(gradient[5:8]) == 0)              # the dropped window: no gradient
    assert np.all(np.abs(np.asarray(gradient[8:14])).sum(axis=1) > 0)
    changed = tokens.at[0, 0].set(20)                          # but its state reaches the kept windows
    assert float(pooled(params, changed)) != float(pooled(params, tokens))


# ----------------------------------------------------------------------------------------------
# BPT3C at length, golden: real IMDb reviews longer than max_len against fastai 2.8.12's
# `SentenceEncoder` + `PoolingLinearClassifier` with the same weights. The golden tests in
# test_convert.py use random documents of at most 23 tokens; these are real reviews of ~2,900 tokens,
# twice fastai's max_len, so that ~20 windows run before the kept ones and carry their state.

IMDB_TEST = data_dir() / "imdb" / "test.jsonl.gz"
FASTAI_MAX_LEN = 72 * 20        # get_text_classifier's default max_len


@pytest.fixture(scope="module")
def imdb_reviews():
    """(vocabulary size, documents longest first): the 3 longest IMDb test reviews (by characters:
    2,893, 2,769 and 2,741 tokens with our tokenizer) and the reviews nearest 5,000 and 1,000
    characters (1,183 and 241 tokens: within max_len, so that fastai's batch has rows that start
    whole windows late). Ids over a vocabulary of their own tokens seen twice or more (the rest
    xxunk), which keeps the embedding small."""
    if not IMDB_TEST.exists():
        pytest.skip(f"IMDb data not found at {IMDB_TEST} (set ULMFIT_DATA_DIR)")
    texts = read_jsonl(IMDB_TEST, label_field=None)[0].texts
    characters = np.array([len(text) for text in texts])
    picked = [*np.argsort(-characters, kind="stable")[:3], *(int(np.argmin(np.abs(characters - n)))
                                                              for n in (5000, 1000))]
    tokenizer = TextTokenizer(TokenizerSettings())
    tokens = [tokenizer(texts[i]) for i in picked]
    vocab = make_vocab(count_tokens(tokens), min_freq=2)
    documents = sorted((numericalize(t, token_to_id(vocab)) for t in tokens), key=len, reverse=True)
    assert len(documents[2]) > 2 * FASTAI_MAX_LEN - 200 and len(documents[3]) < FASTAI_MAX_LEN
    return len(vocab), documents


def _calibrated_fastai_classifier(config, batch):
    """fastai's classifier (PyTorch init, seed 3) in eval mode with each batch norm's running
    statistics set to those of its input over `batch` (fastai's layout). With PyTorch's init the
    running statistics (0, 1) leave the logits of any two reviews equal to ~1e-3, so a 1e-5 check
    would see little; calibrated, they differ by O(1) and every pooled feature counts."""
    from fastai_reference import fastai_classifier, fastai_core, torch
    reference = fastai_classifier(config, seed=3).eval()
    with torch.no_grad():
        outputs, mask = reference[0](torch.tensor(batch))
        features = fastai_core.masked_concat_pool(outputs, mask, config.bptt)
        for block in reference[1].layers:
            norm = block[0]
            norm.running_mean.copy_(features.mean(0))
            norm.running_var.copy_(features.var(0) + 1e-3)
            features = block(features)
    return reference


def _fastai_logits(reference, tokens):
    from fastai_reference import torch
    with torch.no_grad():
        return reference(torch.tensor(np.asarray(tokens, dtype=np.int64)))[0].numpy()


def test_classifier_logits_equal_fastai_on_imdb_reviews_longer_than_max_len(imdb_reviews):
    """bptt 70 (ours and the paper's; 1440 is no multiple of it, so the first kept window starts
    mid-way, as fastai's `sl - i <= max_len` has it) and fastai's max_len 1440: the batch of all five
    reviews in fastai's own `pad_input_chunk` layout (pad_first: whole windows of padding in front,
    the remainder behind; rows fed from the window where their text starts) and the longest alone
    give fastai's logits within 1e-5."""
    from fastai_reference import pad_input_chunk, state_dict_numpy
    vocab_size, documents = imdb_reviews
    bptt = 70
    config = awd_lstm_clas_config(vocab_size, 2, emb_size=16, n_hidden=24, n_layers=2, bptt=bptt,
                                  max_len=FASTAI_MAX_LEN)
    batch = pad_input_chunk(documents, config.encoder.pad_token, bptt)
    assert batch.shape == (5, len(documents[0]))
    short = len(documents[-1])
    front = (len(documents[0]) - short) // bptt * bptt     # fastai pads first, in whole windows
    assert np.all(batch[-1, :front] == 1) and np.all(batch[-1, front:front + short] != 1)
    reference = _calibrated_fastai_classifier(config, batch)
    _, params, stats = convert.import_classifier(state_dict_numpy(reference), config)
    apply = jax.jit(lambda tokens, config: models.classifier_apply(params, stats, tokens, config=config)[0],
                    static_argnames="config")

    expected = _fastai_logits(reference, batch)
    logits = np.asarray(apply(jnp.asarray(batch), config))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    longest = documents[0][None]
    np.testing.assert_allclose(np.asarray(apply(jnp.asarray(longest), config)), _fastai_logits(reference, longest),
                               atol=1e-5, rtol=0)

    # The check can see what matters: the reviews' logits differ by O(1), and keeping every window
    # (max_len None) moves the long reviews' logits far beyond the tolerance, the short ones' not at all.
    assert expected.std(axis=0).min() > 0.1
    everything = np.asarray(apply(jnp.asarray(batch), dataclasses.replace(config, max_len=None)))
    moved = np.abs(everything - logits).max(axis=1)
    assert moved[:3].min() > 1e-2 and moved[3:].max() < 1e-5


@pytest.mark.parametrize("bptt", [72, 70])
def test_predict_layout_of_a_long_review_alone_gives_fastais_logits(imdb_reviews, bptt):
    """Our own layout (`predict.classifier_batch_settings`: the width rounded up to a multiple of
    bptt, the remainder padded behind the text), the longest review alone, against fastai's
    prediction of it alone (a batch of one: no padding). With bptt 70 the bucket of the 2,893-token
    review is 2,940 wide and 1440 is no multiple of 70: the windows fastai keeps (from 1470, 1,423
    tokens) are not those within max_len of our width (from 1540), so they are chosen from the
    review's own length."""
    from fastai_reference import pad_input_chunk, state_dict_numpy
    vocab_size, documents = imdb_reviews
    config = awd_lstm_clas_config(vocab_size, 2, emb_size=16, n_hidden=24, n_layers=2, bptt=bptt,
                                  max_len=FASTAI_MAX_LEN)
    reference = _calibrated_fastai_classifier(config, pad_input_chunk(documents, config.encoder.pad_token, bptt))
    _, params, stats = convert.import_classifier(state_dict_numpy(reference), config)
    settings = predict.classifier_batch_settings(config, batch_size=1)
    batch = next(classifier_batches(documents[:1], None, settings, train=False))
    assert batch.tokens.shape[1] % bptt == 0 and batch.tokens.shape[1] > len(documents[0])
    logits, _, _ = models.classifier_apply(params, stats, jnp.asarray(batch.tokens), config=config)
    np.testing.assert_allclose(np.asarray(logits), _fastai_logits(reference, documents[0][None]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# BPT3C on our length buckets, golden: a batch padded wider than fastai pads it (to its longest
# document, L) against fastai 2.8.12 on its own padding of the same documents. The widths: fastai's
# own (23), L plus whole windows (28, 38: every row shifts alike) and multiples of bptt (25, 30, 45:
# two rows' shifts can differ by a window, so fastai's window i is our window w for one row and w + 1
# for another). max_len 12 is no multiple of bptt 5: fastai keeps its windows from 15 (23 - 15 <= 12),
# which are not ours within 12 of our width. The lengths: documents longer than max_len, whole windows
# of front padding, a row whose last window is all padding (4 tokens: 19-22 are its trailing pads), and
# fastai's `real_bs` leaving out a row whose text reaches that window (11 tokens, from 10 to 20: at 20
# only rows 0, 1, 3 and 4 hold text, so real_bs 4 feeds rows 0-3, the 20-token row's padding among them).

BUCKET_CONFIG = awd_lstm_clas_config(30, 3, drop_mult=0.0, emb_size=6, n_hidden=8, n_layers=2, bptt=5, max_len=12,
                                     hidden_sizes=(6,), head_ps=(0.0, 0.0))
BUCKET_LENGTHS = (23, 22, 20, 17, 11, 9, 4)
ALPHA, BETA = 2.0, 1.0


@pytest.mark.parametrize("width", [23, 28, 38, 25, 30, 45])
def test_classifier_on_any_bucket_width_equals_fastai_on_its_own_padding(width):
    """Train mode (batch statistics), no dropout: the logits and the gradients of the cross-entropy
    equal fastai's on every width; with AR and TAR over `fastai_layout_mask(..., max_len)` the loss
    and gradients too, where the width is L plus whole windows (otherwise fastai's rows can have
    trailing pads beyond our width, which its regulariser averages over)."""
    from fastai_reference import fastai_classifier, gradient_dict, pad_input_chunk, state_dict_numpy, torch
    from ulmfit_jax import losses
    from ulmfit_jax.text.batches import fastai_layout_mask, pad_input_chunk as our_pad_input_chunk
    config = BUCKET_CONFIG
    bptt, pad = config.bptt, config.encoder.pad_token
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, config.encoder.vocab_size, size=n) for n in BUCKET_LENGTHS]
    labels = rng.integers(0, config.n_classes, size=len(documents))
    theirs = pad_input_chunk(documents, pad, bptt)
    tokens = our_pad_input_chunk(documents, pad, seq_len=bptt, pad_len=width)
    assert theirs.shape[1] == 23 and (width == 23) == np.array_equal(tokens, theirs)
    exact = (width - 23) % bptt == 0

    def fastai_gradients(regularized: bool):
        reference = fastai_classifier(config, seed=7).train()
        logits, _, outputs = reference(torch.tensor(theirs))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        if regularized:
            loss = (loss + ALPHA * outputs.pow(2).mean()
                    + BETA * (outputs[:, 1:] - outputs[:, :-1]).pow(2).mean())
        loss.backward()
        return logits.detach().numpy(), loss.item(), convert.import_classifier(gradient_dict(reference), config)[1]

    _, params, stats = convert.import_classifier(state_dict_numpy(fastai_classifier(config, seed=7)), config)
    mask = jnp.asarray(fastai_layout_mask(BUCKET_LENGTHS, width, bptt, max_len=config.max_len))

    def loss_fn(params, regularized):
        logits, _, outputs = models.classifier_apply(params, stats, jnp.asarray(tokens), config=config, train=True,
                                                     key=jax.random.PRNGKey(0))
        loss = losses.cross_entropy(logits, jnp.asarray(labels))
        if regularized:
            kept = mask[:, width - outputs.shape[1]:]
            loss = (loss + losses.activation_regularization(outputs, ALPHA, kept)
                    + losses.temporal_activation_regularization(outputs, BETA, kept))
        return loss, logits

    for regularized in (False, True) if exact else (False,):
        expected_logits, expected_loss, expected = fastai_gradients(regularized)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, regularized)
        np.testing.assert_allclose(np.asarray(logits), expected_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(float(loss), expected_loss, atol=1e-5, rtol=1e-5)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, atol=1e-5, rtol=1e-5), grads, expected)


def test_fastai_windows_follow_fastais_feeding_and_keeping_per_row():
    """`fastai_windows` on the 30-wide bucket of BUCKET_LENGTHS (fastai's 23): the rows of 23, 22, 17
    and 11 tokens sit a window later than fastai puts them (shift 5), those of 20, 9 and 4 two
    (shift 10). Our window 25 is fastai's window 20 (real_bs 4) for the first and its 15 (real_bs 7)
    for the second: every row is fed there but the 11-token row, although its text reaches it.
    fastai keeps its windows 15 and 20: our 20 and 25 for shift-5 rows, 25 alone for shift-10 ones."""
    config = BUCKET_CONFIG
    tokens = np.full((len(BUCKET_LENGTHS), 30), config.encoder.pad_token, np.int32)
    from ulmfit_jax.text.batches import pad_chunk
    for row, n in enumerate(BUCKET_LENGTHS):
        tokens[row] = pad_chunk(np.full(n, 7), 30, config.encoder.pad_token, seq_len=config.bptt)
    fed, kept = map(np.asarray, encoder.fastai_windows(jnp.asarray(tokens), pad_token=config.encoder.pad_token,
                                                       bptt=config.bptt, max_len=config.max_len))
    assert fed.shape == kept.shape == (6, 7)                      # our windows 0, 5, ..., 25 x rows
    shifts = [5, 5, 10, 5, 5, 10, 10]                             # (30 - n) // 5 * 5 - (23 - n) // 5 * 5
    for row, shift in enumerate(shifts):
        window_of = lambda fastai_start: (fastai_start + shift) // config.bptt
        assert kept[:, row].tolist() == [w in (window_of(15), window_of(20)) for w in range(6)]
    assert fed[5].tolist() == [True, True, True, True, False, True, True]     # our 25: fastai's 20 or 15
    assert fed[:, 4].tolist() == [False, False, False, True, True, False]     # the 11-token row: fastai's 10, 15
