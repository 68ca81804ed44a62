"""CheckpointStore: the thin I/O shell between tcpcp and Redis (standalone, Sentinel, Cluster).

Every write is one call into the `tcpcp` Redis Function library (store/functions.lua), which
checks the epoch atomically; the requested durability (WAIT / WAITAOF) is sent on the same
connection in the same round trip, and a put returns only once it holds.

    with CheckpointStore.connect(config, keyring) as store:
        epoch = store.lease_acquire("origin-a", holder="origin-a", ttl_ms=3000)
        store.put(Checkpoint(origin="origin-a", conn="...", epoch=epoch, version=1, ...))
        store.lease_renew("origin-a", "origin-a", epoch, ttl_ms=3000)
    # resurrector:
        state = store.state("origin-a")                  # lease expired?
        epoch = store.claim("origin-a", "standby-1", state.epoch, ttl_ms=3000)
        for item in store.records("origin-a"): ...       # verified checkpoints or refusals
    # logged output (DESIGN.md section 5): bytes go to the log before they go to the kernel
        store.append_output("origin-a", conn, epoch, offset, data)   # or put_with_output
        store.trim_output("origin-a", conn, epoch, upto_offset)      # the peer acknowledged
        data = store.read_output("origin-a", conn, peer_rcv_offset)  # resurrector: verified
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.exceptions as rx
import structlog
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from store.config import DurabilityMode, StoreConfig, Topology
from store.errors import (
    ClaimLost,
    DurabilityError,
    DurabilityUnsupported,
    EpochExhausted,
    InvalidCheckpoint,
    LeaseHeld,
    LeaseLost,
    LibraryVersionError,
    NotOwner,
    OutputNotHeld,
    OutputOffsetRefused,
    OutputTooLarge,
    RecordCorrupt,
    RecordError,
    RecordTooLarge,
    StaleEpoch,
    StateCorrupt,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    TooManyRecords,
    VersionNotNewer,
    WriteRefused,
)
from store.keys import META_PATTERN, OriginKeys, check_name, keys_of, origin_of_meta_key
from store.limits import Limits
from store.outlog import OutputRange, decode_output, encode_output
from store.record import U64_MAX, Checkpoint, RecordHeader, decode, encode, read_header
from store.signing import KeyRing

log = structlog.get_logger(component="tcpcp.store.client")

LIBRARY_SOURCE = resources.files("store").joinpath("functions.lua").read_text(encoding="utf-8")
_version_match = re.search(r"^local LIBRARY_VERSION = (\d+)$", LIBRARY_SOURCE, re.MULTILINE)
assert _version_match, "store/functions.lua must define LIBRARY_VERSION"
LIBRARY_VERSION = int(_version_match.group(1))

PUT_BATCH = 64  # records per FCALL in put_many
PUT_BATCH_BYTES = 256 * 1024  # and about this many record bytes
T = TypeVar("T")
_SUCCESS = frozenset({"OK", "DUP"})  # DUP: an output append stored already (a retry)


@dataclass(frozen=True, slots=True)
class OriginState:
    """One consistent view of an origin's fencing state."""

    origin: str
    epoch: int
    owner: str | None
    lease_holder: str | None
    lease_ms_left: int | None  # None when no lease is live


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """Result of one record in put_many: `error` is None when it was stored."""

    conn: str
    version: int
    error: WriteRefused | RecordTooLarge | None


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    """Result of one append in append_many: `error` is None when the range is in the log
    (`duplicate`: it was already, from an earlier attempt of the same append)."""

    conn: str
    offset: int
    error: WriteRefused | None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class OutputBounds:
    """What a connection's output log holds: outbound bytes [start, end)."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One stored record as read back: a verified checkpoint, or the reason it is refused."""

    conn: str
    size: int
    checkpoint: Checkpoint | None
    error: RecordError | None
    header: RecordHeader | None = None  # unverified, for display; None if unparseable


# --- error translation -----------------------------------------------------------------------

def _fields(message: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in message.split() if "=" in p)


def _refusal(message: str, origin: str) -> WriteRefused | None:
    """The WriteRefused for a TCPCP_* error reply from the library, or None if it is not one."""
    try:
        return _parse_refusal(message, origin)
    except (KeyError, ValueError):  # the stored state it quotes is malformed (not our writes)
        return WriteRefused(f"write to origin {origin!r} refused by the store with a reply "
                            f"quoting malformed state: {message!r}")


def _decimal(raw: object, what: str, error: type[StoreError]) -> int:
    """`raw` (a Redis reply) as a non-negative decimal integer, else `error`."""
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else str(raw)
    if not text.isdigit() or not text.isascii():
        raise error(f"{what} must be a decimal integer, got {raw!r}")
    return int(text)


def _parse_refusal(message: str, origin: str) -> WriteRefused | None:
    code = message.split(" ", 1)[0]
    f = _fields(message)
    if code == "TCPCP_STALE_EPOCH":
        return StaleEpoch(
            f"write to origin {origin!r} must carry the current epoch {f['current']}, "
            f"got {f['given']}: the writer is fenced",
            given=int(f["given"]), current=int(f["current"]))
    if code == "TCPCP_LEASE_HELD":
        return LeaseHeld(f"lease of origin {origin!r} must be free or ours, "
                         f"but {f['holder']!r} holds it")
    if code == "TCPCP_LEASE_LOST":
        return LeaseLost(f"lease of origin {origin!r} must be held by the caller, "
                         f"got holder {f['holder']!r} (expired or taken)")
    if code == "TCPCP_NOT_OWNER":
        return NotOwner(f"origin {origin!r} must be owned by the caller, but {f['owner']!r} "
                        f"owns it at epoch {f['epoch']}: the caller is fenced")
    if code == "TCPCP_CLAIM_LOST":
        return ClaimLost(f"claim of origin {origin!r} expected epoch {f['seen']}, "
                         f"got {f['current']}: another claimer won")
    if code == "TCPCP_UNOWNED":
        return NotOwner(f"origin {origin!r} must have an owner before anything is written for "
                        f"it, got none at epoch {f['epoch']} (never leased, or its fencing "
                        "state was lost with a primary's data): take the lease first")
    if code == "TCPCP_EPOCH_EXHAUSTED":
        return EpochExhausted(f"epoch of origin {origin!r} must be below 2**63-1 to be bumped, "
                              f"got {f['current']}: the origin cannot be claimed again")
    return None


def _item_refusal(status: str, origin: str, conn: str, version: int,
                  limit: int) -> WriteRefused | RecordTooLarge:
    code, _, value = status.partition(" ")
    if code == "VERSION_NOT_NEWER" and value.isdigit() and value.isascii():
        return VersionNotNewer(
            f"record {origin}/{conn} must have a version above the stored {value}, got {version}",
            given=version, stored=int(value))
    if code == "TOO_MANY":
        return TooManyRecords(f"origin {origin!r} may hold at most {limit} records, has {value}")
    if code == "TOO_LARGE":
        return RecordTooLarge(f"record {origin}/{conn} is {value} bytes, above the store's limit")
    return WriteRefused(f"record {origin}/{conn} refused by the store: {status}")


def _output_refusal(status: str, origin: str, conn: str, offset: int, size: int,
                    limits: Limits) -> WriteRefused:
    """The refusal of one output append (a status of tcpcp_output_append)."""
    code, _, value = status.partition(" ")
    number = int(value) if value.isdigit() and value.isascii() else None
    where = f"output log of {origin}/{conn}"
    if code == "OFFSET" and number is not None:
        return OutputOffsetRefused(
            f"{where}: an append must start where the log ends, at {number}, got offset "
            f"{offset} ({'a gap' if offset > number else 'an overlap'} that is not a duplicate "
            "of a stored append)", given=offset, end=number)
    if code == "TOO_LARGE_APPEND" and number is not None:
        return OutputTooLarge(
            f"{where}: an append must be at most max_output_append = "
            f"{limits.max_output_append} bytes, got {number}",
            limit="max_output_append", size=number, maximum=limits.max_output_append)
    if code == "FULL" and number is not None:
        return OutputTooLarge(
            f"{where} may hold at most max_output_held = {limits.max_output_held} bytes, "
            f"holds {number} and the append adds {size}: trim what the peer acknowledged",
            limit="max_output_held", size=number + size, maximum=limits.max_output_held)
    if code == "TOO_MANY_ENTRIES" and number is not None:
        return OutputTooLarge(
            f"{where} may hold at most max_output_entries = {limits.max_output_entries} "
            f"appends, holds {number}: trim what the peer acknowledged, or append less often",
            limit="max_output_entries", size=number + 1, maximum=limits.max_output_entries)
    if code == "TOO_MANY_LOGS":
        return TooManyRecords(f"origin {origin!r} may hold at most "
                              f"{limits.max_records_per_origin} output logs, has {value}")
    return WriteRefused(f"{where}: append at {offset} refused by the store: {status}")


def _put_output_refusal(status: str, cp: Checkpoint, offset: int, size: int,
                        limits: Limits) -> WriteRefused | RecordTooLarge:
    """The refusal of one record-and-append of tcpcp_put_output: the record's, else the append's."""
    if status.partition(" ")[0] in ("VERSION_NOT_NEWER", "TOO_MANY", "TOO_LARGE"):
        return _item_refusal(status, cp.origin, cp.conn, cp.version,
                             limits.max_records_per_origin)
    return _output_refusal(status, cp.origin, cp.conn, offset, size, limits)


def _stream_offset(raw: object, origin: str, conn: str) -> int:
    """The offset of an output log entry from its stream ID "<offset>-1"."""
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else str(raw)
    head, sep, tail = text.partition("-")
    if sep != "-" or tail != "1" or not head.isdigit() or not head.isascii():
        raise RecordCorrupt(f"output log of {origin}/{conn} must have entry IDs <offset>-1, "
                            f"got {text!r}")
    return int(head)


def _translate(exc: Exception, what: str) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, rx.AuthenticationError | rx.AuthenticationWrongNumberOfArgsError):
        return StoreConfigError(f"{what}: Redis refused the credentials: {exc}")
    if isinstance(exc, rx.NoPermissionError) or "can't run this command" in str(exc):
        return StoreConfigError(f"{what}: the Redis ACL user lacks a permission: {exc}")
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError | rx.ReadOnlyError
                  | rx.ClusterDownError | MasterNotFoundError | rx.SlotNotCoveredError):
        return StoreUnavailable(f"{what}: Redis unreachable or not primary: {exc}")
    if isinstance(exc, rx.ResponseError) and "function not found" in str(exc).lower():
        return StoreUnavailable(
            f"{what}: the server has no tcpcp function library (restarted without its data, or "
            f"a failover to an unprepared server); reconnect to load it: {exc}")
    if isinstance(exc, rx.ResponseError) and str(exc).startswith(("READONLY", "LOADING",
                                                                  "MASTERDOWN", "TRYAGAIN")):
        return StoreUnavailable(f"{what}: Redis cannot serve writes now: {exc}")
    if isinstance(exc, rx.ResponseError) and str(exc).startswith("NOREPLICAS"):
        return StoreUnavailable(
            f"{what}: the primary must see its min-replicas-to-write good replicas before it "
            f"accepts a write, it does not (nothing was written): {exc}")
    if isinstance(exc, rx.OutOfMemoryError) or str(exc).startswith("OOM"):
        return StoreUnavailable(f"{what}: Redis is above its maxmemory and refuses writes "
                                f"(nothing was written): {exc}")
    return StoreError(f"{what}: unexpected Redis reply: {type(exc).__name__}: {exc}")


def _scan_meta_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match=META_PATTERN, count=1000))


def _split(items: list[T], count: int, max_bytes: int,
           size: Callable[[T], int]) -> list[list[T]]:
    """Split items into FCALL batches of at most `count` items and about `max_bytes`."""
    batches: list[list[T]] = [[]]
    held = 0
    for item in items:
        if batches[-1] and (len(batches[-1]) >= count or held + size(item) > max_bytes):
            batches.append([])
            held = 0
        batches[-1].append(item)
        held += size(item)
    return batches if batches[0] else []


def _chunks(items: list[tuple[str, int, bytes]], count: int,
            max_bytes: int = PUT_BATCH_BYTES) -> list[list[tuple[str, int, bytes]]]:
    """Split records into FCALL batches of at most `count` records and about `max_bytes`."""
    return _split(items, count, max_bytes, lambda item: len(item[2]))


# --- routing ---------------------------------------------------------------------------------

class _Router:
    """Gives the Redis client that serves an origin's slot, and every primary."""

    def for_keys(self, keys: OriginKeys) -> redis.Redis:
        raise NotImplementedError

    def primaries(self) -> list[redis.Redis]:
        raise NotImplementedError

    def refresh(self) -> None:
        """Forget cached topology after an error (cluster slots move)."""

    def close(self) -> None:
        raise NotImplementedError


class _Single(_Router):
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def for_keys(self, keys: OriginKeys) -> redis.Redis:
        return self.client

    def primaries(self) -> list[redis.Redis]:
        return [self.client]

    def close(self) -> None:
        self.client.close()


class _Cluster(_Router):
    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster

    def for_keys(self, keys: OriginKeys) -> redis.Redis:
        node = self.cluster.get_node_from_key(keys.meta)
        return self.cluster.get_redis_connection(node)

    def primaries(self) -> list[redis.Redis]:
        return [self.cluster.get_redis_connection(n) for n in self.cluster.get_primaries()]

    def refresh(self) -> None:
        self.cluster.nodes_manager.initialize()

    def close(self) -> None:
        self.cluster.close()


def _connection_kwargs(config: StoreConfig) -> dict[str, Any]:
    wait_s = config.durability.timeout_ms / 1000 if config.durability.mode is not \
        DurabilityMode.NONE else 0.0
    kw: dict[str, Any] = {
        "username": config.username,
        "password": config.password,
        "socket_timeout": max(config.socket_timeout_s, wait_s + 1.0),
        "socket_connect_timeout": config.connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),  # a retried put could be applied twice: caller decides
    }
    if config.tls is not None:
        kw.update(ssl=True, ssl_ca_certs=config.tls.ca_file, ssl_certfile=config.tls.cert_file,
                  ssl_keyfile=config.tls.key_file,
                  ssl_cert_reqs="required" if config.tls.verify else "none",
                  ssl_check_hostname=config.tls.verify)
    return kw


def _open_router(config: StoreConfig) -> _Router:
    kw = _connection_kwargs(config)
    if config.topology is Topology.STANDALONE:
        assert config.url is not None
        if config.url.startswith("rediss://"):
            kw.pop("ssl", None)
        return _Single(redis.Redis.from_url(config.url, **kw))
    if config.topology is Topology.CLUSTER:
        assert config.url is not None
        kw.pop("retry")
        if config.url.startswith("rediss://"):
            kw.pop("ssl", None)
        return _Cluster(RedisCluster.from_url(config.url, **kw))
    sentinel_kw: dict[str, Any] = {
        "username": config.sentinel_username, "password": config.sentinel_password,
        "socket_timeout": config.connect_timeout_s,
        "socket_connect_timeout": config.connect_timeout_s,
    }
    if config.tls is not None:
        sentinel_kw.update({k: v for k, v in kw.items() if k.startswith("ssl")})
    sentinel = Sentinel(list(config.sentinels), sentinel_kwargs=sentinel_kw, **kw)
    assert config.service is not None
    return _Single(sentinel.master_for(config.service, **kw))


# --- the store ---------------------------------------------------------------------------------

class CheckpointStore:
    """Fenced, signed, durable checkpoint records in Redis. Use `connect`; close when done."""

    def __init__(self, config: StoreConfig, keys: KeyRing, router: _Router) -> None:
        self.config = config
        self.keys = keys
        self.limits = config.limits
        self._router = router
        self._where = config.url or f"{config.service} via Sentinels {config.sentinels}"
        self._log = log.bind(store=config.topology.value, where=self._where)

    @classmethod
    def connect(cls, config: StoreConfig, keys: KeyRing) -> CheckpointStore:
        """Connect, load the Function library if missing or older, check durability support."""
        try:
            router = _open_router(config)
        except (rx.RedisError, ValueError, OSError) as exc:
            raise _translate(exc, "connecting to the store") from exc
        store = cls(config, keys, router)
        try:
            store._prepare()
        except BaseException:
            router.close()
            raise
        return store

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._router.close()

    # -- connect-time checks --

    def _prepare(self) -> None:
        for client in self._call("listing primaries", self._router.primaries):
            self._call("loading the function library", partial(self._ensure_library, client))
            self._call("checking durability support", partial(self._check_durability, client))

    def _ensure_library(self, client: redis.Redis) -> None:
        try:
            loaded = int(client.execute_command("FCALL_RO", "tcpcp_version", 0))
        except rx.ResponseError as exc:
            if "not found" not in str(exc).lower():
                raise
            loaded = 0
        if loaded > LIBRARY_VERSION:
            raise LibraryVersionError(
                f"function library tcpcp must be at most version {LIBRARY_VERSION} for this "
                f"client, got version {loaded} on the server: upgrade tcpcp"
            )
        if loaded < LIBRARY_VERSION:
            client.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY_SOURCE)
            self._log.info("function_library_loaded", version=LIBRARY_VERSION, previous=loaded)

    def _check_durability(self, client: redis.Redis) -> None:
        d = self.config.durability
        if d.mode is DurabilityMode.WAIT:
            client.execute_command("WAIT", 0, 1)
        elif d.mode is DurabilityMode.WAITAOF:
            try:
                client.execute_command("WAITAOF", 0, 0, 1)
            except rx.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                raise DurabilityUnsupported(
                    f"durability {d} needs the WAITAOF command (Redis >= 7.2); the server at "
                    f"{self._where} is Redis {self._server_version(client)}, "
                    "which lacks it: use none or wait:N"
                ) from None

    @staticmethod
    def _server_version(client: redis.Redis) -> str:
        try:
            hello = client.execute_command("HELLO")
            props = dict(zip(hello[::2], hello[1::2], strict=False)) if isinstance(hello, list) \
                else hello
            v = props.get(b"version") or props.get("version")
            return v.decode() if isinstance(v, bytes) else str(v)
        except rx.RedisError:
            return "(version unknown)"

    # -- plumbing --

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, translating Redis errors; on a topology error refresh the routes once."""
        for attempt in (1, 2):
            try:
                return fn()
            except (rx.MovedError, rx.AskError, rx.ClusterDownError) as exc:
                if attempt == 2 or self.config.topology is not Topology.CLUSTER:
                    raise _translate(exc, what) from exc
                self._router.refresh()
            except StoreError:
                raise
            except (rx.RedisError, OSError) as exc:
                raise _translate(exc, what) from exc
        raise AssertionError("unreachable")

    def _fcall(self, name: str, keys: OriginKeys, *args: object, durable: bool = False,
               extra_keys: tuple[str, ...] = ()) -> Any:
        """FCALL one library function with the origin's four keys and `extra_keys`; with
        `durable`, also await the configured durability."""
        durability = self._durability_command() if durable else None

        def run() -> Any:
            client = self._router.for_keys(keys)
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("FCALL", name, 4 + len(extra_keys), *keys.all(), *extra_keys,
                                 *args)
            if durability is not None:
                pipe.execute_command(*durability)
            replies = pipe.execute(raise_on_error=False)
            if isinstance(replies[0], rx.ResponseError):
                refusal = _refusal(str(replies[0]), keys.origin)
                raise refusal if refusal is not None else replies[0]
            if isinstance(replies[0], Exception):
                raise replies[0]
            if durability is not None:
                self._check_durable(replies[1], keys.origin)
            return replies[0]
        return self._call(f"{name} on origin {keys.origin!r}", run)

    def _durability_command(self) -> tuple[object, ...] | None:
        d = self.config.durability
        if d.mode is DurabilityMode.WAIT:
            return ("WAIT", d.replicas, d.timeout_ms)
        if d.mode is DurabilityMode.WAITAOF:
            return ("WAITAOF", d.local, d.replicas, d.timeout_ms)
        return None

    def _check_durable(self, reply: Any, origin: str) -> None:
        d = self.config.durability
        if isinstance(reply, Exception):
            raise _translate(reply, f"durability {d} on origin {origin!r}")
        if d.mode is DurabilityMode.WAIT and int(reply) < d.replicas:
            raise DurabilityError(
                f"write to origin {origin!r} needed {d.replicas} replica(s) within "
                f"{d.timeout_ms} ms (WAIT), got {int(reply)}: not durable, keep the gate closed"
            )
        if d.mode is DurabilityMode.WAITAOF:
            local, replicas = int(reply[0]), int(reply[1])
            if local < d.local or replicas < d.replicas:
                raise DurabilityError(
                    f"write to origin {origin!r} needed AOF fsync local={d.local} and on "
                    f"{d.replicas} replica(s) within {d.timeout_ms} ms (WAITAOF), got "
                    f"local={local} replicas={replicas}: not durable, keep the gate closed"
                )

    def _put_batches(self, keys: OriginKeys, epoch: int,
                     batches: list[list[tuple[str, int, bytes]]]) -> list[str]:
        """FCALL tcpcp_put per batch plus one durability command, pipelined on one connection."""
        limits = self.limits
        calls: list[list[object]] = []
        for batch in batches:
            args: list[object] = ["FCALL", "tcpcp_put", 4, *keys.all(), epoch,
                                  limits.max_records_per_origin, limits.max_record]
            for conn, version, record in batch:
                args += [conn, version, record]
            calls.append(args)
        return self._run_calls(keys, calls, f"put on origin {keys.origin!r}")

    def _run_calls(self, keys: OriginKeys, calls: list[list[object]], what: str,
                   durable: bool = True) -> list[str]:
        """Run FCALLs that return one status per item, plus one durability command when any
        item was stored (with `durable`), pipelined on one connection; all the statuses.
        A refusal of a whole call (stale epoch, ...) is raised."""
        durability = self._durability_command() if durable else None

        def run() -> list[str]:
            client = self._router.for_keys(keys)
            replies: list[Any]
            if durability is None and len(calls) == 1:  # one round trip without a pipeline
                try:
                    replies = [client.execute_command(*calls[0])]
                except rx.ResponseError as exc:
                    replies = [exc]
            else:
                pipe = client.pipeline(transaction=False)
                for call in calls:
                    pipe.execute_command(*call)
                if durability is not None:
                    pipe.execute_command(*durability)
                replies = pipe.execute(raise_on_error=False)
            statuses: list[str] = []
            for reply in replies[:len(calls)]:
                if isinstance(reply, rx.ResponseError):
                    refusal = _refusal(str(reply), keys.origin)
                    raise refusal if refusal is not None else reply
                if isinstance(reply, Exception):
                    raise reply
                statuses += [s.decode(errors="replace") if isinstance(s, bytes) else str(s)
                             for s in reply]
            if durability is not None and any(s in _SUCCESS for s in statuses):
                self._check_durable(replies[-1], keys.origin)
            return statuses
        return self._call(what, run)

    # -- writes --

    def put(self, cp: Checkpoint) -> None:
        """Store `cp` (signed) if its epoch is current and its version newer; return once durable.

        Raises StaleEpoch, VersionNotNewer, TooManyRecords, DurabilityError, StoreUnavailable.
        """
        record = encode(cp, self.keys, self.limits)
        (status,) = self._put_batches(keys_of(cp.origin), cp.epoch,
                                      [[(cp.conn, cp.version, record)]])
        if status != "OK":
            raise _item_refusal(status, cp.origin, cp.conn, cp.version,
                                self.limits.max_records_per_origin)

    def put_many(self, checkpoints: Iterable[Checkpoint],
                 batch: int = PUT_BATCH) -> list[PutOutcome]:
        """Store many checkpoints of ONE origin and epoch in one round trip (bulk checkpoints).

        Every record is checked on its own (a refused version does not stop the others); a stale
        epoch refuses them all (StaleEpoch); durability is awaited once for the whole set.
        """
        cps = list(checkpoints)
        if not cps:
            return []
        origin, epoch = cps[0].origin, cps[0].epoch
        for cp in cps:
            if (cp.origin, cp.epoch) != (origin, epoch):
                raise InvalidCheckpoint(
                    f"put_many needs one origin and epoch ({origin!r}, {epoch}), "
                    f"got ({cp.origin!r}, {cp.epoch})"
                )
        items = [(cp.conn, cp.version, encode(cp, self.keys, self.limits)) for cp in cps]
        statuses = self._put_batches(keys_of(origin), epoch, _chunks(items, batch))
        return [
            PutOutcome(cp.conn, cp.version, None if status == "OK" else _item_refusal(
                status, origin, cp.conn, cp.version, self.limits.max_records_per_origin))
            for cp, status in zip(cps, statuses, strict=True)
        ]

    def delete(self, origin: str, epoch: int, conns: Iterable[str]) -> int:
        """Delete closed connections' records and, in the same step, their output logs
        (fenced by epoch); returns how many records existed."""
        names = [check_name("connection", c, key_safe=False) for c in conns]
        if not names:
            return 0
        keys = keys_of(origin)
        logs = (keys.output_positions, *(keys.output(c) for c in names))
        return int(self._fcall("tcpcp_delete", keys, epoch, *names, durable=True,
                               extra_keys=logs))

    def lease_acquire(self, origin: str, holder: str, ttl_ms: int) -> int:
        """Take the origin's lease (first owner becomes owner at epoch 1); returns the epoch.

        Raises LeaseHeld if another holder's lease is live, NotOwner if another holder owns it.
        """
        check_name("holder", holder)
        epoch = self._fcall("tcpcp_lease_acquire", keys_of(origin), holder, int(ttl_ms),
                            durable=True)
        return _decimal(epoch, f"epoch of origin {origin!r}", StateCorrupt)

    def lease_renew(self, origin: str, holder: str, epoch: int, ttl_ms: int) -> None:
        """Extend a live lease; return once the configured durability holds.

        Raises LeaseLost (expired), StaleEpoch/NotOwner (fenced). A renewal that reached only
        the primary would be lost in a failover, and the standby would then see the lease end
        earlier than the holder believes: so it awaits durability too, and on DurabilityError
        the holder must count its lease from the last renewal that returned.
        """
        self._fcall("tcpcp_lease_renew", keys_of(origin), holder, epoch, int(ttl_ms),
                    durable=True)

    def lease_release(self, origin: str, holder: str, epoch: int) -> None:
        """Give the lease up at once (ownership and epoch stay)."""
        self._fcall("tcpcp_lease_release", keys_of(origin), holder, epoch)

    def claim(self, origin: str, holder: str, seen_epoch: int, ttl_ms: int) -> int:
        """Fence the origin: bump its epoch, become owner and lease holder; returns the epoch.

        `seen_epoch` is the epoch read (state()) when the lease was seen expired; of claimers
        that saw the same epoch exactly one wins, the others get ClaimLost. LeaseHeld while
        another holder's lease is live. The claim awaits the configured durability (a claim
        lost in a failover would un-fence the origin); on DurabilityError it may still have
        been applied: state().owner == holder then says this claimer holds the origin.
        """
        check_name("holder", holder)
        epoch = self._fcall("tcpcp_claim", keys_of(origin), holder, seen_epoch, int(ttl_ms),
                            durable=True)
        return _decimal(epoch, f"epoch of origin {origin!r}", StateCorrupt)

    # -- output logs (logged output, DESIGN.md section 5) --

    def _output_batches(self, function: str, keys: OriginKeys, head: list[object],
                        items: list[tuple[str, list[object], int]], batch: int,
                        durable: bool = True) -> list[str]:
        """FCALL `function` per batch of items (conn, its ARGV, its bytes), each item with its
        connection's output log key; pipelined, durability awaited once."""
        calls: list[list[object]] = []
        for chunk in _split(items, batch, PUT_BATCH_BYTES, lambda item: item[2]):
            streams = [keys.output(conn) for conn, _, _ in chunk]
            calls.append(["FCALL", function, 5 + len(streams), *keys.all(),
                          keys.output_positions, *streams, *head,
                          *(arg for _, args, _ in chunk for arg in args)])
        return self._run_calls(keys, calls, f"{function} on origin {keys.origin!r}",
                               durable=durable)

    def _output_limits(self) -> list[object]:
        limits = self.limits
        return [limits.max_output_append, limits.max_output_held, limits.max_output_entries]

    def append_output(self, origin: str, conn: str, epoch: int, offset: int,
                      data: bytes) -> None:
        """Append outbound bytes [offset, offset + len(data)) to the connection's output log
        (signed, fenced by epoch); return once durable. Hand them to the kernel only then.

        The log's first append may start anywhere; every later one where the log ends. The
        same append again (a retry after an error) is accepted and awaits durability again.
        Raises OutputOffsetRefused (a gap or an overlap), OutputTooLarge (naming the limit),
        TooManyRecords, StaleEpoch / NotOwner, DurabilityError, StoreUnavailable.
        """
        (outcome,) = self.append_many([OutputRange(origin, conn, epoch, offset, data)])
        if outcome.error is not None:
            raise outcome.error

    def append_many(self, ranges: Iterable[OutputRange],
                    batch: int = PUT_BATCH) -> list[AppendOutcome]:
        """Append many output ranges of ONE origin and epoch in one round trip (group commit).

        Each append is checked on its own, in order (several may extend one connection's log);
        a stale epoch refuses them all (StaleEpoch); durability is awaited once for the set.
        An append above max_output_append raises OutputTooLarge before anything is sent.
        """
        items = list(ranges)
        if not items:
            return []
        origin, epoch = items[0].origin, items[0].epoch
        for r in items:
            if (r.origin, r.epoch) != (origin, epoch):
                raise InvalidCheckpoint(f"append_many needs one origin and epoch ({origin!r}, "
                                        f"{epoch}), got ({r.origin!r}, {r.epoch})")
        args = [(r.conn, [r.conn, r.offset, len(r.data), encode_output(r, self.keys,
                                                                      self.limits)],
                 len(r.data)) for r in items]
        head: list[object] = [epoch, *self._output_limits(), self.limits.max_records_per_origin]
        statuses = self._output_batches("tcpcp_output_append", keys_of(origin), head, args,
                                        batch)
        return [AppendOutcome(r.conn, r.offset, None if status in _SUCCESS else _output_refusal(
                    status, origin, r.conn, r.offset, len(r.data), self.limits),
                              duplicate=status == "DUP")
                for r, status in zip(items, statuses, strict=True)]

    def put_with_output(self, cp: Checkpoint, offset: int, data: bytes) -> None:
        """Store `cp` and append its outbound bytes to its connection's output log in ONE
        atomic step: both or neither; return once durable. Empty `data` appends nothing.

        Raises what put and append_output raise (the record's refusal first).
        """
        (outcome,) = self.put_many_with_output([(cp, offset, data)])
        if outcome.error is not None:
            raise outcome.error

    def put_many_with_output(self, commits: Iterable[tuple[Checkpoint, int, bytes]],
                             batch: int = PUT_BATCH) -> list[PutOutcome]:
        """put_with_output for many connections of ONE origin and epoch in one round trip
        (group commit): each record and its append together or not at all, each on its own
        merit; a stale epoch refuses them all; durability is awaited once for the set."""
        items = list(commits)
        if not items:
            return []
        origin, epoch = items[0][0].origin, items[0][0].epoch
        args: list[tuple[str, list[object], int]] = []
        for cp, offset, data in items:
            if (cp.origin, cp.epoch) != (origin, epoch):
                raise InvalidCheckpoint(f"put_many_with_output needs one origin and epoch "
                                        f"({origin!r}, {epoch}), got ({cp.origin!r}, {cp.epoch})")
            record = encode(cp, self.keys, self.limits)
            entry = encode_output(OutputRange(cp.origin, cp.conn, cp.epoch, offset, data),
                                  self.keys, self.limits)
            args.append((cp.conn, [cp.conn, cp.version, record, offset, len(data), entry],
                         len(record) + len(entry)))
        limits = self.limits
        head: list[object] = [epoch, limits.max_records_per_origin, limits.max_record,
                              *self._output_limits()]
        statuses = self._output_batches("tcpcp_put_output", keys_of(origin), head, args, batch)
        return [PutOutcome(cp.conn, cp.version, None if status in _SUCCESS else
                           _put_output_refusal(status, cp, offset, len(data), limits))
                for (cp, offset, data), status in zip(items, statuses, strict=True)]

    def trim_output(self, origin: str, conn: str, epoch: int, upto_offset: int) -> int | None:
        """Drop what the peer acknowledged: the log then holds [upto_offset, end) (an append
        straddling upto_offset is kept whole). Trimming backwards is a no-op. Returns the
        log's start, None if the connection has no log.

        Not awaited for durability: a trim lost in a failover only keeps acknowledged bytes
        longer. Raises OutputOffsetRefused past the log's end, StaleEpoch / NotOwner.
        """
        check_name("connection", conn, key_safe=False)
        if not 0 <= upto_offset <= U64_MAX:
            raise InvalidCheckpoint(f"upto_offset must be in 0..2**64-1, got {upto_offset}")
        (status,) = self._output_batches("tcpcp_output_trim", keys_of(origin), [epoch],
                                         [(conn, [conn, upto_offset], 0)], 1, durable=False)
        if status == "NONE":
            return None
        if status.startswith("OFFSET "):
            end = _decimal(status[7:], f"end of the output log of {origin}/{conn}", StateCorrupt)
            raise OutputOffsetRefused(
                f"output log of {origin}/{conn}: a trim must stop at most at the log's end "
                f"{end}, got {upto_offset} (the peer cannot have acknowledged bytes never "
                "logged)", given=upto_offset, end=end)
        return _decimal(status, f"start of the output log of {origin}/{conn}", StateCorrupt)

    def _output_read(self, origin: str, conn: str, from_offset: int) -> list[Any]:
        keys = keys_of(origin)

        def run() -> list[Any]:
            reply: list[Any] = self._router.for_keys(keys).execute_command(
                "FCALL_RO", "tcpcp_output_read", 6, *keys.all(), keys.output_positions,
                keys.output(conn), conn, from_offset)
            return reply
        return self._call(f"read output log of {origin}/{conn}", run)

    def output_bounds(self, origin: str, conn: str) -> OutputBounds | None:
        """What the connection's output log holds, None if it has none."""
        check_name("connection", conn, key_safe=False)
        reply = self._output_read(origin, conn, U64_MAX)
        if not reply:
            return None
        what = f"output log of {origin}/{conn}"
        return OutputBounds(start=_decimal(reply[0], f"start of the {what}", RecordCorrupt),
                            end=_decimal(reply[1], f"end of the {what}", RecordCorrupt))

    def read_output(self, origin: str, conn: str, from_offset: int) -> bytes:
        """The connection's outbound bytes from `from_offset` to the end of its log, every
        append verified (signature, origin, connection, offset, contiguity).

        Raises OutputNotHeld when the log does not hold from_offset (no log, trimmed past it,
        or it lies past the end), another RecordError for a forged, corrupt or foreign entry.
        """
        check_name("connection", conn, key_safe=False)
        if not 0 <= from_offset <= U64_MAX:
            raise InvalidCheckpoint(f"from_offset must be in 0..2**64-1, got {from_offset}")
        what = f"output log of {origin}/{conn}"
        reply = self._output_read(origin, conn, from_offset)
        if not reply:
            raise OutputNotHeld(f"{what} must hold offset {from_offset}, but there is no log",
                                start=None, end=None)
        start = _decimal(reply[0], f"start of the {what}", RecordCorrupt)
        end = _decimal(reply[1], f"end of the {what}", RecordCorrupt)
        if not start <= from_offset <= end:
            reason = "the peer acknowledged it, so it was trimmed" if from_offset < start \
                else "it lies past the log's end"
            raise OutputNotHeld(f"{what} holds [{start}, {end}), must hold offset "
                                f"{from_offset}: {reason}", start=start, end=end)
        if from_offset == end:
            return b""
        entries = reply[2:]
        if not entries:
            raise RecordCorrupt(f"{what} holds [{start}, {end}) by its state, but no append "
                                f"holds offset {from_offset}")
        first = expected = _stream_offset(entries[0], origin, conn)
        pieces: list[bytes] = []
        for raw_id, raw in zip(entries[::2], entries[1::2], strict=True):
            offset = _stream_offset(raw_id, origin, conn)
            if offset != expected:
                raise RecordCorrupt(f"{what} must be contiguous: an append ends at {expected}, "
                                    f"the next starts at {offset}")
            r = decode_output(raw, self.keys, origin=origin, conn=conn, offset=offset,
                              limits=self.limits)
            pieces.append(r.data)
            expected = r.end
        if not first <= from_offset < expected or expected != end:
            raise RecordCorrupt(f"{what} holds [{start}, {end}) by its state, but its appends "
                                f"cover [{first}, {expected})")
        return b"".join(pieces)[from_offset - first:]

    # -- reads --

    def state(self, origin: str) -> OriginState:
        keys = keys_of(origin)

        def run() -> Any:
            return self._router.for_keys(keys).execute_command(
                "FCALL_RO", "tcpcp_state", 4, *keys.all())
        epoch, owner, lease, pttl = self._call(f"state of origin {origin!r}", run)
        return OriginState(
            origin=origin, epoch=_decimal(epoch, f"epoch of origin {origin!r}", StateCorrupt),
            owner=owner.decode(errors="replace") or None,
            lease_holder=lease.decode(errors="replace") or None,
            lease_ms_left=int(pttl) if int(pttl) >= 0 else None)

    def get_raw(self, origin: str, conn: str) -> bytes | None:
        keys = keys_of(origin)
        def run() -> bytes | None:
            raw: Any = self._router.for_keys(keys).hget(keys.records, conn)
            return raw
        return self._call(f"get {origin}/{conn}", run)

    def get(self, origin: str, conn: str) -> Checkpoint | None:
        """The verified checkpoint of one connection, None if absent; RecordError if refused."""
        raw = self.get_raw(origin, conn)
        if raw is None:
            return None
        return decode(raw, self.keys, origin=origin, conn=conn, limits=self.limits)

    def connections(self, origin: str) -> dict[str, int]:
        """Connection name -> stored version, for every record of the origin."""
        keys = keys_of(origin)

        def run() -> dict[str, int]:
            client = self._router.for_keys(keys)
            return {k.decode(errors="replace"): _decimal(v, f"version of {origin}/{k!r}",
                                                         RecordCorrupt)
                    for k, v in client.hscan_iter(keys.versions, count=500)}
        return dict(sorted(self._call(f"list origin {origin!r}", run).items()))

    def logged_connections(self, origin: str) -> set[str]:
        """The connections of the origin that have an output log (logged output): one scan,
        where output_bounds per connection is a round trip each."""
        keys = keys_of(origin)

        def run() -> set[str]:
            client = self._router.for_keys(keys)
            return {k.decode(errors="replace")
                    for k, _ in client.hscan_iter(keys.output_positions, count=1000)}
        return self._call(f"list the output logs of origin {origin!r}", run)

    def records(self, origin: str, count: int = 100) -> Iterator[ReadResult]:
        """Every stored record of the origin, each verified or refused with its reason."""
        keys = keys_of(origin)
        cursor: int = 0
        seen: set[bytes] = set()  # HSCAN may return a field twice while the hash rehashes
        while True:
            def step(cur: int = cursor) -> tuple[int, dict[bytes, bytes]]:
                reply: Any = self._router.for_keys(keys).hscan(keys.records, cur, count=count)
                return int(reply[0]), reply[1]
            cursor, page = self._call(f"read records of origin {origin!r}", step)
            for raw_conn, raw in sorted(page.items()):
                if raw_conn in seen:
                    continue
                seen.add(raw_conn)
                conn = raw_conn.decode("utf-8", errors="replace")
                try:
                    header = read_header(raw, self.limits)
                except RecordError:
                    header = None
                try:
                    cp = decode(raw, self.keys, origin=origin, conn=conn, limits=self.limits)
                    yield ReadResult(conn, len(raw), cp, None, header)
                except RecordError as exc:
                    yield ReadResult(conn, len(raw), None, exc, header)
            if cursor == 0:
                return

    def origins(self) -> list[str]:
        """Every origin that has fencing state in the store (scans all primaries)."""
        found: set[str] = set()
        for client in self._call("listing primaries", self._router.primaries):
            keys = self._call("scanning origins", partial(_scan_meta_keys, client))
            found.update(o for o in map(origin_of_meta_key, keys) if o is not None)
        return sorted(found)

    def client_for(self, origin: str) -> redis.Redis:
        """The raw Redis client serving `origin` (tests and tools only: bypasses all checks)."""
        return self._router.for_keys(keys_of(origin))
