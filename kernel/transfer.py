"""The planned-passing wire format: signed, bounded frames. Pure: bytes in, values out.

One pass is one TCP conversation between the origin's and the destination's passing halves:

    origin                                   destination
    BATCH   (ICIs + application states)  ─►  verify, restore in repair mode
            ◄─  REPORT  (restored / refused, by index)
    ACTIVATE or ABORT                    ─►  repair off (or discard silently)
            ◄─  DONE    (activated / failed, by index)

Every frame is

    header    magic "TCPX" | version u8 | kind u8 | reserved u16 (0) | length u32 (rest of frame)
    envelope  key id (u8 len + ASCII) | origin (u8 len + UTF-8) | destination (u8 len + UTF-8) |
              epoch u64 | nonce 16 bytes | sent_at_ms u64
    body      kind-specific (below)
    mac       HMAC-SHA256 over header + envelope + body, with the key ring's key `key id`

so the signature binds the key id, the origin, the destination, the epoch and the nonce. The
nonce is the batch's; the three later frames repeat it, which ties each answer to its batch. The
receiver checks, in this order and before anything is touched: the header's length against its
limits (before reading the rest), the MAC, the kind it expects next, then the envelope (its own
name as destination, an origin it accepts, an epoch not below the last one seen, a fresh
timestamp, a nonce never seen). Only then are the ICIs decoded and checked against the policy.

Bodies:
    BATCH     count u32 | (ICI len u32, ICI, state len u32, state)*
    REPORT    n_restored u32 | index u32 * | n_refused u32 | (index u32, reason u16 len + UTF-8)*
    ACTIVATE  (empty)
    ABORT     reason u16 len + UTF-8
    DONE      like REPORT: activated indices, then (index, reason) of those that failed

Anything else raises TransferError naming what was expected and what came.
"""

from __future__ import annotations

import enum
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kernel import codec
from kernel.errors import KernelError
from kernel.ici import Ici
from kernel.sanity import RestorePolicy

MAGIC = b"TCPX"
VERSION = 1
NONCE_BYTES = 16
MAC_BYTES = 32
MAX_NAME = 255
MAX_REASON = 1000
HEADER = struct.Struct("!4sBBHI")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ENVELOPE_NUMS = struct.Struct(f"!Q{NONCE_BYTES}sQ")
ICI_OVERHEAD = 512
"""Bytes an encoded ICI needs besides its queues (fixed fields; IPv6 addresses; trailer)."""


class TransferError(KernelError):
    """A frame that does not fit: malformed, oversized, forged, stale or out of turn."""


class Kind(enum.IntEnum):
    BATCH = 1
    REPORT = 2
    ACTIVATE = 3
    ABORT = 4
    DONE = 5


class Signer(Protocol):
    """What frames are signed and checked with: store.signing.KeyRing fits."""

    @property
    def sign_with(self) -> str: ...

    def mac(self, key_id: str, data: bytes) -> bytes: ...

    def accepts(self, key_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a receiver reads. Derived from the restore policy (for_policy), so a sender
    cannot make it buffer more than the connections it would restore could hold."""

    max_items: int = 10_000
    max_ici: int = 2 * (16 << 20) + ICI_OVERHEAD
    max_app_state: int = 1 << 20
    max_frame: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_items", "max_ici", "max_app_state", "max_frame"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise TransferError(f"limit {name}: expected a positive integer, got {value!r}")

    @classmethod
    def for_policy(cls, policy: RestorePolicy, *, max_items: int = 10_000,
                   max_app_state: int = 1 << 20, max_frame: int = 64 << 20) -> Limits:
        """One ICI can hold at most the policy's two queues; one frame at most max_frame."""
        max_ici = policy.max_send_queue + policy.max_recv_queue + ICI_OVERHEAD
        largest_item = max_ici + max_app_state + 8
        return cls(max_items, max_ici, max_app_state,
                   max(min(max_frame, 1024 + max_items * largest_item), 1024 + largest_item))


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who speaks to whom, under which epoch, about which batch (nonce), and when."""

    key_id: str
    origin: str
    destination: str
    epoch: int
    nonce: bytes
    sent_at_ms: int

    def __post_init__(self) -> None:
        for name in ("origin", "destination"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_NAME:
                raise TransferError(f"{name}: expected 1..{MAX_NAME} bytes of UTF-8, "
                                    f"got {value!r}")
        if not isinstance(self.key_id, str) or not self.key_id.isascii() \
                or not 0 < len(self.key_id) <= MAX_NAME:
            raise TransferError(f"key id: expected 1..{MAX_NAME} ASCII characters, "
                                f"got {self.key_id!r}")
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_BYTES:
            raise TransferError(f"nonce: expected {NONCE_BYTES} bytes, got {self.nonce!r}")
        for name in ("epoch", "sent_at_ms"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1 << 64:
                raise TransferError(f"{name}: expected an unsigned 64-bit integer, "
                                    f"got {value!r}")

    def reply(self, sent_at_ms: int) -> Envelope:
        """The envelope of an answer to this frame: same parties, epoch and nonce."""
        return Envelope(self.key_id, self.origin, self.destination, self.epoch, self.nonce,
                        sent_at_ms)


@dataclass(frozen=True, slots=True)
class Item:
    """One connection in a batch: its encoded ICI and the application's state for it."""

    ici: bytes
    app_state: bytes = b""


@dataclass(frozen=True, slots=True)
class Outcome:
    """A REPORT or DONE body: indices that succeeded, and (index, reason) of those that did not."""

    ok: tuple[int, ...]
    failed: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    envelope: Envelope
    items: tuple[Item, ...] = ()
    outcome: Outcome | None = None
    reason: str = ""


# ------------------------------------------------------------------ encoding

def _name(value: str) -> bytes:
    raw = value.encode()
    return _U8.pack(len(raw)) + raw


def _reason(text: str) -> bytes:
    raw = text.encode()[:MAX_REASON]
    return _U16.pack(len(raw)) + raw


def _envelope(env: Envelope) -> bytes:
    return (_name(env.key_id) + _name(env.origin) + _name(env.destination)
            + _ENVELOPE_NUMS.pack(env.epoch, env.nonce, env.sent_at_ms))


def _outcome(out: Outcome) -> bytes:
    parts = [_U32.pack(len(out.ok)), *(_U32.pack(i) for i in out.ok), _U32.pack(len(out.failed))]
    for i, why in out.failed:
        parts += [_U32.pack(i), _reason(why)]
    return b"".join(parts)


def encode(frame: Frame, signer: Signer) -> bytes:
    """The signed bytes of a frame (signed with the key its envelope names)."""
    env = frame.envelope
    if frame.kind is Kind.BATCH:
        parts = [_U32.pack(len(frame.items))]
        for item in frame.items:
            parts += [_U32.pack(len(item.ici)), item.ici, _U32.pack(len(item.app_state)),
                      item.app_state]
        body = b"".join(parts)
    elif frame.kind in (Kind.REPORT, Kind.DONE):
        if frame.outcome is None:
            raise TransferError(f"{frame.kind.name} frame: expected an outcome")
        body = _outcome(frame.outcome)
    elif frame.kind is Kind.ABORT:
        body = _reason(frame.reason)
    else:
        body = b""
    rest = _envelope(env) + body
    head = HEADER.pack(MAGIC, VERSION, frame.kind, 0, len(rest) + MAC_BYTES)
    return head + rest + signer.mac(env.key_id, head + rest)


def batch(items: Sequence[tuple[Ici, bytes]], envelope: Envelope, signer: Signer) -> bytes:
    """A signed BATCH of (ICI, application state) pairs."""
    return encode(Frame(Kind.BATCH, envelope,
                        tuple(Item(codec.encode(ici), state) for ici, state in items)), signer)


# ------------------------------------------------------------------ decoding

def read_header(head: bytes, limits: Limits, expect: Kind | Sequence[Kind]) -> tuple[Kind, int]:
    """(kind, length of the rest) from the fixed header; refuses before the rest is read."""
    kinds = (expect,) if isinstance(expect, Kind) else tuple(expect)
    wanted = "/".join(k.name for k in kinds)
    if len(head) != HEADER.size:
        raise TransferError(f"frame header: expected {HEADER.size} bytes, got {len(head)}")
    magic, version, kind, reserved, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise TransferError(f"frame header: expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise TransferError(f"frame header: expected version {VERSION}, got {version}")
    if kind not in kinds:
        name = Kind(kind).name if kind in Kind._value2member_map_ else str(kind)
        raise TransferError(f"frame: expected {wanted}, got kind {name}")
    if reserved:
        raise TransferError(f"frame header: reserved field must be 0, got {reserved}")
    cap = limits.max_frame if kind == Kind.BATCH else 16 + 8 * limits.max_items * (
        1 + MAX_REASON) + 4 * MAX_NAME
    if length > cap:
        raise TransferError(f"{Kind(kind).name} frame: at most {cap} bytes, announced {length}")
    if length < MAC_BYTES + 3 + _ENVELOPE_NUMS.size:
        raise TransferError(f"{Kind(kind).name} frame: announced {length} bytes, too short "
                            "for an envelope and a signature")
    return Kind(kind), length


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise TransferError(f"{self.what}: {field} truncated (needs {n} bytes, "
                                f"{len(self.data) - self.pos} left)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def name(self, field: str) -> str:
        (n,) = _U8.unpack(self.take(1, field))
        raw = self.take(n, field)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise TransferError(f"{self.what}: {field} is not UTF-8: {raw[:40]!r}") from None

    def reason(self, field: str) -> str:
        (n,) = _U16.unpack(self.take(2, field))
        if n > MAX_REASON:
            raise TransferError(f"{self.what}: {field} of {n} bytes, at most {MAX_REASON}")
        return self.take(n, field).decode(errors="replace")

    def done(self) -> None:
        if self.pos != len(self.data):
            raise TransferError(f"{self.what}: {len(self.data) - self.pos} bytes after the end")


def _read_outcome(r: _Reader, limits: Limits) -> Outcome:
    n = r.u32("count of successes")
    if n > limits.max_items:
        raise TransferError(f"{r.what}: at most {limits.max_items} indices, got {n}")
    ok = tuple(r.u32("index") for _ in range(n))
    m = r.u32("count of failures")
    if m > limits.max_items:
        raise TransferError(f"{r.what}: at most {limits.max_items} failures, got {m}")
    failed = tuple((r.u32("index"), r.reason("reason")) for _ in range(m))
    return Outcome(ok, failed)


def open_frame(kind: Kind, head: bytes, rest: bytes, signer: Signer, limits: Limits) -> Frame:
    """Check the signature of a frame (header from read_header, rest as announced), then parse
    it. Nothing but the signature is looked at before the signature holds."""
    what = f"{kind.name} frame"
    if len(rest) < MAC_BYTES:
        raise TransferError(f"{what}: expected a {MAC_BYTES}-byte signature, got {len(rest)} "
                            "bytes")
    signed, mac = head + rest[:-MAC_BYTES], rest[-MAC_BYTES:]
    r = _Reader(rest[:-MAC_BYTES], what)
    key_id = r.name("key id")
    if not signer.accepts(key_id):
        raise TransferError(f"{what}: signed with key {key_id!r}, which this host's key ring "
                            "does not hold")
    if not hmac.compare_digest(signer.mac(key_id, signed), mac):
        raise TransferError(f"{what}: bad signature (forged, corrupted, or another key ring)")
    env = Envelope(key_id, r.name("origin"), r.name("destination"),
                   *_ENVELOPE_NUMS.unpack(r.take(_ENVELOPE_NUMS.size, "envelope")))
    if kind is Kind.BATCH:
        count = r.u32("item count")
        if count > limits.max_items:
            raise TransferError(f"{what}: at most {limits.max_items} connections, got {count}")
        items = []
        for i in range(count):
            n = r.u32(f"item {i} ICI length")
            if n > limits.max_ici:
                raise TransferError(f"{what}: item {i} ICI of {n} bytes, at most "
                                    f"{limits.max_ici} under this host's restore policy")
            ici = r.take(n, f"item {i} ICI")
            n = r.u32(f"item {i} state length")
            if n > limits.max_app_state:
                raise TransferError(f"{what}: item {i} application state of {n} bytes, at "
                                    f"most {limits.max_app_state}")
            items.append(Item(ici, r.take(n, f"item {i} application state")))
        r.done()
        return Frame(kind, env, tuple(items))
    if kind in (Kind.REPORT, Kind.DONE):
        out = _read_outcome(r, limits)
        r.done()
        return Frame(kind, env, outcome=out)
    reason = r.reason("reason") if kind is Kind.ABORT else ""
    r.done()
    return Frame(kind, env, reason=reason)


# ------------------------------------------------------------------ checks of a conversation

@dataclass(frozen=True, slots=True)
class Acceptance:
    """What a destination accepts: its own name, the origins it takes connections from, how far
    a sender's clock may be off, and how long nonces are remembered."""

    me: str
    origins: frozenset[str]
    max_skew_ms: int = 30_000


class ReplayGuard:
    """Nonces seen within the freshness window, and the highest epoch seen per origin.

    A batch is accepted once: its nonce is remembered for twice the allowed skew, after which
    its timestamp alone refuses it. Pure: time comes in with the calls."""

    def __init__(self, acceptance: Acceptance, max_nonces: int = 100_000) -> None:
        self.acceptance = acceptance
        self.max_nonces = max_nonces
        self._nonces: dict[bytes, int] = {}
        self._epochs: dict[str, int] = {}

    def check_batch(self, env: Envelope, now_ms: int) -> None:
        """Raise TransferError unless a batch with this envelope may be restored now."""
        acc = self.acceptance
        if env.destination != acc.me:
            raise TransferError(f"batch for destination {env.destination!r}, this host is "
                                f"{acc.me!r}")
        if env.origin not in acc.origins:
            raise TransferError(f"batch from origin {env.origin!r}, accepted origins are "
                                f"{sorted(acc.origins)}")
        if abs(now_ms - env.sent_at_ms) > acc.max_skew_ms:
            raise TransferError(f"batch sent at {env.sent_at_ms} ms, now is {now_ms} ms: "
                                f"expected within {acc.max_skew_ms} ms (stale or replayed)")
        last = self._epochs.get(env.origin, 0)
        if env.epoch < last:
            raise TransferError(f"batch of origin {env.origin!r} under epoch {env.epoch}, "
                                f"expected at least {last} (stale)")
        self._expire(now_ms)
        if env.nonce in self._nonces:
            raise TransferError(f"batch nonce {env.nonce.hex()} seen before: a replay")
        if len(self._nonces) >= self.max_nonces:
            raise TransferError(f"more than {self.max_nonces} batches within the freshness "
                                "window: refusing until older ones expire")
        self._nonces[env.nonce] = now_ms
        self._epochs[env.origin] = max(last, env.epoch)

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - 2 * self.acceptance.max_skew_ms
        for nonce in [n for n, t in self._nonces.items() if t < horizon]:
            del self._nonces[nonce]


def check_answer(frame: Frame, batch_envelope: Envelope) -> None:
    """Raise TransferError unless an answer belongs to this batch (parties, epoch, nonce)."""
    env = frame.envelope
    mine = (batch_envelope.origin, batch_envelope.destination, batch_envelope.epoch,
            batch_envelope.nonce)
    if (env.origin, env.destination, env.epoch, env.nonce) != mine:
        raise TransferError(f"{frame.kind.name} frame belongs to another pass: origin "
                            f"{env.origin!r}, destination {env.destination!r}, epoch {env.epoch},"
                            f" nonce {env.nonce.hex()}")


def check_coverage(outcome: Outcome, count: int, what: str) -> None:
    """Raise TransferError unless the outcome names every index 0..count-1 exactly once."""
    seen = [*outcome.ok, *(i for i, _ in outcome.failed)]
    if sorted(seen) != list(range(count)):
        dup = sorted({i for i in seen if seen.count(i) > 1})
        missing = sorted(set(range(count)) - set(seen))
        extra = sorted(i for i in set(seen) if not 0 <= i < count)
        raise TransferError(f"{what}: expected each of {count} indices exactly once; "
                            f"missing {missing[:10]}, repeated {dup[:10]}, out of range "
                            f"{extra[:10]}")
