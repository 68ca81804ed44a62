"""Command-line options that say how to reach the store; shared by `tcpcp inspect` and benches.

Secrets never go on the command line: the password comes from a file or TCPCP_STORE_PASSWORD,
the signing keys from the key file (--keys or TCPCP_STORE_KEYS).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from store.config import Durability, StoreConfig, Tls, Topology
from store.errors import StoreConfigError


def add_store_arguments(parser: argparse.ArgumentParser, *, durability: bool = False) -> None:
    g = parser.add_argument_group("store connection")
    g.add_argument("--url", default=os.environ.get("TCPCP_STORE_URL"),
                   help="redis:// or rediss:// URL (env TCPCP_STORE_URL); with --cluster, any "
                   "cluster node")
    g.add_argument("--cluster", action="store_true", help="the URL names a Redis Cluster node")
    g.add_argument("--sentinel", action="append", default=[], metavar="HOST:PORT",
                   help="a Sentinel address (repeat for each); needs --service; Sentinel "
                   "credentials from env TCPCP_SENTINEL_USER / TCPCP_SENTINEL_PASSWORD")
    g.add_argument("--service", help="the Sentinel service (master) name")
    g.add_argument("--username", default=os.environ.get("TCPCP_STORE_USER"),
                   help="Redis ACL user (env TCPCP_STORE_USER)")
    g.add_argument("--password-file", type=Path,
                   help="file holding the Redis password (else env TCPCP_STORE_PASSWORD)")
    g.add_argument("--tls-ca", help="CA bundle (PEM): enables TLS")
    g.add_argument("--tls-cert", help="client certificate (PEM)")
    g.add_argument("--tls-key", help="client key (PEM)")
    g.add_argument("--keys", type=Path, default=os.environ.get("TCPCP_STORE_KEYS"),
                   help="signing-key file, JSON (env TCPCP_STORE_KEYS)")
    if durability:
        g.add_argument("--durability", type=Durability.parse, default=Durability(),
                       help="none | wait:N[:MS] | waitaof:L:N[:MS] (default none)")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise StoreConfigError(f"Sentinel address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    password = os.environ.get("TCPCP_STORE_PASSWORD")
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as exc:
            raise StoreConfigError(
                f"cannot read password file {args.password_file}: {exc.strerror}") from None
    tls = None
    if args.tls_ca or args.tls_cert or (args.url or "").startswith("rediss://"):
        tls = Tls(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    common: dict[str, object] = {
        "username": args.username, "password": password, "tls": tls,
        "durability": getattr(args, "durability", Durability()),
    }
    if args.sentinel:
        return StoreConfig(topology=Topology.SENTINEL, service=args.service,
                           sentinels=tuple(_host_port(s) for s in args.sentinel),
                           sentinel_username=os.environ.get("TCPCP_SENTINEL_USER"),
                           sentinel_password=os.environ.get("TCPCP_SENTINEL_PASSWORD"),
                           **common)  # type: ignore[arg-type]
    topology = Topology.CLUSTER if args.cluster else Topology.STANDALONE
    return StoreConfig(topology=topology, url=args.url, **common)  # type: ignore[arg-type]
