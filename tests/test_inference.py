"""The inference API (ulmfit_jax.load_classifier / load_language_model) and scripts/predict.py on
models whose directories carry their tokenizer: a SentencePiece classifier trained through the
scripts must predict from raw text exactly what its own evaluation of the prepared data gives."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import ulmfit_jax
from ulmfit_jax import checkpoint, cli, ensemble, models
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
from ulmfit_jax.evaluation import evaluate_language_model
from ulmfit_jax.generate import Sampling
from ulmfit_jax.text.batches import concatenate_documents
from ulmfit_jax.text.datasets import load_prepared
from ulmfit_jax.text.pipeline import tokenize_corpus
from ulmfit_jax.text.tokenizers import TokenizerSettings
from ulmfit_jax.text.vocab import token_to_id

pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--emb-sz", "16", "--n-hid", "24", "--n-layers", "2", "--bptt", "12", "--seed", "1"]


def run(script, *args, input=None, timeout=600):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], input=input,
                            capture_output=True, text=True, timeout=timeout, env=cli_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cli_environment():
    import os
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)                        # one device, as a user's run
    return env


def synthetic_texts(n, seed):
    """Raw two-class texts with capitals, punctuation and repeats (fastai's rules all have work):
    class "pos" draws its words mostly from one half of a made-up vocabulary, "neg" from the other."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "be", "do", "gu", "pe"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(400)})
    half = len(words) // 2
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        own = words[:half] if label else words[half:]
        chosen = [str(rng.choice(own if rng.random() < 0.8 else words)) for _ in range(rng.integers(3, 30))]
        chosen[0] = chosen[0].capitalize()
        if rng.random() < 0.2:
            chosen.insert(1, chosen[1].upper())
        if rng.random() < 0.1:
            chosen.append("!!!!")
        rows.append({"text": " ".join(chosen) + rng.choice([" .", "?", " ,ok"]), "label": ["neg", "pos"][label]})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SentencePiece data prepared by prepare_data.py, a tiny classifier trained a few steps by
    train_classifier.py, and the test texts as raw strings."""
    folder = tmp_path_factory.mktemp("inference")
    raw = folder / "raw"
    raw.mkdir()
    splits = {"train": synthetic_texts(600, 0), "test": synthetic_texts(150, 1)}
    for name, rows in splits.items():
        (raw / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = folder / "data"
    run("prepare_data.py", "--input", raw, "--format", "jsonl", "--out", data, "--tokenizer", "sentencepiece",
        "--no-cache", "--no-progress", "--min-freq", "1")
    result = run("train_classifier.py", "--data", data, "--out", folder / "clas", *TINY, "--bs", "32",
                 "--epochs", "1", "--max-steps", "6", "--compilation-cache", "off")
    final = json.loads(result.stdout.strip().splitlines()[-1])
    return {"folder": folder, "data": data, "model": folder / "clas" / "last", "final": final,
            "texts": [row["text"] for row in splits["test"]]}


def test_a_sentencepiece_classifier_predicts_from_raw_text_what_its_evaluation_gives(trained):
    model_dir, data = trained["model"], load_prepared(trained["data"])
    texts, documents = trained["texts"], data.splits["test"].documents

    # the model directory carries the tokenizer of its data, SentencePiece model included
    assert json.loads((model_dir / "tokenizer.json").read_text())["kind"] == "sentencepiece"
    assert (model_dir / "spm.model").read_bytes() == (trained["data"] / "spm.model").read_bytes()

    classifier = ulmfit_jax.load_classifier(model_dir)
    encoded = classifier.encode(texts)
    assert len(encoded) == len(documents) and all(np.array_equal(a, b) for a, b in zip(encoded, documents))
    # ... which the default tokenizer would not have given: the test tells the tokenizers apart
    default = tokenize_corpus(texts, TokenizerSettings(), n_workers=0, use_cache=False, progress=False)
    assert sum(np.array_equal(a, b) for a, b in zip(default.numericalize(token_to_id(data.vocab)), documents)) \
        < len(documents) // 10

    labels, probabilities = classifier.predict(texts)
    own = ensemble.classifier_probabilities(checkpoint.load_model(model_dir), documents)   # scripts/evaluate.py's
    np.testing.assert_array_equal(probabilities, own)
    assert labels == [data.classes[i] for i in own.argmax(1)]
    accuracy = np.mean(np.array([data.classes.index(label) for label in labels]) == data.splits["test"].labels)
    assert abs(accuracy - trained["final"]["test_accuracy"]) < 1e-9          # what training reported on test

    # scripts/predict.py, the command-line contract: one JSON line a text with the label and the probabilities
    hamlet = run("predict.py", "--model", model_dir, input="Who wrote Hamlet ?\n")
    [line] = hamlet.stdout.splitlines()
    line = json.loads(line)
    assert line["text"] == "Who wrote Hamlet ?" and line["label"] in data.classes
    assert set(line["probabilities"]) == set(data.classes) and abs(sum(line["probabilities"].values()) - 1) < 1e-5
    assert "warning" not in hamlet.stderr
    lines = run("predict.py", "--model", model_dir, input="\n".join(texts) + "\n").stdout.splitlines()
    printed = [json.loads(line) for line in lines]
    assert [p["text"] for p in printed] == texts and [p["label"] for p in printed] == labels
    np.testing.assert_allclose([[p["probabilities"][c] for c in data.classes] for p in printed], probabilities,
                               atol=1e-6)


def test_forward_and_backward_directories_ensemble(trained):
    model_dir, data = trained["model"], load_prepared(trained["data"])
    pair = ulmfit_jax.load_classifier(model_dir, backward=model_dir, batch_size=16)
    loaded = checkpoint.load_model(model_dir)
    expected = ensemble.ensemble_probabilities(loaded, loaded, data.splits["test"].documents, 16)
    np.testing.assert_array_equal(pair.predict(trained["texts"]).probabilities, expected)
    assert not np.array_equal(expected, ensemble.classifier_probabilities(loaded, data.splits["test"].documents,
                                                                          batch_size=16))

    other = trained["folder"] / "fast_tokenized"
    checkpoint.save_model(other, loaded["config"], loaded["params"], loaded["vocab"], batch_stats=loaded["batch_stats"],
                          classes=loaded["classes"], tokenizer=TokenizerSettings())
    with pytest.raises(ValueError, match="tokenize text differently"):
        ulmfit_jax.load_classifier(model_dir, backward=other)


def test_load_language_model_perplexity_equals_evaluate_language_model(trained, tmp_path):
    data = load_prepared(trained["data"])
    config = awd_lstm_lm_config(len(data.vocab), emb_size=8, n_hidden=12, n_layers=2)
    params = jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(3), config))
    checkpoint.save_model(tmp_path / "lm", config, params, data.vocab, tokenizer=cli.data_tokenizer(trained["data"]))

    lm = ulmfit_jax.load_language_model(tmp_path / "lm")
    for backwards in (False, True):
        expected = evaluate_language_model(params, config, concatenate_documents(data.splits["test"].documents,
                                                                                 backwards=backwards),
                                           batch_size=3, bptt=7)
        result = lm.evaluate(trained["texts"], batch_size=3, bptt=7, backwards=backwards)
        assert result == expected
        assert lm.perplexity(trained["texts"], batch_size=3, bptt=7, backwards=backwards) == expected["perplexity"]

    out = lm.generate("Kalo mi", 5, sampling=Sampling(top_k=1))
    assert len(out.tokens) == 5 and out.tokens == [data.vocab[i] for i in out.ids]
    assert out.text.startswith("Kalo mi") and "\u2581" not in out.text
    assert lm.generate("Kalo mi", 5, sampling=Sampling(top_k=1)).tokens == out.tokens
    back = lm.generate("Kalo mi", 3, backwards=True, seed=2)
    assert back.text.endswith("Kalo mi") and len(back.tokens) == 3

    with pytest.raises(ValueError, match="holds a language model, not a classifier"):
        ulmfit_jax.load_classifier(tmp_path / "lm")
    with pytest.raises(ValueError, match="holds a classifier, not a language model"):
        ulmfit_jax.load_language_model(trained["model"])


def test_an_older_directory_warns_once_and_reads_text_with_the_default_tokenizer(tmp_path, capfd):
    texts = ["This is A GREAT film !", "Worst. Movie. Ever...", "so-so"]
    corpus = tokenize_corpus(texts, TokenizerSettings(), n_workers=0, use_cache=False, progress=False)
    specials = ["xxunk", "xxpad", "xxbos", "xxeos", "xxfld", "xxrep", "xxwrep", "xxup", "xxmaj"]
    vocab = specials + [token for token in corpus.tokens[:-2] if token not in specials]
    config = awd_lstm_clas_config(len(vocab), 2, emb_size=8, n_hidden=12, n_layers=2, bptt=5)
    params, batch_stats = jax.tree.map(np.asarray, models.init_classifier(jax.random.PRNGKey(0), config))
    checkpoint.save_model(tmp_path / "old", config, params, vocab, batch_stats=batch_stats)   # no tokenizer
    capfd.readouterr()

    classifier = ulmfit_jax.load_classifier(tmp_path / "old")
    warning = capfd.readouterr().err
    assert warning.count("\n") == 1 and "records no tokenizer" in warning and "default" in warning
    assert classifier.tokenizer == TokenizerSettings() and classifier.classes == ["0", "1"]
    expected = corpus.numericalize(token_to_id(vocab))
    assert any((document == 0).any() for document in expected)          # unknown tokens -> xxunk, as prepared
    assert all(np.array_equal(a, b) for a, b in zip(classifier.encode(texts), expected))
    labels, probabilities = classifier.predict(texts)
    np.testing.assert_array_equal(probabilities, ensemble.classifier_probabilities(
        checkpoint.load_model(tmp_path / "old"), expected))
    assert capfd.readouterr().err == ""                                  # loading warns, predicting does not


def test_bad_input_gets_a_clear_error(trained, tmp_path):
    classifier = ulmfit_jax.load_classifier(trained["model"])
    with pytest.raises(TypeError, match="not one string"):
        classifier.predict("Who wrote Hamlet ?")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        classifier.predict(["a", 3])
    empty = classifier.predict([])
    assert empty.labels == [] and empty.probabilities.shape == (0, 2)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        ulmfit_jax.load_classifier(tmp_path / "nothing")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        ulmfit_jax.load_classifier(trained["model"], batch_size=0)

    broken = tmp_path / "broken"
    loaded = checkpoint.load_model(trained["model"])
    checkpoint.save_model(broken, loaded["config"], loaded["params"], loaded["vocab"],
                          batch_stats=loaded["batch_stats"], classes=loaded["classes"], tokenizer=loaded["tokenizer"])
    (broken / "spm.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="SentencePiece model .* does not load"):
        ulmfit_jax.load_classifier(broken)
    (broken / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match="spm.model, which is missing"):
        ulmfit_jax.load_classifier(broken)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--model", str(broken)],
                            input="a\n", capture_output=True, text=True, timeout=300, env=cli_environment())
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "spm.model, which is missing" in result.stderr and "Traceback" not in result.stderr


def test_the_scripts_read_text_with_the_model_tokenizer(trained, tmp_path):
    model_dir, data = trained["model"], load_prepared(trained["data"])
    evaluated = json.loads(run("evaluate.py", "--model", model_dir, "--data", trained["data"]).stdout.splitlines()[-1])
    assert abs(evaluated["accuracy"] - trained["final"]["test_accuracy"]) < 1e-9

    # data of the same vocabulary but another tokenizer is refused, naming both
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in trained["texts"]))
    run("prepare_data.py", "--input", raw, "--format", "jsonl", "--out", tmp_path / "fast", "--vocab",
        model_dir / "vocab.json", "--classes", trained["data"] / "classes.json", "--no-cache", "--no-progress")
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(model_dir),
                              "--data", str(tmp_path / "fast")], capture_output=True, text=True, timeout=300,
                             env=cli_environment())
    assert refused.returncode != 0 and "was tokenized with fast" in refused.stderr and "sentencepiece" in refused.stderr

    # fastai weights in and out: the import records the SentencePiece tokenizer it is told
    run("convert_fastai.py", "export", "--model", model_dir, "--weights", tmp_path / "clas.pth",
        "--vocab", tmp_path / "itos.pkl")
    trained_config = checkpoint.load_model(model_dir)["config"]        # the window is not in the weights
    spm = ["--tokenizer", "sentencepiece", "--sentencepiece-model", trained["data"] / "spm.model"]
    imported = json.loads(run("convert_fastai.py", "import", "--weights", tmp_path / "clas.pth", "--vocab",
                              tmp_path / "itos.pkl", "--out", tmp_path / "imported", *spm, "--bptt",
                              trained_config.bptt, "--max-len", trained_config.max_len).stdout.splitlines()[-1])
    assert (imported["bptt"], imported["max_len"]) == (trained_config.bptt, trained_config.max_len)
    defaults = json.loads(run("convert_fastai.py", "import", "--weights", tmp_path / "clas.pth", "--vocab",
                              tmp_path / "itos.pkl", "--out", tmp_path / "fastai_window", *spm, "--max-len", 0)
                          .stdout.splitlines()[-1])
    assert (defaults["bptt"], defaults["max_len"]) == (72, None)          # fastai's window; 0: no max_len
    imported = ulmfit_jax.load_classifier(tmp_path / "imported")
    np.testing.assert_allclose(imported.predict(trained["texts"]).probabilities,
                               ulmfit_jax.load_classifier(model_dir).predict(trained["texts"]).probabilities, atol=1e-6)

    # evaluate_lm.py --text: raw text through the LM directory's tokenizer
    config = awd_lstm_lm_config(len(data.vocab), emb_size=8, n_hidden=12, n_layers=2)
    params = jax.tree.map(np.asarray, models.init_language_model(jax.random.PRNGKey(3), config))
    checkpoint.save_model(tmp_path / "lm", config, params, data.vocab, tokenizer=cli.data_tokenizer(trained["data"]))
    (tmp_path / "texts.txt").write_text("\n\n".join(trained["texts"]) + "\n")
    result = json.loads(run("evaluate_lm.py", "--model", tmp_path / "lm", "--text", tmp_path / "texts.txt", "--bs", 2,
                            "--bptt", 9).stdout.splitlines()[-1])
    expected = ulmfit_jax.load_language_model(tmp_path / "lm").evaluate(trained["texts"], batch_size=2, bptt=9)
    assert {k: result[k] for k in expected} == expected
