"""Size and count limits of the checkpoint store: what one record and one origin may hold.

The same limits are checked when a record is encoded, when it is decoded, and by the Redis
Function library on every put, so nothing grows without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.errors import StoreConfigError

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds, in bytes unless said otherwise."""

    max_ici: int = 16 * KIB
    max_app_state: int = 4 * MIB
    max_send_queue: int = 8 * MIB
    max_name: int = 255  # origin and connection names, UTF-8 bytes
    max_record: int = 13 * MIB  # the whole encoded record
    max_records_per_origin: int = 1_000_000

    def __post_init__(self) -> None:
        for field in ("max_ici", "max_app_state", "max_send_queue", "max_name", "max_record",
                      "max_records_per_origin"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise StoreConfigError(f"limit {field} must be a positive integer, got {value!r}")
        if self.max_name > 255:
            raise StoreConfigError(f"limit max_name must be at most 255, got {self.max_name}")


DEFAULT_LIMITS = Limits()
