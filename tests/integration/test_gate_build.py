"""The BPF programs are compiled with clang on first use into a cache outside the checkout, and
no compiled object is ever committed: a machine with an empty cache builds and loads them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kernel import bpfbuild
from kernel.libbpf import BpfObject

PROGRAMS = {"gate": "gate_egress", "quarantine": "quarantine_ingress"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "no-such-cache" / "bpf"
    monkeypatch.setenv("TCPCP_BPF_CACHE", str(cache))
    return cache


def test_empty_cache_compiles_each_program_once_into_an_object_the_kernel_loads(
        empty_cache: Path) -> None:
    assert not empty_cache.exists()
    for name, program in PROGRAMS.items():
        path = bpfbuild.object_path(name)
        assert path.parent == empty_cache and path.name.startswith(f"{name}-")
        built = path.stat().st_mtime_ns
        with BpfObject(path.read_bytes(), name) as obj:
            assert obj.program_fd(program) >= 0
        assert bpfbuild.object_path(name) == path
        assert path.stat().st_mtime_ns == built  # cached: not compiled again
    assert sorted(p.name.split("-")[0] for p in empty_cache.iterdir()) == sorted(PROGRAMS)


def test_no_compiled_object_is_committed_and_the_cache_lies_outside_the_checkout(
        empty_cache: Path) -> None:
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.split(b"\0")
    elf = [name for name in tracked
           if name and (REPO / name.decode()).is_file()
           and (REPO / name.decode()).read_bytes()[:4] == b"\x7fELF"]
    assert elf == []
    sources = sorted(p.name for p in bpfbuild.BPF_SOURCE_DIR.glob("*.bpf.c"))
    assert sources == sorted(f"{n}.bpf.c" for n in PROGRAMS)
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "kernel/bpf/gate.o"],
                             check=False)
    assert ignored.returncode == 0, "a compiled object in the checkout would not be ignored"
