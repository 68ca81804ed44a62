"""tcpcp's checkpoint store on Redis: signed, versioned, epoch-fenced records, durable on demand.

    from store import CheckpointStore, StoreConfig, Durability, Checkpoint, load_keyring

Modules: record (format and signature), outlog (output log entries: logged output), signing
(key ring), keys (key names), limits, config (connection and durability), client
(CheckpointStore), acl (least-privilege user), functions.lua (the Redis Function library every
write goes through), inspectcli (`tcpcp inspect`), errors (StoreError and its subclasses).
"""

from store.client import (
    AppendOutcome,
    CheckpointStore,
    OriginState,
    OutputBounds,
    PutOutcome,
    ReadResult,
)
from store.config import Durability, DurabilityMode, StoreConfig, Tls, Topology
from store.errors import StoreError
from store.limits import Limits
from store.outlog import OutputRange
from store.record import Checkpoint
from store.signing import KeyRing, load_keyring

__all__ = [
    "AppendOutcome", "Checkpoint", "CheckpointStore", "Durability", "DurabilityMode", "KeyRing",
    "Limits", "OriginState", "OutputBounds", "OutputRange", "PutOutcome", "ReadResult",
    "StoreConfig", "StoreError", "Tls", "Topology", "load_keyring",
]
