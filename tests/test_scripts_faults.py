"""Fault injection on train_classifier.py with gradual unfreezing (stages of 1, 1, 1, 1 epochs of 9 steps):
SIGKILL at several points, during a checkpoint's write, an unreadable newest checkpoint, a stop
mid-epoch; each time the rerun of the same command must end where the uninterrupted run does (on
CPU bit for bit). And `--no-resume` and the refusal of changed settings.

TREC-6, a tiny encoder (pretrain_lm.py and finetune_lm.py, a few steps each), one CPU device. Every
process runs in its own process group, with its output in files, under a timeout; the groups still
running when a test ends are killed.
"""

import json
import os
import signal
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
STEPS_PER_EPOCH = 9           # 4907 training questions // --bs 512
TOTAL_STEPS = 4 * STEPS_PER_EPOCH
# the final JSON's keys that say what was trained (not how fast)
RESULT_KEYS = ("epoch", "step", "train_loss", "valid_loss", "valid_accuracy", "valid_macro_f1", "test_loss",
               "test_accuracy", "test_macro_f1")


def run(folder: Path, name: str, script: str, args) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=TIMEOUT, env=cpu_environment())
    (folder / f"{name}.stdout").write_text(result.stdout)
    (folder / f"{name}.stderr").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def saved_steps(out: Path) -> list[int]:
    """The committed checkpoints (orbax writes `<step>.orbax-checkpoint-tmp...` and renames it when done)."""
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def epoch_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r]


def wait_for(script: Script, condition, what: str, poll: float = 0.005) -> None:
    """Poll until `condition()`; fail when the script ends first or time runs out."""
    deadline = time.time() + TIMEOUT
    while not condition():
        if not script.running():
            pytest.fail(f"{script.stdout_path.stem} ended (status {script.process.returncode}) before {what}:\n"
                        + script.stderr[-2000:])
        if time.time() > deadline:
            pytest.fail(f"{script.stdout_path.stem}: no {what} in {TIMEOUT} s")
        time.sleep(poll)


def assert_same_result(got: dict, expected: dict) -> None:
    assert {k: got.get(k) for k in RESULT_KEYS} == {k: expected[k] for k in RESULT_KEYS}


def assert_same_arrays(got_file: Path, want_file: Path) -> None:
    with np.load(got_file) as got, np.load(want_file) as want:
        assert sorted(got.files) == sorted(want.files)
        different = [k for k in want.files if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])]
        assert not different, f"{got_file} differs from {want_file} in {different}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Prepared TREC-6, a tiny fine-tuned encoder, a compilation cache, and the uninterrupted run of
    `command(out)`: {"command", "expected" (its final JSON), "reference" (its out folder), "folder"}."""
    folder = tmp_path_factory.mktemp("faults")
    data, cache = folder / "trec", folder / "xla_cache"
    run(folder, "prepare", "prepare_data.py", ["--input", TREC, "--format", "trec6", "--out", data, "--no-progress"])
    common = [*TINY, "--bs", "32", "--compilation-cache", cache]
    run(folder, "pretrain", "pretrain_lm.py", ["--data", data, "--out", folder / "lm", *common, "--max-steps", 10])
    finetuned = run(folder, "finetune", "finetune_lm.py", ["--data", data, "--pretrained", folder / "lm" / "best",
                                                           "--out", folder / "ft", *common, "--epochs", 1,
                                                           "--max-steps", 10])

    def command(out: Path, *extra) -> list:
        return ["--data", data, "--encoder", finetuned["encoder"], "--out", out, *TINY, "--bs", 512, "--epochs", 1,
                "--log-every", 1, "--compilation-cache", cache, *extra]

    reference = folder / "reference"
    expected = run(folder, "reference", "train_classifier.py", command(reference))
    records = epoch_records(reference)
    assert [r["step"] for r in records] == [9, 18, 27, 36], records
    assert [r["trainable"] for r in records] == [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    assert expected["step"] == TOTAL_STEPS and "resumed_from_step" not in (folder / "reference.stdout").read_text()
    return {"command": command, "expected": expected, "reference": reference, "folder": folder}


def test_sigkill_at_three_points_then_the_rerun_equals_the_uninterrupted_run(tmp_path, shared, processes):
    out = tmp_path / "killed"
    command = shared["command"](out)
    kill_points = [
        # stage 1's last epoch: its record is written, then its checkpoint (the kill may land before or after)
        ("stage 1's epoch record", lambda script: len(epoch_records(out)) >= 1),
        ("stage 2's first steps", lambda script: script.progress(TOTAL_STEPS) >= STEPS_PER_EPOCH + 1),
        ("the middle of stage 2", lambda script: script.progress(TOTAL_STEPS) >= STEPS_PER_EPOCH + 4),
    ]
    for attempt, (what, condition) in enumerate(kill_points):
        newest = max(saved_steps(out), default=None)
        script = processes(tmp_path, f"attempt{attempt}", "train_classifier.py", command)
        wait_for(script, lambda: condition(script), what)
        script.kill()
        assert script.wait() == -signal.SIGKILL
        assert script.resumed_from() == newest, script.stdout     # the newest committed checkpoint, or none
        if attempt:
            # killed inside stage 2, after its first step: stage 1's checkpoint is the newest
            assert saved_steps(out)[-1] == STEPS_PER_EPOCH, (what, saved_steps(out))

    final = processes(tmp_path, "final", "train_classifier.py", command)
    assert final.wait() == 0, final.stderr[-3000:]
    assert final.resumed_from() == STEPS_PER_EPOCH
    assert_same_result(final.final(), shared["expected"])
    assert_same_arrays(out / "last" / "params.npz", shared["reference"] / "last" / "params.npz")
    assert saved_steps(out) == [27, 36]


def test_sigkill_while_a_checkpoint_is_written(tmp_path, shared, processes):
    """Killed while orbax writes stage 2's checkpoint (step 18) into its temporary folder: the rerun
    resumes from stage 1's (step 9) and ends as the uninterrupted run."""
    for attempt in range(3):                  # the write takes some 0.1 s; the poll is every 2 ms
        out = tmp_path / f"attempt{attempt}"
        folder = out / "checkpoints"
        writing = lambda: [p.name for p in folder.iterdir() if p.name.startswith("18.") and "tmp" in p.name] \
            if folder.is_dir() else []
        script = processes(tmp_path, f"attempt{attempt}", "train_classifier.py", shared["command"](out))
        wait_for(script, writing, "a temporary checkpoint folder for step 18", poll=0.002)
        script.kill()
        assert script.wait() == -signal.SIGKILL
        if writing() and saved_steps(out) == [STEPS_PER_EPOCH]:
            break                              # killed mid-write: the partial step 18 is still there
    else:
        pytest.fail("the checkpoint of step 18 was committed before every kill landed")

    rerun = processes(tmp_path, "rerun", "train_classifier.py", shared["command"](out))
    assert rerun.wait() == 0, rerun.stderr[-3000:]
    assert rerun.resumed_from() == STEPS_PER_EPOCH
    assert_same_result(rerun.final(), shared["expected"])
    assert_same_arrays(out / "last" / "params.npz", shared["reference"] / "last" / "params.npz")
    assert saved_steps(out) == [27, 36] and not [p for p in folder.iterdir() if "tmp" in p.name]


@pytest.fixture(scope="module")
def unreadable_newest(shared):
    """A run stopped after stage 2 (checkpoints 9 and 18), then step 18's array data overwritten with
    garbage (a corrupt committed checkpoint), then the same command rerun to the end."""
    out = shared["folder"] / "unreadable"
    run(shared["folder"], "unreadable_first", "train_classifier.py", shared["command"](out, "--max-steps", 18))
    assert saved_steps(out) == [9, 18]
    data_files = [p for p in (out / "checkpoints" / "18").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        path.write_bytes(os.urandom(64))
    rerun = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_classifier.py"),
                            *map(str, shared["command"](out))], capture_output=True, text=True, timeout=TIMEOUT,
                           env=cpu_environment())
    return out, rerun


def test_an_unreadable_newest_checkpoint_is_skipped_for_the_one_before(unreadable_newest):
    _, rerun = unreadable_newest
    assert "checkpoint step 18" in rerun.stdout and "unreadable" in rerun.stdout
    assert '"resumed_from_step": 9' in rerun.stdout


def test_after_an_unreadable_newest_checkpoint_the_rerun_finishes_equal(shared, unreadable_newest):
    out, rerun = unreadable_newest
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_result(json.loads(rerun.stdout.strip().splitlines()[-1]), shared["expected"])
    assert_same_arrays(out / "last" / "params.npz", shared["reference"] / "last" / "params.npz")


@pytest.fixture(scope="module")
def stopped_mid_epoch(shared):
    """Stopped with --max-steps in the middle of the last stage's epoch (a checkpoint at step 31, after
    the best epoch by validation accuracy), rerun to the end."""
    out = shared["folder"] / "stopped_mid_epoch"
    stopped = run(shared["folder"], "stopped_first", "train_classifier.py",
                  shared["command"](out, "--max-steps", 31))
    assert stopped["step"] == 31 and saved_steps(out) == [27, 31]
    resumed = run(shared["folder"], "stopped_rerun", "train_classifier.py", shared["command"](out))
    assert '"resumed_from_step": 31' in (shared["folder"] / "stopped_rerun.stdout").read_text()
    return out, resumed


def test_stopped_mid_epoch_the_rerun_trains_as_the_uninterrupted_run(shared, stopped_mid_epoch):
    out, resumed = stopped_mid_epoch
    assert_same_arrays(out / "last" / "params.npz", shared["reference"] / "last" / "params.npz")
    keys = [k for k in RESULT_KEYS if k != "train_loss"]         # train_loss: the next test
    assert {k: resumed[k] for k in keys} == {k: shared["expected"][k] for k in keys}


def test_stopped_mid_epoch_the_rerun_reports_the_epochs_train_loss(shared, stopped_mid_epoch):
    _, resumed = stopped_mid_epoch
    assert resumed["train_loss"] == shared["expected"]["train_loss"]


def test_stopped_mid_epoch_the_best_model_is_the_uninterrupted_runs(shared, stopped_mid_epoch):
    out, _ = stopped_mid_epoch
    accuracies = [r["valid_accuracy"] for r in epoch_records(shared["reference"])]
    best_epoch = accuracies.index(max(accuracies))        # the first of the best: out/best keeps it
    if best_epoch == len(accuracies) - 1:
        pytest.skip("the last epoch is the best: out/best is out/last whether or not the run was resumed")
    assert_same_arrays(out / "best" / "params.npz", shared["reference"] / "best" / "params.npz")


def test_no_resume_moves_the_earlier_run_aside_and_changed_settings_are_refused(tmp_path, shared):
    out = tmp_path / "run"
    command = shared["command"]
    run(tmp_path, "first", "train_classifier.py", command(out, "--max-steps", 9))
    assert saved_steps(out) == [9]
    before = (out / "metrics.jsonl").read_text()

    # another learning rate: refused before anything is trained or written, the flag named
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_classifier.py"),
                              *map(str, command(out, "--lr", "0.03"))], capture_output=True, text=True,
                             timeout=TIMEOUT, env=cpu_environment())
    assert refused.returncode != 0
    assert "--lr: saved 0.02, now 0.03" in refused.stderr, refused.stderr[-2000:]
    assert saved_steps(out) == [9] and (out / "metrics.jsonl").read_text() == before
    assert not (out / "previous").exists()

    # --no-resume: the earlier run moves to out/previous/1 whole, the new one starts at step 0
    fresh = run(tmp_path, "fresh", "train_classifier.py", command(out, "--no-resume"))
    assert "resumed_from_step" not in (tmp_path / "fresh.stdout").read_text()
    assert "previous/1" in (tmp_path / "fresh.stderr").read_text()
    assert_same_result(fresh, shared["expected"])
    assert_same_arrays(out / "last" / "params.npz", shared["reference"] / "last" / "params.npz")
    previous = out / "previous" / "1"
    assert sorted(int(p.name) for p in (previous / "checkpoints").iterdir() if p.name.isdigit()) == [9]
    assert (previous / "metrics.jsonl").read_text() == before
    assert json.loads((previous / "run.json").read_text()) == json.loads((out / "run.json").read_text())
    assert (previous / "last" / "params.npz").is_file() and (previous / "best" / "params.npz").is_file()
    assert [r["step"] for r in epoch_records(out)] == [9, 18, 27, 36]

    # --no-resume lets the settings change: the finished run moves to out/previous/2
    changed = run(tmp_path, "changed", "train_classifier.py", command(out, "--no-resume", "--lr", "0.03",
                                                                      "--max-steps", 2))
    assert changed["step"] == 2 and "resumed_from_step" not in (tmp_path / "changed.stdout").read_text()
    assert saved_steps(out) == [2] and saved_steps(out / "previous" / "2") == [27, 36]
    assert json.loads((out / "run.json").read_text())["lr"] == 0.03
