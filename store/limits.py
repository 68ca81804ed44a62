"""Size and count limits of the checkpoint store: what one record and one origin may hold.

The same limits are checked when a record is encoded, when it is decoded, and by the Redis
Function library on every put, so nothing grows without bound. The ICI is the one owner of a
connection's queue bytes; the record's own send_queue field (max_send_queue) is kept for the
format's sake and is empty in checkpoints taken with kernel.repair.dump.

A connection's output log (logged output, DESIGN.md section 5) holds the outbound bytes the
peer has not acknowledged yet: at most max_output_held bytes (a restorable send queue, QUEUE,
plus what the application produced since its last commit), in appends of at most
max_output_append bytes, in at most max_output_entries appends (each costs about 100 bytes
of Redis memory besides its data). An origin holds at most max_records_per_origin logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.errors import StoreConfigError

KIB = 1024
MIB = 1024 * KIB
QUEUE = 8 * MIB
"""kernel.sanity.RestorePolicy's default max_send_queue and max_recv_queue: the ICI carries
both queues, so max_ici is what kernel.codec.max_encoded_size(QUEUE, QUEUE) gives (a unit test
ties the two together; store/ does not import kernel/)."""
ICI_FIXED = 256
"""At least the ICI codec's fixed part (135 bytes for an IPv6 identity, version 2)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds, in bytes unless said otherwise."""

    max_ici: int = 2 * QUEUE + ICI_FIXED
    max_app_state: int = 4 * MIB
    max_send_queue: int = 8 * MIB
    max_name: int = 255  # origin and connection names, UTF-8 bytes
    max_record: int = 2 * QUEUE + ICI_FIXED + 4 * MIB + 8 * MIB + 64 * KIB  # the whole record
    max_records_per_origin: int = 1_000_000
    max_output_append: int = 1 * MIB  # data bytes of one output log append
    max_output_held: int = 2 * QUEUE  # data bytes one connection's output log holds
    max_output_entries: int = 65_536  # appends one connection's output log holds

    def __post_init__(self) -> None:
        for field in ("max_ici", "max_app_state", "max_send_queue", "max_name", "max_record",
                      "max_records_per_origin", "max_output_append", "max_output_held",
                      "max_output_entries"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise StoreConfigError(f"limit {field} must be a positive integer, got {value!r}")
        if self.max_name > 255:
            raise StoreConfigError(f"limit max_name must be at most 255, got {self.max_name}")
        if self.max_output_append > min(self.max_output_held, 2**31):
            raise StoreConfigError(
                f"limit max_output_append must be at most max_output_held "
                f"({self.max_output_held}) and 2**31, got {self.max_output_append}")


DEFAULT_LIMITS = Limits()
