"""The three stages end to end through the scripts, on real data (TREC-6), tiny and short."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ulmfit_jax.text.datasets import data_dir, load_prepared

ROOT = Path(__file__).resolve().parent.parent
TREC = data_dir() / "trec"
pytestmark = pytest.mark.skipif(not (TREC / "TREC_10.label").is_file(),
                                reason=f"TREC-6 not found under {TREC} (set ULMFIT_DATA_DIR)")
TINY = ["--emb-sz", "16", "--n-hid", "24", "--n-layers", "2", "--bptt", "20", "--seed", "1"]


def run(script, *args, timeout=600):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    # strict JSON: a NaN or Infinity in the last line fails
    return json.loads(result.stdout.strip().splitlines()[-1], parse_constant=lambda name: pytest.fail(name))


def run_failing(script, *args, timeout=300):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


def test_three_stages_evaluate_and_predict(tmp_path):
    data = tmp_path / "trec"
    prepared = run("prepare_data.py", "--input", TREC, "--format", "trec6", "--out", data, "--no-progress")
    assert prepared["docs"] == 5952
    lm = run("pretrain_lm.py", "--data", data, "--out", tmp_path / "lm", *TINY, "--bs", "32", "--max-steps", "25")
    assert lm["step"] == 25 and lm["tokens_per_s"] > 0 and lm["compile_seconds"] > 0
    # the same command again: nothing left to train; it reports the finished run
    rerun = run("pretrain_lm.py", "--data", data, "--out", tmp_path / "lm", *TINY, "--bs", "32", "--max-steps", "25")
    assert rerun["step"] == 25 and rerun["valid_loss"] == lm["valid_loss"] and rerun["tokens_per_s"] is None
    finetuned = run("finetune_lm.py", "--data", data, "--pretrained", tmp_path / "lm" / "best", "--out",
                    tmp_path / "ft", *TINY, "--bs", "32", "--epochs", "1", "--max-steps", "30")
    assert Path(finetuned["encoder"], "params.npz").is_file()
    # the paper's "supervised" low-shot LM: the text of only the labelled reviews the classifier trains on
    labelled = run("finetune_lm.py", "--data", data, "--pretrained", tmp_path / "lm" / "best", "--out",
                   tmp_path / "ft_labelled", *TINY, "--bs", "8", "--labelled-docs", "60", "--max-steps", "1")
    assert labelled["documents"] == 60 and finetuned["documents"] == 5452
    refused = run_failing("finetune_lm.py", "--data", data, "--pretrained", tmp_path / "lm" / "best", "--out",
                          tmp_path / "ft_refused", *TINY, "--labelled-docs", "60", "--max-docs", "100")
    assert "--labelled-docs chooses the documents; it does not go with --max-docs" in refused
    # the tiny model learns only with light dropout (fastai's classifier dropouts make it predict one
    # class): 0.52-0.57 test accuracy over seeds 1-3 with --drop-mult 0.1, 0.19-0.35 without
    clas_flags = [*TINY, "--bs", "64", "--epochs", "1", "--drop-mult", "0.1"]
    classifier = run("train_classifier.py", "--data", data, "--encoder", finetuned["encoder"], "--out",
                     tmp_path / "clas", *clas_flags)
    test_labels = np.asarray(load_prepared(data).splits["test"].labels)
    majority = np.bincount(test_labels).max() / len(test_labels)           # DESC: 138 of 500
    # gradual unfreezing: 4 one-epoch stages of 76 full batches of 64 (4,907 training questions)
    assert classifier["step"] == 4 * 76 and classifier["test_accuracy"] > majority + 0.15
    records = [json.loads(line) for line in (tmp_path / "clas" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trainable"] for r in records if "epoch" in r][:2] == [[3], [2, 3]]
    assert (tmp_path / "clas" / "classifier_metrics.png").is_file()

    rerun = run("train_classifier.py", "--data", data, "--encoder", finetuned["encoder"], "--out",
                tmp_path / "clas", *clas_flags)
    assert {k: rerun[k] for k in ("step", "valid_loss", "test_accuracy")} == {
        k: classifier[k] for k in ("step", "valid_loss", "test_accuracy")}

    evaluated = run("evaluate.py", "--model", tmp_path / "clas" / "last", "--data", data, "--split", "test")
    assert evaluated["documents"] == 500 and abs(evaluated["accuracy"] - classifier["test_accuracy"]) < 1e-9
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--model",
                             str(tmp_path / "clas" / "last")], input="Who wrote Hamlet ?\n\nHow far is Mars ?\n",
                            capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["Who wrote Hamlet ?", "How far is Mars ?"]
    assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-4 for line in lines)

    # data numericalized with another vocabulary is refused, before anything is trained or written
    other = tmp_path / "trec_min_freq_5"
    run("prepare_data.py", "--input", TREC, "--format", "trec6", "--out", other, "--min-freq", "5", "--no-progress")
    refused = run_failing("train_classifier.py", "--data", other, "--encoder", finetuned["encoder"], "--out",
                          tmp_path / "refused", *TINY, "--max-steps", "1")
    assert "the encoder's vocabulary" in refused and "is not the data's" in refused
    assert not (tmp_path / "refused" / "last").exists()
    # the corrected command (the right data) runs in the same folder: the refused run trained nothing to guard
    fixed = run("train_classifier.py", "--data", data, "--encoder", finetuned["encoder"], "--out",
                tmp_path / "refused", *TINY, "--max-steps", "1", "--test-docs", "48")
    assert fixed["step"] == 1 and fixed["test_documents"] == 48 and classifier["test_documents"] == 500
    # an encoder fixes the architecture: flags that contradict it are refused, not ignored
    refused = run_failing("train_classifier.py", "--data", data, "--encoder", finetuned["encoder"], "--out",
                          tmp_path / "refused_arch", *TINY, "--n-hid", "32", "--arch", "qrnn", "--max-steps", "1")
    assert "--n-hid 32 (the encoder's: 24)" in refused and "--arch qrnn (the encoder's: lstm)" in refused
    assert not (tmp_path / "refused_arch" / "last").exists()
    refused = run_failing("train_classifier.py", "--data", data, "--encoder", finetuned["encoder"], "--out",
                          tmp_path / "refused_docs", *TINY, "--train-docs", "5")
    assert "--train-docs 5: a balanced choice needs at least one of each of the 6 classes" in refused
    refused = run_failing("evaluate.py", "--model", tmp_path / "clas" / "last", "--data", other, "--split", "test")
    assert "the model's vocabulary is not the data's" in refused


def test_sigterm_saves_a_checkpoint_and_a_rerun_resumes(tmp_path):
    data = tmp_path / "trec"
    run("prepare_data.py", "--input", TREC, "--format", "trec6", "--out", data, "--no-progress")
    command = [sys.executable, str(ROOT / "scripts" / "pretrain_lm.py"), "--data", str(data), "--out",
               str(tmp_path / "lm"), *TINY, "--bs", "8", "--epochs", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "lm" / "checkpoints"
    deadline = time.time() + 300
    while not (tmp_path / "lm" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)                                  # the first epoch is done: compiled and stepping
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    interrupted = json.loads(stdout.strip().splitlines()[-1])
    assert interrupted["interrupted"] and any(checkpoints.iterdir())
    resumed = subprocess.run(command + ["--max-steps", str(interrupted["step"] + 5)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'"resumed_from_step": {interrupted["step"]}' in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == interrupted["step"] + 5
