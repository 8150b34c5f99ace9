"""The committed Python stubs of proto/rlhf/v1 are what protoc generates from the .proto files today."""

import filecmp
import subprocess
import sys

from tests.support import ROOT


def test_committed_stubs_equal_freshly_generated(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True, capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    committed = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*_pb2*.py*"))
    assert generated == committed
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / "proto" / p, shallow=False)]
    assert not stale, f"regenerate with `make proto`: {stale}"
