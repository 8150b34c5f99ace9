"""Fixtures for every test, and a marker per kind of test taken from its folder.

tests/unit         pure functions, codec, configs, datasets, PPO math: no subprocess, no server, fast
tests/integration  real gRPC servers on loopback, DeepSpeed trainer runs, Helm rendering, promtool
tests/e2e          several processes: LocalMesh, controller runs, scale-out, the CLI over subprocesses

`pytest -m unit` (or integration, e2e) selects exactly that folder.
"""

import pathlib

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.helm", "tests.support.prometheus"]

TESTS = pathlib.Path(__file__).resolve().parent
KINDS = ("unit", "integration", "e2e")


def kind_of(path: pathlib.Path) -> str | None:
    """The kind of a test file under tests/: the name of its folder there (None for a file outside the three)."""
    path = pathlib.Path(path).resolve()
    parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
    return parts[0] if len(parts) > 1 and parts[0] in KINDS else None


def pytest_collection_modifyitems(config, items):
    """Mark each test with its kind, and run the kinds fastest first (unit, integration, e2e).

    A test file elsewhere under tests/ is an error, so that none goes unmarked.
    """
    for item in items:
        kind = kind_of(item.path)
        if kind is not None:
            item.add_marker(getattr(pytest.mark, kind))
        elif pathlib.Path(item.path).resolve().is_relative_to(TESTS):
            raise pytest.UsageError(f"{item.nodeid}: put the test under tests/unit, tests/integration or tests/e2e")
    items.sort(key=lambda item: KINDS.index(kind_of(item.path)) if kind_of(item.path) else len(KINDS))
