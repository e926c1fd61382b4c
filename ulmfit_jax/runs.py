"""A run folder's settings and fresh starts.

A training script writes everything of one run under its `--out` folder (checkpoints, metrics,
the `best` and `last` models), and a rerun with the same `--out` resumes from the checkpoints.
Resuming is only right when the rerun asks for the same training: the checkpoints' step count,
optimizer state and schedule mean nothing under another learning rate, data set or model size.
So the first run records its settings in `out/run.json`, a rerun compares against them
(`check_or_save_settings`) and stops with the differing flags named (`SettingsMismatch`), and
`--no-resume` moves the old run aside (`move_aside`) instead of deleting it.

In a run of several processes, process 0 alone writes `run.json` and moves things aside; the
others only compare (`write=False`), after process 0 is done with the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ulmfit_jax.checkpoint import _atomic_write

SETTINGS_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RUN_ITEMS = ("checkpoints", SETTINGS_FILE, METRICS_FILE, "best", "last")
PREVIOUS = "previous"


def flag_name(key: str) -> str:
    """`learning_rate` -> `--learning-rate`: how the user typed the setting."""
    return "--" + key.replace("_", "-")


class _NotSet:
    def __repr__(self):
        return "NOT_SET"


NOT_SET = _NotSet()  # the side of a difference where the setting is absent


class SettingsMismatch(ValueError):
    """A rerun asked for other settings than those the run folder's checkpoints were made with.

    `differences` maps each differing key to `(saved, now)`, JSON values, with `NOT_SET` on the
    side where the key is absent. The message names each as the flag the user typed.
    """

    def __init__(self, path: Path, differences: dict[str, tuple]):
        self.path = Path(path)
        self.differences = differences

        def show(value) -> str:
            return "(not set)" if value is NOT_SET else json.dumps(value)

        lines = [f"  {flag_name(key)}: saved {show(before)}, now {show(after)}"
                 for key, (before, after) in sorted(differences.items())]
        super().__init__(
            f"{self.path.parent} holds a run made with other settings (saved in {self.path.name}):\n"
            + "\n".join(lines) + "\nrerun with the saved settings to resume it, or pass --no-resume to start "
            f"afresh (the old run is then moved to {self.path.parent / PREVIOUS}/<N>, not deleted)")


def setting_differences(saved: dict, now: dict) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key whose values differ or that one side
    lacks (`NOT_SET` there). Values compare by their JSON text: 1 and true differ, as they would
    on the command line, and NaN equals NaN."""
    return {key: (saved.get(key, NOT_SET), now.get(key, NOT_SET)) for key in saved.keys() | now.keys()
            if key not in saved or key not in now or _canonical(saved[key]) != _canonical(now[key])}


def _json_default(value):
    """Paths as strings, numpy scalars as Python numbers; anything else is not a setting."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"a setting must be JSON-able, not {type(value).__name__}: {value!r}")


def _normalised(settings: dict) -> dict:
    """The settings as they come back from `run.json`: tuples as lists, paths as strings."""
    return json.loads(json.dumps(settings, default=_json_default))


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def check_or_save_settings(out: Path, settings: dict, *, write: bool = True) -> None:
    """Compare `settings` with `out/run.json`, or record them there when the file does not exist.

    `settings` are the parsed command-line flags less those that may change between reruns
    (where to log, how often to print, ...), as a JSON-able dict; values are compared after a
    JSON round trip, so a tuple equals a list and a Path its string. Raises `SettingsMismatch`
    naming every flag that differs (a key on one side only differs too). The settings guard only
    what was trained: a `run.json` beside no checkpoint, metrics or model (a run stopped before it
    trained, e.g. refused for its data) is replaced, so the corrected command just runs. The file
    is written through a temporary file and a rename, so it is whole or absent, never half-written;
    with `write=False` (the processes other than 0 of a multi-process run) it is only read, if there.
    """
    out = Path(out)
    path = out / SETTINGS_FILE
    now = _normalised(settings)
    if path.is_file() and holds_training(out):
        try:
            saved = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); pass --no-resume to start afresh "
                             f"(the old run is moved to {out / PREVIOUS}/<N>)") from error
        if not isinstance(saved, dict):
            raise ValueError(f"{path} does not hold a settings object; pass --no-resume to start afresh")
        differences = setting_differences(saved, now)
        if differences:
            raise SettingsMismatch(path, differences)
        return
    if write:                    # a first run, or one stopped before it trained (say on bad data)
        text = json.dumps(now, indent=1, sort_keys=True) + "\n"
        _atomic_write(path, lambda handle: handle.write(text.encode()))


def holds_training(out: Path) -> bool:
    """Whether a run folder holds anything a run trained: a run item besides its settings (an
    empty checkpoints folder does not count)."""
    for name in RUN_ITEMS:
        path = Path(out) / name
        if name != SETTINGS_FILE and os.path.lexists(path) and (name != "checkpoints" or any(path.iterdir())):
            return True
    return False


def move_aside(out: Path, names=RUN_ITEMS) -> Path | None:
    """`--no-resume`: move the previous run's items out of the way, into `out/previous/<N>`.

    Nothing is deleted: an earlier run may hold the only copy of a trained model. `N` is
    one more than the highest number already under `out/previous` (1 for the first), so the
    numbers go up with age; the folder is claimed with `mkdir`, which fails if another process
    took the number first. Each item moves with one `os.rename` (same file system, atomic), so an
    interruption leaves every item whole, either still in `out` or already moved; a rerun moves
    what is left. Returns the new folder, or None (and creates nothing) when none of `names`
    exists.
    """
    out = Path(out)
    present = [name for name in names if os.path.lexists(out / name)]
    if not present:
        return None
    previous = out / PREVIOUS
    previous.mkdir(exist_ok=True)
    number = max((int(p.name) for p in previous.iterdir() if p.name.isdigit()), default=0) + 1
    while True:
        target = previous / str(number)
        try:
            target.mkdir()
            break
        except FileExistsError:
            number += 1
    for name in present:
        os.rename(out / name, target / name)
    return target
