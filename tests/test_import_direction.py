"""Imports run one way: server, client and training import the contract; only training imports the server
(its engine, to verify exports with the code that serves); the contract imports none of them and no torch
or onnxruntime. Read from the sources and the pyproject files, so a new import in the wrong direction
fails here before it reaches an install (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> (source directory, distribution)
    "rm_contract": (ROOT / "proto" / "src" / "rm_contract", "rewardserve-contract"),
    "rm_server": (ROOT / "server" / "src" / "rm_server", "rewardserve-server"),
    "rm_client": (ROOT / "client" / "src" / "rm_client", "rewardserve-client"),
    "rm_training": (ROOT / "rm_training" / "src" / "rm_training", "rewardserve-training"),
}
ALLOWED = {  # the rewardserve modules each package may import (a package name allows all its modules)
    "rm_contract": set(),
    "rm_server": {"rm_contract"},
    "rm_client": {"rm_contract"},
    "rm_training": {"rm_contract", "rm_server.runtime.engine"},
}
DISTRIBUTIONS = {distribution for _, distribution in PACKAGES.values()}
HEAVY = {"torch", "onnxruntime", "transformers", "onnx"}
FORBIDDEN = {  # third-party packages a part must not import, by module prefix
    "rm_contract": HEAVY,
    "rm_server": {"torch", "transformers", "onnx"},
    "rm_client": {"torch", "transformers"},  # except the [ppo] extra, below
}
OPTIONAL_PARTS = {"rm_client.ppo"}  # installed with an extra that brings torch


def module_name(package: str, path: Path) -> str:
    relative = path.relative_to(PACKAGES[package][0]).with_suffix("")
    parts = [package, *relative.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every absolute module name `path` imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module)
    return names


def sources(package: str) -> list[tuple[str, Path]]:
    directory = PACKAGES[package][0]
    return [(module_name(package, p), p) for p in sorted(directory.rglob("*.py"))]


def violations(package: str) -> list[str]:
    found = []
    for module, path in sources(package):
        optional = any(module == o or module.startswith(o + ".") for o in OPTIONAL_PARTS)
        for name in imports_of(path, module):
            top = name.split(".")[0]
            if top in PACKAGES and top != package:
                if not any(name == a or name.startswith(a + ".") for a in ALLOWED[package]):
                    found.append(f"{module} imports {name}")
            if not optional and top in FORBIDDEN.get(package, ()):
                found.append(f"{module} imports {name}")
    return found


@pytest.mark.parametrize("package", list(PACKAGES))
def test_each_part_imports_only_what_the_architecture_allows(package):
    assert violations(package) == []


def test_the_checker_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The rule itself must be able to fail: a contract module importing the server, nested in a function."""
    fake = tmp_path / "rm_contract"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from rm_server.runtime.engine import OnnxEngine\n    import torch\n")
    (fake / "ok.py").write_text("from .bad import f\n")
    monkeypatch.setitem(PACKAGES, "rm_contract", (fake, "rewardserve-contract"))
    assert sorted(violations("rm_contract")) == [
        "rm_contract.bad imports rm_server.runtime.engine",
        "rm_contract.bad imports torch",
    ]


SERVER_WINGS = {  # wing -> what its modules must not import (module prefixes)
    "rm_server.errors": {"rm_server.", "grpc", "aiohttp", "onnxruntime"},
    "rm_server.runtime": {"rm_server.core", "rm_server.transport", "grpc", "aiohttp"},
    "rm_server.core": {"rm_server.transport", "grpc", "aiohttp", "onnxruntime"},
    "rm_server.transport.grpc": {"rm_server.transport.http", "onnxruntime", "rm_server.runtime"},
    "rm_server.transport.http": {"rm_server.transport.grpc", "grpc", "onnxruntime", "rm_server.runtime"},
}
"""The server's wings (docs/architecture.md): runtime (numpy in, numpy out) knows no core and no wire; the
core knows no wire and reaches onnxruntime only through runtime; each transport knows its wire alone."""


def wing_violations(directory: Path = PACKAGES["rm_server"][0]) -> list[str]:
    found = []
    for path in sorted(directory.rglob("*.py")):
        relative = path.relative_to(directory).with_suffix("")
        parts = ["rm_server", *relative.parts]
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for wing, forbidden in SERVER_WINGS.items():
            if module != wing and not module.startswith(wing + "."):
                continue
            for name in imports_of(path, module):
                if any(name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden):
                    found.append(f"{module} imports {name}")
    return found


def test_server_wings_import_only_downward():
    assert wing_violations() == []


def test_the_wing_checker_sees_each_wrong_import(tmp_path):
    """One wrong import in each wing must be reported: a runtime module importing the core, the core
    importing grpc and onnxruntime, one transport importing the other."""
    root = tmp_path / "rm_server"
    for folder, body in {
        "runtime": "from rm_server.core.inputs import Limits\n",
        "core": "import grpc\nimport onnxruntime as ort\n",
        "transport/grpc": "from rm_server.transport.http.app import HttpServer\n",
        "transport/http": "def f():\n    from rm_server.transport.grpc.status import STATUS\n",
    }.items():
        (root / folder).mkdir(parents=True)
        (root / folder / "bad.py").write_text(body)
    (root / "errors.py").write_text("import grpc\n")
    assert sorted(wing_violations(root)) == [
        "rm_server.core.bad imports grpc",
        "rm_server.core.bad imports onnxruntime",
        "rm_server.errors imports grpc",
        "rm_server.runtime.bad imports rm_server.core.inputs",
        "rm_server.transport.grpc.bad imports rm_server.transport.http.app",
        "rm_server.transport.http.bad imports rm_server.transport.grpc.status",
    ]


def declared_dependencies(package: str) -> set[str]:
    """The rewardserve distributions the installed one requires (its metadata, extras left out)."""
    requirements = metadata.requires(PACKAGES[package][1]) or []
    return {re.split(r"[\s\[<>=;]", r, maxsplit=1)[0] for r in requirements if "extra ==" not in r} & DISTRIBUTIONS


def test_distributions_depend_the_same_way():
    """Installing the server must not install the client; installing the client must not install the server."""
    assert declared_dependencies("rm_contract") == set()
    assert declared_dependencies("rm_server") == {"rewardserve-contract"}
    assert declared_dependencies("rm_client") == {"rewardserve-contract"}
    assert declared_dependencies("rm_training") == {"rewardserve-contract", "rewardserve-server"}


def test_contract_and_server_import_without_torch_onnxruntime_or_the_client():
    """What actually gets loaded (transitive imports included), in a fresh interpreter."""
    code = (
        "import sys\n"
        "import rm_contract.bundle, rm_contract.recipe, rm_contract.records, rm_contract.padding\n"
        "import rm_contract.config_cli, rm_contract.backbones, rm_contract.pb.reward_pb2_grpc\n"
        "contract = {m.split('.')[0] for m in sys.modules}\n"
        "import rm_server.main\n"
        "server = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(contract & {'torch', 'onnxruntime', 'rm_server', 'rm_client', 'rm_training'}))\n"
        "print(sorted(server & {'torch', 'transformers', 'rm_client', 'rm_training'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "[]"]
