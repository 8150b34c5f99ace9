"""The package layers hold: each package imports only packages below it, demo and bench stay apart, and no
two packages import each other, even through a lazy import inside a function.

    rlhf (proto) 0 <- services 1 <- training 2 <- controller 3 <- demo 4, bench 4 <- cli 5

The walker reads source files with `ast` (nothing is imported) and takes the root to read, so that the
tests at the end can show it catching an upward import, a lazy one and a cycle in a tree made for them.
"""

import ast
import itertools
import pathlib
import textwrap
from dataclasses import dataclass

from tests.support import ROOT

LAYERS = {"rlhf": 0, "services": 1, "training": 2, "controller": 3, "demo": 4, "bench": 4, "cli": 5}
SOURCES = {"rlhf": "proto/rlhf", "services": "services", "training": "training", "controller": "controller",
           "demo": "demo", "bench": "bench", "cli": "cli"}  # package -> its folder under the root
APART = [{"demo", "bench"}]  # same layer, and never importing each other


@dataclass(frozen=True)
class Import:
    """One import statement of one of the packages, naming another (or the same) package."""

    path: str  # relative to the root
    line: int
    importer: str  # the package the file belongs to
    imported: str  # the top-level package it names
    statement: str  # as written

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: `{self.statement}`"


def imported_packages(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """Top-level packages an import statement names; a relative import stays inside the importer's package."""
    if isinstance(node, ast.ImportFrom):
        return {importer} if node.level else {node.module.split(".")[0]}
    return {alias.name.split(".")[0] for alias in node.names}


def imports_under(root: pathlib.Path, sources: dict[str, str] = SOURCES) -> list[Import]:
    """Every import, at module level or inside a function or class, between the packages under `root`."""
    found = []
    for package, folder in sources.items():
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                for imported in sorted(imported_packages(node, package) & set(sources)):
                    found.append(Import(str(path.relative_to(root)), node.lineno, package, imported,
                                        ast.unparse(node)))
    return found


def upward_imports(imports: list[Import], layers: dict[str, int] = LAYERS) -> list[str]:
    """Imports of a package of a higher layer than the importer's."""
    return [f"{i}: {i.importer} (layer {layers[i.importer]}) imports {i.imported} (layer {layers[i.imported]})"
            for i in imports if layers[i.imported] > layers[i.importer]]


def imports_across(imports: list[Import], apart: list[set[str]] = APART) -> list[str]:
    """Imports between packages that must stay apart."""
    return [f"{i}: {i.importer} imports {i.imported}; they must not import each other"
            for i in imports if i.importer != i.imported and {i.importer, i.imported} in apart]


def package_cycles(imports: list[Import]) -> list[str]:
    """Each cycle of the package-level import graph, with one import per edge."""
    edges: dict[str, dict[str, Import]] = {}
    for i in imports:
        if i.importer != i.imported:
            edges.setdefault(i.importer, {}).setdefault(i.imported, i)
    cycles, seen = [], set()

    def visit(package: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(package, {})):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    hops = [f"{a} -> {b} ({edges[a][b]})" for a, b in itertools.pairwise(cycle)]
                    cycles.append("cycle " + " -> ".join(cycle) + ": " + "; ".join(hops))
            else:
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    return cycles


def layer_problems(root: pathlib.Path, sources: dict[str, str] = SOURCES) -> list[str]:
    """Everything wrong with the layering of the packages under `root`, one line each."""
    imports = imports_under(root, sources)
    return upward_imports(imports) + imports_across(imports) + package_cycles(imports)


# --- the repository --------------------------------------------------------------------------


def test_every_package_is_read_and_its_imports_are_seen():
    imports = imports_under(ROOT)
    assert {i.importer for i in imports} == set(SOURCES)  # each package's files were read (none moved away)
    assert {(i.importer, i.imported) for i in imports} >= {("services", "rlhf"), ("training", "services"),
                                                           ("controller", "services"), ("cli", "controller")}


def test_packages_import_only_lower_layers_and_no_cycles():
    problems = layer_problems(ROOT)
    assert not problems, "layering broken:\n" + "\n".join(problems)


# --- the walker on a tree made to break the rules --------------------------------------------------


def write_tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in SOURCES.values():  # every package exists, most of them empty
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def test_an_upward_import_is_reported_with_file_line_and_statement(tmp_path):
    root = write_tree(tmp_path, {"services/engine.py": "import torch\n\nfrom controller.ppo import compute_gae\n"})
    assert layer_problems(root) == [
        "services/engine.py:3: `from controller.ppo import compute_gae`: services (layer 1) imports controller (layer 3)"]


def test_a_lazy_upward_import_inside_a_function_is_reported(tmp_path):
    root = write_tree(tmp_path, {"training/loop.py": """\
        import services.models


        def run():
            import cli.main as entry
            return entry
        """})
    assert layer_problems(root) == ["training/loop.py:5: `import cli.main as entry`: training (layer 2) imports cli (layer 5)"]


def test_demo_and_bench_may_not_import_each_other(tmp_path):
    root = write_tree(tmp_path, {"bench/metrics.py": "from demo.report import table\n"})
    assert imports_across(imports_under(root)) == [
        "bench/metrics.py:1: `from demo.report import table`: bench imports demo; they must not import each other"]


def test_a_cycle_between_packages_is_reported_with_its_imports(tmp_path):
    root = write_tree(tmp_path, {"services/a.py": "from training import b\n",
                                 "training/b.py": "def f():\n    from services.a import x\n"})
    assert package_cycles(imports_under(root)) == [(
        "cycle services -> training -> services: services -> training (services/a.py:1: `from training import b`); "
        "training -> services (training/b.py:2: `from services.a import x`)")]


def test_relative_and_downward_imports_and_other_libraries_are_allowed(tmp_path):
    root = write_tree(tmp_path, {
        "services/__init__.py": "from . import codec\nfrom .codec import decode\n",
        "services/codec.py": "import numpy\nfrom rlhf.v1 import tensor_pb2\n",
        "cli/main.py": "import controller.loop\nfrom bench import generate\nfrom demo import run\n",
        "proto/rlhf/v1/tensor_pb2_grpc.py": "from rlhf.v1 import tensor_pb2\n",
    })
    assert layer_problems(root) == []
    assert len(imports_under(root)) == 7  # all seen: 2 relative, 1 proto, 3 by cli, 1 inside proto
