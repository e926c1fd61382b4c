"""Multi-process runs of the training scripts: 2 processes x 1 CPU device (`--distributed`, gloo) give
the final JSON of 1 process x 2 forced CPU devices; a 2-process run stopped partway and rerun (in
2 processes, or in 1) ends where the uninterrupted run does; SIGTERM stops both processes at one step.

TREC-6 and tiny models. Every process runs in its own process group, with its output in files, under
a timeout; the groups still running when a test ends are killed.
"""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from script_processes import Script, cpu_environment, processes  # noqa: F401  (processes: a fixture)
from ulmfit_jax.text.datasets import data_dir

ROOT = Path(__file__).resolve().parent.parent
TREC = data_dir() / "trec"
pytestmark = pytest.mark.skipif(not (TREC / "TREC_10.label").is_file(),
                                reason=f"TREC-6 not found under {TREC} (set ULMFIT_DATA_DIR)")
TINY = ["--emb-sz", "16", "--n-hid", "24", "--n-layers", "2", "--bptt", "20", "--seed", "1"]
TIMEOUT = 300
# the LM: 26 steps an epoch at --bs 128, so 35 steps cross an epoch boundary (a checkpoint, the carry reset)
LM = [*TINY, "--bs", "128", "--epochs", "2"]
LM_STEPS = 35
# the classifier from scratch: 19 steps an epoch at --bs 256
CLASSIFIER = [*TINY, "--bs", "256"]
CLASSIFIER_STEPS = 25
# what depends on the run's speed, not on what it trained
TIMING = ("seconds", "compile_seconds", "tokens_per_s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_distributed(start, folder: Path, name: str, script: str, args, n: int = 2) -> list[Script]:
    cluster = ["--distributed", "--coordinator-address", f"localhost:{free_port()}", "--num-processes", str(n)]
    return [start(folder, f"{name}.{i}", script, [*args, *cluster, "--process-id", str(i)], cpu_environment(1))
            for i in range(n)]


def wait_all(runs: list[Script], expected_status: int = 0, timeout: float = TIMEOUT) -> list[int]:
    """Wait for every process; as soon as one ends with another status or time is up, kill them all and
    fail with its stderr (the others would wait on it until some barrier times out)."""
    deadline = time.time() + timeout
    while any(run.running() for run in runs):
        failed = [run for run in runs if not run.running() and run.process.returncode != expected_status]
        if failed or time.time() > deadline:
            for run in runs:
                run.signal(signal.SIGKILL)
            culprit = failed[0] if failed else runs[0]
            pytest.fail(f"{culprit.stderr_path.name}: status {culprit.process.poll()} "
                        f"({'timed out' if not failed else 'failed'}):\n{culprit.stderr[-3000:]}")
        time.sleep(0.1)
    return [run.process.returncode for run in runs]


def finish_all(runs: list[Script]) -> list[dict]:
    statuses = wait_all(runs)
    assert statuses == [0] * len(runs), [run.stderr[-2000:] for run in runs]
    return [run.final() for run in runs]


def run_single(folder: Path, name: str, script: str, args, devices: int = 2) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=TIMEOUT, env=cpu_environment(devices))
    (folder / f"{name}.stderr").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMING}


def assert_same_result(got: dict, expected: dict) -> None:
    """Losses within 1e-5 relative, the same steps and test accuracy (the scripts' contract)."""
    assert (got["step"], got["epoch"]) == (expected["step"], expected["epoch"])
    compared = [k for k in expected if k.endswith(("_loss", "_perplexity"))]
    assert {"train_loss", "valid_loss"} <= set(compared)
    for key in compared:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    if "test_accuracy" in expected:
        assert got["test_accuracy"] == expected["test_accuracy"]
    assert got["valid_accuracy"] == pytest.approx(expected["valid_accuracy"], abs=1e-3)


def epoch_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


def json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The prepared data and a compilation cache every run of this module shares."""
    folder = tmp_path_factory.mktemp("distributed")
    run_single(folder, "prepare", "prepare_data.py",
               ["--input", TREC, "--format", "trec6", "--out", folder / "trec", "--no-progress"])
    return {"folder": folder, "data": folder / "trec", "cache": folder / "xla_cache"}


@pytest.fixture(scope="module")
def lm_reference(shared):
    """1 process x 2 devices, uninterrupted: -> (final JSON, out folder)."""
    out = shared["folder"] / "lm_reference"
    result = run_single(shared["folder"], "lm_reference", "pretrain_lm.py",
                        ["--data", shared["data"], "--out", out, *LM, "--max-steps", LM_STEPS,
                         "--compilation-cache", shared["cache"]])
    assert result["step"] == LM_STEPS and epoch_steps(out) == [26, LM_STEPS]
    return result, out


@pytest.fixture(scope="module")
def classifier_reference(shared):
    out = shared["folder"] / "classifier_reference"
    result = run_single(shared["folder"], "classifier_reference", "train_classifier.py",
                        ["--data", shared["data"], "--out", out, *CLASSIFIER, "--max-steps", CLASSIFIER_STEPS,
                         "--compilation-cache", shared["cache"]])
    assert result["step"] == CLASSIFIER_STEPS and epoch_steps(out) == [19, CLASSIFIER_STEPS]
    return result, out


def test_train_classifier_two_processes_equal_one_process(tmp_path, shared, classifier_reference, processes):
    expected, reference_out = classifier_reference
    out = tmp_path / "classifier"
    runs = start_distributed(processes, tmp_path, "classifier", "train_classifier.py",
                             ["--data", shared["data"], "--out", out, *CLASSIFIER, "--max-steps", CLASSIFIER_STEPS,
                              "--compilation-cache", shared["cache"]])
    results = finish_all(runs)
    assert without_timing(results[0]) == without_timing(results[1])   # every process prints the final JSON
    for result in results:
        assert_same_result(result, expected)
    # process 0 alone writes the run folder and prints records and progress
    assert epoch_steps(out) == [19, CLASSIFIER_STEPS]
    assert len(json_lines(runs[1].stdout)) == 1 and len(json_lines(runs[0].stdout)) == 3
    assert runs[0].progress(CLASSIFIER_STEPS) > 0 and runs[1].progress(CLASSIFIER_STEPS) == 0
    with np.load(out / "last" / "params.npz") as got, np.load(reference_out / "last" / "params.npz") as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_pretrain_lm_two_processes_stopped_and_resumed_equal_one_process(tmp_path, shared, lm_reference,
                                                                         processes):
    expected, _ = lm_reference
    out = tmp_path / "lm"
    args = ["--data", shared["data"], "--out", out, *LM, "--compilation-cache", shared["cache"]]
    # stopped mid-epoch (a checkpoint at step 10: the LM's hidden state, sharded across the processes)
    first = start_distributed(processes, tmp_path, "first", "pretrain_lm.py", [*args, "--max-steps", 10,
                                                                               "--log-every", 3])
    stopped = finish_all(first)
    assert [r["step"] for r in stopped] == [10, 10]
    assert without_timing(stopped[0]) == without_timing(stopped[1])
    assert epoch_steps(out) == [10] and (out / "checkpoints" / "10").is_dir()
    assert len(json_lines(first[1].stdout)) == 1 and first[1].progress(10) == 0

    # a copy resumed in 1 process x 2 devices: the distributed flags may change between reruns
    shutil.copytree(out, tmp_path / "lm_single")
    single = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_lm.py"), "--data", str(shared["data"]),
                             "--out", str(tmp_path / "lm_single"), *LM, "--compilation-cache", str(shared["cache"]),
                             "--max-steps", str(LM_STEPS)], capture_output=True, text=True, timeout=TIMEOUT,
                            env=cpu_environment(2))
    assert single.returncode == 0, single.stderr[-3000:]
    assert '"resumed_from_step": 10' in single.stdout
    assert_same_result(json.loads(single.stdout.strip().splitlines()[-1]), expected)

    # resumed in 2 processes, through the epoch boundary to the end
    second = start_distributed(processes, tmp_path, "second", "pretrain_lm.py", [*args, "--max-steps", LM_STEPS])
    resumed = finish_all(second)
    assert '"resumed_from_step": 10' in second[0].stdout
    assert "resumed_from_step" not in second[1].stdout
    for result in resumed:
        assert_same_result(result, expected)
    assert epoch_steps(out) == [10, 26, LM_STEPS]


def test_sigterm_stops_both_processes_at_the_same_step_and_a_rerun_finishes(tmp_path, shared, lm_reference,
                                                                            processes):
    expected, _ = lm_reference
    out = tmp_path / "lm"
    args = ["--data", shared["data"], "--out", out, *LM, "--max-steps", LM_STEPS, "--log-every", 1,
            "--compilation-cache", shared["cache"]]
    runs = start_distributed(processes, tmp_path, "terminated", "pretrain_lm.py", args)
    deadline = time.time() + TIMEOUT
    while runs[0].progress(LM_STEPS) < 3 and all(run.running() for run in runs) and time.time() < deadline:
        time.sleep(0.05)                           # both processes are past compiling and training
    assert all(run.running() for run in runs) and runs[0].progress(LM_STEPS) >= 3, runs[0].stderr[-2000:]
    for run in runs:                               # as a cluster preempting the job does: every host
        run.signal(signal.SIGTERM)
    statuses = wait_all(runs, expected_status=128 + signal.SIGTERM)
    assert statuses == [128 + signal.SIGTERM] * 2, [run.stdout[-1000:] for run in runs]
    lines = [run.final() for run in runs]
    assert all(line["interrupted"] for line in lines)
    step = lines[0]["step"]
    assert lines[1]["step"] == step and 3 <= step < LM_STEPS
    assert (out / "checkpoints" / str(step)).is_dir()

    rerun = start_distributed(processes, tmp_path, "rerun", "pretrain_lm.py", args)
    results = finish_all(rerun)
    assert f'"resumed_from_step": {step}' in rerun[0].stdout
    for result in results:
        assert_same_result(result, expected)
