"""The store over TLS (rediss://, CA verification, client certificates) to a real redis-server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from store.client import CheckpointStore
from store.config import StoreConfig, Tls
from store.errors import StoreUnavailable
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import LocalRedis, free_port, keyring, running  # noqa: F401


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=tcpcp test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=d)


def test_store_works_over_tls_with_a_client_certificate_and_refuses_an_unknown_ca(
        tmp_path: Path, keyring: KeyRing) -> None:  # noqa: F811
    make_pki(tmp_path)
    port = free_port()
    tls = Tls(ca_file=str(tmp_path / "ca.crt"), cert_file=str(tmp_path / "client.crt"),
              key_file=str(tmp_path / "client.key"))
    server = LocalRedis(
        {"port": "0", "tls-port": str(port), "tls-cert-file": str(tmp_path / "server.crt"),
         "tls-key-file": str(tmp_path / "server.key"),
         "tls-ca-cert-file": str(tmp_path / "ca.crt"), "tls-auth-clients": "yes"},
        port=port, client_kwargs={"ssl": True, "ssl_ca_certs": tls.ca_file,
                                  "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file})
    with running(server):
        config = StoreConfig.standalone(f"rediss://127.0.0.1:{port}", tls=tls)
        with CheckpointStore.connect(config, keyring) as store:
            epoch = store.lease_acquire("origin-a", "origin-a", ttl_ms=5000)
            written = Checkpoint(origin="origin-a", conn="c1", epoch=epoch, version=1,
                                 time_ns=time.time_ns(), inbound_consumed=1,
                                 outbound_produced=2, ici=b"ici", app_state=b"s",
                                 send_queue=b"q")
            store.put(written)
            assert store.get("origin-a", "c1") == written
        (tmp_path / "other").mkdir()
        make_pki(tmp_path / "other")
        wrong_ca = Tls(ca_file=str(tmp_path / "other" / "ca.crt"),
                       cert_file=str(tmp_path / "client.crt"),
                       key_file=str(tmp_path / "client.key"))
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            CheckpointStore.connect(StoreConfig.standalone(f"rediss://127.0.0.1:{port}",
                                                           tls=wrong_ca), keyring)
