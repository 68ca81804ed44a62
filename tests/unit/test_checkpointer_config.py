"""The checkpointer's configuration: defaults < TOML file < environment < flags, every error
named by its source, and --help and the reference generated from the one settings table."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer.commit_policy import CommitPolicy
from checkpointer.config import (
    BY_KEY,
    CONFIG_ENV,
    SETTINGS,
    Config,
    ConfigError,
    GateBackend,
    GuardedPort,
    build_parser,
    load_config,
    merge,
    render_reference,
    store_with_password,
)
from kernel.patch_gate import Backend
from store.config import Durability, DurabilityMode, Topology

BASE = ["--url", "redis://127.0.0.1:6379", "--keys", "/etc/tcpcp/keys.json"]
BASE_TOML = '[store]\nurl = "redis://10.0.0.9:6379"\nkeys_file = "/k.json"\n'


def load(argv: Sequence[str] = (), env: Mapping[str, str] | None = None,
         toml: str | None = None, *, base: bool = True) -> Config:
    args = build_parser().parse_args([*BASE, *argv] if base else list(argv))
    return merge(args, env or {}, toml_text=toml, toml_name="/etc/tcpcp/c.toml",
                 hostname="web-1")


def refused(argv: Sequence[str] = (), env: Mapping[str, str] | None = None,
            toml: str | None = None, *, base: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(argv, env, toml, base=base)
    return info.value


# --- defaults and mapping onto the other modules' types ---------------------------------------


def test_defaults_fill_every_setting_but_the_store_location_and_keys() -> None:
    c = load()
    assert c.store.topology is Topology.STANDALONE and c.store.url == "redis://127.0.0.1:6379"
    assert c.store.durability == Durability() and c.store.tls is None
    assert c.keys_file == Path("/etc/tcpcp/keys.json")
    assert c.origin == "web-1"
    assert c.interfaces == ("eth0",)
    assert c.gate_backend is GateBackend.AUTO and c.gate_backend.backend is None
    assert c.guarded_ports == ()
    assert (c.lease_ttl_ms, c.lease_renew_ms) == (3000, 1000)
    assert c.checkpoint_period_ms == 1000
    assert c.socket_path == Path("/run/tcpcp/checkpointer.sock")
    assert c.allowed_uids == frozenset({0}) and c.allowed_gids == frozenset()
    assert c.metrics_address == ("127.0.0.1", 9477)
    assert (c.log_format, c.log_level) == ("auto", "info")
    assert c.commit_policy == CommitPolicy(interval_s=0.005, every_bytes=None)
    assert c.sources["lease.renew_ms"] == "default (lease.ttl_ms / 3)"
    assert c.sources["origin"] == "default (the host name)"
    assert c.config_file is None


def test_renew_interval_follows_the_ttl_when_not_set() -> None:
    assert load(["--lease-ttl-ms", "900"]).lease_renew_ms == 300


def test_gate_backend_names_map_onto_the_kernel_backends() -> None:
    assert load(["--gate-backend", "bpf"]).gate_backend.backend is Backend.BPF
    assert load(["--gate-backend", "PATCH"]).gate_backend.backend is Backend.PATCH


def test_commit_policy_settings_map_onto_commit_policy() -> None:
    c = load(["--commit-interval-ms", "0", "--commit-every-bytes", "65536"])
    assert c.commit_policy == CommitPolicy(interval_s=None, every_bytes=65536)
    assert load(["--commit-interval-ms", "20"]).commit_policy.interval_s == 0.02


def test_metrics_address_empty_disables_and_ipv6_takes_brackets() -> None:
    assert load(env={"TCPCP_CHECKPOINTER_METRICS_ADDRESS": ""}).metrics_address is None
    assert load(["--metrics-address", "[::1]:0"]).metrics_address == ("::1", 0)
    assert load(toml='metrics_address = ""\n' + BASE_TOML, base=False).metrics_address is None


def test_guarded_ports_take_a_port_or_an_address_and_port() -> None:
    c = load(toml='guarded_ports = [80, "10.0.0.1:443", "[fd00::1]:8080"]\n' + BASE_TOML,
             base=False)
    assert c.guarded_ports == (GuardedPort(80), GuardedPort(443, ipaddress.ip_address("10.0.0.1")),
                               GuardedPort(8080, ipaddress.ip_address("fd00::1")))
    assert c.guards("192.0.2.7", 80) and c.guards("10.0.0.1", 443)
    assert not c.guards("10.0.0.2", 443) and not c.guards("fd00::1", 443)
    assert [str(g) for g in c.guarded_ports] == ["80", "10.0.0.1:443", "[fd00::1]:8080"]


def test_an_empty_flag_value_clears_a_list() -> None:
    c = load(["--allow-uid", ""], env={"TCPCP_CHECKPOINTER_ALLOWED_UIDS": "5,6"})
    assert c.allowed_uids == frozenset()
    assert load(["--interface", "", "--interface", "br0"]).interfaces == ("br0",)


def test_clients_are_allowed_by_uid_or_gid() -> None:
    c = load(["--allow-uid", "1000", "--allow-gid", "50"])
    assert c.allows(1000, 1) and c.allows(7, 50) and not c.allows(0, 0)


def test_store_reuses_cliopts_topologies_and_tls() -> None:
    c = load(["--cluster", "--durability", "wait:1:250"],
             env={"TCPCP_CHECKPOINTER_STORE_URL": "rediss://node:7000",
                  "TCPCP_CHECKPOINTER_STORE_USERNAME": "tcpcp"})
    assert c.store.topology is Topology.CLUSTER and c.store.url == "redis://127.0.0.1:6379"
    c = load(env={"TCPCP_CHECKPOINTER_STORE_URL": "rediss://node:7000",
                  "TCPCP_CHECKPOINTER_STORE_USERNAME": "tcpcp",
                  "TCPCP_CHECKPOINTER_STORE_CLUSTER": "yes"}, base=False,
             toml='[store]\nkeys_file = "/k"\ndurability = "waitaof:1:0"\n')
    assert c.store.topology is Topology.CLUSTER and c.store.url == "rediss://node:7000"
    assert c.store.username == "tcpcp" and c.store.tls is not None
    assert c.store.durability.mode is DurabilityMode.WAITAOF
    c = load(["--keys", "/k", "--sentinel", "10.0.0.5:26379", "--sentinel", "[fd00::5]:26379",
              "--service", "mymaster", "--tls-ca", "/ca.pem"], base=False,
             env={"TCPCP_SENTINEL_USER": "s", "TCPCP_SENTINEL_PASSWORD": "sp"})
    assert c.store.topology is Topology.SENTINEL and c.store.service == "mymaster"
    assert c.store.sentinels == (("10.0.0.5", 26379), ("fd00::5", 26379))
    assert (c.store.sentinel_username, c.store.sentinel_password) == ("s", "sp")
    assert c.store.tls is not None and c.store.tls.ca_file == "/ca.pem"


def test_store_password_comes_from_the_given_environment_not_the_process_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPCP_STORE_PASSWORD", "from-os-environ")
    assert load(env={"TCPCP_STORE_PASSWORD": "given"}).store.password == "given"
    assert load().store.password is None


def test_password_file_is_read_only_by_store_with_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    c = load(["--password-file", str(secret)])
    assert c.store.password is None and c.store_password_file == secret
    assert store_with_password(c).password == "s3cret"
    assert store_with_password(load()).password is None
    missing = load(["--password-file", str(tmp_path / "absent")])
    with pytest.raises(ConfigError, match=r"flag --password-file: store.password_file: "
                       r"expected a readable file, got .*absent"):
        store_with_password(missing)


def test_log_settings_fall_back_on_the_tcpcp_wide_variables_below_the_file() -> None:
    env = {"TCPCP_LOG_FORMAT": "json", "TCPCP_LOG_LEVEL": "debug"}
    c = load(env=env)
    assert (c.log_format, c.log_level) == ("json", "debug")
    assert c.sources["log.format"] == "env TCPCP_LOG_FORMAT"
    c = load(env=env, toml='[log]\nformat = "console"\n')
    assert (c.log_format, c.log_level) == ("console", "debug")
    c = load(env={**env, "TCPCP_CHECKPOINTER_LOG_LEVEL": "error"})
    assert c.log_level == "error"


# --- the file -----------------------------------------------------------------------------------


def test_config_file_is_named_by_flag_or_environment_and_the_flag_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("checkpoint_period_ms = 111\n" + BASE_TOML)
    b.write_text("checkpoint_period_ms = 222\n" + BASE_TOML)
    c = load_config([], {CONFIG_ENV: str(a)}, hostname="h")
    assert c.checkpoint_period_ms == 111 and c.config_file == a
    assert c.sources["checkpoint_period_ms"] == f"{a}:1"
    c = load_config(["--config", str(b)], {CONFIG_ENV: str(a)}, hostname="h")
    assert c.checkpoint_period_ms == 222


def test_toml_dotted_keys_and_tables_are_the_same_settings() -> None:
    c = load(toml='lease.ttl_ms = 6000\n[commit]\nevery_bytes = 4096\n')
    assert c.lease_ttl_ms == 6000 and c.commit_policy.every_bytes == 4096
    assert c.sources["lease.ttl_ms"] == "/etc/tcpcp/c.toml:1"
    assert c.sources["commit.every_bytes"] == "/etc/tcpcp/c.toml:3"


# --- precedence -----------------------------------------------------------------------------

# per setting, candidate values: (toml literal, env text, flag args, value)
CANDIDATES: dict[str, list[tuple[str, str, list[str], Any]]] = {
    "lease.ttl_ms": [(str(n), str(n), ["--lease-ttl-ms", str(n)], n)
                     for n in (6000, 9000, 12000)],
    "checkpoint_period_ms": [(str(n), str(n), ["--checkpoint-period-ms", str(n)], n)
                             for n in (10, 20, 30)],
    "gate_backend": [(f'"{b}"', b, ["--gate-backend", b], b) for b in ("bpf", "patch", "auto")],
    "interfaces": [(f'["{a}", "{b}"]', f"{a},{b}", ["--interface", a, "--interface", b], (a, b))
                   for a, b in (("veth0", "veth1"), ("br0", "lo"), ("eno1", "eno2"))],
    "store.cluster": [("true", "true", ["--cluster"], True),
                      ("false", "no", ["--no-cluster"], False),
                      ("true", "on", ["--cluster"], True)],
    "log.level": [(f'"{lv}"', lv, ["--log-level", lv], lv) for lv in ("debug", "warning", "error")],
}
SOURCES = ("toml", "env", "flag")


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(CANDIDATES)),
                       st.fixed_dictionaries({}, optional={s: st.integers(0, 2) for s in SOURCES}),
                       max_size=len(CANDIDATES)))
def test_the_highest_source_that_sets_a_setting_wins(plan: dict[str, dict[str, int]]) -> None:
    toml_lines, env, argv = [], {}, []
    for key, chosen in plan.items():
        for source, i in chosen.items():
            literal, text, flags, _ = CANDIDATES[key][i]
            if source == "toml":
                toml_lines.append(f"{key} = {literal}")
            elif source == "env":
                env[BY_KEY[key].env] = text
            else:
                argv += flags
    c = load(argv, env, "\n".join(toml_lines) + "\n" if toml_lines else None)
    for key in CANDIDATES:
        chosen = plan.get(key, {})
        winner = next((s for s in reversed(SOURCES) if s in chosen), None)
        expected = BY_KEY[key].default if winner is None else CANDIDATES[key][chosen[winner]][3]
        assert c.values[key] == expected, (key, plan)
        source = c.sources[key]
        assert {None: "default", "toml": "/etc/tcpcp/c.toml", "env": "env TCPCP_CHECKPOINTER_",
                "flag": "flag --"}[winner] in source


# --- round trips of values through each source ---------------------------------------------

ifnames = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=127),
                  min_size=1, max_size=15)
ports = st.integers(1, 65535)
guarded = st.one_of(
    st.builds(GuardedPort, ports),
    st.builds(GuardedPort, ports, st.ip_addresses()))
origins = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd", "Pd")),
                  min_size=1, max_size=60)
durabilities = st.one_of(
    st.just(Durability()),
    st.builds(lambda n, t: Durability(DurabilityMode.WAIT, replicas=n, timeout_ms=t),
              st.integers(1, 5), st.integers(1, 10_000)),
    st.builds(lambda loc, n, t: Durability(DurabilityMode.WAITAOF, local=loc, replicas=n,
                                           timeout_ms=t),
              st.just(1), st.integers(0, 5), st.integers(1, 10_000)))


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=100, deadline=None)
@given(names=st.lists(ifnames, min_size=1, max_size=4), entries=st.lists(guarded, max_size=5),
       origin=origins, durability=durabilities, uids=st.lists(st.integers(0, 2**32 - 2),
                                                             max_size=4),
       source=st.sampled_from(SOURCES))
def test_values_come_back_unchanged_through_any_source(
        names: list[str], entries: list[GuardedPort], origin: str, durability: Durability,
        uids: list[int], source: str) -> None:
    values: dict[str, Any] = {"interfaces": tuple(names), "guarded_ports": tuple(entries),
                              "origin": origin, "store.durability": durability,
                              "allowed_uids": tuple(uids)}
    argv: list[str] = []
    env: dict[str, str] = {}
    toml = ""
    for key, value in values.items():
        s = BY_KEY[key]
        if source == "toml":
            if isinstance(value, tuple):
                items = [_toml_string(str(v)) if not isinstance(v, int) else str(v)
                         for v in value]
                literal = "[" + ", ".join(items) + "]"
            else:
                literal = _toml_string(s.kind.show(value))
            toml += f"{key} = {literal}\n"
        elif source == "env":
            env[s.env] = s.kind.show(value)
        else:
            for item in (value or ("",)) if isinstance(value, tuple) else [value]:
                argv.append(f"{s.flag}={item}")  # an empty list: one empty value
    c = load(argv, env, toml or None)
    for key, value in values.items():
        assert c.values[key] == value, key


# --- errors: each names its source, the setting, what was expected and what came --------------


def test_unknown_toml_key_is_an_error_with_a_suggestion_and_its_line() -> None:
    e = refused(toml='[lease]\nttl_ms = 4000\nrenew_msec = 100\n')
    assert (e.source, e.setting, e.got) == ("/etc/tcpcp/c.toml:3", "lease.renew_msec", 100)
    assert "did you mean lease.renew_ms?" in str(e)
    assert refused(toml="frobnicate = 1\n").setting == "frobnicate"
    assert refused(toml='[nothing]\nx = 1\n').setting == "nothing"


def test_a_table_given_as_a_value_or_a_value_as_a_table_is_an_error() -> None:
    e = refused(toml="store = 3\n")
    assert (e.source, e.setting, e.expected) == ("/etc/tcpcp/c.toml:1", "store",
                                                 "a table [store]")
    e = refused(toml="[origin]\nname = 'x'\n")
    assert (e.source, e.setting, e.got) == ("/etc/tcpcp/c.toml:1", "origin", {"name": "x"})
    assert e.expected.startswith("an origin name")


def test_a_key_of_the_wrong_table_is_unknown_and_the_right_one_suggested() -> None:
    e = refused(toml='[store]\nurl = "redis://x"\nguarded_ports = [80]\n')
    assert (e.source, e.setting) == ("/etc/tcpcp/c.toml:3", "store.guarded_ports")
    assert "did you mean guarded_ports?" in e.expected


def test_toml_syntax_error_names_the_file_and_line() -> None:
    e = refused(toml='origin = "a"\nlease.ttl_ms = \n')
    assert e.source == "/etc/tcpcp/c.toml:2" and e.setting == "config"
    assert e.expected == "a TOML document"


@pytest.mark.parametrize("line,key,expected", [
    ('lease.ttl_ms = "3000"', "lease.ttl_ms", "an integer in 100..3600000"),
    ("lease.ttl_ms = true", "lease.ttl_ms", "an integer in 100..3600000"),
    ("lease.ttl_ms = 3000.5", "lease.ttl_ms", "an integer in 100..3600000"),
    ("lease.ttl_ms = 99", "lease.ttl_ms", "an integer in 100..3600000"),
    ('store.cluster = "yes"', "store.cluster", "a boolean (true/false)"),
    ('interfaces = "eth0"', "interfaces", "a list of an interface name"),
    ("guarded_ports = [0]", "guarded_ports", "a list of a port 1..65535"),
    ("guarded_ports = [true]", "guarded_ports", "a list of a port 1..65535"),
    ("allowed_gids = [-1]", "allowed_gids", "a list of an id in 0..4294967294"),
    ("origin = 7", "origin", "an origin name"),
    ("socket_path = 'relative.sock'", "socket_path", "an absolute path"),
    ("checkpoint_period_ms = {a = 1}", "checkpoint_period_ms", "an integer"),
])
def test_wrong_toml_value_names_file_line_setting_and_what_came(
        line: str, key: str, expected: str) -> None:
    e = refused(toml=f"# comment\n{line}\n")
    assert (e.source, e.setting) == ("/etc/tcpcp/c.toml:2", key)
    assert e.expected.startswith(expected), e.expected
    assert "got" in str(e)


def test_unknown_environment_variable_of_the_prefix_is_an_error_others_are_not() -> None:
    e = refused(env={"TCPCP_CHECKPOINTER_LEASE_TTL": "4000"})
    assert (e.source, e.setting, e.got) == ("env TCPCP_CHECKPOINTER_LEASE_TTL", "environment",
                                            "4000")
    assert "did you mean TCPCP_CHECKPOINTER_LEASE_TTL_MS?" in e.expected
    load(env={"TCPCP_OTHER": "x", "PATH": "/bin", "TCPCP_STORE_URL": "redis://elsewhere"})


@pytest.mark.parametrize("var,value,setting", [
    ("TCPCP_CHECKPOINTER_LEASE_TTL_MS", "3s", "lease.ttl_ms"),
    ("TCPCP_CHECKPOINTER_STORE_CLUSTER", "maybe", "store.cluster"),
    ("TCPCP_CHECKPOINTER_GATE_BACKEND", "xdp", "gate_backend"),
    ("TCPCP_CHECKPOINTER_GUARDED_PORTS", "80,::1:443", "guarded_ports"),
    ("TCPCP_CHECKPOINTER_GUARDED_PORTS", "80,[zz]:443", "guarded_ports"),
    ("TCPCP_CHECKPOINTER_GUARDED_PORTS", "65536", "guarded_ports"),
    ("TCPCP_CHECKPOINTER_INTERFACES", "averyveryverylongname", "interfaces"),
    ("TCPCP_CHECKPOINTER_INTERFACES", "eth0,a/b", "interfaces"),
    ("TCPCP_CHECKPOINTER_METRICS_ADDRESS", "9477", "metrics_address"),
    ("TCPCP_CHECKPOINTER_METRICS_ADDRESS", "localhost:http", "metrics_address"),
    ("TCPCP_CHECKPOINTER_SOCKET_PATH", "/" + "x" * 107, "socket_path"),
    ("TCPCP_CHECKPOINTER_ORIGIN", "web{1}", "origin"),
    ("TCPCP_CHECKPOINTER_ORIGIN", "web 1", "origin"),
    ("TCPCP_CHECKPOINTER_STORE_DURABILITY", "wait:0", "store.durability"),
    ("TCPCP_CHECKPOINTER_STORE_URL", "http://redis", "store.url"),
    ("TCPCP_CHECKPOINTER_STORE_SENTINELS", "redis", "store.sentinels"),
    ("TCPCP_CHECKPOINTER_ALLOWED_UIDS", "root", "allowed_uids"),
    ("TCPCP_CHECKPOINTER_LOG_LEVEL", "trace", "log.level"),
    ("TCPCP_LOG_FORMAT", "xml", "log.format"),
])
def test_wrong_environment_value_names_the_variable(var: str, value: str, setting: str) -> None:
    e = refused(env={var: value})
    assert (e.source, e.setting, e.got) == (f"env {var}", setting, value)
    assert str(e).startswith(f"env {var}: {setting}: expected ")


@pytest.mark.parametrize("argv,flag,setting", [
    (["--lease-ttl-ms", "-5"], "--lease-ttl-ms", "lease.ttl_ms"),
    (["--guard", "http"], "--guard", "guarded_ports"),
    (["--allow-uid", "4294967295"], "--allow-uid", "allowed_uids"),
    (["--commit-every-bytes", "-1"], "--commit-every-bytes", "commit.every_bytes"),
    (["--durability", "waitaof"], "--durability", "store.durability"),
    (["--metrics-address", "[::1]:70000"], "--metrics-address", "metrics_address"),
])
def test_wrong_flag_value_names_the_flag(argv: list[str], flag: str, setting: str) -> None:
    e = refused(argv)
    assert (e.source, e.setting) == (f"flag {flag}", setting)


def test_unknown_flag_or_missing_flag_value_is_a_config_error_not_an_exit() -> None:
    with pytest.raises(ConfigError, match=r"command line: flags: .*--lease-ttl"):
        build_parser().parse_args(["--lease-ttl", "5"])
    with pytest.raises(ConfigError, match=r"command line: flags: .*--url"):
        build_parser().parse_args(["--url"])
    with pytest.raises(ConfigError, match=r"command line: flags: .*--frobnicate"):
        build_parser().parse_args(["--frobnicate"])


@pytest.mark.parametrize("ttl,renew", [(3000, 1500), (3000, 2000), (100, 50), (3000, 3000)])
def test_renew_interval_not_below_half_the_ttl_is_refused(ttl: int, renew: int) -> None:
    e = refused(env={"TCPCP_CHECKPOINTER_LEASE_RENEW_MS": str(renew)},
                toml=f"lease.ttl_ms = {ttl}\n")
    assert (e.source, e.setting, e.got) == ("env TCPCP_CHECKPOINTER_LEASE_RENEW_MS",
                                            "lease.renew_ms", renew)
    assert f"lease.ttl_ms / 2 = {ttl / 2:g}" in e.expected
    assert "lease.ttl_ms" in e.expected and "/etc/tcpcp/c.toml:1" in e.expected


def test_renew_interval_just_below_half_the_ttl_is_accepted() -> None:
    assert load(["--lease-ttl-ms", "3001", "--lease-renew-ms", "1500"]).lease_renew_ms == 1500


def test_missing_keys_file_or_store_location_is_refused() -> None:
    e = refused(["--url", "redis://x"], base=False)
    assert e.setting == "store.keys_file" and "--keys" in e.expected
    assert "nothing (not set)" in str(e)
    e = refused(["--keys", "/k"], base=False)
    assert e.setting == "store.url" and "--url" in e.expected


def test_sentinels_without_a_service_are_refused_naming_their_source() -> None:
    e = refused(["--keys", "/k"], env={"TCPCP_CHECKPOINTER_STORE_SENTINELS": "10.0.0.5:26379"},
                base=False)
    assert e.source == "env TCPCP_CHECKPOINTER_STORE_SENTINELS" and e.setting == "store"
    assert "service" in e.expected


def test_a_url_and_sentinels_together_are_refused_naming_both_sources() -> None:
    e = refused(env={"TCPCP_CHECKPOINTER_STORE_SENTINELS": "10.0.0.5:26379"})
    assert e.source == "flag --url and env TCPCP_CHECKPOINTER_STORE_SENTINELS"
    assert e.expected == "either store.url or store.sentinels, not both"


def test_host_name_that_cannot_be_an_origin_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"default \(the host name\): origin: "):
        merge(build_parser().parse_args(BASE), {}, hostname="web{1}")
    assert merge(build_parser().parse_args([*BASE, "--origin", "ok"]), {},
                 hostname="web{1}").origin == "ok"


def test_unreadable_config_file_names_where_its_path_came_from(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=rf"flag --config: config: .*{re.escape(missing)}"):
        load_config(["--config", missing], {}, hostname="h")
    with pytest.raises(ConfigError, match=rf"env {CONFIG_ENV}: config: "):
        load_config([], {CONFIG_ENV: missing}, hostname="h")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="a readable UTF-8 TOML file"):
        load_config(["--config", str(binary)], {}, hostname="h")


# --- help and reference -----------------------------------------------------------------------


def test_help_explains_every_setting_with_default_env_and_toml_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for s in SETTINGS:
        assert s.flag in text and s.env in text, s.key
        table, _, name = s.key.rpartition(".")
        assert (f"TOML {name} in [{table}]" if table else f"TOML {s.key}") in text, s.key
        assert f"default {s.shown_default}" in text, s.key
    assert CONFIG_ENV in text


def test_reference_has_one_row_per_setting_with_six_columns() -> None:
    ref = render_reference()
    rows = [line for line in ref.splitlines() if line.startswith("| ")]
    assert rows[0] == "| setting | TOML key | env var | flag | default | meaning |"
    body = rows[1:]
    assert len(body) == len(SETTINGS)
    for s, row in zip(SETTINGS, body, strict=True):
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 6, row
        assert cells[0].strip() == s.key and s.env in cells[2] and s.flag in cells[3]
    assert "auto\\|bpf\\|patch" in ref  # pipes inside cells are escaped
    assert "TCPCP_CHECKPOINTER_" in ref and "precedence" in ref


def test_every_setting_has_help_and_unique_names() -> None:
    assert all(s.help for s in SETTINGS)
    for attr in ("key", "env", "flag"):
        names = [getattr(s, attr) for s in SETTINGS]
        assert len(names) == len(set(names)), attr
