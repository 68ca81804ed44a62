"""Build the tcpcp guest kernel: Debian's pinned linux-source-6.12, with or without the series
in kernel/patches/, configured from ops/kernel/config over tinyconfig, bzImage only.

Everything lands in a cache outside the repository (TCPCP_KERNEL_CACHE, default
/var/cache/tcpcp-kernel): the unpacked source, one hard-linked tree per flavour (patched files
are copied before patching, so the pristine source never changes), and ccache's directory
(compiler hits are shared between the flavours: the trees use relative paths and ccache
ignores the directory). A rebuild with nothing changed is an incremental `make`.

    python -m ops.kernel.build --flavour patched     # prints the bzImage path and seconds

A test session that boots guests starts both builds in the background first
(start_background, from tests/conftest.py), so they overlap the rest of the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from ops.kernel.errors import BuildFailed, SourceUnavailable

log = structlog.get_logger(component="tcpcp.ops.kernel.build")

REPO = Path(__file__).resolve().parents[2]
PATCHES = REPO / "kernel" / "patches"
CONFIG_FRAGMENT = Path(__file__).resolve().with_name("config")


@dataclass(frozen=True, slots=True)
class SourcePin:
    """The Debian source package the series is made against."""

    package: str
    version: str
    tarball: Path


PIN = SourcePin("linux-source-6.12", "6.12.117-1~deb12u1",
                Path("/usr/src/linux-source-6.12.tar.xz"))


class Flavour(enum.Enum):
    STOCK = "stock"
    PATCHED = "patched"


@dataclass(frozen=True, slots=True)
class BuiltKernel:
    flavour: Flavour
    bzimage: Path
    seconds: float
    cpu_seconds: float  # user + system time of the build's child processes


def cache_dir() -> Path:
    return Path(os.environ.get("TCPCP_KERNEL_CACHE", "/var/cache/tcpcp-kernel"))


# ---------------------------------------------------------------------- pure helpers
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


def wanted_options(fragment: str) -> dict[str, str]:
    """The CONFIG_X=value lines of a config fragment (comments and blanks ignored)."""
    wanted: dict[str, str] = {}
    for line in fragment.splitlines():
        m = _OPTION.match(line.strip())
        if m:
            wanted[m.group(1)] = m.group(2)
    return wanted


def missing_options(fragment: str, config: str) -> list[str]:
    """Options the fragment asks for that the final .config does not have with that value
    (Kconfig drops an option silently when its dependencies are off)."""
    have = wanted_options(config)
    return sorted(f"{k}={v} (got {have.get(k, 'unset')})"
                  for k, v in wanted_options(fragment).items() if have.get(k) != v)


def series(patch_dir: Path = PATCHES) -> list[Path]:
    """The patches in the order the series file lists them."""
    names = [n.strip() for n in (patch_dir / "series").read_text().splitlines()]
    return [patch_dir / n for n in names if n and not n.startswith("#")]


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def touched_files(patch_text: str) -> list[str]:
    """Files a patch in git format-patch form modifies (its '+++ b/...' lines)."""
    return [line[6:].strip() for line in patch_text.splitlines() if line.startswith("+++ b/")]


# ---------------------------------------------------------------------- I/O steps
def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         logfile: Path | None = None) -> None:
    if logfile is None:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildFailed(f"expected `{' '.join(cmd)}` to succeed, got exit "
                              f"{done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
        return
    with logfile.open("w") as out:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            check=False).returncode
    if rc != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-40:])
        raise BuildFailed(f"expected `{' '.join(cmd)}` to succeed, got exit {rc} "
                          f"(log {logfile}):\n{tail}")


def installed_version(package: str) -> str | None:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.startswith("install ok installed"):
        return None
    return done.stdout.split()[-1]


def ensure_source(pin: SourcePin = PIN) -> Path:
    """Install the pinned source package if needed and unpack it once; returns the tree."""
    unpacked = cache_dir() / "src" / pin.version / pin.package
    if (unpacked / ".tcpcp-unpacked").exists():
        return unpacked
    if installed_version(pin.package) != pin.version:
        log.info("kernel_source_install", package=pin.package, version=pin.version)
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                               f"{pin.package}={pin.version}"],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SourceUnavailable(
                f"expected apt to install {pin.package}={pin.version} (the version "
                f"kernel/patches/ is made against), got exit {done.returncode}: "
                f"{done.stderr.strip()[-600:]} -- if the mirror dropped it, rebase the series "
                f"onto the current version and update PIN in ops/kernel/build.py")
    if not pin.tarball.exists():
        raise SourceUnavailable(f"expected {pin.tarball} from {pin.package}={pin.version}, "
                                f"found no such file")
    start = time.monotonic()
    staging = unpacked.parent / ".unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _run(["tar", "-xJf", str(pin.tarball), "-C", str(staging)])
    shutil.rmtree(unpacked, ignore_errors=True)
    (staging / pin.package).rename(unpacked)
    staging.rmdir()
    (unpacked / ".tcpcp-unpacked").write_text(pin.version + "\n")
    log.info("kernel_source_unpacked", path=str(unpacked), s=round(time.monotonic() - start, 1))
    return unpacked


def prepare_tree(flavour: Flavour, source: Path, pin: SourcePin = PIN) -> Path:
    """A build tree for flavour: hard links to the source, patched files copied then patched.

    The tree's name carries the series digest, so a changed series gets a fresh tree (older
    trees of the flavour are removed)."""
    patches = series() if flavour is Flavour.PATCHED else []
    stamp = f"{pin.version}-{flavour.value}" + (f"-{digest(patches)}" if patches else "")
    trees = cache_dir() / "tree"
    tree = trees / stamp
    if (tree / ".tcpcp-tree").exists():
        return tree
    trees.mkdir(parents=True, exist_ok=True)
    for old in trees.glob(f"{pin.version}-{flavour.value}*"):
        shutil.rmtree(old)
    _run(["cp", "-al", str(source), str(tree)])
    for patch in patches:
        for rel in touched_files(patch.read_text()):
            target = tree / rel
            if target.exists():  # break the hard link before patch writes to it
                data = target.read_bytes()
                target.unlink()
                target.write_bytes(data)
        _run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
              "-i", str(patch)], cwd=tree)
        log.info("kernel_patch_applied", patch=patch.name)
    (tree / ".tcpcp-tree").write_text(stamp + "\n")
    return tree


def _make_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CCACHE_DIR=str(cache_dir() / "ccache"), CCACHE_BASEDIR=str(tree),
               CCACHE_NOHASHDIR="1", KBUILD_BUILD_TIMESTAMP="tcpcp",
               KBUILD_BUILD_USER="tcpcp", KBUILD_BUILD_HOST="tcpcp")
    return env


def configure(tree: Path) -> None:
    """tinyconfig + ops/kernel/config + olddefconfig, redone only when the fragment changed."""
    fragment = CONFIG_FRAGMENT.read_text()
    stamp = hashlib.sha256(fragment.encode()).hexdigest()
    stamp_file = tree / ".tcpcp-config"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    env = _make_env(tree)
    _run(["make", "-s", "tinyconfig"], cwd=tree, env=env)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(CONFIG_FRAGMENT)],
         cwd=tree, env=env)
    _run(["make", "-s", "olddefconfig"], cwd=tree, env=env)
    missing = missing_options(fragment, (tree / ".config").read_text())
    if missing:
        raise BuildFailed(f"expected every option of {CONFIG_FRAGMENT} in the final .config, "
                          f"missing: {', '.join(missing)}")
    stamp_file.write_text(stamp)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One builder at a time per cache (parallel test processes share it)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(flavour: Flavour, jobs: int | None = None) -> BuiltKernel:
    """Build (or bring up to date) the flavour's bzImage; returns its path and the time taken."""
    start = time.monotonic()
    cpu_start = _children_cpu()
    with cache_lock():
        tree = prepare_tree(flavour, ensure_source())
        configure(tree)
        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cc = ["CC=ccache gcc"] if shutil.which("ccache") else []
        jobs = jobs or (os.cpu_count() or 1) + 1
        _run(["make", f"-j{jobs}", *cc, "bzImage"], cwd=tree, env=_make_env(tree),
             logfile=logs / f"{flavour.value}.log")
    built = BuiltKernel(flavour, tree / "arch" / "x86" / "boot" / "bzImage",
                        round(time.monotonic() - start, 1),
                        round(_children_cpu() - cpu_start, 1))
    log.info("kernel_built", flavour=flavour.value, path=str(built.bzimage), s=built.seconds,
             cpu_s=built.cpu_seconds)
    return built


def start_background(flavours: str = "both") -> subprocess.Popen[bytes]:
    """Start building flavours ("patched", "stock" or "both") in a child process at the lowest
    CPU and I/O priority, logging to the cache's logs/background-build.log. A later build()
    waits for it on the cache lock and then finds its work done (an incremental make)."""
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "background-build.log").open("wb") as out:
        proc = subprocess.Popen(["nice", "-n", "19", "ionice", "-c", "3", sys.executable, "-m",
                                 "ops.kernel.build", "--flavour", flavours], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    log.info("kernel_build_background", pid=proc.pid, flavours=flavours)
    return proc


def stop_background(proc: subprocess.Popen[bytes]) -> None:
    """Stop a background build that is still running (its whole process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    from ops import logs

    logs.configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flavour", choices=[f.value for f in Flavour] + ["both"],
                        default="patched")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    flavours = list(Flavour) if args.flavour == "both" else [Flavour(args.flavour)]
    for flavour in flavours:
        built = build(flavour, args.jobs)
        print(f"{flavour.value} {built.bzimage} {built.seconds}s (cpu {built.cpu_seconds}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
