"""Log configuration: JSON lines for machines, console for people, levels filter."""

from __future__ import annotations

import json

import pytest
import structlog

from ops import logs


def test_json_lines_carry_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    log = structlog.get_logger().bind(conn="10.0.0.2:5123>10.9.9.1:80", epoch=7)
    log.info("restored", ms=3.1)
    log.debug("hidden")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "restored" and record["epoch"] == 7 and record["ms"] == 3.1
    assert record["conn"] == "10.0.0.2:5123>10.9.9.1:80" and record["level"] == "info"


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("console", "debug")
    structlog.get_logger().debug("probe", peer="x")
    err = capsys.readouterr().err
    assert "probe" in err and "peer" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)


def test_environment_selects_format_and_bad_values_are_refused(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TCPCP_LOG_FORMAT", "json")
    monkeypatch.setenv("TCPCP_LOG_LEVEL", "warning")
    logs.configure()
    structlog.get_logger().info("dropped")
    structlog.get_logger().warning("kept")
    assert [json.loads(x)["event"] for x in capsys.readouterr().err.splitlines()] == ["kept"]
    with pytest.raises(ValueError, match="log level must be one of"):
        logs.configure("json", "loud")
    with pytest.raises(ValueError, match="log format must be"):
        logs.configure("xml", "info")


def test_every_module_logger_says_which_component_it_is() -> None:
    """Loggers are named: each module's lines carry component="tcpcp.<layer>..."."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    unnamed = [f"{p.relative_to(root)}:{i}"
               for layer in ("kernel", "store", "checkpointer", "resurrector", "ops")
               for p in sorted((root / layer).rglob("*.py"))
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if "structlog.get_logger(" in line and 'component="tcpcp.' not in line]
    assert unnamed == []


def test_the_component_name_is_on_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    structlog.get_logger(component="tcpcp.test").bind(conn="a>b").info("restored")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["component"] == "tcpcp.test" and line["conn"] == "a>b"


def test_lines_go_to_the_stderr_of_the_moment_not_the_one_at_configure_time(
        capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    old = sys.stderr
    first = io.StringIO()
    sys.stderr = first
    try:
        logs.configure("json", "info")
        first.close()  # as a test's captured stream is, once the test ends
        second = io.StringIO()
        sys.stderr = second
        structlog.get_logger(component="tcpcp.test").info("still_logged")
    finally:
        sys.stderr = old
    assert "still_logged" in second.getvalue()
