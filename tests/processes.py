"""Running the `qalign` console script in a child process and killing it mid-way (resume tests)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def console_script() -> list[str]:
    """The installed `qalign` command beside this interpreter, else on PATH, else `python -m qalign`."""
    script = Path(sys.executable).with_name("qalign")
    if script.exists():
        return [str(script)]
    found = shutil.which("qalign")
    return [found] if found else [sys.executable, "-m", "qalign"]


def run_until_then_sigkill(cmd: list[str], ready: Callable[[], bool], timeout: float, **popen) -> subprocess.Popen:
    """Start ``cmd``; once ``ready()`` (or after ``timeout`` s, or when it ends) send SIGKILL and reap it.
    The caller asserts ``returncode == -SIGKILL`` to know the kill really landed mid-run."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc
