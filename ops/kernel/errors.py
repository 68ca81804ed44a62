"""The guest-kernel tooling's exception hierarchy: every error ops/kernel raises derives from
GuestKernelError."""

from __future__ import annotations


class GuestKernelError(Exception):
    """Base of every error raised while building or booting the tcpcp guest kernel."""


class SourceUnavailable(GuestKernelError):
    """The pinned kernel source package cannot be installed."""


class BuildFailed(GuestKernelError):
    """A step of the kernel or initramfs build failed."""


class GuestFailed(GuestKernelError):
    """The guest panicked, hung, or ended without a verdict line."""
