"""How to reach the store and how durable a write must be: pure values, parsed from settings.

Durability settings (text form, as in config files and on the command line):

    none                        acknowledged by the primary
    wait:N[:TIMEOUT_MS]         WAIT: N replicas acknowledged within the timeout (default 1000)
    waitaof:L:N[:TIMEOUT_MS]    WAITAOF (Redis >= 7.2): fsynced to the AOF locally (L = 0|1)
                                and on N replicas within the timeout
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from store.errors import StoreConfigError
from store.limits import DEFAULT_LIMITS, Limits

DEFAULT_TIMEOUT_MS = 1000


class DurabilityMode(enum.Enum):
    NONE = "none"
    WAIT = "wait"
    WAITAOF = "waitaof"


@dataclass(frozen=True, slots=True)
class Durability:
    """What must hold before a put returns: see the module docstring."""

    mode: DurabilityMode = DurabilityMode.NONE
    replicas: int = 0
    local: int = 0
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.timeout_ms <= 0 or self.local not in (0, 1):
            raise StoreConfigError(
                f"durability needs replicas >= 0, local 0|1 and timeout_ms > 0, got {self}"
            )
        if self.mode is DurabilityMode.WAIT and self.replicas == 0:
            raise StoreConfigError("durability wait needs at least 1 replica, got 0")
        if self.mode is DurabilityMode.WAITAOF and self.replicas == 0 and self.local == 0:
            raise StoreConfigError("durability waitaof needs local=1 or replicas >= 1, got neither")

    @classmethod
    def parse(cls, text: str) -> Durability:
        parts = text.strip().lower().split(":")
        try:
            mode = DurabilityMode(parts[0])
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise StoreConfigError(
                f"durability must be none, wait:N[:MS] or waitaof:L:N[:MS], got {text!r}"
            ) from None
        if mode is DurabilityMode.NONE and not numbers:
            return cls()
        padded = [*numbers, DEFAULT_TIMEOUT_MS]
        if mode is DurabilityMode.WAIT and len(numbers) in (1, 2):
            return cls(mode, replicas=numbers[0], timeout_ms=padded[1])
        if mode is DurabilityMode.WAITAOF and len(numbers) in (2, 3):
            return cls(mode, local=numbers[0], replicas=numbers[1], timeout_ms=padded[2])
        raise StoreConfigError(
            f"durability must be none, wait:N[:MS] or waitaof:L:N[:MS], got {text!r}"
        )

    def __str__(self) -> str:
        if self.mode is DurabilityMode.NONE:
            return "none"
        if self.mode is DurabilityMode.WAIT:
            return f"wait:{self.replicas}:{self.timeout_ms}"
        return f"waitaof:{self.local}:{self.replicas}:{self.timeout_ms}"


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS towards Redis (and Sentinels). Files are PEM paths."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


class Topology(enum.Enum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the store is and how to talk to it.

    STANDALONE and CLUSTER use `url` (redis:// or rediss://; for a cluster, any node).
    SENTINEL uses `service` and `sentinels` ((host, port) pairs).
    """

    topology: Topology = Topology.STANDALONE
    url: str | None = None
    service: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: Tls | None = None
    durability: Durability = Durability()
    limits: Limits = DEFAULT_LIMITS
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.topology is Topology.SENTINEL:
            if not self.service or not self.sentinels:
                raise StoreConfigError(
                    "sentinel topology needs a service name and at least one sentinel address, "
                    f"got service={self.service!r} sentinels={self.sentinels!r}"
                )
        elif not self.url or not self.url.startswith(("redis://", "rediss://")):
            raise StoreConfigError(
                f"{self.topology.value} topology needs a redis:// or rediss:// URL, "
                f"got {self.url!r}"
            )

    @classmethod
    def standalone(cls, url: str, **kw: Any) -> StoreConfig:
        return cls(topology=Topology.STANDALONE, url=url, **kw)

    @classmethod
    def cluster(cls, url: str, **kw: Any) -> StoreConfig:
        return cls(topology=Topology.CLUSTER, url=url, **kw)

    @classmethod
    def sentinel(cls, service: str, sentinels: list[tuple[str, int]] | tuple[tuple[str, int], ...],
                 **kw: Any) -> StoreConfig:
        return cls(topology=Topology.SENTINEL, service=service,
                   sentinels=tuple((h, int(p)) for h, p in sentinels), **kw)
