"""Fail back: the origin crashes, the standby resurrects its upload and keeps checkpointing it
under the origin's name; the old origin comes back (rebooted, empty) as the standby; the new
origin crashes too, and the upload comes home. One TCP connection of an unmodified peer through
both failovers: no RST, no PAWS drop, its socket kept, every byte delivered once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ops import gatelab as G
from ops.agentlab import AgentProcess, write_keys
from ops.capture import Capture
from ops.failoverlab import StandbySide, events
from ops.lab import Lab
from ops.redislab import RedisServer
from ops.wait import wait_until
from store.client import CheckpointStore
from store.config import StoreConfig
from store.signing import load_keyring

RST = 0x04
PORT = 5521
TOTAL = 16_000_000


def test_an_upload_survives_a_crash_of_the_origin_and_then_of_the_standby_coming_home(
        fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    redis = RedisServer(lab, "store", 6431).start()
    keys = write_keys(tmp_path / "keys.json")
    origin = "fb"
    agent = AgentProcess(lab, "origin", store_url=redis.url, keys=keys, guard=[PORT],
                         workdir=tmp_path / "origin", origin=origin, ttl_ms=1000,
                         backend="bpf")
    (tmp_path / "origin").mkdir()
    standby = StandbySide(lab, "standby", origin=origin, store_url=redis.url, keys=keys,
                          port=PORT, workdir=tmp_path / "standby", think_ms=60)
    home: StandbySide | None = None
    cap = None
    store = lab.call("peer", CheckpointStore.connect, StoreConfig(url=redis.url),
                     load_keyring(keys))

    def committed() -> tuple[int, int]:
        """(epoch, bytes consumed) of the connection's record, (0, 0) before it exists."""
        cps = [r.checkpoint for r in lab.call("peer", lambda: list(store.records(origin)))
               if r.checkpoint is not None]
        return max(((cp.epoch, cp.inbound_consumed) for cp in cps), default=(0, 0))
    try:
        lab.move_address("origin")  # the resurrectors take the service address over
        agent.start()
        standby.start()
        sink_log = tmp_path / "origin" / "sink.log"
        with sink_log.open("wb") as out:
            lab.popen("origin", [sys.executable, "-m", "ops.apps.sink", "--listen",
                                 f"0.0.0.0:{PORT}", "--checkpointer", str(agent.socket_path),
                                 "--think-ms", "3"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: b"listening" in sink_log.read_bytes(), 30, what="the origin's sink")
        cap = Capture.in_lab(lab, "peer", "eth0", f"tcp port {PORT}",
                             path=tmp_path / "peer.pcap", snaplen=96).start()
        paws_before = G.nstat(lab.run, "peer", "TcpExtPAWSEstab")
        uploader = lab.popen("peer", G.uploader_argv(lab.service(4), PORT, TOTAL),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: committed()[1] > 2_000_000, 60, what="2 MB committed on the origin")
        lab.crash("origin")
        first_epoch, first_at = committed()
        # the standby resurrected it, its checkpointer guards it under the claimed epoch, and
        # its commits go on from where the origin's stopped
        wait_until(lambda: committed()[0] > first_epoch and committed()[1] > first_at, 60,
                   what="the standby committing the upload at a new epoch")
        assert not events(standby.sink_log, "finished"), "the upload ended before the fail back"
        lab.reboot("origin")
        home = StandbySide(lab, "origin", origin=origin, store_url=redis.url, keys=keys,
                           port=PORT, workdir=tmp_path / "home").start()
        second_epoch, _ = committed()
        wait_until(lambda: committed()[1] > first_at + 1_000_000, 60,
                   what="1 MB more committed on the standby")
        assert not events(standby.sink_log, "finished"), "the upload ended before the fail back"
        lab.crash("standby")
        out_text, err = uploader.communicate(timeout=180)
        wait_until(lambda: home is not None and home.finished(), 60,
                   what="the old origin finishing the upload")
    finally:
        if cap is not None:
            cap.stop()
        lab.call("peer", store.close)
        agent.close()
        standby.close()
        if home is not None:
            home.close()
    assert uploader.returncode == 0, err
    assert out_text.strip() == G.expected_sha256(TOTAL)  # the peer's digest of what it sent
    # each failover fenced the one before: the claims bumped the epoch once each (the record
    # itself is gone: the end of stream was committed and the connection closed)
    assert second_epoch == first_epoch + 1
    assert [standby.timeline()[0]["epoch"], home.timeline()[0]["epoch"]] == [
        first_epoch + 1, first_epoch + 2]
    for side in (standby, home):
        timeline = side.timeline()
        assert len(timeline) == 1 and timeline[0]["resurrected"] == 1, timeline
        adopted = events(side.sink_log, "adopted")
        assert len(adopted) == 1, adopted
    (done,) = home.finished()
    assert done["total"] == TOTAL and done["guarded"] is True
    # the old origin resumed where the standby's last commit was, past the first crash point
    assert first_at < done["consumed"] < TOTAL
    assert [s for s in cap.segments() if s.flags & RST] == []
    assert G.nstat(lab.run, "peer", "TcpExtPAWSEstab") == paws_before
