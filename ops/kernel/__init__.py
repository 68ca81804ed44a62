"""Guest-kernel tooling: build Debian's linux-source-6.12 with kernel/patches/, boot it under qemu
and run the project's own tests inside (see ops/kernel/qemu.py)."""
