"""Tests that run INSIDE the tcpcp guest kernel (booted by ops/kernel/qemu.py), never on the host.

On the host (no TCPCP_GUEST=1 in the environment) nothing here is collected: the host suite
runs them through tests/integration/test_kernel_guest.py, which builds the kernels and boots
them. TCPCP_GUEST_FLAVOUR says which kernel the guest runs: `patched` collects test_patch_*,
`stock` collects test_stock_*.
"""

from __future__ import annotations

import os

_IN_GUEST = os.environ.get("TCPCP_GUEST") == "1"
_FLAVOUR = os.environ.get("TCPCP_GUEST_FLAVOUR", "patched")

if not _IN_GUEST:
    collect_ignore_glob = ["test_*.py"]
elif _FLAVOUR == "stock":
    collect_ignore_glob = ["test_patch_*.py"]
else:
    collect_ignore_glob = ["test_stock_*.py"]
