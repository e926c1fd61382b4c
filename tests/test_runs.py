"""The run folder's recorded settings (a rerun resumes only with the same ones) and --no-resume's
moving aside of an old run, which must never lose any of it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ulmfit_jax import runs

SETTINGS = {"lr": 0.01, "n_layers": 3, "data_dir": "data/imdb", "hidden_sizes": [50], "bidirectional": False}


def trained(out: Path) -> Path:
    """Mark a run folder as holding a run that trained (its metrics), which its settings guard."""
    (out / runs.METRICS_FILE).write_text('{"epoch": 0}\n')
    return out


def test_first_run_writes_the_settings(tmp_path):
    out = tmp_path / "run"  # not there yet: created
    runs.check_or_save_settings(out, {**SETTINGS, "data_dir": Path("data/imdb"), "hidden_sizes": (50,)})
    assert json.loads((out / "run.json").read_text()) == SETTINGS
    assert [p.name for p in out.iterdir()] == ["run.json"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "run.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not owner-only


def test_equal_settings_pass_and_leave_the_file_alone(tmp_path):
    runs.check_or_save_settings(tmp_path, SETTINGS)
    before = (tmp_path / "run.json").read_bytes()
    # another key order, a tuple for the list, a Path for the string, a numpy scalar for the int
    rerun = {"bidirectional": False, "hidden_sizes": (50,), "data_dir": Path("data/imdb"), "n_layers": np.int64(3),
             "lr": 0.01}
    runs.check_or_save_settings(tmp_path, rerun)
    runs.check_or_save_settings(tmp_path, rerun, write=False)
    assert (tmp_path / "run.json").read_bytes() == before


def test_a_mismatch_names_every_differing_flag(tmp_path):
    runs.check_or_save_settings(trained(tmp_path), {**SETTINGS, "max_len": 1440})
    before = (tmp_path / "run.json").read_bytes()
    now = {**SETTINGS, "lr": 0.02, "n_layers": 4, "data_dir": "data/trec", "drop_mult": 0.5}
    del now["bidirectional"]
    now["max_len"] = 1440
    with pytest.raises(runs.SettingsMismatch) as caught:
        runs.check_or_save_settings(tmp_path, now)
    message = str(caught.value)
    assert "--lr: saved 0.01, now 0.02" in message
    assert "--n-layers: saved 3, now 4" in message
    assert '--data-dir: saved "data/imdb", now "data/trec"' in message
    assert "--drop-mult: saved (not set), now 0.5" in message  # only in the new settings
    assert "--bidirectional: saved false, now (not set)" in message  # only in the saved ones
    assert "max-len" not in message and "hidden-sizes" not in message  # equal ones are not listed
    assert "--no-resume" in message
    assert set(caught.value.differences) == {"lr", "n_layers", "data_dir", "drop_mult", "bidirectional"}
    assert isinstance(caught.value, ValueError)
    assert (tmp_path / "run.json").read_bytes() == before  # the saved settings stay as they were


def test_values_of_another_type_differ(tmp_path):
    runs.check_or_save_settings(trained(tmp_path), {"seed": 1})
    with pytest.raises(runs.SettingsMismatch, match="--seed: saved 1, now true"):
        runs.check_or_save_settings(tmp_path, {"seed": True})


def test_write_false_never_writes_but_still_compares(tmp_path):
    runs.check_or_save_settings(tmp_path / "run", SETTINGS, write=False)
    assert not (tmp_path / "run").exists()
    runs.check_or_save_settings(trained(tmp_path), SETTINGS)  # process 0 writes ...
    with pytest.raises(runs.SettingsMismatch, match="--lr: saved 0.01, now 0.1"):  # ... the others compare
        runs.check_or_save_settings(tmp_path, {**SETTINGS, "lr": 0.1}, write=False)


def test_an_unreadable_settings_file_is_an_error_that_points_at_no_resume(tmp_path):
    trained(tmp_path)
    (tmp_path / "run.json").write_text('{"lr": 0.0')
    with pytest.raises(ValueError, match="run.json is not valid JSON.*--no-resume"):
        runs.check_or_save_settings(tmp_path, SETTINGS)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--no-resume"):
        runs.check_or_save_settings(tmp_path, SETTINGS)


@pytest.mark.parametrize("what", ["nothing", "an empty checkpoints folder"])
def test_settings_beside_nothing_trained_are_replaced(tmp_path, what):
    """A run stopped before it trained (refused for its data, say) guards nothing: the corrected
    command runs and records its own settings; once a checkpoint is there, they are guarded."""
    if what != "nothing":
        (tmp_path / "checkpoints").mkdir()
    runs.check_or_save_settings(tmp_path, {**SETTINGS, "data_dir": "data/imbd"})
    runs.check_or_save_settings(tmp_path, SETTINGS, write=False)          # the other processes: no refusal
    runs.check_or_save_settings(tmp_path, SETTINGS)
    assert json.loads((tmp_path / "run.json").read_text()) == SETTINGS
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "checkpoints" / "100").mkdir()
    with pytest.raises(runs.SettingsMismatch, match='--data-dir: saved "data/imdb", now "data/imbd"'):
        runs.check_or_save_settings(tmp_path, {**SETTINGS, "data_dir": "data/imbd"})


def test_a_setting_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(TypeError, match="JSON-able"):
        runs.check_or_save_settings(tmp_path, {"model": object()})
    assert not (tmp_path / "run.json").exists()


def make_run(out: Path, tag: str):
    """A run folder as a training script leaves it."""
    (out / "checkpoints" / "7").mkdir(parents=True)
    (out / "checkpoints" / "7" / "state").write_text(f"state {tag}")
    (out / "run.json").write_text(json.dumps({"tag": tag}))
    (out / "metrics.jsonl").write_text(f'{{"tag": "{tag}"}}\n')
    for model in ("best", "last"):
        (out / model).mkdir()
        (out / model / "params.npz").write_text(f"{model} {tag}")


def contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_move_aside_twice_keeps_both_old_runs_whole(tmp_path):
    make_run(tmp_path, "first")
    first = contents(tmp_path)
    (tmp_path / "data.txt").write_text("not a run item")
    assert runs.move_aside(tmp_path) == tmp_path / "previous" / "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "previous"]
    make_run(tmp_path, "second")
    second = {k: v for k, v in contents(tmp_path).items() if not k.startswith(("previous", "data.txt"))}
    assert runs.move_aside(tmp_path) == tmp_path / "previous" / "2"
    assert contents(tmp_path / "previous" / "1") == first
    assert contents(tmp_path / "previous" / "2") == second
    assert (tmp_path / "data.txt").read_text() == "not a run item"


def test_move_aside_with_nothing_there_returns_none_and_creates_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert runs.move_aside(tmp_path) is None
    assert runs.move_aside(tmp_path / "never_made") is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_move_aside_moves_only_what_exists_and_links_themselves(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("m")
    os.symlink(tmp_path / "gone", tmp_path / "last")  # a dangling link is still something to move
    moved = runs.move_aside(tmp_path)
    assert sorted(p.name for p in moved.iterdir()) == ["last", "metrics.jsonl"]
    assert (moved / "last").is_symlink() and not (tmp_path / "last").exists()


def test_an_interrupted_move_aside_loses_nothing(tmp_path, monkeypatch):
    make_run(tmp_path, "run")
    everything = contents(tmp_path)
    real_rename, calls = os.rename, []

    def rename_then_die(source, target):
        calls.append(source)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_rename(source, target)
    monkeypatch.setattr(runs.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        runs.move_aside(tmp_path)
    monkeypatch.undo()
    split = {k: v for k, v in contents(tmp_path).items() if not k.startswith("previous")}
    split.update(contents(tmp_path / "previous" / "1"))
    assert split == everything  # every file whole, in one place or the other
    assert runs.move_aside(tmp_path) == tmp_path / "previous" / "2"  # a rerun moves the rest
    merged = {**contents(tmp_path / "previous" / "1"), **contents(tmp_path / "previous" / "2")}
    assert merged == everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_move_aside_numbers_past_the_highest_taken(tmp_path):
    (tmp_path / "previous" / "3").mkdir(parents=True)
    (tmp_path / "previous" / "notes").mkdir()
    (tmp_path / "run.json").write_text("{}")
    assert runs.move_aside(tmp_path) == tmp_path / "previous" / "4"
