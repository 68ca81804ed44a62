"""The least-privilege Redis ACL for tcpcp's store user: only the commands and keys it needs.

    ACL SETUSER tcpcp on >secret <rules...>

where the rules are `acl_rules(topology, durability)`. The user may load the Function library
itself (FUNCTION LOAD); drop `+function|load` if an administrator loads it (see client.py).

Redis checks the commands a Function calls against the CALLER's ACL, so the user needs the
hash/string commands the library uses on `tcpcp:*` keys. The epoch fence therefore stops stale
but honest writers (every tcpcp write goes through the library); it is no defence against a
holder of these credentials who bypasses tcpcp. The record signature is that defence: a record
written without the signing key is refused at restore.
"""

from __future__ import annotations

from store.config import Durability, DurabilityMode, Topology
from store.keys import PREFIX

_BASE = (
    "+fcall", "+fcall_ro", "+function|load",    # the tcpcp library: every write, state
    # what the library itself calls: Redis checks a function's calls against the caller's ACL
    "+hget", "+hset", "+hlen", "+hdel", "+hincrby", "+get", "+set", "+del", "+pexpire", "+pttl",
    "+xadd", "+xrange", "+xrevrange", "+xtrim", "+xlen",   # output logs
    "+hscan", "+scan",                           # reads: records, connections, origins
    "+ping", "+hello",                           # health check; server version in errors
)
_CLUSTER = ("+cluster|slots", "+cluster|shards", "+command", "+readonly")


def acl_rules(topology: Topology = Topology.STANDALONE,
              durability: Durability | None = None) -> list[str]:
    """The ACL SETUSER rules (after `on >password`) for a store user."""
    durability = durability or Durability()
    rules = ["resetkeys", f"~{PREFIX}:*", "resetchannels", "-@all", *_BASE]
    if durability.mode is DurabilityMode.WAIT:
        rules.append("+wait")
    if durability.mode is DurabilityMode.WAITAOF:
        rules.append("+waitaof")
    if topology is Topology.CLUSTER:
        rules.extend(_CLUSTER)
    return rules
