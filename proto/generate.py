"""Generate the Python stubs of proto/reward/v1/reward.proto into the contract package (`make proto`).

Server and client both import them from `rm_contract.pb`. With --check, fail when the committed stubs differ
from freshly generated ones (CI runs this, so stubs never drift from the .proto).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "reward" / "v1" / "reward.proto"
TARGET = ROOT / "proto" / "src" / "rm_contract" / "pb"
STUBS = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc, then make the grpc module import its sibling relatively (protoc writes an absolute import)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        generated = Path(tmp) / "reward" / "v1"
        grpc_module = generated / "reward_pb2_grpc.py"
        grpc_module.write_text(
            grpc_module.read_text().replace("from reward.v1 import reward_pb2", "from . import reward_pb2")
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in STUBS:
            shutil.copyfile(generated / name, out_dir / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        print(f"wrote {', '.join(STUBS)} to {TARGET.relative_to(ROOT)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            n for n in STUBS if not (TARGET / n).is_file() or not filecmp.cmp(Path(tmp) / n, TARGET / n, shallow=False)
        ]
    if stale:
        sys.exit(f"stale protobuf stubs: {', '.join(stale)} differ from {PROTO.relative_to(ROOT)}; run `make proto`")
    print("protobuf stubs are up to date")


if __name__ == "__main__":
    main()
