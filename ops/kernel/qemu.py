"""Boot a tcpcp guest kernel under qemu (TCG) and run one shell command inside it.

The guest sees the host's root read-only (virtio-9p), so the command uses the repository, the
Python and the virtualenv of the host. qemu exits 0 whatever happens in the guest, so the
verdict comes from the serial log: the guest's init prints `TCPCP-VERDICT <nonce> exit=N`
after the command; a panic, oops, kernel BUG or WARNING, a missing verdict line or a hang
(timeout) fail the run.

    run = boot(bzimage, ".venv/bin/python -m pytest tests/kernelguest -q")
    run.verdict.passed, run.verdict.exit_code, run.log_path, run.seconds

    python -m ops.kernel.qemu --flavour patched -- uname -a
"""

from __future__ import annotations

import argparse
import enum
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ops.kernel import initramfs
from ops.kernel.build import REPO, cache_dir
from ops.kernel.errors import GuestFailed

log = structlog.get_logger(component="tcpcp.ops.kernel.qemu")

QEMU = "qemu-system-x86_64"
KERNEL_PROBLEMS = ("Kernel panic", "Oops:", "BUG: ", "WARNING: CPU:",
                   "general protection fault")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Outcome(enum.Enum):
    PASSED = "passed"          # verdict line, exit 0
    FAILED = "failed"          # verdict line, exit != 0
    KERNEL_PROBLEM = "kernel"  # panic / oops / BUG / WARNING in the log
    NO_VERDICT = "no-verdict"  # the guest ended (or was stopped) without a verdict line


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    exit_code: int | None
    detail: str

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED


def read_verdict(serial_log: str, nonce: str, timed_out: bool = False) -> Verdict:
    """What the serial log says about the run whose init was given nonce."""
    for line in serial_log.splitlines():
        for problem in KERNEL_PROBLEMS:
            if problem in line:
                return Verdict(Outcome.KERNEL_PROBLEM, None, line.strip())
    marker = f"{initramfs.VERDICT_PREFIX} {nonce} exit="
    for line in serial_log.splitlines():
        at = line.find(marker)
        if at < 0:
            continue
        code_text = line[at + len(marker):].split()[0] if line[at + len(marker):] else ""
        if not code_text.isdigit():
            return Verdict(Outcome.NO_VERDICT, None, f"unreadable verdict line: {line!r}")
        code = int(code_text)
        return Verdict(Outcome.PASSED if code == 0 else Outcome.FAILED, code, line.strip())
    why = "timed out (hang)" if timed_out else "guest ended without a verdict line"
    return Verdict(Outcome.NO_VERDICT, None, why)


@dataclass(frozen=True, slots=True)
class GuestRun:
    verdict: Verdict
    seconds: float
    log_path: Path
    serial_log: str
    files: dict[str, bytes] = field(default_factory=dict)

    def require_passed(self) -> GuestRun:
        if not self.verdict.passed:
            tail = "\n".join(self.serial_log.splitlines()[-60:])
            raise GuestFailed(f"expected the guest command to pass, got "
                              f"{self.verdict.outcome.value} ({self.verdict.detail}); "
                              f"log {self.log_path}:\n{tail}")
        return self


def job_script(command: str, cwd: Path, env: dict[str, str]) -> str:
    """The shell script the guest runs (from its job directory)."""
    exports = {"PATH": GUEST_PATH, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", "TCPCP_GUEST": "1", **env}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
    return "\n".join([*lines, f"cd {shlex.quote(str(cwd))} || exit 126", command, ""])


def qemu_command(bzimage: Path, initrd: Path, job_dir: Path, smp: int, mem_mb: int,
                 repo: Path = REPO) -> list[str]:
    # tsc=reliable: without it the TSC watchdog under TCG can demote the clock to jiffies
    # (4 ms resolution), which ruins every latency figure taken in the guest
    append = "console=ttyS0 panic=-1 oops=panic loglevel=4 tsc=reliable"
    return [QEMU, "-nodefaults", "-no-user-config", "-machine", "pc", "-cpu", "max",
            "-smp", str(smp), "-m", str(mem_mb), "-kernel", str(bzimage),
            "-initrd", str(initrd), "-append", append, "-no-reboot", "-display", "none",
            "-serial", "stdio", "-monitor", "none",
            "-virtfs", f"local,path=/,mount_tag={initramfs.ROOT_TAG},security_model=none,"
                       "readonly=on,multidevs=remap",
            "-virtfs", f"local,path={job_dir},mount_tag={initramfs.JOB_TAG},"
                       "security_model=none,multidevs=remap",
            "-virtfs", f"local,path={repo},mount_tag={initramfs.REPO_TAG},security_model=none,"
                       "readonly=on,multidevs=remap"]


KEEP_GUEST_LOGS = 40  # the newest serial logs kept in the cache's logs/


def _prune_logs(logs: Path, keep: int) -> None:
    """Remove all but the newest keep guest serial logs (each boot writes one)."""
    old = sorted(logs.glob("guest-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in old[keep:]:
        path.unlink(missing_ok=True)


def boot(bzimage: Path, command: str, *, cwd: Path = REPO, timeout: float = 300.0,
         smp: int = 2, mem_mb: int = 2048, env: dict[str, str] | None = None,
         echo: bool = False, log_path: Path | None = None) -> GuestRun:
    """Boot bzimage, run command (a shell command line) in cwd inside the guest, return the run.

    The serial log is streamed to log_path (and to stderr with echo); after timeout seconds
    the guest counts as hung and qemu is killed. Files the command leaves in $TCPCP_JOB_DIR
    come back in GuestRun.files."""
    if shutil.which(QEMU) is None:
        raise GuestFailed(f"expected {QEMU} on PATH (apt-get install qemu-system-x86), "
                          f"found none")
    initrd = initramfs.build_initramfs(cache_dir() / "initramfs.cpio")
    nonce = secrets.token_hex(8)
    if log_path is None:
        log_path = cache_dir() / "logs" / f"guest-{nonce}.log"
        _prune_logs(log_path.parent, KEEP_GUEST_LOGS)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tcpcp-job-") as tmp:
        job_dir = Path(tmp)
        job_dir.chmod(0o777)
        (job_dir / "nonce").write_text(nonce)
        (job_dir / "repo_path").write_text(str(REPO))
        (job_dir / "cmd").write_text(job_script(
            command, cwd, {"TCPCP_JOB_DIR": initramfs.GUEST_JOB_DIR, **(env or {})}))
        start = time.monotonic()
        proc = subprocess.Popen(qemu_command(bzimage, initrd, job_dir, smp, mem_mb),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        chunks: list[str] = []
        reader = threading.Thread(target=_stream, args=(proc, log_path, chunks, echo),
                                  daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        seconds = round(time.monotonic() - start, 2)
        files = {p.name: p.read_bytes() for p in job_dir.iterdir()
                 if p.is_file() and p.name not in ("cmd", "nonce", "repo_path")}
    serial_log = "".join(chunks)
    verdict = read_verdict(serial_log, nonce, timed_out)
    log.info("guest_run", outcome=verdict.outcome.value, exit=verdict.exit_code, s=seconds,
             log=str(log_path))
    return GuestRun(verdict, seconds, log_path, serial_log, files)


def _stream(proc: subprocess.Popen[bytes], log_path: Path, chunks: list[str],
            echo: bool) -> None:
    assert proc.stdout is not None
    with log_path.open("w") as out:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            chunks.append(line)
            out.write(line)
            out.flush()
            if echo:
                sys.stderr.write(line)


def main(argv: list[str] | None = None) -> int:
    from ops import logs
    from ops.kernel.build import Flavour, build

    logs.configure()
    parser = argparse.ArgumentParser(description="Boot the tcpcp guest kernel and run a "
                                                 "command in it; exit status is the guest's.")
    parser.add_argument("--flavour", choices=[f.value for f in Flavour], default="patched")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    kernel = build(Flavour(args.flavour))
    run = boot(kernel.bzimage, shlex.join(args.command), timeout=args.timeout, smp=args.smp,
               echo=True)
    print(f"verdict={run.verdict.outcome.value} exit={run.verdict.exit_code} "
          f"seconds={run.seconds} log={run.log_path}")
    if run.verdict.exit_code is not None:
        return run.verdict.exit_code
    return 125


if __name__ == "__main__":
    raise SystemExit(main())
