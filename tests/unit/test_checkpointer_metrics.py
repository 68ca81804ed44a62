"""The checkpointer's Prometheus registry and endpoint: output read back by a strict parser of
the text exposition format 0.0.4, and an endpoint that keeps serving through bad clients."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer.metrics import (
    CONTENT_TYPE,
    LEASE_STATES,
    SECONDS_100US_TO_1S,
    CheckpointerMetrics,
    Histogram,
    MetricError,
    MetricsServer,
    Registry,
    format_value,
    serve,
)
from ops.wait import wait_until

# --- a strict parser of the text format 0.0.4 ---------------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
VALUE = r"[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
HELP_LINE = re.compile(rf"^# HELP ({NAME}) ((?:[^\\\n]|\\\\|\\n)*)$")
TYPE_LINE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE_LINE = re.compile(rf"^({NAME})(\{{.*\}})? ({VALUE})$")
PAIR = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)')


@dataclass
class Family:
    help: str | None = None
    type: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def unescape(text: str, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1]
            assert nxt in ("\\n\"" if quote else "\\n"), f"bad escape \\{nxt} in {text!r}"
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_labels(text: str) -> dict[str, str]:
    assert text.startswith("{") and text.endswith("}"), text
    body, labels, pos = text[1:-1], {}, 0
    while pos < len(body):
        m = PAIR.match(body, pos)
        assert m is not None, f"bad label set {text!r} at {pos}"
        assert m.group(1) not in labels, f"duplicate label {m.group(1)} in {text!r}"
        labels[m.group(1)] = unescape(m.group(2), quote=True)
        pos = m.end()
    return labels


def parse(text: str) -> dict[str, Family]:
    """Families by name; asserts every rule of the format that the registry promises."""
    assert text == "" or text.endswith("\n"), "output must end with a newline"
    families: dict[str, Family] = {}
    current: str | None = None
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text.split("\n")[:-1]:  # lines end with \n only (not \r, \x85, ...)
        if (m := HELP_LINE.match(line)) is not None:
            name = m.group(1)
            assert name not in families, f"family {name} appears twice"
            families[name] = Family(help=unescape(m.group(2), quote=False))
            current = name
        elif (m := TYPE_LINE.match(line)) is not None:
            assert m.group(1) == current, f"TYPE of {m.group(1)} not right after its HELP"
            fam = families[m.group(1)]
            assert fam.type is None and not fam.samples, "TYPE must come before the samples"
            fam.type = m.group(2)
        else:
            m = SAMPLE_LINE.match(line)
            assert m is not None, f"not a sample line: {line!r}"
            assert current is not None and families[current].type is not None
            name, labels = m.group(1), parse_labels(m.group(2)) if m.group(2) else {}
            allowed = {current} if families[current].type != "histogram" else {
                current + "_bucket", current + "_sum", current + "_count"}
            assert name in allowed, f"sample {name} in family {current}"
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen_series, f"series {key} twice"
            seen_series.add(key)
            families[current].samples.append((name, labels, float(m.group(3).replace(
                "Inf", "inf").replace("NaN", "nan"))))
    for name, fam in families.items():
        if fam.type == "histogram":
            check_histogram(name, fam)
    return families


def check_histogram(name: str, fam: Family) -> None:
    """Per label set: buckets cumulative in increasing le, the last +Inf, equal to _count."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[str, dict[str, str], float]]] = {}
    for sample in fam.samples:
        rest = tuple(sorted((k, v) for k, v in sample[1].items() if k != "le"))
        series.setdefault(rest, []).append(sample)
    for rest, samples in series.items():
        buckets = [(float(lab["le"].replace("Inf", "inf")), v) for n, lab, v in samples
                   if n == name + "_bucket"]
        assert buckets and buckets[-1][0] == math.inf, f"{name}{rest}: no +Inf bucket"
        assert all(a[0] < b[0] and a[1] <= b[1]
                   for a, b in itertools.pairwise(buckets)), buckets
        counts = [v for n, _, v in samples if n == name + "_count"]
        sums = [v for n, _, v in samples if n == name + "_sum"]
        assert counts == [buckets[-1][1]] and len(sums) == 1, (name, rest)
        assert [n for n, _, _ in samples][-2:] == [name + "_sum", name + "_count"]


def test_the_parser_refuses_what_the_format_forbids() -> None:
    for bad in ['# HELP a x\n# TYPE a gauge\na{l="x"y"} 1\n',
                "# HELP a x\n# TYPE a gauge\na 1\na 2\n",
                "# HELP a x\n# TYPE a gauge\nb 1\n",
                "# HELP a x\n# TYPE a gauge\na 1",
                '# HELP a x\n# TYPE a gauge\na{l="\\t"} 1\n',
                '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\n'
                "h_sum 1\nh_count 1\n"]:
        with pytest.raises(AssertionError):
            parse(bad)


# --- the registry --------------------------------------------------------------------------------


def test_counter_gauge_and_histogram_render_help_type_and_samples() -> None:
    r = Registry()
    c = r.counter("jobs_total", "Jobs done.\nSecond line with a \\ backslash.", ["kind"])
    g = r.gauge("queue_bytes", "Bytes queued.")
    h = r.histogram("wait_seconds", "Waits.", buckets=[0.1, 1])
    c.labels(kind="a").inc()
    c.labels("b").inc(2.5)
    g.set(7)
    g.dec(2)
    for v in (0.05, 0.1, 0.5, 3):
        h.observe(v)
    fams = parse(r.render())
    assert list(fams) == ["jobs_total", "queue_bytes", "wait_seconds"]
    assert fams["jobs_total"].help == "Jobs done.\nSecond line with a \\ backslash."
    assert fams["jobs_total"].samples == [("jobs_total", {"kind": "a"}, 1.0),
                                          ("jobs_total", {"kind": "b"}, 2.5)]
    assert fams["queue_bytes"].samples == [("queue_bytes", {}, 5.0)]
    assert fams["wait_seconds"].samples == [
        ("wait_seconds_bucket", {"le": "0.1"}, 2), ("wait_seconds_bucket", {"le": "1"}, 3),
        ("wait_seconds_bucket", {"le": "+Inf"}, 4), ("wait_seconds_sum", {}, 3.65),
        ("wait_seconds_count", {}, 4)]
    assert c.value(kind="b") == 2.5 and g.value() == 5


def test_a_metric_without_labels_is_exposed_at_zero_and_a_labelled_one_once_named() -> None:
    r = Registry()
    r.counter("a_total", "A.")
    b = r.counter("b_total", "B.", ["why"])
    fams = parse(r.render())
    assert fams["a_total"].samples == [("a_total", {}, 0.0)] and fams["b_total"].samples == []
    b.labels(why="late")
    assert parse(r.render())["b_total"].samples == [("b_total", {"why": "late"}, 0.0)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), min_size=1, max_size=5, unique=True), st.text())
def test_any_label_value_and_help_text_read_back_unchanged(values: list[str], help: str) -> None:
    r = Registry()
    c = r.counter("x_total", help, ["a", "b"])
    for i, v in enumerate(values):
        c.labels(a=v, b="\\" + v + '"').inc(i + 1)
    fam = parse(r.render())["x_total"]
    assert fam.help == help
    assert sorted((lab["a"], lab["b"], val) for _, lab, val in fam.samples) == sorted(
        (v, "\\" + v + '"', float(i + 1)) for i, v in enumerate(values))


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=12, unique=True).map(sorted),
       st.lists(st.one_of(finite, st.just(math.inf), st.just(-math.inf)), max_size=60),
       st.sampled_from(["", "x"]))
def test_histogram_buckets_are_cumulative_and_count_every_observation(
        bounds: list[float], observed: list[float], label: str) -> None:
    r = Registry()
    h = r.histogram("h", "H.", ["l"] if label else [], buckets=bounds)
    child = h.labels(label) if label else h
    for v in observed:
        child.observe(v)
    fam = parse(r.render())["h"]
    buckets = [(lab["le"], v) for n, lab, v in fam.samples if n == "h_bucket"]
    assert [le for le, _ in buckets] == [format_value(b) for b in bounds] + ["+Inf"]
    for (le, count), bound in zip(buckets, [*bounds, math.inf], strict=True):
        assert count == sum(1 for v in observed if v <= bound), le
    total = next(v for n, _, v in fam.samples if n == "h_sum")
    expected = sum(observed)
    assert total == expected or (math.isnan(total) and math.isnan(expected)) or \
        math.isclose(total, expected, rel_tol=1e-9, abs_tol=1e-6)


def test_commit_latency_buckets_span_100_us_to_1_s() -> None:
    r = Registry()
    m = CheckpointerMetrics.register(r)
    assert m.commit_latency.buckets == SECONDS_100US_TO_1S
    assert SECONDS_100US_TO_1S[0] == 0.0001 and SECONDS_100US_TO_1S[-1] == 1.0
    fams = parse(r.render())
    assert set(fams) == {
        "tcpcp_checkpointer_commits_total", "tcpcp_checkpointer_commit_latency_seconds",
        "tcpcp_checkpointer_gate_held_bytes", "tcpcp_checkpointer_lease_state",
        "tcpcp_checkpointer_checkpoints_total", "tcpcp_checkpointer_refused_requests_total",
        "tcpcp_checkpointer_guarded_connections"}
    assert fams["tcpcp_checkpointer_commit_latency_seconds"].type == "histogram"
    assert all(f.help for f in fams.values())


def test_lease_state_is_one_for_the_current_state_only() -> None:
    r = Registry()
    m = CheckpointerMetrics.register(r)
    m.set_lease_state("fenced")
    samples = parse(r.render())["tcpcp_checkpointer_lease_state"].samples
    assert {lab["state"]: v for _, lab, v in samples} == {
        s: (1.0 if s == "fenced" else 0.0) for s in LEASE_STATES}
    with pytest.raises(MetricError, match="lease state"):
        m.set_lease_state("sleepy")


@pytest.mark.parametrize("make", [
    lambda r: r.counter("1bad", "x"),
    lambda r: r.counter("a-b", "x"),
    lambda r: r.counter("ok", "x", ["__reserved"]),
    lambda r: r.counter("ok", "x", ["a-b"]),
    lambda r: r.counter("ok", "x", ["a", "a"]),
    lambda r: r.histogram("ok", "x", ["le"]),
    lambda r: r.histogram("ok", "x", buckets=[]),
    lambda r: r.histogram("ok", "x", buckets=[1, 1]),
    lambda r: r.histogram("ok", "x", buckets=[2, 1]),
    lambda r: r.histogram("ok", "x", buckets=[float("nan")]),
])
def test_bad_definitions_are_refused(make: object) -> None:
    with pytest.raises(MetricError):
        make(Registry())  # type: ignore[operator]


def test_bad_uses_are_refused() -> None:
    r = Registry()
    c = r.counter("c_total", "C.", ["a"])
    h = r.histogram("h", "H.")
    with pytest.raises(MetricError, match="already"):
        r.counter("c_total", "again")
    with pytest.raises(MetricError, match="expected 1 values"):
        c.inc()
    with pytest.raises(MetricError, match=r"expected \['a'\]"):
        c.labels(b="x")
    with pytest.raises(MetricError, match="not both"):
        c.labels("x", a="y")
    with pytest.raises(MetricError, match="goes up"):
        c.labels("x").inc(-1)
    with pytest.raises(MetricError, match="NaN"):
        h.observe(math.nan)


def test_the_trailing_inf_bucket_may_be_given_and_is_not_doubled() -> None:
    h = Histogram("h", "H.", buckets=[1, math.inf])
    assert h.buckets == (1.0,)


def test_counts_from_many_threads_add_up() -> None:
    r = Registry()
    c = r.counter("c_total", "C.", ["t"])
    h = r.histogram("h", "H.")

    def work(i: int) -> None:
        for _ in range(2000):
            c.labels(t=str(i % 2)).inc()
            h.observe(0.001)
            r.render()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value("0") + c.value("1") == 12000
    count = [v for n, _, v in parse(r.render())["h"].samples if n == "h_count"]
    assert count == [12000]


@pytest.mark.parametrize("value,text", [(1, "1"), (1.0, "1"), (0.25, "0.25"),
                                        (math.inf, "+Inf"), (-math.inf, "-Inf"),
                                        (math.nan, "NaN"), (1e-05, "1e-05")])
def test_values_use_the_go_float_syntax(value: float, text: str) -> None:
    assert format_value(value) == text


# --- the endpoint --------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    r = Registry()
    m = CheckpointerMetrics.register(r)
    m.commits.inc(3)
    m.commit_latency.observe(0.0003)
    m.refused.labels(reason="oversized").inc()
    with MetricsServer(r, ("127.0.0.1", 0), deadline_s=1.0, max_request=2048,
                       max_clients=8) as s:
        yield s


def scrape(s: MetricsServer) -> dict[str, Family]:
    with urllib.request.urlopen(s.url, timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == CONTENT_TYPE
        return parse(answer.read().decode("utf-8"))


def raw(s: MetricsServer, data: bytes, timeout: float = 5) -> bytes:
    """Send data (as much as the server takes) and read the answer until the server closes."""
    with socket.create_connection(s.address, timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # refused mid-request: the answer may be there
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_scrape_returns_the_registry_in_the_text_format(server: MetricsServer) -> None:
    assert server.address[1] > 0
    fams = scrape(server)
    assert fams["tcpcp_checkpointer_commits_total"].samples == [
        ("tcpcp_checkpointer_commits_total", {}, 3.0)]
    assert ("tcpcp_checkpointer_refused_requests_total", {"reason": "oversized"}, 1.0) in \
        fams["tcpcp_checkpointer_refused_requests_total"].samples


def test_other_paths_are_not_found_and_other_methods_not_allowed(server: MetricsServer) -> None:
    host, port = server.address
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url, data=b"x=1", timeout=5)
    assert info.value.code == 405 and info.value.headers["Allow"] == "GET"
    assert raw(server, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(server, b"GET /metrics SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert scrape(server)


def test_a_huge_request_line_is_refused_and_others_are_still_served(
        server: MetricsServer) -> None:
    answer = raw(server, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert scrape(server)


def test_a_client_that_sends_nothing_is_dropped_at_the_deadline_without_holding_others(
        server: MetricsServer) -> None:
    silent = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
    try:
        started = time.monotonic()
        assert scrape(server)  # served at once although three silent clients are connected
        assert time.monotonic() - started < 0.9
        for sock in silent:
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < 4
    finally:
        for sock in silent:
            sock.close()
    assert scrape(server)


def test_a_slow_trickling_client_is_cut_at_the_deadline(server: MetricsServer) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /metrics HTTP/1.1\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - started > 2:
                break
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 2


def test_more_clients_than_allowed_are_turned_away_and_service_resumes() -> None:
    with MetricsServer(Registry(), ("127.0.0.1", 0), deadline_s=1.0, max_clients=2) as s:
        hogs = [socket.create_connection(s.address, timeout=5) for _ in range(2)]
        # both hogs hold a slot once the server has accepted them
        wait_until(lambda: s._server._slots._value == 0, 5,  # type: ignore[attr-defined]
                   what="both slots taken")
        try:
            extra = raw(s, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert extra == b""  # closed at once: no slot
        finally:
            for sock in hogs:
                sock.close()
        wait_until(lambda: scrape(s) == {}, 5, what="scrapes served again")


def test_serve_without_an_address_starts_nothing() -> None:
    assert serve(Registry(), None) is None
    s = serve(Registry(), ("127.0.0.1", 0))
    assert s is not None
    s.close()
