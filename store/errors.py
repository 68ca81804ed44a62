"""The store package's exception hierarchy: every error raised by store/ derives from StoreError.

Two families matter to callers. RecordError and its subclasses come from the read path
(a record that must not be restored); the others come from writes and the connection
(a checkpoint that was not stored, so the caller keeps the ACK gate closed).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by tcpcp's checkpoint store."""


# --- configuration -------------------------------------------------------------------------


class StoreConfigError(StoreError):
    """The store was configured with something it cannot use (URL, key file, durability)."""


class SigningKeyError(StoreConfigError):
    """The signing-key file is missing, unreadable or malformed."""


class DurabilityUnsupported(StoreConfigError):
    """The server cannot provide the durability the store was configured with."""


class LibraryVersionError(StoreConfigError):
    """The Redis Function library on the server is newer than this client's."""


class InvalidCheckpoint(StoreError):
    """A checkpoint handed to the store has a field out of range (negative, too wide, bad name)."""


# --- connection ----------------------------------------------------------------------------


class StoreUnavailable(StoreError):
    """Redis could not be reached, or the connection broke during an operation."""


class StateCorrupt(StoreError):
    """An origin's fencing state in Redis (its epoch) is malformed: written by something else."""


# --- writes ----------------------------------------------------------------------------------


class WriteRefused(StoreError):
    """The function library refused a write; nothing was changed."""


class StaleEpoch(WriteRefused):
    """The write carried an epoch other than the origin's current one: the writer is fenced."""

    def __init__(self, message: str, *, given: int, current: int) -> None:
        super().__init__(message)
        self.given = given
        self.current = current


class VersionNotNewer(WriteRefused):
    """The record's version is not above the stored one: an older record never replaces a newer."""

    def __init__(self, message: str, *, given: int, stored: int) -> None:
        super().__init__(message)
        self.given = given
        self.stored = stored


class TooManyRecords(WriteRefused):
    """The origin already holds the maximum number of connection records."""


class LeaseHeld(WriteRefused):
    """The lease (or the claim) is refused because another holder's lease is live."""


class LeaseLost(WriteRefused):
    """A renewal or release failed: the lease expired or belongs to someone else."""


class NotOwner(WriteRefused):
    """The origin is owned by another holder (it was claimed): the caller is fenced."""


class ClaimLost(WriteRefused):
    """Another claimer bumped the epoch first: exactly one claimer wins."""


class EpochExhausted(WriteRefused):
    """The origin's epoch is at its maximum (2**63-1, the limit of Redis counters): no new claim."""


class OutputOffsetRefused(WriteRefused):
    """An output log write at the wrong offset: an append must start where the log ends (a gap
    or an overlap is refused; only an exact duplicate of a stored append is accepted again),
    and a trim must not go past the log's end."""

    def __init__(self, message: str, *, given: int, end: int) -> None:
        super().__init__(message)
        self.given = given
        self.end = end


class OutputTooLarge(WriteRefused):
    """An output log append above one of the limits (`limit` names it: max_output_append,
    max_output_held or max_output_entries); nothing was appended."""

    def __init__(self, message: str, *, limit: str, size: int, maximum: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.size = size
        self.maximum = maximum


class DurabilityError(StoreError):
    """The write reached the primary but not the requested durability within the timeout.

    The record may or may not survive a failover; the caller must treat it as not committed.
    """


# --- reads -----------------------------------------------------------------------------------


class RecordError(StoreError):
    """A stored record is refused: it must not be restored."""


class RecordTooLarge(RecordError):
    """A record (or one of its fields) exceeds the configured size limit."""


class RecordTruncated(RecordError):
    """A record ends before its declared fields do."""


class RecordCorrupt(RecordError):
    """A record does not follow the format (magic, format version, lengths, trailing bytes)."""


class RecordUnsigned(RecordError):
    """A record carries no signature."""


class RecordUnknownKey(RecordError):
    """A record is signed with a key id this store does not accept."""


class RecordBadSignature(RecordError):
    """A record's HMAC does not match its contents: forged or corrupted."""


class RecordForeign(RecordError):
    """A record signed for another origin or connection than the one it was stored under."""


class OutputNotHeld(RecordError):
    """The output log does not hold the range asked for (no log, trimmed below the offset, or
    the offset lies past its end): those outbound bytes cannot be restored from the store."""

    def __init__(self, message: str, *, start: int | None, end: int | None) -> None:
        super().__init__(message)
        self.start = start
        self.end = end
