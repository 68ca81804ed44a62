"""The checkpointer daemon's configuration: one table of settings, four sources, a frozen Config.

Sources, lowest to highest precedence (a later one replaces a value, lists included, whole):

    defaults  <  TOML file  <  environment  <  command-line flags

    parser = build_parser()                       # --help is generated from SETTINGS
    config = load_config(argv, os.environ)        # -> Config, or raises ConfigError
    config.lease_renew_ms, config.store, config.sources["lease.ttl_ms"]
    print(render_reference())                     # the markdown reference, from SETTINGS too

Naming rule: a setting is named by its TOML key (`lease.ttl_ms` is `ttl_ms` in the `[lease]`
table); its environment variable is TCPCP_CHECKPOINTER_ followed by the key in upper case with
dots turned into underscores (TCPCP_CHECKPOINTER_LEASE_TTL_MS); its flag is the key with dots and
underscores turned into dashes (--lease-ttl-ms), except the store's flags, which keep the names
`tcpcp inspect` uses (store/cliopts.py: --url, --cluster, --sentinel, ...). The file is named by
--config PATH or TCPCP_CHECKPOINTER_CONFIG; without either no file is read. In the environment a
list is comma-separated; a list flag is repeated once per item (an empty value clears the
list). Flags are never abbreviated. An unknown TOML key or an unknown
TCPCP_CHECKPOINTER_* variable is an error (a typo must not be ignored).

Secrets stay out of the file, the environment naming rule and the command line, as in
store/cliopts.py: the Redis password is read from `store.password_file` (by the daemon, when it
connects: store_with_password()) or from TCPCP_STORE_PASSWORD, the Sentinel credentials from
TCPCP_SENTINEL_USER / TCPCP_SENTINEL_PASSWORD. The log settings fall back on the tcpcp-wide
TCPCP_LOG_FORMAT / TCPCP_LOG_LEVEL (ops/logs.py), below the file.

No I/O here except reading the TOML file that --config / TCPCP_CHECKPOINTER_CONFIG names (and
the password file, in store_with_password() only); the environment is a mapping passed in.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import ipaddress
import platform
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from checkpointer.commit_policy import CommitPolicy, PolicyError
from kernel.patch_gate import Backend
from store.cliopts import config_from_args
from store.config import Durability, StoreConfig
from store.errors import StoreConfigError
from store.keys import check_name

ENV_PREFIX = "TCPCP_CHECKPOINTER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
CONFIG_FLAG = "--config"
PASSWORD_ENV = "TCPCP_STORE_PASSWORD"          # the names store/cliopts.py reads
SENTINEL_USER_ENV = "TCPCP_SENTINEL_USER"
SENTINEL_PASSWORD_ENV = "TCPCP_SENTINEL_PASSWORD"
MAX_SUN_PATH = 107                              # sizeof(sockaddr_un.sun_path) - 1 on Linux
MAX_IFNAME = 15                                 # IFNAMSIZ - 1
_MISSING: Any = object()


class _Nothing:
    """What a required setting that no source set "got" in an error."""

    def __repr__(self) -> str:
        return "nothing (not set)"


NOT_SET: Any = _Nothing()


class ConfigError(ValueError):
    """A setting that does not fit: where it came from, which one, what was expected, what came.

    source: "default", "PATH:LINE" (or PATH) of the TOML file, "env NAME" or "flag --name"."""

    def __init__(self, source: str, setting: str, expected: str, got: Any = _MISSING) -> None:
        self.source = source
        self.setting = setting
        self.expected = expected
        self.got = got
        text = f"{source}: {setting}: expected {expected}"
        super().__init__(text if got is _MISSING else f"{text}, got {got!r}")


class _Invalid(ValueError):
    """A value refused by a kind; the caller adds the source and the setting."""


# --- kinds: how one setting's value is read from TOML and from text ------------------------


class Kind:
    """How a setting's value comes from TOML (native types) and from text (env, flags)."""

    expected = "a value"
    metavar = "VALUE"
    is_list = False

    def from_toml(self, value: object) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        raise _Invalid(self.expected)

    def from_text(self, text: str) -> Any:
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """The value as text that from_text() reads back (for --help and the reference)."""
        return "" if value is None else str(value)


class Int(Kind):
    def __init__(self, lo: int, hi: int, *, what: str = "an integer") -> None:
        self.lo, self.hi = lo, hi
        self.expected = f"{what} in {lo}..{hi}"
        self.metavar = "N"

    def from_toml(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(self.expected)
        return self._check(value)

    def from_text(self, text: str) -> int:
        try:
            number = int(text.strip(), 10)
        except ValueError:
            raise _Invalid(self.expected) from None
        return self._check(number)

    def _check(self, number: int) -> int:
        if not self.lo <= number <= self.hi:
            raise _Invalid(self.expected)
        return number


class Bool(Kind):
    expected = "a boolean (true/false)"
    metavar = "BOOL"
    _TEXT = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}

    def from_toml(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(self.expected)
        return value

    def from_text(self, text: str) -> bool:
        try:
            return self._TEXT[text.strip().lower()]
        except KeyError:
            raise _Invalid("a boolean (true/false, yes/no, on/off, 1/0)") from None

    def show(self, value: Any) -> str:
        return "true" if value else "false"


class Text(Kind):
    """A string checked by `check` (which raises _Invalid); "" means unset when optional."""

    def __init__(self, expected: str, metavar: str, check: Callable[[str], Any] | None = None,
                 *, optional: bool = False) -> None:
        self.expected, self.metavar = expected, metavar
        self.check, self.optional = check, optional

    def from_text(self, text: str) -> Any:
        if self.optional and text == "":
            return None
        return self.check(text) if self.check is not None else text


class Choice(Kind):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.expected = "one of " + ", ".join(choices)
        self.metavar = "|".join(choices)

    def from_text(self, text: str) -> str:
        name = text.strip().lower()
        if name not in self.choices:
            raise _Invalid(self.expected)
        return name


class ListOf(Kind):
    """A list: a TOML array, comma-separated text, or a repeated flag (one item each)."""

    is_list = True

    def __init__(self, item: Kind) -> None:
        self.item = item
        self.expected = f"a list of {item.expected}"
        self.metavar = item.metavar

    def from_toml(self, value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid(self.expected)
        return tuple(self._item(self.item.from_toml, v) for v in value)

    def from_text(self, text: str) -> tuple[Any, ...]:
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        return tuple(self._item(self.item.from_text, p) for p in parts)

    def from_flags(self, texts: Sequence[str]) -> tuple[Any, ...]:
        """One item per flag; an empty value adds nothing (`--guard ""` clears the list)."""
        return tuple(self._item(self.item.from_text, t) for t in texts if t != "")

    def _item(self, parse: Callable[[Any], Any], raw: object) -> Any:
        try:
            return parse(raw)
        except _Invalid as exc:
            raise _Invalid(f"{self.expected} (an item: {exc})") from None

    def show(self, value: Any) -> str:
        return ",".join(self.item.show(v) for v in value)


# --- value types and checks ---------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class GuardedPort:
    """A guarded local port, on every address (address None) or on one."""

    port: int
    address: IPAddress | None = None

    def matches(self, address: str | IPAddress, port: int) -> bool:
        """Whether a socket bound to (address, port) belongs to this entry."""
        if port != self.port:
            return False
        return self.address is None or ipaddress.ip_address(address) == self.address

    def __str__(self) -> str:
        if self.address is None:
            return str(self.port)
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def _split_host_port(text: str, expected: str, lo: int) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not lo <= int(port) <= 65535:
        raise _Invalid(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise _Invalid(expected)
    elif ":" in host:  # an IPv6 address without brackets: where does it end?
        raise _Invalid(expected)
    if not host or any(c.isspace() for c in host):
        raise _Invalid(expected)
    return host, int(port)


class GuardedKind(Kind):
    expected = "a port 1..65535 or ADDR:PORT (IPv6 as [ADDR]:PORT)"
    metavar = "[ADDR:]PORT"

    def from_toml(self, value: object) -> GuardedPort:
        if isinstance(value, int) and not isinstance(value, bool):
            return self.from_text(str(value))
        return super().from_toml(value)

    def from_text(self, text: str) -> GuardedPort:
        text = text.strip()
        if text.isdigit():
            if not 1 <= int(text) <= 65535:
                raise _Invalid(self.expected)
            return GuardedPort(int(text))
        host, port = _split_host_port(text, self.expected, 1)
        try:
            return GuardedPort(port, ipaddress.ip_address(host))
        except ValueError:
            raise _Invalid(self.expected) from None


def _sentinel(text: str) -> str:
    host, port = _split_host_port(text, "HOST:PORT (IPv6 as [ADDR]:PORT)", 1)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics_address(text: str) -> tuple[str, int]:
    return _split_host_port(text, "HOST:PORT (IPv6 as [ADDR]:PORT; port 0: any) or \"\"", 0)


def _show_metrics(value: tuple[str, int] | None) -> str:
    if value is None:
        return ""
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsKind(Text):
    def show(self, value: Any) -> str:
        return _show_metrics(value)


def _ifname(text: str) -> str:
    name = text.strip()
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if not 0 < size <= MAX_IFNAME or name in (".", "..") or any(
            c == "/" or c.isspace() or not c.isprintable() for c in name):
        raise _Invalid(f"an interface name of 1..{MAX_IFNAME} bytes without '/' or spaces")
    return name


def _socket_path(text: str) -> Path:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if not text.startswith("/") or size > MAX_SUN_PATH or "\0" in text:
        raise _Invalid(f"an absolute path of at most {MAX_SUN_PATH} bytes")
    return Path(text)


def _file_path(text: str) -> Path:
    if "\0" in text or not text.strip():
        raise _Invalid("a file path")
    return Path(text)


def _url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://")):
        raise _Invalid("a redis:// or rediss:// URL")
    return text


def _durability(text: str) -> Durability:
    try:
        return Durability.parse(text)
    except StoreConfigError as exc:
        raise _Invalid(f"none, wait:N[:MS] or waitaof:L:N[:MS] ({exc})") from None


def _origin(text: str) -> str:
    try:
        return check_name("origin", text)
    except StoreConfigError as exc:
        raise _Invalid(f"an origin name ({exc})") from None


def _holder(text: str) -> str:
    try:
        return check_name("holder", text)
    except ValueError as exc:
        raise _Invalid(f"a holder name ({exc})") from None


def _plain(text: str) -> str:
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise _Invalid("a non-empty name without spaces")
    return text


class DurabilityKind(Text):
    def show(self, value: Any) -> str:
        return str(value)


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its TOML key (its name), how it is read, its default and its help.

    default None with default_text: computed at load (origin: the host name; renew: TTL/3)."""

    key: str
    kind: Kind
    default: Any
    help: str
    flag_name: str = ""           # "" -> derived from the key (see the module docstring)
    default_text: str = ""        # "" -> kind.show(default)
    fallback_env: str = ""        # a tcpcp-wide variable read below the TOML file

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def table(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.kind.is_list and not self.default:
            return "none"
        shown = self.kind.show(self.default)
        return f'"{shown}"' if shown == "" else shown


_UID = Int(0, 2**32 - 2, what="an id")
SETTINGS: tuple[Setting, ...] = (
    Setting("store.url", Text("a redis:// or rediss:// URL", "URL", _url, optional=True), None,
            "Redis URL (rediss:// enables TLS); with store.cluster any cluster node",
            flag_name="--url", default_text="none: set it or store.sentinels"),
    Setting("store.cluster", Bool(), False, "the URL names a Redis Cluster node",
            flag_name="--cluster"),
    Setting("store.sentinels", ListOf(Text("HOST:PORT", "HOST:PORT", _sentinel)), (),
            "Sentinel addresses (instead of a URL; needs store.service); Sentinel credentials "
            "from TCPCP_SENTINEL_USER / TCPCP_SENTINEL_PASSWORD", flag_name="--sentinel"),
    Setting("store.service", Text("a service name", "NAME", _plain, optional=True), None,
            "the Sentinel service (master) name", flag_name="--service", default_text="none"),
    Setting("store.username", Text("an ACL user name", "USER", _plain, optional=True), None,
            "Redis ACL user", flag_name="--username", default_text="none (default user)"),
    Setting("store.password_file", Text("a file path", "PATH", _file_path, optional=True), None,
            "file holding the Redis password (else TCPCP_STORE_PASSWORD); never the password "
            "itself", flag_name="--password-file", default_text="none"),
    Setting("store.tls_ca", Text("a file path", "PATH", _file_path, optional=True), None,
            "CA bundle (PEM) for TLS to Redis; enables TLS", flag_name="--tls-ca",
            default_text="none"),
    Setting("store.tls_cert", Text("a file path", "PATH", _file_path, optional=True), None,
            "client certificate (PEM); enables TLS", flag_name="--tls-cert", default_text="none"),
    Setting("store.tls_key", Text("a file path", "PATH", _file_path, optional=True), None,
            "client key (PEM)", flag_name="--tls-key", default_text="none"),
    Setting("store.keys_file", Text("a file path", "PATH", _file_path, optional=True), None,
            "signing-key file (JSON, store/signing.py): records are signed with its key",
            flag_name="--keys", default_text="none: required"),
    Setting("store.durability", DurabilityKind("durability", "MODE", _durability), Durability(),
            "what a commit waits for before the gate opens: none, wait:N[:MS] (N replicas) or "
            "waitaof:L:N[:MS] (AOF fsync locally L=0|1 and on N replicas)",
            flag_name="--durability"),
    Setting("origin", Text("an origin name", "NAME", _origin, optional=True), None,
            "this host's name in the store (the lease and records are kept under it)",
            default_text="the host name"),
    Setting("interfaces", ListOf(Text("an interface name", "IFNAME", _ifname)), ("eth0",),
            "interfaces whose egress the eBPF gate watches", flag_name="--interface"),
    Setting("gate_backend", Choice("auto", "bpf", "patch"), "auto",
            "ACK gate: bpf (tc egress eBPF), patch (the kernel series' TCP_COMMIT_SEQ) or auto "
            "(patch when the kernel has it)"),
    Setting("guarded_ports", ListOf(GuardedKind()), (),
            "local ports whose connections may be guarded: PORT (any address) or ADDR:PORT; "
            "a socket on any other is refused", flag_name="--guard"),
    Setting("lease.ttl_ms", Int(100, 3_600_000), 3000,
            "the origin's lease in the store; a standby takes over once it expires"),
    Setting("lease.renew_ms", Int(1, 3_600_000, what="an integer"), None,
            "how often the lease is renewed; must be below lease.ttl_ms / 2",
            default_text="lease.ttl_ms / 3"),
    Setting("lease.holder", Text("a holder name", "NAME", _holder, optional=True), None,
            "who holds the origin's lease; a standby's checkpointer for another host's "
            "origin needs a name of its own, the one its resurrector claims for "
            "(--claim-for)", default_text="checkpointer@ORIGIN"),
    Setting("standby", Bool(), False,
            "a standby's checkpointer: wait without limit until the origin is claimed for "
            "lease.holder (by this host's resurrector), then guard the connections handed "
            "over here; without it a lease not acquired in 3 TTLs is an error"),
    Setting("checkpoint_period_ms", Int(1, 3_600_000), 1000,
            "how often every guarded connection is checkpointed"),
    Setting("commit.interval_ms", Int(0, 60_000), 5,
            "commit pending inbound bytes this long after the first (0: only when the "
            "application would block)"),
    Setting("commit.every_bytes", Int(0, 2**31 - 1), 0,
            "also commit once this many bytes are pending (0: never; keep it below the "
            "peer's congestion window)"),
    Setting("socket_path", Text("an absolute path", "PATH", _socket_path),
            Path("/run/tcpcp/checkpointer.sock"), "the local API's unix socket"),
    Setting("allowed_uids", ListOf(_UID), (0,),
            "user ids allowed on the local API (SO_PEERCRED); a client is allowed when its uid "
            "or its gid is listed", flag_name="--allow-uid"),
    Setting("allowed_gids", ListOf(_UID), (), "group ids allowed on the local API",
            flag_name="--allow-gid"),
    Setting("metrics_address",
            MetricsKind("HOST:PORT or \"\"", "HOST:PORT", _metrics_address, optional=True),
            ("127.0.0.1", 9477), 'Prometheus endpoint (GET /metrics); "" disables it'),
    Setting("log.format", Choice("auto", "json", "console"), "auto",
            "log output: json lines, console, or auto (console on a terminal)",
            fallback_env="TCPCP_LOG_FORMAT"),
    Setting("log.level", Choice("debug", "info", "warning", "error"), "info",
            "lowest level logged", fallback_env="TCPCP_LOG_LEVEL"),
)
BY_KEY: Mapping[str, Setting] = MappingProxyType({s.key: s for s in SETTINGS})
BY_ENV: Mapping[str, Setting] = MappingProxyType({s.env: s for s in SETTINGS})
TABLES = frozenset(s.table for s in SETTINGS if s.table)


# --- the result ----------------------------------------------------------------------------


class GateBackend(enum.Enum):
    AUTO = "auto"
    BPF = "bpf"
    PATCH = "patch"

    @property
    def backend(self) -> Backend | None:
        """What kernel.gatebackend.open_gate(backend=...) takes (None: choose by the kernel)."""
        return None if self is GateBackend.AUTO else Backend(self.value)


@dataclass(frozen=True, slots=True)
class Config:
    """The daemon's configuration. `values` holds every setting's value by key, `sources` where
    it came from ("default", "PATH:LINE", "env NAME", "flag --name")."""

    store: StoreConfig
    store_password_file: Path | None
    keys_file: Path
    origin: str
    interfaces: tuple[str, ...]
    gate_backend: GateBackend
    guarded_ports: tuple[GuardedPort, ...]
    lease_ttl_ms: int
    lease_renew_ms: int
    lease_holder: str
    standby: bool
    checkpoint_period_ms: int
    commit_policy: CommitPolicy
    socket_path: Path
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    metrics_address: tuple[str, int] | None
    log_format: str
    log_level: str
    config_file: Path | None = None
    values: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def guards(self, address: str | IPAddress, port: int) -> bool:
        """Whether a socket bound to (address, port) is on a guarded port."""
        return any(g.matches(address, port) for g in self.guarded_ports)

    def allows(self, uid: int, gid: int) -> bool:
        """Whether a local-API client with these credentials (SO_PEERCRED) is authorised."""
        return uid in self.allowed_uids or gid in self.allowed_gids


def store_with_password(config: Config) -> StoreConfig:
    """config.store with the password read from store.password_file when that is set (the one
    file read outside the TOML file; the daemon calls it when it connects)."""
    path = config.store_password_file
    if path is None:
        return config.store
    try:
        password = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(config.sources.get("store.password_file", "default"),
                          "store.password_file", "a readable file",
                          f"{path}: {exc.strerror}") from None
    return replace(config.store, password=password)


# --- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting on a bad command line."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError("command line", "flags", "known flags with their values", message)


def _help(s: Setting) -> str:
    text = (f"{s.help} (default {s.shown_default}; env {s.env}"
            + (f", else {s.fallback_env}" if s.fallback_env else "")
            + f"; TOML {_toml_place(s)})")
    return text.replace("%", "%%")


def _toml_place(s: Setting) -> str:
    table, _, name = s.key.rpartition(".")
    return f"{name} in [{table}]" if table else s.key


PURPOSE = ("tcpcp checkpointer: runs as a sidecar next to a server, checkpoints the kernel state "
           "(ICI) of every guarded TCP connection with the application's state into Redis, and "
           "holds ACKs until the application commits.")


def build_parser(prog: str = "checkpointer", description: str = PURPOSE) -> argparse.ArgumentParser:
    """The command line, one flag per setting (values are read by load_config, not argparse:
    every flag's value stays text until then, so errors name the flag)."""
    parser = _Parser(prog=prog, description=description,
                     epilog=f"Precedence: defaults < TOML file < environment ({ENV_PREFIX}*) "
                     "< flags. Lists: comma-separated in the environment, one flag per item (an "
                     "empty value clears the list).",
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument(CONFIG_FLAG, metavar="PATH",
                        help=f"TOML configuration file (env {CONFIG_ENV}; default: none)")
    groups: dict[str, Any] = {}
    for s in SETTINGS:
        title = {"": "checkpointer"}.get(s.table, s.table)
        if title not in groups:
            groups[title] = parser.add_argument_group(f"{title} settings")
        group = groups[title]
        if isinstance(s.kind, Bool):
            group.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction,
                               help=_help(s))
        else:
            group.add_argument(s.flag, dest=s.key, metavar=s.kind.metavar, help=_help(s),
                               action="append" if s.kind.is_list else "store")
    return parser


# --- merging the sources --------------------------------------------------------------------


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str], *,
                hostname: str | None = None,
                parser: argparse.ArgumentParser | None = None) -> Config:
    """Parse argv (None: sys.argv[1:]), read the TOML file it or environ names, merge all
    sources over the defaults. hostname: the default origin (None: this host's name)."""
    args = (parser or build_parser()).parse_args(argv)
    path, where = getattr(args, "config", None), f"flag {CONFIG_FLAG}"
    if path is None and CONFIG_ENV in environ:
        path, where = environ[CONFIG_ENV], f"env {CONFIG_ENV}"
    text = None
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(where, "config", "a readable UTF-8 TOML file",
                              f"{path}: {reason}") from None
    return merge(args, environ, toml_text=text, toml_name=path, hostname=hostname)


def merge(args: argparse.Namespace | None, environ: Mapping[str, str], *,
          toml_text: str | None = None, toml_name: str | None = None,
          hostname: str | None = None) -> Config:
    """The pure core of load_config: flags already parsed (by build_parser()), the file's text
    already read. Raises ConfigError."""
    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    sources: dict[str, str] = {s.key: "default" for s in SETTINGS}

    def put(s: Setting, source: str, raw: Any, how: str) -> None:
        try:
            if how == "toml":
                values[s.key] = s.kind.from_toml(raw)
            elif isinstance(s.kind, ListOf) and how == "flag":
                values[s.key] = s.kind.from_flags(raw)
            elif isinstance(s.kind, Bool) and how == "flag":
                values[s.key] = bool(raw)
            else:
                values[s.key] = s.kind.from_text(raw)
        except _Invalid as exc:
            raise ConfigError(source, s.key, str(exc), raw) from None
        sources[s.key] = source

    for s in SETTINGS:
        if s.fallback_env and s.fallback_env in environ:
            put(s, f"env {s.fallback_env}", environ[s.fallback_env], "text")
    if toml_text is not None:
        for key, raw, where in _toml_items(toml_text, toml_name or "<toml>"):
            put(BY_KEY[key], where, raw, "toml")
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        known = BY_ENV.get(var)
        if known is None:
            raise ConfigError(f"env {var}", "environment", _known("a known variable", var,
                                                                  [*BY_ENV, CONFIG_ENV]),
                              environ[var])
        put(known, f"env {var}", environ[var], "text")
    given = vars(args) if args is not None else {}
    for s in SETTINGS:
        if s.key in given:
            put(s, f"flag {s.flag}", given[s.key], "flag")
    return _build(values, sources, hostname, toml_name if toml_text is not None else None,
                  environ)


def _known(what: str, got: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(got, known, n=1)
    return what + (f" (did you mean {close[0]}?)" if close else f" (one of {', '.join(known)})")


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_.\-\"' ]+?)\s*=")


def _toml_lines(text: str) -> dict[str, int]:
    """Best effort: the line of each dotted key's assignment (tomllib keeps no positions)."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        if (m := _HEADER.match(line)) is not None:
            table = m.group(1)
            lines.setdefault(table, number)
            continue
        if (m := _ASSIGN.match(line)) is not None:
            key = ".".join(p.strip().strip("\"'") for p in m.group(1).split("."))
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _toml_items(text: str, name: str) -> list[tuple[str, object, str]]:
    """(setting key, value, "PATH:LINE") of every setting in the file; unknown keys raise."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        where = f"{name}:{match.group(1)}" if match else name
        raise ConfigError(where, "config", "a TOML document", str(exc)) from None
    lines = _toml_lines(text)

    def at(key: str) -> str:
        line = lines.get(key) or lines.get(key.rpartition(".")[0])
        return f"{name}:{line}" if line else name

    out: list[tuple[str, object, str]] = []
    for top, value in doc.items():
        if top in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(at(top), top, f"a table [{top}]", value)
            items = [(f"{top}.{k}", v) for k, v in value.items()]
        else:
            items = [(top, value)]
        for key, v in items:
            if key not in BY_KEY:
                raise ConfigError(at(key), key, _known("a known key", key, list(BY_KEY)),
                                  v)
            out.append((key, v, at(key)))
    return out


def _build(values: dict[str, Any], sources: dict[str, str], hostname: str | None,
           config_file: str | None, environ: Mapping[str, str]) -> Config:
    v, src = values, sources
    if v["origin"] is None:
        try:
            v["origin"] = _origin(hostname if hostname is not None else platform.node())
        except _Invalid as exc:
            raise ConfigError("default (the host name)", "origin", str(exc), hostname) from None
        src["origin"] = "default (the host name)"
    if v["lease.holder"] is None:
        v["lease.holder"] = f"checkpointer@{v['origin']}"
        src["lease.holder"] = "default (checkpointer@ORIGIN)"
    ttl = v["lease.ttl_ms"]
    if v["lease.renew_ms"] is None:
        v["lease.renew_ms"], src["lease.renew_ms"] = ttl // 3, "default (lease.ttl_ms / 3)"
    renew = v["lease.renew_ms"]
    if not 2 * renew < ttl:
        raise ConfigError(src["lease.renew_ms"], "lease.renew_ms",
                          f"less than lease.ttl_ms / 2 = {ttl / 2:g} (lease.ttl_ms {ttl} from "
                          f"{src['lease.ttl_ms']}), so a renewal can fail once and still come "
                          "in time", renew)
    if v["store.keys_file"] is None:
        raise ConfigError("default", "store.keys_file", "a signing-key file (TOML keys_file in "
                          f"[store], env {BY_KEY['store.keys_file'].env} or --keys)", NOT_SET)
    try:
        policy = CommitPolicy(
            interval_s=v["commit.interval_ms"] / 1000 if v["commit.interval_ms"] else None,
            every_bytes=v["commit.every_bytes"] or None)
    except PolicyError as exc:  # not reached with the kinds' ranges; kept for the contract
        raise ConfigError(src["commit.interval_ms"], "commit", str(exc)) from None
    return Config(
        store=with_environment_secrets(_store(v, src), environ),
        store_password_file=v["store.password_file"],
        keys_file=v["store.keys_file"], origin=v["origin"], interfaces=v["interfaces"],
        gate_backend=GateBackend(v["gate_backend"]), guarded_ports=v["guarded_ports"],
        lease_ttl_ms=ttl, lease_renew_ms=renew, lease_holder=v["lease.holder"],
        standby=v["standby"], checkpoint_period_ms=v["checkpoint_period_ms"],
        commit_policy=policy, socket_path=v["socket_path"],
        allowed_uids=frozenset(v["allowed_uids"]), allowed_gids=frozenset(v["allowed_gids"]),
        metrics_address=v["metrics_address"], log_format=v["log.format"],
        log_level=v["log.level"], config_file=None if config_file is None else Path(config_file),
        values=MappingProxyType(dict(v)), sources=MappingProxyType(dict(src)))


_STORE_KEYS = ("store.url", "store.cluster", "store.sentinels", "store.service",
               "store.username", "store.tls_ca", "store.tls_cert", "store.tls_key",
               "store.durability")


def _store(v: dict[str, Any], src: dict[str, str]) -> StoreConfig:
    """StoreConfig as store/cliopts.py builds it from its flags (topology, TLS from rediss:// or
    a CA/cert); credentials come from the environment mapping given to merge(), not os.environ,
    and the password file is read later (store_with_password)."""
    if v["store.url"] is None and not v["store.sentinels"]:
        raise ConfigError("default", "store.url", "a redis:// or rediss:// URL (TOML url in "
                          f"[store], env {BY_KEY['store.url'].env} or --url) or store.sentinels "
                          "with store.service", NOT_SET)
    if v["store.url"] is not None and v["store.sentinels"]:
        raise ConfigError(f"{src['store.url']} and {src['store.sentinels']}", "store.url",
                          "either store.url or store.sentinels, not both",
                          (v["store.url"], v["store.sentinels"]))
    ns = argparse.Namespace(
        url=v["store.url"], cluster=v["store.cluster"], sentinel=list(v["store.sentinels"]),
        service=v["store.service"], username=v["store.username"], password_file=None,
        tls_ca=_text(v["store.tls_ca"]), tls_cert=_text(v["store.tls_cert"]),
        tls_key=_text(v["store.tls_key"]), durability=v["store.durability"])
    try:
        store = config_from_args(ns)
    except StoreConfigError as exc:
        given = [f"{k} from {src[k]}" for k in _STORE_KEYS if src[k] != "default"]
        raise ConfigError(", ".join(sorted({src[k] for k in _STORE_KEYS
                                            if src[k] != "default"})) or "default",
                          "store", f"a usable store ({exc}; settings: {', '.join(given)})"
                          ) from None
    return store


def with_environment_secrets(store: StoreConfig, environ: Mapping[str, str]) -> StoreConfig:
    """store with the password and Sentinel credentials of environ (the variables
    store/cliopts.py reads), or none."""
    return replace(store, password=environ.get(PASSWORD_ENV),
                   sentinel_username=environ.get(SENTINEL_USER_ENV),
                   sentinel_password=environ.get(SENTINEL_PASSWORD_ENV))


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


# --- the reference --------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """The configuration reference in markdown, from SETTINGS (what --help says, as a table)."""
    rows = ["| setting | TOML key | env var | flag | default | meaning |",
            "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        env = f"`{s.env}`" + (f" (else `{s.fallback_env}`)" if s.fallback_env else "")
        flag = f"`{s.flag} {s.kind.metavar}`" if not isinstance(s.kind, Bool) else \
            f"`{s.flag}` / `--no-{s.flag[2:]}`"
        if s.kind.is_list:
            flag += " (repeat)"
        rows.append("| " + " | ".join(_cell(c) for c in (
            s.key, f"`{_toml_place(s)}`", env, flag, s.shown_default, s.help)) + " |")
    head = (
        "# checkpointer configuration\n\n"
        "Sources, lowest to highest precedence: defaults < TOML file (`--config PATH` or "
        f"`{CONFIG_ENV}`) < environment < flags. A later source replaces a value, lists "
        "whole.\n\n"
        f"Naming: a setting's environment variable is `{ENV_PREFIX}` + its key in upper case "
        "with dots as underscores; its flag is `--` + the key with dots and underscores as "
        "dashes, except the store's flags, which are those of `tcpcp inspect`. Lists are "
        "comma-separated in the environment and one flag per item (an empty value clears "
        "the list). Flags are never abbreviated. Unknown TOML keys and "
        f"unknown `{ENV_PREFIX}*` variables are errors.\n\n"
        f"Secrets: the Redis password comes from `store.password_file` or `{PASSWORD_ENV}`, "
        f"Sentinel credentials from `{SENTINEL_USER_ENV}` / `{SENTINEL_PASSWORD_ENV}`; never "
        "from flags or the TOML file. The log settings fall back on the tcpcp-wide "
        "`TCPCP_LOG_FORMAT` / `TCPCP_LOG_LEVEL`, below the TOML file.\n\n")
    return head + "\n".join(rows) + "\n"


__all__ = ["BY_ENV", "BY_KEY", "CONFIG_ENV", "ENV_PREFIX", "SETTINGS", "Config", "ConfigError",
           "GateBackend", "GuardedPort", "Setting", "build_parser", "load_config", "merge",
           "render_reference", "store_with_password", "with_environment_secrets"]
