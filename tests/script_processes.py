"""Script processes for the tests that kill, signal and rerun the training scripts: each in its own
process group, stdout and stderr in files (no pipe to fill), killed when the test ends."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def cpu_environment(devices: int = 1) -> dict:
    """CPU only, `devices` forced host devices (conftest's XLA_FLAGS are not the run's)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


class Script:
    """One script process in its own process group."""

    def __init__(self, folder: Path, name: str, script: str, args, env=None):
        self.stdout_path, self.stderr_path = folder / f"{name}.stdout", folder / f"{name}.stderr"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                                            stdout=stdout, stderr=stderr, env=env or cpu_environment(),
                                            start_new_session=True)

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, number) -> None:
        """To the whole group, and only while the leader is not reaped (its group id is then still its)."""
        if self.running():
            os.killpg(self.process.pid, number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.stdout_path.stem} ran over {timeout} s:\n{self.stderr[-3000:]}")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def final(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])

    def progress(self, total: int) -> int:
        """The highest step the progress bar (process 0's) has shown of `total` (0 before any)."""
        return max(map(int, re.findall(rf"(\d+)/{total} \[", self.stderr)), default=0)

    def resumed_from(self) -> int | None:
        found = re.findall(r'"resumed_from_step": (\d+)', self.stdout)
        return int(found[0]) if found else None


@pytest.fixture
def processes():
    """`processes(folder, name, script, args, env=None)` starts a `Script`; whatever still runs when the
    test ends (failed or not) is killed."""
    started = []

    def start(*args, **kwargs) -> Script:
        started.append(Script(*args, **kwargs))
        return started[-1]

    yield start
    for script in started:
        script.kill()
        script.process.wait(timeout=60)
