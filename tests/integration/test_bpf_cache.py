"""Compiled BPF objects are loaded only from a cache nobody but root (or us) could have written:
an unsafe directory, an object owned by another uid, or a symlinked object is refused with an
error naming the path and the problem, never loaded, and a fresh object is compiled instead."""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from kernel import bpfbuild
from kernel.libbpf import BpfObject

PLANTED = b"\x7fELF planted by someone else"
OTHER_UID = 54321


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache" / "bpf"
    directory.mkdir(parents=True, mode=0o755)
    for d in (directory, directory.parent):
        d.chmod(0o755)
    monkeypatch.setenv("TCPCP_BPF_CACHE", str(directory))
    return directory


def _plant(path: Path, uid: int = 0) -> None:
    path.write_bytes(PLANTED)
    path.chmod(0o644)
    os.chown(path, uid, uid)


def _refusals(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "bpf_cache_refused"]


def _assert_loads(data: bytes, name: str = "quarantine") -> None:
    assert data != PLANTED and data[:4] == b"\x7fELF"
    with BpfObject(data, name) as obj:
        assert obj.program_fd("quarantine_ingress") >= 0


def test_a_world_writable_cache_directory_is_refused_and_its_object_never_loaded(
        cache: Path) -> None:
    cache.chmod(0o777)
    planted = cache / bpfbuild.object_name("quarantine")
    _plant(planted)
    with pytest.raises(bpfbuild.UnsafeBpfCache) as refused:
        bpfbuild.object_path("quarantine")
    assert str(cache) in str(refused.value)
    assert "world-writable (mode 0777)" in str(refused.value)
    with capture_logs() as logs:
        data = bpfbuild.object_bytes("quarantine")
    _assert_loads(data)
    assert [e["path"] for e in _refusals(logs)] == [str(cache)]
    assert planted.read_bytes() == PLANTED  # an unsafe directory is left alone, not written


def test_a_group_writable_cache_directory_is_refused(cache: Path) -> None:
    cache.chmod(0o775)
    with pytest.raises(bpfbuild.UnsafeBpfCache, match="group-writable"):
        bpfbuild.object_path("quarantine")
    assert list(cache.iterdir()) == []


def test_an_ancestor_owned_by_another_user_makes_the_cache_unsafe(cache: Path) -> None:
    os.chown(cache.parent, OTHER_UID, OTHER_UID)  # like a user's HOME under `sudo -E`
    with pytest.raises(bpfbuild.UnsafeBpfCache) as refused:
        bpfbuild.object_path("quarantine")
    assert str(cache.parent) in str(refused.value)
    assert f"owned by uid {OTHER_UID}" in str(refused.value)
    with capture_logs() as logs:
        _assert_loads(bpfbuild.object_bytes("quarantine"))
    assert len(_refusals(logs)) == 1
    assert list(cache.iterdir()) == []


def test_a_cached_object_owned_by_another_uid_is_refused_and_replaced_by_a_fresh_one(
        cache: Path) -> None:
    planted = cache / bpfbuild.object_name("quarantine")
    _plant(planted, uid=OTHER_UID)
    with pytest.raises(bpfbuild.UnsafeBpfCache) as refused:
        bpfbuild.object_path("quarantine")
    assert str(planted) in str(refused.value)
    assert f"owned by uid {OTHER_UID}" in str(refused.value)
    with capture_logs() as logs:
        data = bpfbuild.object_bytes("quarantine")
    _assert_loads(data)
    assert [e["path"] for e in _refusals(logs)] == [str(planted)]
    st = planted.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o644)
    assert planted.read_bytes() == data
    assert bpfbuild.object_path("quarantine") == planted  # now trusted


def test_a_world_writable_cached_object_is_refused(cache: Path) -> None:
    planted = cache / bpfbuild.object_name("quarantine")
    _plant(planted)
    planted.chmod(0o666)
    with pytest.raises(bpfbuild.UnsafeBpfCache,
                       match=r"object group and world-writable \(mode 0666\)"):
        bpfbuild.object_path("quarantine")
    _assert_loads(bpfbuild.object_bytes("quarantine"))


def test_a_symlinked_object_is_refused_even_when_it_points_at_a_root_owned_file(
        cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.o"
    _plant(elsewhere)  # root's, 0644: only the link is wrong
    link = cache / bpfbuild.object_name("quarantine")
    link.symlink_to(elsewhere)
    with pytest.raises(bpfbuild.UnsafeBpfCache) as refused:
        bpfbuild.object_path("quarantine")
    assert str(link) in str(refused.value) and "symlink" in str(refused.value)
    with capture_logs() as logs:
        data = bpfbuild.object_bytes("quarantine")
    _assert_loads(data)
    assert len(_refusals(logs)) == 1
    assert not link.is_symlink() and link.read_bytes() == data
    assert elsewhere.read_bytes() == PLANTED


def test_a_cache_reached_through_roots_symlink_is_resolved_then_checked(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alias = tmp_path / "alias"  # like /var/run -> /run
    alias.symlink_to(cache, target_is_directory=True)
    monkeypatch.setenv("TCPCP_BPF_CACHE", str(alias))
    path = bpfbuild.object_path("quarantine")
    assert path.parent == alias and (cache / path.name).is_file()


def test_a_clean_cache_compiles_once_atomically_and_the_object_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "fresh" / "a" / "bpf"
    monkeypatch.setenv("TCPCP_BPF_CACHE", str(cache))
    path = cache / bpfbuild.object_name("quarantine")
    assert not path.exists()
    old = os.umask(0o002)  # the directories made must not follow a umask of 002
    try:
        data = bpfbuild.object_bytes("quarantine")
    finally:
        os.umask(old)
    _assert_loads(data)
    st = path.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o644)
    for d in (cache, cache.parent, cache.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) & 0o022 == 0, d
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    assert bpfbuild.object_bytes("quarantine") == data
    assert bpfbuild.object_path("quarantine") == path
    again = path.stat()  # cached: the same file, not compiled and written again
    assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_root_caches_under_var_cache_not_in_the_invoking_users_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TCPCP_BPF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "someone"))  # as under `sudo -E`
    assert os.geteuid() == 0, "run as root (ops/test)"
    assert bpfbuild.cache_dir() == bpfbuild.ROOT_CACHE == Path("/var/cache/tcpcp/bpf")
