"""The lab itself: reachability, service switching, crash, partition, coexistence, cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from kernel.repair import tcp_info
from ops import netns
from ops.capture import Capture
from ops.gatelab import observe_for
from ops.lab import Lab, LabError, list_labs
from ops.probe import NameServer, reachable
from ops.wait import wait_until

PORT = 7700
SERVICE_PORT = 8080


def test_every_host_reaches_every_other_host_over_ipv4_and_ipv6(lab: Lab) -> None:
    servers = [NameServer(lab, h, PORT) for h in lab.hosts]
    for s in servers:
        s.__enter__()
    try:
        failures = []
        for src in lab.hosts:
            for dst in lab.hosts:
                if src == dst:
                    continue
                for family in (4, 6):
                    answer = reachable(lab, src, lab.addr(dst, family), PORT)
                    if answer != dst:
                        failures.append((src, dst, family, answer))
        assert failures == []
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def test_links_are_mtu_1500(lab: Lab) -> None:
    from pyroute2 import IPRoute

    for host in ("peer", "origin", "standby"):
        with IPRoute(netns=lab.netns(host)) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
            assert link.get("IFLA_MTU") == 1500


@pytest.mark.parametrize("family", [4, 6])
def test_service_address_is_answered_by_origin_then_standby_after_each_kind_of_switch(
        fresh_lab: Lab, family: int) -> None:
    lab = fresh_lab
    service = lab.service(family)
    with NameServer(lab, "origin", SERVICE_PORT), NameServer(lab, "standby", SERVICE_PORT):
        assert reachable(lab, "peer", service, SERVICE_PORT) == "origin"
        lab.switch_route("standby")
        assert reachable(lab, "peer", service, SERVICE_PORT) == "standby"
        lab.switch_route("origin")
        assert reachable(lab, "peer", service, SERVICE_PORT) == "origin"
        lab.move_address("standby")
        assert reachable(lab, "peer", service, SERVICE_PORT) == "standby"
        lab.move_address("origin")
        assert reachable(lab, "peer", service, SERVICE_PORT) == "origin"


def test_move_address_reaches_standby_when_origin_is_crashed_and_keeps_the_address(
        fresh_lab: Lab) -> None:
    lab = fresh_lab
    with NameServer(lab, "standby", SERVICE_PORT):
        # warm the gateway's neighbour cache towards origin first
        lab.move_address("origin")
        lab.crash("origin")
        lab.move_address("standby", release=False)
        for family in (4, 6):
            assert reachable(lab, "peer", lab.service(family), SERVICE_PORT) == "standby"


def _established_pair(lab: Lab, family: int) -> tuple[socket.socket, socket.socket]:
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    listener = lab.call("origin", _listen, fam, SERVICE_PORT + 1)
    client = lab.call("peer", socket.create_connection, (lab.service(family), SERVICE_PORT + 1), 3)
    server, _ = listener.accept()
    listener.close()
    return client, server


def _listen(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(4)
    return s


def test_crash_cuts_origin_off_outside_while_its_kernel_keeps_the_socket(fresh_lab: Lab) -> None:
    lab = fresh_lab
    client, server = _established_pair(lab, 4)
    sleeper = lab.popen("origin", ["sleep", "300"])
    origin_mac = lab.host("origin").mac
    from_origin = f"src host {lab.service(4)} or src host {lab.addr('origin')}"
    caps = [
        Capture.in_lab(lab, "peer", "eth0", from_origin),
        Capture.in_lab(lab, "gw", "br0", f"ether src {origin_mac}"),
        Capture.in_lab(lab, "gw", "v-peer", from_origin),
    ]
    with contextlib.ExitStack() as stack:
        for c in caps:
            stack.enter_context(c)
        stack.callback(server.close)
        stack.callback(client.close)
        server.sendall(b"before-crash")
        assert client.recv(100) == b"before-crash"
        # nothing of origin's is in flight: the peer's ACK of its bytes has arrived
        wait_until(lambda: tcp_info(server).tcpi_unacked == 0, 10,
                   what="origin's bytes acknowledged")
        killed = lab.crash("origin")
        crashed_at = time.time()
        assert sleeper.pid in killed
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        # origin's TCP sees no error: it queues the bytes and keeps retransmitting them
        server.sendall(b"after-crash" * 100)
        client.sendall(b"from-peer")
        # origin retransmits within this window (RTO from 200 ms, doubling) and none of it
        # may cross the cut: an absence, so the window is fixed
        observe_for(1.5)
        ss = lab.run("origin", ["ss", "-tnH", "state", "established"], capture_output=True,
                     text=True, check=True).stdout
        assert f"{lab.service(4)}:{SERVICE_PORT + 1}" in ss
        send_q = int(ss.split()[1])
        assert send_q == len(b"after-crash" * 100)
        retrans_in_window = tcp_info(server).tcpi_total_retrans
    assert retrans_in_window > 0, "origin retransmitted nothing in the window: it proves nothing"
    for c in caps:
        segs = c.segments()
        before = [s for s in segs if s.at < crashed_at]
        after = [s for s in segs if s.at >= crashed_at]
        assert before, f"capture on {c.where} saw nothing even before the crash"
        assert after == [], f"{c.where} saw origin after the crash: {after[:3]}"


def test_a_rebooted_host_comes_back_empty_and_its_old_connections_never_reach_the_peer(
        fresh_lab: Lab) -> None:
    """crash -> switch -> reboot: the origin's old socket (still retransmitting in its kernel
    when it was cut) dies with its namespace; the peer sees nothing of it, the host is back on
    both families, and the service stays where it was moved."""
    lab = fresh_lab
    client, server = _established_pair(lab, 4)
    with Capture.in_lab(lab, "peer", "eth0", f"tcp port {SERVICE_PORT + 1}") as cap:
        lab.crash("origin")
        server.sendall(b"never-seen" * 100)  # the old kernel keeps retransmitting this
        lab.switch_route("standby")
        with pytest.raises(LabError, match="crash it first"):
            lab.reboot("standby")
        lab.reboot("origin")
        ss = lab.run("origin", ["ss", "-tanH"], capture_output=True, text=True,
                     check=True).stdout
        assert ss.strip() == "", ss
        with NameServer(lab, "origin", PORT):
            for family in (4, 6):
                assert reachable(lab, "peer", lab.addr("origin", family), PORT) == "origin"
        # the old socket's RTO (200 ms doubling from the crash) fires within this window were
        # it alive and uncut: an absence, so the window is fixed
        observe_for(3.0)
    server.close()
    client.close()
    assert lab.service_owner == "standby" and "origin" not in lab.service_holders
    assert [s for s in cap.segments() if s.sport == SERVICE_PORT + 1] == []


def test_partition_drops_only_between_the_named_hosts_and_heal_restores(fresh_lab: Lab) -> None:
    lab = fresh_lab
    servers = [NameServer(lab, h, PORT) for h in ("store", "standby", "peer", "origin")]
    for s in servers:
        s.__enter__()
    try:
        lab.partition("origin", ["store", "peer"])
        for family in (4, 6):
            assert reachable(lab, "origin", lab.addr("store", family), PORT, 0.5) is None
            assert reachable(lab, "store", lab.addr("origin", family), PORT, 0.5) is None
            assert reachable(lab, "origin", lab.addr("peer", family), PORT, 0.5) is None
            assert reachable(lab, "peer", lab.service(family), PORT, 0.5) is None
            assert reachable(lab, "origin", lab.addr("standby", family), PORT) == "standby"
            assert reachable(lab, "standby", lab.addr("store", family), PORT) == "store"
        lab.heal()
        for family in (4, 6):
            assert reachable(lab, "origin", lab.addr("store", family), PORT) == "store"
            assert reachable(lab, "peer", lab.service(family), PORT) == "origin"
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def test_per_host_sysctls_change_only_that_host(lab: Lab) -> None:
    def root_value() -> str:
        with open("/proc/sys/net/ipv4/tcp_timestamps") as f:
            return f.read().strip()

    before = root_value()
    for key in ("net.ipv4.tcp_timestamps", "net.ipv4.tcp_sack", "net.ipv4.tcp_window_scaling",
                "net.ipv4.tcp_ecn"):
        original = lab.sysctl_get("peer", key)
        lab.sysctl("peer", key, 0)
        try:
            assert lab.sysctl_get("peer", key) == "0"
            assert lab.sysctl_get("origin", key) == original or key == "net.ipv4.tcp_ecn"
        finally:
            lab.sysctl("peer", key, original)
    assert root_value() == before


def test_labs_with_different_prefixes_coexist_and_are_isolated(lab: Lab) -> None:
    with Lab(stores=1) as other:
        assert other.prefix != lab.prefix
        assert {h.netns for h in other.hosts.values()}.isdisjoint(
            h.netns for h in lab.hosts.values())
        with NameServer(other, "origin", PORT + 5):
            assert reachable(other, "peer", other.service(4), PORT + 5) == "origin"
            # the same address in the first lab is another host, where nothing listens
            assert reachable(lab, "peer", lab.service(4), PORT + 5) is None
        assert set(list_labs()) >= {lab.prefix, other.prefix}
    assert not any(netns.exists(h.netns) for h in other.hosts.values())
    assert all(netns.exists(h.netns) for h in lab.hosts.values())


def test_lab_of_a_sigkilled_run_is_removed_by_the_next_one(tmp_path: object) -> None:
    script = textwrap.dedent("""
        import json, sys, time
        from ops import logs
        from ops.lab import Lab
        logs.configure("json", "warning")
        lab = Lab(stores=1)
        lab.up()
        p = lab.popen("origin", ["sleep", "600"])
        print(json.dumps({"prefix": lab.prefix, "sleeper": p.pid,
                          "netns": [h.netns for h in lab.hosts.values()]}), flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert all(netns.exists(n) for n in info["netns"])
    assert os.path.exists(f"/proc/{info['sleeper']}")
    with Lab(stores=1):
        pass  # building any lab sweeps the dead one
    assert not any(netns.exists(n) for n in info["netns"])
    wait_until(lambda: not os.path.exists(f"/proc/{info['sleeper']}"), 5,
               what="the sleeper of the SIGKILLed run gone")
    assert info["prefix"] not in list_labs()


def test_leftovers_of_the_same_prefix_are_removed_before_building() -> None:
    prefix = f"tleft{os.getpid()}"
    stale = f"{prefix}-origin"
    netns.create(stale)
    try:
        with Lab(prefix=prefix, stores=1) as lab:
            assert reachable(lab, "peer", lab.addr("origin"), PORT) is None  # fresh and working
            assert lab.call("origin", socket.gethostname)  # namespace usable
        assert not netns.exists(stale)
    finally:
        netns.remove(stale)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_lab_is_removed_when_its_process_is_interrupted(sig: signal.Signals) -> None:
    # A process started from a background job of a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: the child would sleep
    # through the signal. It sets the handler an interactive process has.
    script = textwrap.dedent("""
        import json, signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from ops import logs
        from ops.lab import lab
        logs.configure("json", "warning")
        with lab(stores=1) as l:
            print(json.dumps([h.netns for h in l.hosts.values()]), flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert child.stdout is not None
        names = json.loads(child.stdout.readline())
        assert all(netns.exists(n) for n in names)
        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not any(netns.exists(n) for n in names)


def test_attaching_to_a_lab_from_another_process_keeps_its_owner(lab: Lab) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    script = (f"from ops.lab import Lab; l = Lab.attach({lab.prefix!r}); "
              "l.switch_route('standby'); l.switch_route('origin')")
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, capture_output=True)
    with open(f"/run/tcpcp-lab/{lab.prefix}.json") as f:
        assert json.load(f)["owner_pid"] == os.getpid()
    with Lab(stores=1):
        pass  # sweeping after the attaching process exited must leave this lab alone
    assert all(netns.exists(h.netns) for h in lab.hosts.values())


def test_every_lab_link_keeps_each_flow_on_one_cpu(lab: Lab) -> None:
    """RPS on every veth end: a flow's segments cannot overtake each other across CPUs."""
    for host, ifname in (("origin", "eth0"), ("peer", "eth0"), ("gw", "p-origin"),
                         ("gw", "v-peer")):
        out = lab.run(host, ["unshare", "--mount", "sh", "-ec",
                             f"mount -t sysfs sysfs /sys; cat /sys/class/net/{ifname}/queues/"
                             "rx-0/rps_cpus"], capture_output=True, text=True, check=True).stdout
        assert int(out.strip().replace(",", ""), 16) == (1 << (os.cpu_count() or 1)) - 1
