"""Generate the Python stubs for proto/rlhf/v1/*.proto.

Usage: python proto/generate.py [OUT_DIR]   (default: proto/, next to the sources)
The committed stubs must equal what this writes; tests/integration/test_proto_stubs.py checks it.
"""

import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every .proto under rlhf/v1; return the sources compiled."""
    sources = sorted(PROTO_ROOT.glob("rlhf/v1/*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(PROTO_ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sources


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    target.mkdir(parents=True, exist_ok=True)
    for source in generate(target):
        print(f"generated stubs for {source.relative_to(PROTO_ROOT)}")
