"""Compile the BPF C sources in kernel/bpf/ with clang on first use, cached by source hash.

The cache key covers the program's source, every header in kernel/bpf/ and the compiler flags, so
an edited source is rebuilt and an unchanged one is compiled once per machine. Objects live in
$TCPCP_BPF_CACHE, else /var/cache/tcpcp/bpf when running as root, else ~/.cache/tcpcp/bpf, and are
never committed.

Root loads these objects into the kernel, so a cached object is trusted only when nobody else
could have written it (a user's HOME under `sudo -E` would otherwise let that user plant one):

- every directory from / down to the cache is opened without following symlinks and fstat'ed:
  owned by root or the effective uid, not group- or world-writable. An ancestor may be
  world-writable only if it is root's and sticky (/tmp): nobody else can then rename or replace
  what lies below it, and a directory someone else made there fails its own check;
- the object is opened with O_NOFOLLOW relative to that directory's descriptor and the opened
  descriptor is fstat'ed (a regular file, owned by root or the euid, not group- or
  world-writable) and read from that same descriptor: no path is resolved twice;
- a new object is compiled in a private temporary directory and written into the cache
  atomically (temporary file in the cache directory, mode 0644, fsync, rename).

`object_path` raises UnsafeBpfCache naming the path and what was wrong. `object_bytes` (what the
loaders use) logs that refusal, never loads the refused object, and compiles a fresh one: into the
cache, replacing the refused file, when the directory itself is safe; otherwise in a private
temporary directory, leaving the unsafe cache alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import structlog

from kernel.errors import KernelError

log = structlog.get_logger(component="tcpcp.kernel.bpfbuild")

BPF_SOURCE_DIR = Path(__file__).resolve().parent / "bpf"
ROOT_CACHE = Path("/var/cache/tcpcp/bpf")
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
               "-I/usr/include/x86_64-linux-gnu")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BpfBuildError(KernelError):
    """clang could not compile a BPF program."""


class UnsafeBpfCache(BpfBuildError):
    """A cache directory or cached object someone other than root (or us) could have written."""

    def __init__(self, path: Path | str, problem: str, *, directory_safe: bool = False) -> None:
        super().__init__(f"refusing BPF cache path {path}: {problem}")
        self.path = str(path)
        self.problem = problem
        self.directory_safe = directory_safe  # the object was bad, its directory was fine


def cache_dir() -> Path:
    """Directory holding compiled objects."""
    env = os.environ.get("TCPCP_BPF_CACHE")
    if env:
        return Path(env)
    return ROOT_CACHE if os.geteuid() == 0 else Path.home() / ".cache" / "tcpcp" / "bpf"


def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    digest.update(" ".join(CLANG_FLAGS).encode())
    for path in [source, *sorted(BPF_SOURCE_DIR.glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _owner_problem(st: os.stat_result) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, expected root (0) or uid {os.geteuid()}"
    return None


def _mode_problem(st: os.stat_result) -> str | None:
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "world"))
                           if st.st_mode & bit)
        return f"{who}-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_dir(path: Path, st: os.stat_result, *, is_cache: bool) -> None:
    mode = _mode_problem(st)
    if mode and not is_cache and st.st_uid == 0 and st.st_mode & stat.S_ISVTX:
        mode = None  # root's sticky directory (/tmp): nobody can replace what we own below it
    problem = _owner_problem(st) or mode
    if problem:
        raise UnsafeBpfCache(path, f"directory {problem}")


def _make_dirs(directory: Path) -> None:
    """Create the missing directories of `directory`, each mode 0755 or less (never os.makedirs:
    it makes the intermediate ones 0777 & ~umask, group-writable under umask 002)."""
    missing = []
    here = directory
    while not os.path.lexists(here) and here != here.parent:
        missing.append(here)
        here = here.parent
    for path in reversed(missing):
        with contextlib.suppress(OSError):  # what cannot be made fails the checked walk
            os.mkdir(path, 0o755)


@contextlib.contextmanager
def _trusted_dir(directory: Path, *, create: bool) -> Iterator[int]:
    """A descriptor of `directory`, every component from / down checked (see the module doc)."""
    directory = Path(os.path.abspath(directory))
    if create:
        _make_dirs(directory)
    # a symlink among the ancestors (e.g. /var/run) is taken as resolved, then every real
    # component is opened without following links: a link swapped in meanwhile fails (ELOOP)
    real = Path(os.path.realpath(directory))
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_dir(Path("/"), os.fstat(fd), is_cache=real == Path("/"))
        here = Path("/")
        for part in real.parts[1:]:
            here = here / part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafeBpfCache(here, f"cannot open the directory without following "
                                           f"links: {exc.strerror}") from None
            os.close(fd)
            fd = child
            _check_dir(here, os.fstat(fd), is_cache=here == real)
        yield fd
    finally:
        os.close(fd)


def _read_trusted(dir_fd: int, directory: Path, name: str) -> bytes | None:
    """The object `name` in the checked directory, or None if there is none."""
    path = directory / name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeBpfCache(path, "is a symlink (objects are never loaded through links)",
                                 directory_safe=True) from None
        raise UnsafeBpfCache(path, f"cannot open it: {exc.strerror}",
                             directory_safe=True) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeBpfCache(path, "is not a regular file", directory_safe=True)
        problem = _owner_problem(st) or _mode_problem(st)
        if problem:
            raise UnsafeBpfCache(path, f"object {problem}", directory_safe=True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _compile(name: str, source: Path) -> bytes:
    """Compile in a private temporary directory (mode 0700, ours) and return the object."""
    with tempfile.TemporaryDirectory(prefix="tcpcp-bpf-") as private:
        out = Path(private) / f"{name}.o"
        cmd = ["clang", *CLANG_FLAGS, f"-I{BPF_SOURCE_DIR}", "-c", str(source), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BpfBuildError(
                f"expected clang to compile {source.name}, it exited {result.returncode}:\n"
                f"{result.stderr}")
        return out.read_bytes()


def _write_atomically(dir_fd: int, name: str, data: bytes) -> None:
    """`name` in the directory becomes `data` at once (mode 0644), replacing what was there."""
    partial = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=dir_fd)
        raise


def _source(name: str) -> Path:
    source = BPF_SOURCE_DIR / f"{name}.bpf.c"
    if not source.is_file():
        raise BpfBuildError(f"expected BPF source {source}, found no such file")
    return source


def object_name(name: str) -> str:
    """File name of the cached object for kernel/bpf/<name>.bpf.c (program name + source hash)."""
    return f"{name}-{_source_hash(_source(name))}.o"


def _cached(name: str) -> tuple[Path, bytes]:
    """The trusted cached object for `name` (compiled and cached first if missing)."""
    source = _source(name)
    directory = cache_dir()
    target = object_name(name)
    with _trusted_dir(directory, create=True) as dir_fd:
        data = _read_trusted(dir_fd, directory, target)
        if data is None:
            data = _compile(name, source)
            _write_atomically(dir_fd, target, data)
            log.info("bpf_compiled", program=name, object=str(directory / target))
    return directory / target, data


def object_path(name: str) -> Path:
    """Path of the compiled object for kernel/bpf/<name>.bpf.c, compiling it if needed.

    Raises UnsafeBpfCache if the cache directory or the object there is not to be trusted."""
    return _cached(name)[0]


def object_bytes(name: str) -> bytes:
    """The compiled ELF object for kernel/bpf/<name>.bpf.c, read from a trusted cache.

    A refused cache entry is never loaded: the object is compiled again, into the cache when its
    directory is safe (replacing the refused file), else in a private temporary directory."""
    try:
        return _cached(name)[1]
    except UnsafeBpfCache as exc:
        log.warning("bpf_cache_refused", program=name, path=exc.path, problem=exc.problem)
        source = _source(name)
        data = _compile(name, source)
        if exc.directory_safe:
            directory = cache_dir()
            with _trusted_dir(directory, create=False) as dir_fd:
                _write_atomically(dir_fd, object_name(name), data)
            log.info("bpf_compiled", program=name, object=str(directory), replaced=exc.path)
        else:
            log.info("bpf_compiled", program=name, object="private temporary directory")
        return data
