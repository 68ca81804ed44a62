"""The resurrector's configuration: flags over environment over TOML, and the hand-over routes
(resurrector.daemon.load, HandoverRoutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resurrector.daemon import DEFAULT_HANDOVER, HandoverRoutes, load, skip_kind

BASE = ["--url", "redis://store:6379", "--keys", "/etc/tcpcp/keys.json", "--origin", "web1",
        "--serve", "10.0.0.80"]


def test_defaults_one_handover_socket_and_no_gate_without_a_claim_holder() -> None:
    args = load(BASE, {})
    assert args.handover.default == Path(DEFAULT_HANDOVER) and args.handover.by_port == {}
    assert args.gate_backend == "off" and args.claim_for is None


def test_a_claim_holder_turns_the_gate_on_unless_it_is_set_off() -> None:
    assert load([*BASE, "--claim-for", "checkpointer@web1@sb"], {}).gate_backend == "auto"
    assert load([*BASE, "--claim-for", "c@w", "--gate-backend", "off"], {}).gate_backend == "off"


def test_routes_by_port_from_flags_and_from_the_environment() -> None:
    args = load([*BASE, "--handover-socket", "8080=/run/files.sock", "--handover-socket",
                 "6379=/run/kv.sock"], {})
    assert args.handover.path_for("10.0.0.80:8080>10.0.0.9:5555") == Path("/run/files.sock")
    assert args.handover.path_for("[fd00::80]:6379>[fd00::9]:5555") == Path("/run/kv.sock")
    assert args.handover.path_for("10.0.0.80:22>10.0.0.9:5555") is None  # no bare PATH given
    env = load(BASE, {"TCPCP_RESURRECTOR_HANDOVER_SOCKET": "8080=/run/f.sock, /run/rest.sock"})
    assert env.handover.by_port == {8080: Path("/run/f.sock")}
    assert env.handover.default == Path("/run/rest.sock")


@pytest.mark.parametrize(("items", "expected"), [
    (["relative.sock"], "absolute path"),
    (["80=/a", "80=/b"], "routed twice"),
    (["/a", "/b"], "one bare PATH"),
    (["0=/a"], "1..65535"),
    (["http=/a"], "1..65535"),
    (["70000=/a"], "1..65535"),
])
def test_bad_routes_are_refused_naming_what_was_expected(items: list[str], expected: str,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    argv = [*BASE]
    for item in items:
        argv += ["--handover-socket", item]
    with pytest.raises(SystemExit):
        load(argv, {})
    assert expected in capsys.readouterr().err


@given(st.dictionaries(st.integers(1, 65535), st.sampled_from(["/a", "/b", "/c"]), max_size=5),
       st.one_of(st.none(), st.just("/rest")), st.integers(1, 65535))
def test_a_connection_goes_to_its_port_s_socket_else_the_bare_one(
        routes: dict[int, str], default: str | None, port: int) -> None:
    items = [f"{p}={path}" for p, path in routes.items()] + ([default] if default else [])
    parsed = HandoverRoutes.parse(items or ["/only"])
    want = routes.get(port, default) if items else "/only"
    got = parsed.path_for(f"10.1.2.3:{port}>10.9.9.9:40000")
    assert got == (Path(want) if want else None)
    expected = {*routes.values(), *([default] if default else [])} if items else {"/only"}
    assert set(parsed.paths) == {Path(x) for x in expected}


@pytest.mark.parametrize(("reason", "kind"), [
    ("refused: ICI rejected by ecn: expected a flow without ECN", "refused"),
    ("no answer to 3 probes in 0.9 s (the peer is gone, or its path does not lead here)",
     "no_answer"),
    ("no hand-over socket serves its port (expected a --handover-socket PORT=PATH)", "unrouted"),
    ("output log: expected 12 logged bytes from position 40, got 0", "restore_failed"),
])
def test_a_skipped_connection_s_reason_becomes_one_of_four_metric_labels(reason: str,
                                                                        kind: str) -> None:
    assert skip_kind(reason) == kind
