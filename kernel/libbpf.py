"""cffi (ABI mode) bindings to libbpf.so.1: open and load a BPF object, find its programs and maps,
read and write map elements, run a program on a test packet (BPF_PROG_TEST_RUN).

Every libbpf declaration used by tcpcp is in `_CDEF` below (layouts as in libbpf 1.1, Debian 12).
Usage: `with BpfObject(elf_bytes, "gate") as obj: fd = obj.program_fd("gate_egress");
m = obj.map("gate_flows"); m.update(key, value)`. Maps and programs live until `close()`, except
maps pinned in bpffs (`pins={"gate_flows": "/sys/fs/bpf/..."}`): a pinned map that already
exists is reused with its contents, a new one is pinned there, and it lives until `unpin`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cffi

from kernel.errors import KernelError

_CDEF = """
struct bpf_object;
struct bpf_program;
struct bpf_map;

struct bpf_object_open_opts {
    size_t sz;
    const char *object_name;
    bool relaxed_maps;
    const char *pin_root_path;
    uint32_t removed_attach_prog_fd;  /* "__u32 :32" in libbpf.h */
    const char *kconfig;
    const char *btf_custom_path;
    char *kernel_log_buf;
    size_t kernel_log_size;
    uint32_t kernel_log_level;
};

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in;
    uint32_t data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};

struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz,
                                        const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
int bpf_map__fd(const struct bpf_map *map);
uint32_t bpf_map__key_size(const struct bpf_map *map);
uint32_t bpf_map__value_size(const struct bpf_map *map);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
int bpf_map__unpin(struct bpf_map *map, const char *path);

int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
"""

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_LOG_SIZE = 4 << 20

ffi = cffi.FFI()
ffi.cdef(_CDEF)
_lib: Any = None


def lib() -> Any:
    """The loaded libbpf.so.1 (opened on first use)."""
    global _lib
    if _lib is None:
        try:
            _lib = ffi.dlopen("libbpf.so.1")
        except OSError as exc:
            raise LibbpfError(f"expected libbpf.so.1 to load, got {exc}") from exc
    return _lib


class LibbpfError(KernelError):
    """A libbpf call failed."""


class BpfLoadError(LibbpfError):
    """The kernel refused a BPF object; the message carries the verifier log."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc
        raise LibbpfError(f"expected {what} to succeed, got {errno.errorcode.get(code, code)} "
                          f"({os.strerror(code)})")
    return rc


@dataclass(frozen=True, slots=True)
class TestRun:
    """Outcome of one BPF_PROG_TEST_RUN: the program's return code and the packet it left."""

    retval: int
    data: bytes
    duration_ns: int


class BpfMap:
    """One map of a loaded object; keys and values are raw bytes in the map's layout."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size

    def _key(self, key: bytes) -> Any:
        if len(key) != self.key_size:
            raise LibbpfError(f"map {self.name}: expected a {self.key_size}-byte key, "
                              f"got {len(key)} bytes")
        return ffi.from_buffer(key)

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under key, or None when there is none."""
        value = ffi.new("char[]", self.value_size)
        rc = lib().bpf_map_lookup_elem(self.fd, self._key(key), value)
        if rc == -errno.ENOENT:
            return None
        _check(rc, f"lookup in map {self.name}")
        return bytes(ffi.buffer(value))

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Store value under key (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST)."""
        if len(value) != self.value_size:
            raise LibbpfError(f"map {self.name}: expected a {self.value_size}-byte value, "
                              f"got {len(value)} bytes")
        _check(lib().bpf_map_update_elem(self.fd, self._key(key), ffi.from_buffer(value), flags),
               f"update of map {self.name}")

    def delete(self, key: bytes) -> bool:
        """Remove key; False when it was not there."""
        rc = lib().bpf_map_delete_elem(self.fd, self._key(key))
        if rc == -errno.ENOENT:
            return False
        _check(rc, f"delete in map {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key in the map (a snapshot walk; concurrent changes may be missed)."""
        current: Any = ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        while lib().bpf_map_get_next_key(self.fd, current, nxt) == 0:
            key = bytes(ffi.buffer(nxt))
            yield key
            current = ffi.from_buffer(key)


class BpfObject:
    """A BPF ELF object opened from memory and loaded into the kernel; close() unloads it."""

    def __init__(self, elf: bytes, name: str, pins: Mapping[str, str] | None = None) -> None:
        self.name = name
        self._elf = ffi.from_buffer(elf)
        self._log = ffi.new("char[]", _LOG_SIZE)
        self._name = ffi.new("char[]", name.encode())
        opts = ffi.new("struct bpf_object_open_opts *")
        opts.sz = ffi.sizeof("struct bpf_object_open_opts")
        opts.object_name = self._name
        opts.kernel_log_buf = self._log
        opts.kernel_log_size = _LOG_SIZE
        obj = lib().bpf_object__open_mem(self._elf, len(elf), opts)
        if obj == ffi.NULL:
            code = ffi.errno
            raise BpfLoadError(f"expected libbpf to open BPF object {name}, got "
                               f"{errno.errorcode.get(code, code)}")
        self._obj: Any = obj
        self._pins = dict(pins or {})
        for map_name, path in self._pins.items():
            rc = lib().bpf_map__set_pin_path(self._find_map(map_name), path.encode())
            if rc < 0:
                lib().bpf_object__close(obj)
                self._obj = None
                raise LibbpfError(f"expected to pin map {map_name} at {path}, got "
                                  f"{errno.errorcode.get(-rc, -rc)}")
        rc = lib().bpf_object__load(obj)
        if rc < 0:
            verifier = ffi.string(self._log).decode(errors="replace")
            lib().bpf_object__close(obj)
            self._obj = None
            raise BpfLoadError(f"expected the kernel to load BPF object {name}, got "
                               f"{errno.errorcode.get(-rc, -rc)}; verifier log:\n"
                               f"{verifier[-8000:]}")

    def program_fd(self, name: str) -> int:
        """File descriptor of the loaded program called name."""
        prog = lib().bpf_object__find_program_by_name(self._live(), name.encode())
        if prog == ffi.NULL:
            raise LibbpfError(f"expected program {name} in BPF object {self.name}, found none")
        return _check(lib().bpf_program__fd(prog), f"fd of program {name}")

    def _find_map(self, name: str) -> Any:
        m = lib().bpf_object__find_map_by_name(self._live(), name.encode())
        if m == ffi.NULL:
            raise LibbpfError(f"expected map {name} in BPF object {self.name}, found none")
        return m

    def unpin(self) -> None:
        """Remove the bpffs pins of this object's pinned maps (they die with the object)."""
        for map_name in self._pins:
            rc = lib().bpf_map__unpin(self._find_map(map_name), ffi.NULL)
            if rc < 0 and rc != -errno.ENOENT:
                _check(rc, f"unpin of map {map_name}")

    def map(self, name: str) -> BpfMap:
        """The map called name."""
        m = self._find_map(name)
        fd = _check(lib().bpf_map__fd(m), f"fd of map {name}")
        return BpfMap(name, fd, lib().bpf_map__key_size(m), lib().bpf_map__value_size(m))

    def test_run(self, program: str, packet: bytes, repeat: int = 1) -> TestRun:
        """Run program once on packet (an Ethernet frame) through BPF_PROG_TEST_RUN."""
        out = ffi.new("char[]", len(packet) + 256)
        data_in = ffi.from_buffer(packet)
        opts = ffi.new("struct bpf_test_run_opts *")
        opts.sz = ffi.sizeof("struct bpf_test_run_opts")
        opts.data_in = data_in
        opts.data_size_in = len(packet)
        opts.data_out = out
        opts.data_size_out = len(packet) + 256
        opts.repeat = repeat
        _check(lib().bpf_prog_test_run_opts(self.program_fd(program), opts),
               f"test run of {program}")
        return TestRun(opts.retval, bytes(ffi.buffer(out, opts.data_size_out)), opts.duration)

    def _live(self) -> Any:
        if self._obj is None:
            raise LibbpfError(f"BPF object {self.name} is closed")
        return self._obj

    def close(self) -> None:
        """Unload programs and maps (attachments made elsewhere keep their own references)."""
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
