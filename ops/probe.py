"""Small reachability helpers for the lab: TCP listeners that say which host answered, and
packet captures with tcpdump inside a lab host.

Used by the lab's own tests, by `tcpcp lab status --reach` and by the demo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ops import netns
from ops.lab import Lab


class NameServer:
    """A TCP listener in a lab host (IPv4 and IPv6) that answers every connection with its
    host name, then closes. Runs in threads of the calling process."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        self.lab, self.host, self.port = lab, host, port
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()

    def __enter__(self) -> NameServer:
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = self.lab.call(self.host, _listener, family, any_addr, self.port)
            self._socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()
        return self

    def _serve(self, s: socket.socket) -> None:
        s.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.host.encode())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()


def _listener(family: int, address: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((address, port))
    s.listen(64)
    return s


def ask_name(address: str, port: int, timeout: float = 2.0) -> str | None:
    """Connect from the calling thread's namespace; the answering host's name, or None."""
    netns.assert_inside_lab()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((address, port))
            data = b""
            while chunk := s.recv(64):
                data += chunk
            return data.decode() or None
    except OSError:
        return None


def reachable(lab: Lab, src: str, address: str, port: int, timeout: float = 1.0) -> str | None:
    """Which host answers `address:port` as seen from lab host `src` (None: unreachable)."""
    return lab.call(src, ask_name, address, port, timeout)


@dataclass(frozen=True, slots=True)
class Packet:
    time: float
    line: str


class Capture:
    """tcpdump in a lab host, writing a pcap; `packets()` reads it back after `stop()`."""

    def __init__(self, lab: Lab, host: str, interface: str, bpf_filter: str = "",
                 snaplen: int = 128) -> None:
        self.lab, self.host, self.interface = lab, host, interface
        fd, self.path = tempfile.mkstemp(prefix=f"{lab.prefix}-{host}-", suffix=".pcap")
        os.close(fd)
        self.argv = ["tcpdump", "-i", interface, "--immediate-mode", "-U", "-n",
                     "-s", str(snaplen), "-w", self.path]
        if bpf_filter:
            self.argv.append(bpf_filter)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> Capture:
        self.proc = self.lab.popen(self.host, self.argv, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stderr.fileno(), False)
        seen = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stderr.read() or b""
            seen += chunk
            if b"listening on" in seen:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"tcpdump on {self.host}/{self.interface} did not start: {seen!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.2)  # let the last packets reach the file
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)

    def packets(self, read_filter: Sequence[str] = ()) -> list[Packet]:
        r = subprocess.run(["tcpdump", "-r", self.path, "-n", "-tt", "-v", *read_filter],
                           capture_output=True, text=True, check=True)
        out = []
        for line in r.stdout.splitlines():
            head = line.split(" ", 1)[0]
            try:
                out.append(Packet(float(head), line))
            except ValueError:
                if out:  # continuation line of -v output
                    out[-1] = Packet(out[-1].time, out[-1].line + " " + line.strip())
        return out

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def capture(lab: Lab, host: str, interface: str, bpf_filter: str = "") -> Iterator[Capture]:
    cap = Capture(lab, host, interface, bpf_filter).start()
    try:
        yield cap
    finally:
        cap.stop()
