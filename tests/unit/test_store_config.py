"""Pure parts of the store: durability settings, key file parsing, key names, limits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store.config import Durability, DurabilityMode, StoreConfig
from store.errors import SigningKeyError, StoreConfigError
from store.keys import OriginKeys, check_name, keys_of, origin_of_meta_key
from store.limits import Limits
from store.signing import load_keyring, new_secret_hex, parse_keyring


@pytest.mark.parametrize("text,expected", [
    ("none", Durability()),
    ("wait:1", Durability(DurabilityMode.WAIT, replicas=1, timeout_ms=1000)),
    ("WAIT:2:250", Durability(DurabilityMode.WAIT, replicas=2, timeout_ms=250)),
    ("waitaof:1:0", Durability(DurabilityMode.WAITAOF, local=1, replicas=0)),
    ("waitaof:1:1:300", Durability(DurabilityMode.WAITAOF, local=1, replicas=1, timeout_ms=300)),
])
def test_durability_setting_parses(text: str, expected: Durability) -> None:
    assert Durability.parse(text) == expected
    assert Durability.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "wait", "wait:0", "wait:1:0", "waitaof:0:0", "sync",
                                  "waitaof:2:1", "none:1", "wait:x"])
def test_bad_durability_setting_is_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(StoreConfigError, match=r"durability"):
        Durability.parse(text)


def test_store_config_needs_a_url_or_sentinels() -> None:
    with pytest.raises(StoreConfigError, match="URL"):
        StoreConfig.standalone("http://x")
    with pytest.raises(StoreConfigError, match="sentinel"):
        StoreConfig.sentinel("mymaster", [])


def test_key_file_with_two_ids_accepts_both_and_signs_with_the_chosen_one(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sign_with": "new", "keys": {
        "old": new_secret_hex(), "new": new_secret_hex()}}))
    path.chmod(0o600)
    ring = load_keyring(path)
    assert ring.sign_with == "new" and ring.accepts("old") and ring.accepts("new")
    assert not ring.accepts("other")


@pytest.mark.parametrize("text,message", [
    ("not json", "must be JSON"),
    ('{"keys": {}}', "sign_with"),
    ('{"sign_with": "a", "keys": {"a": "zz"}}', "hex"),
    ('{"sign_with": "a", "keys": {"a": "00"}}', "at least 16 bytes"),
    ('{"sign_with": "b", "keys": {"a": "' + "00" * 16 + '"}}', "names key 'b'"),
    ('{"sign_with": "a b", "keys": {"a b": "' + "00" * 16 + '"}}', "key id"),
])
def test_malformed_key_file_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(SigningKeyError, match=message):
        parse_keyring(text)


def test_missing_key_file_is_refused_with_its_path(tmp_path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read key file"):
        load_keyring(tmp_path / "absent.json")


@given(st.text(alphabet=st.characters(codec="ascii", categories=("L", "N")), min_size=1,
               max_size=50))
def test_all_keys_of_an_origin_share_its_hash_tag(origin: str) -> None:
    keys = OriginKeys(origin)
    assert all(k.startswith(f"tcpcp:{{{origin}}}:") for k in keys.all())
    assert len(set(keys.all())) == 4
    assert origin_of_meta_key(keys.meta.encode()) == origin
    assert origin_of_meta_key(keys.records) is None


@pytest.mark.parametrize("name", ["", "a{b", "a}b", "a b", "a*", "x" * 256, "tab\t"])
def test_names_that_would_break_keys_or_patterns_are_refused(name: str) -> None:
    with pytest.raises(StoreConfigError):
        check_name("origin", name)


@pytest.mark.parametrize("name", ["", "a{b", "a b", "x" * 256])
def test_cached_origin_keys_refuse_bad_names_every_time(name: str) -> None:
    for _ in range(2):  # a refusal is never cached as a value
        with pytest.raises(StoreConfigError):
            keys_of(name)
    assert keys_of("origin-a") == OriginKeys("origin-a")


def test_limits_must_be_positive() -> None:
    with pytest.raises(StoreConfigError, match="max_record"):
        Limits(max_record=0)
