import logging

import pytest

from redisengines import checks


def test_runtime_mismatch_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    mine = checks.runtime()
    with caplog.at_level(logging.WARNING, logger="redisengines.checks"):
        found = checks.mismatches({
            0: {"python": mine["python"] + ".4", "cloudpickle": mine["cloudpickle"]},
            1: {"python": "2.7.18", "cloudpickle": mine["cloudpickle"]},
            2: {"python": "2.7.18", "state": "dead"},
        })
    assert found == {1: {"python": "2.7"}}
    assert "engine 1 runs python 2.7" in caplog.text


def test_eviction_policy_is_warned(r, caplog: pytest.LogCaptureFixture) -> None:
    assert checks.eviction_policy(r) == "noeviction"
    r.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="redisengines.checks"):
            assert checks.eviction_policy(r) == "allkeys-lru"
        assert "noeviction" in caplog.text
    finally:
        r.config_set("maxmemory-policy", "noeviction")
