"""Prometheus and promtool: from Debian's `prometheus` package, on PATH or installed here with apt-get."""

import os
import shutil
import subprocess

import pytest

from tests.support import ROOT

PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"


def _apt_install() -> str | None:
    """Install Debian's prometheus package; None on success, else why not."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "there is no apt-get"
    if os.geteuid() != 0:
        return "apt-get install needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a stale package list: refresh once
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    return None if result.returncode == 0 else "apt-get install prometheus failed: " + result.stderr.strip()[-300:]


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """Paths of the prometheus and promtool binaries."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    if not all(found.values()):
        problem = _apt_install()
        if problem:
            pytest.skip(f"Prometheus is not on PATH and cannot be installed: {problem}")
        found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    return found


def promtool(tools, *args, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([tools["promtool"], *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60)
