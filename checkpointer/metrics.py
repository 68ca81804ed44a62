"""Prometheus metrics of the checkpointer: a small registry and its HTTP endpoint, no dependency.

    registry = Registry()
    m = CheckpointerMetrics.register(registry)        # the daemon's metrics, named in one place
    m.commits.inc(); m.commit_latency.observe(0.0004); m.refused.labels(reason="oversized").inc()
    registry.render()                                 # text exposition format 0.0.4
    with MetricsServer(registry, ("127.0.0.1", 9477)) as server:   # GET /metrics, own thread
        server.address

Every metric is thread-safe (one lock per metric family). The rendering follows the text format
0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/): one `# HELP` and one
`# TYPE` line per family, HELP text with backslash and newline escaped, label values with
backslash, double quote and newline escaped, histograms as cumulative `_bucket{le="..."}` series
ending with `le="+Inf"`, then `_sum` and `_count`.

The endpoint answers one request per connection and closes it. A request is at most
max_request bytes and must arrive in full within deadline_s (a slow client is dropped; each
client has its own thread, at most max_clients at once, so nobody waits for another).
"""

from __future__ import annotations

import itertools
import math
import re
import socket
import socketserver
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

import structlog

log = structlog.get_logger(component="tcpcp.checkpointer.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
SECONDS_100US_TO_1S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                       0.25, 0.5, 1.0)


class MetricError(ValueError):
    """A metric defined or used against the rules (bad name, label, value or bucket)."""


def format_value(value: float) -> str:
    """A sample value as the text format writes it (Go's float syntax: +Inf, -Inf, NaN)."""
    if isinstance(value, int):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels_text(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


class _Family:
    """A metric family: name, help, label names, and one child per label-value tuple."""

    type_name: ClassVar[str] = ""
    reserved_labels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise MetricError(f"metric name must match {_METRIC_NAME.pattern}, got {name!r}")
        for label in labelnames:
            if (not _LABEL_NAME.match(label) or label.startswith("__")
                    or label in self.reserved_labels):
                raise MetricError(f"label name must match {_LABEL_NAME.pattern}, not start "
                                  f"with __ and not be one of {sorted(self.reserved_labels)}, "
                                  f"got {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise MetricError(f"label names must be distinct, got {list(labelnames)} for {name}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:
            self._children[()] = self._zero()

    def _zero(self) -> list[float]:
        return [0.0]

    def _child_key(self, values: Sequence[object], kw: dict[str, object]) -> tuple[str, ...]:
        """The key of the labels' child, created at zero (exposed from now on)."""
        key = self._key(values, kw)
        with self._lock:
            self._cell(key)
        return key

    def _key(self, values: Sequence[object], kw: dict[str, object]) -> tuple[str, ...]:
        if values and kw:
            raise MetricError(f"labels of {self.name}: pass values by position or by name, "
                              "not both")
        if kw:
            if set(kw) != set(self.labelnames):
                raise MetricError(f"labels of {self.name}: expected {list(self.labelnames)}, "
                                  f"got {sorted(kw)}")
            values = [kw[n] for n in self.labelnames]
        if len(values) != len(self.labelnames):
            raise MetricError(f"labels of {self.name}: expected {len(self.labelnames)} values "
                              f"({list(self.labelnames)}), got {len(values)}")
        return tuple(str(v) for v in values)

    def _cell(self, key: tuple[str, ...]) -> list[float]:
        """The child's state (call with the lock held)."""
        cell = self._children.get(key)
        if cell is None:
            cell = self._children[key] = self._zero()
        return cell

    def _snapshot(self) -> list[tuple[tuple[str, ...], list[float]]]:
        with self._lock:
            return sorted((k, list(v)) for k, v in self._children.items())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {escape_help(self.help)}",
                 f"# TYPE {self.name} {self.type_name}"]
        for key, cell in self._snapshot():
            lines += self._samples(list(zip(self.labelnames, key, strict=True)), cell)
        return lines

    def _samples(self, pairs: list[tuple[str, str]], cell: list[float]) -> list[str]:
        return [f"{self.name}{_labels_text(pairs)} {format_value(cell[0])}"]


class Counter(_Family):
    """A count that only goes up."""

    type_name = "counter"

    def labels(self, *values: object, **kw: object) -> CounterChild:
        return CounterChild(self, self._child_key(values, kw))

    def inc(self, amount: float = 1) -> None:
        CounterChild(self, self._key((), {})).inc(amount)

    def value(self, *values: object, **kw: object) -> float:
        with self._lock:
            return self._cell(self._key(values, kw))[0]


@dataclass(frozen=True, slots=True)
class CounterChild:
    family: Counter
    key: tuple[str, ...]

    def inc(self, amount: float = 1) -> None:
        if not amount >= 0:
            raise MetricError(f"counter {self.family.name} goes up: expected an increment "
                              f">= 0, got {amount}")
        with self.family._lock:
            self.family._cell(self.key)[0] += amount


class Gauge(_Family):
    """A value that goes up and down."""

    type_name = "gauge"

    def labels(self, *values: object, **kw: object) -> GaugeChild:
        return GaugeChild(self, self._child_key(values, kw))

    def set(self, value: float) -> None:
        GaugeChild(self, self._key((), {})).set(value)

    def inc(self, amount: float = 1) -> None:
        GaugeChild(self, self._key((), {})).inc(amount)

    def dec(self, amount: float = 1) -> None:
        GaugeChild(self, self._key((), {})).inc(-amount)

    def value(self, *values: object, **kw: object) -> float:
        with self._lock:
            return self._cell(self._key(values, kw))[0]


@dataclass(frozen=True, slots=True)
class GaugeChild:
    family: Gauge
    key: tuple[str, ...]

    def set(self, value: float) -> None:
        with self.family._lock:
            self.family._cell(self.key)[0] = value

    def inc(self, amount: float = 1) -> None:
        with self.family._lock:
            self.family._cell(self.key)[0] += amount

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)


class Histogram(_Family):
    """Observations counted into buckets (upper bounds, strictly increasing; +Inf is added).

    A child's state is [count per bucket (not cumulative)..., count in +Inf only, sum]."""

    type_name = "histogram"
    reserved_labels = frozenset({"le"})

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = SECONDS_100US_TO_1S) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()
        if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds) or any(
                a >= b for a, b in itertools.pairwise(bounds)):
            raise MetricError(f"buckets of {name} must be finite and strictly increasing, "
                              f"got {list(buckets)}")
        self.buckets = tuple(bounds)
        super().__init__(name, help, labelnames)

    def _zero(self) -> list[float]:
        return [0.0] * (len(self.buckets) + 2)

    def labels(self, *values: object, **kw: object) -> HistogramChild:
        return HistogramChild(self, self._child_key(values, kw))

    def observe(self, value: float) -> None:
        HistogramChild(self, self._key((), {})).observe(value)

    def _samples(self, pairs: list[tuple[str, str]], cell: list[float]) -> list[str]:
        lines = []
        cumulative = 0.0
        for bound, n in zip([*self.buckets, math.inf], cell[:-1], strict=True):
            cumulative += n
            le = [*pairs, ("le", format_value(bound))]
            lines.append(f"{self.name}_bucket{_labels_text(le)} {format_value(int(cumulative))}")
        lines.append(f"{self.name}_sum{_labels_text(pairs)} {format_value(cell[-1])}")
        lines.append(f"{self.name}_count{_labels_text(pairs)} {format_value(int(cumulative))}")
        return lines


@dataclass(frozen=True, slots=True)
class HistogramChild:
    family: Histogram
    key: tuple[str, ...]

    def observe(self, value: float) -> None:
        if math.isnan(value):
            raise MetricError(f"histogram {self.family.name}: expected a number, got NaN")
        index = len(self.family.buckets)
        for i, bound in enumerate(self.family.buckets):
            if value <= bound:
                index = i
                break
        with self.family._lock:
            cell = self.family._cell(self.key)
            cell[index] += 1
            cell[-1] += value


class Registry:
    """The metric families of one process, rendered together; names are unique."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def register(self, family: _Family) -> _Family:
        with self._lock:
            if family.name in self._families:
                raise MetricError(f"metric {family.name} is registered already")
            self._families[family.name] = family
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        family = Counter(name, help, labelnames)
        self.register(family)
        return family

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help, labelnames)
        self.register(family)
        return family

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = SECONDS_100US_TO_1S) -> Histogram:
        family = Histogram(name, help, labelnames, buckets)
        self.register(family)
        return family

    def families(self) -> list[_Family]:
        with self._lock:
            return list(self._families.values())

    def render(self) -> str:
        """The exposition text (format 0.0.4), families in registration order."""
        lines: list[str] = []
        for family in self.families():
            lines += family.render()
        return "\n".join(lines) + "\n" if lines else ""


# --- the checkpointer's metrics, named in one place -----------------------------------------

LEASE_STATES = ("held", "renewing", "lost", "fenced", "taken_over")
REFUSAL_REASONS = ("malformed", "oversized", "too_many", "version", "unauthorised",
                   "unknown_connection", "not_tcp", "bad_state", "not_guarded", "disconnected")


@dataclass(frozen=True, slots=True)
class CheckpointerMetrics:
    """The metrics the checkpointer issue asks for (not wired to anything here).

    lease_state: one series per LEASE_STATES entry, 1 for the current state and 0 for the
    others (set_lease_state does that). refused: reasons from REFUSAL_REASONS."""

    commits: Counter
    commit_latency: Histogram
    gate_held_bytes: Gauge
    lease_state: Gauge
    checkpoints: Counter
    refused: Counter
    guarded_connections: Gauge

    @classmethod
    def register(cls, registry: Registry) -> CheckpointerMetrics:
        p = "tcpcp_checkpointer_"
        m = cls(
            commits=registry.counter(
                p + "commits_total", "Commits made durable in the store and released by the "
                "ACK gate."),
            commit_latency=registry.histogram(
                p + "commit_latency_seconds", "Time from the agent receiving a commit to "
                "its forced ACK leaving, in seconds (the client's trip to the agent and the reply "
                "are not counted).", buckets=SECONDS_100US_TO_1S),
            gate_held_bytes=registry.gauge(
                p + "gate_held_bytes", "Bytes received on guarded connections but not yet "
                "acknowledged (held by the ACK gate)."),
            lease_state=registry.gauge(
                p + "lease_state", "The origin's lease: 1 for the current state, 0 for the "
                "others.", ["state"]),
            checkpoints=registry.counter(
                p + "checkpoints_total", "Periodic checkpoints written (rate() gives per "
                "second)."),
            refused=registry.counter(
                p + "refused_requests_total", "Local API requests refused, by reason.",
                ["reason"]),
            guarded_connections=registry.gauge(
                p + "guarded_connections", "Connections guarded by this agent."),
        )
        m.set_lease_state("lost")
        return m

    def set_lease_state(self, state: str) -> None:
        if state not in LEASE_STATES:
            raise MetricError(f"lease state must be one of {LEASE_STATES}, got {state!r}")
        for name in LEASE_STATES:
            self.lease_state.labels(state=name).set(1 if name == state else 0)


# --- the HTTP endpoint -----------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            505: "HTTP Version Not Supported"}


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        deadline = time.monotonic() + self.server.deadline_s
        head, status = self._read_head(sock, deadline)
        if status == 0:
            status, body = self._answer(head)
        else:
            body = f"{_REASONS[status]}\n".encode()
        if status != 200:
            log.debug("metrics_request_refused", status=status, peer=str(self.client_address),
                     line=head.split(b"\r\n", 1)[0][:80].decode("latin-1"))
        self._send(sock, status, body, deadline)

    def _read_head(self, sock: socket.socket, deadline: float) -> tuple[bytes, int]:
        """The request line and headers (up to the blank line), or a status to refuse with."""
        data = b""
        limit = self.server.max_request
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return data, 408
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                return data, 408
            except OSError:
                return data, 400
            if not chunk:
                return data, 400
            data += chunk
            if len(data) > limit:
                return data[:limit], 431
        return data, 0

    def _answer(self, head: bytes) -> tuple[int, bytes]:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3:
            return 400, f"{_REASONS[400]}\n".encode()
        if not parts[2].startswith(b"HTTP/1."):
            return 505, f"{_REASONS[505]}\n".encode()
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return 404, f"{_REASONS[404]}\n".encode()
        if method != b"GET":
            return 405, f"{_REASONS[405]}\n".encode()
        return 200, self.server.registry.render().encode("utf-8")

    def _send(self, sock: socket.socket, status: int, body: bytes, deadline: float) -> None:
        kind = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        extra = "Allow: GET\r\n" if status == 405 else ""
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.5))
            sock.sendall(head.encode("ascii") + body)
            if status != 200:
                self._drain(sock)
        except OSError:
            pass  # the client went away or is too slow: nothing to do for it

    @staticmethod
    def _drain(sock: socket.socket, limit: int = 256 * 1024, wait_s: float = 0.5) -> None:
        """Let a refused client read its answer: closing with its unread bytes still queued
        would send RST, which can destroy the answer in flight. Bounded in bytes and time."""
        sock.shutdown(socket.SHUT_WR)
        until = time.monotonic() + wait_s
        while limit > 0 and (left := until - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(min(limit, 65536))
            if not chunk:
                return
            limit -= len(chunk)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], registry: Registry, *, deadline_s: float,
                 max_request: int, max_clients: int) -> None:
        self.registry = registry
        self.deadline_s = deadline_s
        self.max_request = max_request
        self._slots = threading.BoundedSemaphore(max_clients)
        self.address_family = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        log.exception("metrics_request_failed", peer=str(client_address))

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("metrics_client_refused", reason="too many clients",
                        peer=str(client_address))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[arg-type]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[arg-type]
        finally:
            self._slots.release()


class MetricsServer:
    """GET /metrics of registry on address, served from a daemon thread; a context manager."""

    def __init__(self, registry: Registry, address: tuple[str, int], *,
                 deadline_s: float = 5.0, max_request: int = 8192,
                 max_clients: int = 16) -> None:
        self._server = _Server(address, registry, deadline_s=deadline_s,
                               max_request=max_request, max_clients=max_clients)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="tcpcp-metrics", daemon=True)
        self._thread.start()
        log.info("metrics_serving", address=self.url)

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (the real port when 0 was asked)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else \
            f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def serve(registry: Registry, address: tuple[str, int] | None, *, deadline_s: float = 5.0,
          max_request: int = 8192, max_clients: int = 16) -> MetricsServer | None:
    """The endpoint on address (the configuration's metrics_address), or None when that is
    None (metrics disabled)."""
    if address is None:
        return None
    return MetricsServer(registry, address, deadline_s=deadline_s, max_request=max_request,
                         max_clients=max_clients)


__all__ = ["CONTENT_TYPE", "LEASE_STATES", "REFUSAL_REASONS", "SECONDS_100US_TO_1S",
           "CheckpointerMetrics", "Counter", "Gauge", "Histogram", "MetricError",
           "MetricsServer", "Registry", "escape_help", "escape_label_value", "format_value",
           "serve"]
