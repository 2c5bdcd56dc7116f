import pytest

from redisengines.config import Settings
from redisengines.errors import ProtocolError
from redisengines.keys import Keys
from redisengines.protocol import Command, entry


def test_from_env_reads_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDISENGINES_MAX_OBJECT_SIZE", "1234")
    monkeypatch.setenv("REDISENGINES_HEARTBEAT_TTL", "2.5")
    monkeypatch.setenv("REDISENGINES_CLUSTER", "lab")
    s = Settings.from_env()
    assert (s.max_object_size, s.heartbeat_ttl, s.cluster) == (1234, 2.5, "lab")
    assert Settings.from_env(cluster="other").cluster == "other"  # explicit arguments win


def test_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDISENGINES_MAX_OBJECT_SIZE", "big")
    with pytest.raises(ValueError, match="REDISENGINES_MAX_OBJECT_SIZE='big'"):
        Settings.from_env()
    with pytest.raises(ValueError, match="cluster name"):
        Settings(cluster="a:b")
    with pytest.raises(ValueError, match="heartbeat_ttl"):
        Settings(heartbeat_interval=2, heartbeat_ttl=1)


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(redis_url="redis://h:1/0", cluster="c", max_object_size=99, heartbeat_ttl=3.0,
                 key="ab" * 32)
    for k, v in s.to_env().items():
        monkeypatch.setenv(k, v)
    assert Settings.from_env() == s


def test_url_with_password_and_key_are_not_in_repr() -> None:
    shown = repr(Settings(redis_url="redis://:secret@h:1/0", key="c0ffee" * 8))
    assert "secret" not in shown and "c0ffee" not in shown


def test_key_schema_uses_prefix_and_hash_tags() -> None:
    k = Keys("lab")
    assert k.engines == "re:lab:engines"
    assert k.inbox(3) == "re:lab:{e3}:inbox"
    assert k.heartbeat(3) == "re:lab:{e3}:hb"
    assert k.result("c1-5") == "re:lab:{rc1-5}"
    assert k.page("o1", 2) == "re:lab:{oo1}:2"


def test_command_decoding_rejects_what_is_not_a_command() -> None:
    good = {k.encode(): str(v).encode() for k, v in entry("pull", "c-1", "c", names=["a"],
                                                           single=True).items()}
    cmd = Command.decode("1-0", good)
    assert (cmd.op, cmd.id, cmd.client, cmd.names(), cmd.flag("single")) == \
        ("pull", "c-1", "c", ["a"], True)
    for bad in ({b"foo": b"bar"}, {b"op": b"nope", b"id": b"x"}, {b"op": b"pull", b"id": b"{x}"}):
        with pytest.raises(ProtocolError):
            Command.decode("1-0", bad)
