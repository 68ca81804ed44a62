"""`tcpcp inspect`: show the checkpoints in the store, verified, for people or as JSON.

Every record is checked exactly as the resurrector would check it (structure, size limits,
signature, origin/connection identity); refused records are listed with the reason.
Exit status: 0 when every record shown is valid, 1 when any is refused, 2 on a store error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from store.client import CheckpointStore, OriginState, ReadResult
from store.cliopts import add_store_arguments, config_from_args
from store.errors import StoreConfigError, StoreError
from store.signing import load_keyring


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "inspect", help="show stored checkpoints, verified (refused ones with the reason)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("origins", nargs="*", metavar="ORIGIN",
                   help="origin hosts to show (default: every origin in the store)")
    p.add_argument("--conn", action="append", default=[], metavar="NAME",
                   help="show only this connection (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_arguments(p)
    p.set_defaults(func=run)


def _record_doc(r: ReadResult, now_ns: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"conn": r.conn, "size": r.size,
                           "status": "ok" if r.error is None else "refused"}
    if r.header is not None:
        doc.update(key_id=r.header.key_id or None, epoch=r.header.epoch,
                   version=r.header.version, time_ns=r.header.time_ns,
                   age_s=round((now_ns - r.header.time_ns) / 1e9, 3))
    if r.checkpoint is not None:
        cp = r.checkpoint
        doc.update(inbound_consumed=cp.inbound_consumed, outbound_produced=cp.outbound_produced,
                   ici_bytes=len(cp.ici), app_state_bytes=len(cp.app_state),
                   send_queue_bytes=len(cp.send_queue))
    if r.error is not None:
        doc.update(error=type(r.error).__name__, reason=str(r.error))
    return doc


def _origin_doc(state: OriginState, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"origin": state.origin, "epoch": state.epoch, "owner": state.owner,
            "lease_holder": state.lease_holder, "lease_ms_left": state.lease_ms_left,
            "records": records}


def collect(store: CheckpointStore, origins: list[str], conns: list[str]) -> list[dict[str, Any]]:
    now_ns = time.time_ns()
    out = []
    for origin in origins or store.origins():
        records = [_record_doc(r, now_ns) for r in store.records(origin)
                   if not conns or r.conn in conns]
        out.append(_origin_doc(store.state(origin), records))
    return out


def render_table(origins: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for o in origins:
        lease = (f"lease {o['lease_holder']} {o['lease_ms_left']} ms left"
                 if o["lease_holder"] else "no lease")
        lines.append(f"origin {o['origin']}  epoch {o['epoch']}  owner {o['owner'] or '-'}  "
                     f"{lease}  {len(o['records'])} record(s)")
        rows = [("CONN", "VERSION", "EPOCH", "AGE_S", "SIZE", "KEY", "STATUS")]
        for r in o["records"]:
            status = "ok" if r["status"] == "ok" else f"REFUSED {r['error']}: {r['reason']}"
            rows.append((r["conn"], str(r.get("version", "?")), str(r.get("epoch", "?")),
                         str(r.get("age_s", "?")), str(r["size"]), str(r.get("key_id") or "-"),
                         status))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                         + "  " + row[6])
    return "\n".join(lines) if lines else "no origins in the store"


def run(args: argparse.Namespace) -> int:
    try:
        if args.keys is None:
            raise StoreConfigError("inspect needs the signing-key file: --keys or "
                                   "TCPCP_STORE_KEYS")
        keys = load_keyring(args.keys)
        with CheckpointStore.connect(config_from_args(args), keys) as store:
            origins = collect(store, list(args.origins), list(args.conn))
    except StoreError as exc:
        print(f"tcpcp inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"origins": origins}, indent=2) if args.json else render_table(origins))
    refused = any(r["status"] != "ok" for o in origins for r in o["records"])
    return 1 if refused else 0
