"""The guest's initramfs: a static busybox and an /init that mounts the host's root read-only
over virtio-9p, runs the job the host shared, prints the verdict line (with the run's nonce,
read from the job directory) and reboots (qemu runs with -no-reboot, so the reboot ends it).

The archive is written here (cpio "newc"), so nothing but Debian's busybox-static is needed.
Inside the guest, the host root is /host and the job directory (read-write, tag "job") is
/run/tcpcp-job once the init has chrooted: its `cmd` file is run with /bin/sh from the
directory the host named, and its exit status becomes the verdict.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from ops.kernel.errors import BuildFailed

BUSYBOX = Path("/bin/busybox")
VERDICT_PREFIX = "TCPCP-VERDICT"
JOB_TAG = "job"
ROOT_TAG = "hostroot"
REPO_TAG = "repo"  # the repository (with its venv), mounted at its host path over the tmpfs
GUEST_JOB_DIR = "/run/tcpcp-job"

INIT = f"""#!/bin/busybox sh
# tcpcp guest init: host root over 9p, the shared job, a verdict line, reboot.
export PATH=/bin
busybox mkdir -p /proc /sys /dev /host
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
nonce=unknown
verdict() {{
    echo "{VERDICT_PREFIX} $nonce exit=$1 $2" > /dev/ttyS0
    busybox sync
    busybox reboot -f
}}
busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \\
    {ROOT_TAG} /host || verdict 125 "host-root-mount-failed"
busybox mount -t proc proc /host/proc
busybox mount -t sysfs sys /host/sys
busybox mount -t devtmpfs dev /host/dev
busybox mount -t tmpfs tmp /host/tmp
busybox mount -t tmpfs run /host/run
busybox mount -t bpf bpf /host/sys/fs/bpf 2>/dev/null
busybox mkdir -p /host{GUEST_JOB_DIR}
busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {JOB_TAG} \\
    /host{GUEST_JOB_DIR} || verdict 125 "job-mount-failed"
nonce=$(busybox cat /host{GUEST_JOB_DIR}/nonce)
# the repository may live under a path the guest covers with a tmpfs (a CI clone in /tmp)
repo=$(busybox cat /host{GUEST_JOB_DIR}/repo_path)
busybox mkdir -p "/host$repo" 2>/dev/null
busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \\
    {REPO_TAG} "/host$repo" || verdict 125 "repo-mount-failed"
busybox ip link set lo up 2>/dev/null
echo "tcpcp-guest: running job"
busybox chroot /host /bin/sh {GUEST_JOB_DIR}/cmd > /dev/ttyS0 2>&1
verdict $? "job-finished"
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: a regular file or directory with its mode bits."""

    name: str
    mode: int
    data: bytes = b""


def _header(ino: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, 0, 0, len(name), 0]
    head = b"070701" + b"".join(f"{f:08X}".encode() for f in fields) + name
    return head + b"\0" * (-len(head) % 4)


def newc_archive(entries: list[Entry]) -> bytes:
    """A cpio newc archive of entries, ending with the TRAILER!!! record."""
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        out += _header(ino if entry.name != "TRAILER!!!" else 0, entry)
        out += entry.data + b"\0" * (-len(entry.data) % 4)
    return bytes(out)


def read_newc(archive: bytes) -> list[Entry]:
    """The members of a newc archive (the inverse of newc_archive, for checking it)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if archive[pos:pos + 6] != b"070701":
            raise BuildFailed(f"expected a newc header at offset {pos}, "
                              f"got {archive[pos:pos + 6]!r}")
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name_at = pos + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        data = archive[data_at:data_at + size]
        pos = data_at + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append(Entry(name, fields[1], data))


def guest_entries(busybox: bytes) -> list[Entry]:
    return [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
    ]


def build_initramfs(target: Path, busybox: Path = BUSYBOX) -> Path:
    """Write the guest initramfs to target (only when its content changed)."""
    if not busybox.exists():
        raise BuildFailed(f"expected a static busybox at {busybox} "
                          f"(apt-get install busybox-static), found none")
    archive = newc_archive(guest_entries(busybox.read_bytes()))
    if not target.exists() or target.read_bytes() != archive:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive)
    return target
