"""TCP sequence-number arithmetic modulo 2**32, with the kernel's `before`/`after`/`between`.

The kernel compares sequence numbers by the sign of their 32-bit difference
(`(s32)(a - b) < 0`), so every comparison is only meaningful within half the space.
"""

from __future__ import annotations

SEQ_MOD = 1 << 32
_MASK = SEQ_MOD - 1
_HALF = 1 << 31


def seq_add(seq: int, n: int) -> int:
    """`seq + n` wrapped into 32 bits (n may be negative)."""
    return (seq + n) & _MASK


def seq_diff(a: int, b: int) -> int:
    """Signed distance from b to a, as the kernel's `(s32)(a - b)`."""
    d = (a - b) & _MASK
    return d - SEQ_MOD if d >= _HALF else d


def before(a: int, b: int) -> bool:
    """True when a comes strictly before b (kernel `before(a, b)`)."""
    return seq_diff(a, b) < 0


def after(a: int, b: int) -> bool:
    """True when a comes strictly after b (kernel `after(a, b)`)."""
    return before(b, a)


def between(seq: int, low: int, high: int) -> bool:
    """True when low <= seq <= high walking forward from low (kernel `between(seq, low, high)`)."""
    return ((high - low) & _MASK) >= ((seq - low) & _MASK)
