"""The layering of DESIGN.md section 1, enforced on every import statement of the tree:

- kernel/ and store/ import nothing above them (no checkpointer, resurrector, ops);
- checkpointer/ and resurrector/ never import each other, nor ops/;
- the pure modules import no I/O (no sockets, subprocesses, Redis, netlink, cffi, files).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernel", "store", "checkpointer", "resurrector", "ops")
FORBIDDEN = {
    "kernel": {"store", "checkpointer", "resurrector", "ops"},
    "store": {"kernel", "checkpointer", "resurrector", "ops"},
    "checkpointer": {"resurrector", "ops"},
    "resurrector": {"checkpointer", "ops"},
}
PURE = ("kernel/ici.py", "kernel/codec.py", "kernel/seq.py", "kernel/sanity.py",
        "kernel/transfer.py", "kernel/pass_states.py", "checkpointer/commit_policy.py",
        "checkpointer/api.py", "checkpointer/lease.py", "checkpointer/snapshot.py",
        "resurrector/planner.py", "ops/apps/resp.py", "ops/apps/httpwire.py",
        "store/record.py", "store/limits.py")
IO_MODULES = {"socket", "subprocess", "selectors", "asyncio", "redis", "pyroute2", "cffi",
              "fcntl", "ctypes", "os", "shutil", "threading", "multiprocessing", "io",
              "pathlib", "signal", "kernel.repair", "kernel.gate", "kernel.libbpf",
              "kernel.channel", "kernel.isolation", "kernel.quarantine", "store.client"}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved to absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_it_must_not(package: str) -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in files(package) for line, mod in imports(p)
           if mod.split(".")[0] in FORBIDDEN[package]]
    assert bad == [], f"{package}/ must not import {sorted(FORBIDDEN[package])}: {bad}"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    bad = [f"{module}:{line} imports {mod}" for line, mod in imports(ROOT / module)
           if mod in IO_MODULES or mod.split(".")[0] in IO_MODULES - {"kernel", "store"}]
    assert bad == [], f"pure module {module} imports I/O: {bad}"


def test_the_rule_sees_a_violation_when_there_is_one(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    bad = tmp_path / "kernel" / "x.py"
    bad.write_text("import os\nfrom ops.lab import Lab\n")
    mods = [m for _, m in imports(bad, tmp_path)]
    assert "ops.lab" in mods and "os" in mods
