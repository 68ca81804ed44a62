"""Starting the standby application with the resurrected connections as inherited descriptors,
the systemd LISTEN_FDS convention (sd_listen_fds(3)), for `resurrector --exec CMD`.

    spawn(["python", "-m", "myapp", "--adopt-inherited"], [(handed, sock), ...])

The application finds connection i on descriptor 3 + i, LISTEN_FDS of them, LISTEN_PID its own
pid; what goes with each (positions, state: the hand-over frames of resurrector/handover.py, in
the same order) is on descriptor TCPCP_HANDOVER_FD, a sealed memfd right after them. It reads
them with resurrector.adopt.inherited().

The descriptors are moved into place by a trampoline (`python -m resurrector.listenfds`, this
module's main) that execs the command: its pid is the command's, so LISTEN_PID is right, and no
code runs between fork and exec in the resurrector (which has threads).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from resurrector.handover import Handed, encode

FIRST_FD = 3  # SD_LISTEN_FDS_START
FRAMES_ENV = "TCPCP_HANDOVER_FD"


def frames_memfd(handed: Sequence[Handed]) -> int:
    """A sealed memfd holding the hand-over frames, read from offset 0."""
    fd = os.memfd_create("tcpcp-handover", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = b"".join(encode(h) for h in handed)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def spawn(command: Sequence[str], connections: Sequence[tuple[Handed, socket.socket]],
          **popen: object) -> subprocess.Popen[bytes]:
    """Start command with the connections inherited (see the module docstring); the caller
    still owns (and should close) its own copies of the sockets."""
    if not command:
        raise ValueError("expected a command to start, got an empty one")
    frames = frames_memfd([h for h, _ in connections])
    try:
        fds = [s.fileno() for _, s in connections]
        argv = [sys.executable, "-m", "resurrector.listenfds", ",".join(map(str, fds)),
                str(frames), "--", *command]
        return subprocess.Popen(argv, pass_fds=(*fds, frames), start_new_session=True,
                                **popen)  # type: ignore[call-overload, no-any-return]
    finally:
        os.close(frames)


def _place(sources: Sequence[int]) -> None:
    """Move sources onto FIRST_FD, FIRST_FD + 1, ... (inheritable), whatever they were."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1024) for fd in sources]
    for fd in sources:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)


def main(argv: Sequence[str]) -> None:
    """The trampoline: SOCKET_FDS FRAMES_FD -- COMMAND..."""
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m resurrector.listenfds FD,FD,... FRAMES_FD -- COMMAND...")
    sockets = [int(x) for x in argv[0].split(",") if x]
    _place([*sockets, int(argv[1])])
    os.environ.update(LISTEN_FDS=str(len(sockets)), LISTEN_PID=str(os.getpid()),
                      LISTEN_FDNAMES=":".join(["tcpcp"] * len(sockets)),
                      **{FRAMES_ENV: str(FIRST_FD + len(sockets))})
    os.execvp(argv[3], list(argv[3:]))


if __name__ == "__main__":
    main(sys.argv[1:])
