"""The `rlhf` command line run as a user runs it: `python -m cli` in a subprocess."""

import subprocess
import sys


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m cli ARGS`: its exit code, stdout and stderr (text)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
