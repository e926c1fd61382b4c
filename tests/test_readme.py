"""The README's examples run as written: every ```python block is executed, the inference block
against tiny model directories at the paths it names, and every script command line is parsed by
that script's own parser (the scripts themselves run end to end in tests/test_scripts_*.py)."""

import argparse
import contextlib
import io
import re
import runpy
import shlex
from pathlib import Path

import jax
import numpy as np
import pytest

from ulmfit_jax import checkpoint, models
from ulmfit_jax.config import awd_lstm_clas_config, awd_lstm_lm_config
from ulmfit_jax.text.rules import SPECIAL_TOKENS
from ulmfit_jax.text.tokenizers import TokenizerSettings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
COMMANDS = [line.split("python ", 1)[1] for shell in re.findall(r"```\n(.*?)```", README.read_text(), re.S)
            for line in shell.splitlines() if "python scripts/" in line]


def run_block(code, name):
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace, printed.getvalue()


def block(marker):
    chosen = [code for code in BLOCKS if marker in code]
    assert len(chosen) == 1, f"one README python block with {marker!r}, found {len(chosen)}"
    return chosen[0]


def test_every_python_block_is_run_by_a_test():
    markers = ["load_classifier(", "language_model_apply(", "make_train_step("]
    assert len(BLOCKS) == len(markers) and all(any(m in code for m in markers) for code in BLOCKS)


class Parsed(Exception):
    """Raised in place of running a script once its parser has accepted the command line."""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_script_command_parses(command, monkeypatch):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(parse_args(parser, args, namespace))

    script, *argv = shlex.split(command)
    main = runpy.run_path(str(ROOT / script))["main"]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):                 # a flag the script lacks exits with status 2 instead
        main(argv)


def test_the_inference_example(tmp_path, monkeypatch):
    vocab = list(SPECIAL_TOKENS) + "who wrote hamlet ? how far is mars what the capital of france".split()
    classes = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    clas = awd_lstm_clas_config(len(vocab), len(classes), emb_size=8, n_hidden=12, n_layers=2, bptt=10)
    params, stats = models.init_classifier(jax.random.PRNGKey(0), clas)
    checkpoint.save_model(tmp_path / "runs/trec_clas/best", clas, params, vocab, batch_stats=stats,
                          classes=classes, tokenizer=TokenizerSettings())
    lm = awd_lstm_lm_config(len(vocab), emb_size=8, n_hidden=12, n_layers=2)
    checkpoint.save_model(tmp_path / "runs/trec_lm/best", lm, models.init_language_model(jax.random.PRNGKey(1), lm),
                          vocab, tokenizer=TokenizerSettings())
    monkeypatch.chdir(tmp_path)
    namespace, printed = run_block(block("load_classifier("), "inference")
    assert len(namespace["labels"]) == 2 and set(namespace["labels"]) <= set(classes)
    np.testing.assert_allclose(np.asarray(namespace["probabilities"]).sum(1), 1, rtol=1e-5)
    assert printed.startswith(str(namespace["labels"]))


def test_the_functions_example():
    namespace, _ = run_block(block("language_model_apply("), "using the functions")
    assert namespace["logits"].shape == (8, 70, 1_000) and np.isfinite(namespace["logits"]).all()
    emb = namespace["config"].encoder.emb_size
    assert namespace["raw"].shape == namespace["dropped"].shape == (8, 70, emb)
    assert jax.tree.structure(namespace["state"]) == jax.tree.structure(
        namespace["encoder"].initial_state(namespace["config"].encoder, batch_size=8))


def test_the_custom_training_loop_trains_a_classifier():
    """Two stages of 6 epochs: 0.91-0.99 training accuracy over seeds 0-5 (3 epochs each gave
    0.47-0.70 on most seeds: the example did not train, whatever its seed 0 showed)."""
    namespace, printed = run_block(block("make_train_step("), "custom loop")
    assert printed.startswith("loss ")
    accuracy = (namespace["probabilities"].argmax(1) == namespace["labels"]).mean()
    assert accuracy > 0.9 and float(namespace["metrics"]["loss"]) < 0.5
    assert int(namespace["state"].step) == 2 * 6 * 8
