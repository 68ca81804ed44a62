"""Compile the BPF C sources in kernel/bpf/ with clang on first use, cached by source hash.

The cache key covers the program's source, every header in kernel/bpf/ and the compiler flags, so
an edited source is rebuilt and an unchanged one is compiled once per machine. Objects live in
$TCPCP_BPF_CACHE or ~/.cache/tcpcp/bpf and are never committed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import structlog

from kernel.errors import KernelError

log = structlog.get_logger()

BPF_SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
               "-I/usr/include/x86_64-linux-gnu")


class BpfBuildError(KernelError):
    """clang could not compile a BPF program."""


def cache_dir() -> Path:
    """Directory holding compiled objects."""
    env = os.environ.get("TCPCP_BPF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tcpcp" / "bpf"


def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    digest.update(" ".join(CLANG_FLAGS).encode())
    for path in [source, *sorted(BPF_SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def object_path(name: str) -> Path:
    """Path of the compiled object for kernel/bpf/<name>.bpf.c, compiling it if needed."""
    source = BPF_SOURCE_DIR / f"{name}.bpf.c"
    if not source.is_file():
        raise BpfBuildError(f"expected BPF source {source}, found no such file")
    target = cache_dir() / f"{name}-{_source_hash(source)}.o"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["clang", *CLANG_FLAGS, f"-I{BPF_SOURCE_DIR}", "-c", str(source), "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BpfBuildError(
            f"expected clang to compile {source.name}, it exited {result.returncode}:\n"
            f"{result.stderr}")
    partial.replace(target)
    log.info("bpf_compiled", program=name, object=str(target))
    return target


def object_bytes(name: str) -> bytes:
    """The compiled ELF object for kernel/bpf/<name>.bpf.c."""
    return object_path(name).read_bytes()
