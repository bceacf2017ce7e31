"""The ingress's placement table: static spread, routing by queue, hot replication, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wallbreak.coe.replicas.placement import Placement, read_load
from wallbreak.errors import ConfigError


def test_spread_deals_equal_experts_round_robin_and_heavy_ones_apart() -> None:
    p = Placement.spread([f"e{i}" for i in range(6)], 2)
    assert p.experts_of(0) == ["e0", "e2", "e4"] and p.experts_of(1) == ["e1", "e3", "e5"]
    p = Placement.spread(["a", "b", "c", "d"], 2, expected={"a": 10, "b": 9, "c": 1, "d": 1})
    assert p.holders["a"] != p.holders["b"]  # the two hot experts on different replicas
    loads = [sum({"a": 10, "b": 9, "c": 1, "d": 1}[e] for e in p.experts_of(r)) for r in (0, 1)]
    assert sorted(loads) == [10, 11]


def test_requests_go_to_the_holder_and_a_hot_expert_gets_a_second_replica() -> None:
    p = Placement.spread(["a", "b"], 2, hot_queue=2)
    ra = p.choose("a")
    assert ra == p.holders["a"][0]
    p.started(ra, "a")
    assert p.choose("a") == ra  # one in flight: not hot yet
    p.started(ra, "a")
    other = 1 - ra
    assert p.choose("a") == other  # two of its own in flight on its only holder; the other is idle
    assert p.holders["a"] == [ra, other]


def test_a_replica_busy_with_other_experts_does_not_make_an_expert_hot() -> None:
    p = Placement.spread(["a", "b"], 2, hot_queue=2)
    ra, rb = p.holders["a"][0], p.holders["b"][0]
    for _ in range(5):
        p.started(ra, "x")  # the replica is busy, but not with "a"
    assert p.choose("a") == ra and p.holders["a"] == [ra]
    for _ in range(5):
        p.started(rb, "b")
    p.started(ra, "a")
    p.started(ra, "a")
    assert p.choose("a") == ra  # hot, but the only other replica is busier: stay


def test_a_down_replica_is_routed_around_and_its_experts_move() -> None:
    p = Placement.spread(["a", "b"], 2)
    ra = p.holders["a"][0]
    p.mark_down(ra)
    r = p.choose("a")
    assert r == 1 - ra and r in p.holders["a"]
    assert p.choose("a", exclude={r}) is None  # nobody left to try
    p.mark_up(ra)
    assert p.choose("a") in (0, 1)


def test_bad_replica_counts_are_one_clear_message() -> None:
    with pytest.raises(ConfigError, match="--replicas must be at least 1"):
        Placement.spread(["a"], 0)


def test_expert_load_files_measured_or_written_by_hand(tmp_path: Path) -> None:
    experts = ["a", "b", "c", "d"]
    health = tmp_path / "health.json"  # what an earlier deployment's /health said
    health.write_text(json.dumps({"status": "ok", "requests_by_expert": {"a": 120, "b": 100, "c": 3}}))
    load = read_load(health, experts)
    assert load == {"a": 120.0, "b": 100.0, "c": 3.0, "d": 0.0}
    p = Placement.spread(experts, 2, load)
    assert p.holders["a"] != p.holders["b"]
    plain = tmp_path / "load.json"
    plain.write_text(json.dumps({"d": 2.5}))
    assert read_load(plain, experts)["d"] == 2.5
    for text, msg in [
        ("{not json", "not JSON"),
        ("[1, 2]", "want a JSON object"),
        ('{"zz": 1}', "not in the bundle"),
        ('{"a": -1}', "numbers >= 0"),
        ('{"a": "many"}', "numbers >= 0"),
    ]:
        plain.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            read_load(plain, experts)
    with pytest.raises(ConfigError, match="cannot read"):
        read_load(tmp_path / "missing.json", experts)


def test_the_table_counts_requests_once_each_for_the_next_spread() -> None:
    p = Placement.spread(["a", "b"], 2)
    for e in ["a", "a", "b"]:
        p.requested(e)
        r = p.choose(e)
        assert r is not None
        p.started(r, e)
        p.finished(r, e)
    assert p.requests == {"a": 2, "b": 1}


def test_replicas_split_the_clusters_cpus_and_each_fits_a_node() -> None:
    from wallbreak.coe.replicas.deploy import replica_cpus

    assert replica_cpus([2.0], 1) == 2.0  # one replica: every core, not Ray's one-thread default
    assert replica_cpus([2.0], 2) == 1.0
    assert replica_cpus([16.0, 4.0], 2) == 8.0  # both fit on the 16-core node, 10 each would not
    assert replica_cpus([16.0, 4.0], 5) == 4.0
    assert replica_cpus([2.0], 3) == 0.66  # more replicas than cores: shares, one thread each
    assert replica_cpus([16.0, 4.0], 2, asked=4) == 4.0
    with pytest.raises(ConfigError, match=r"--replicas 2 with --replica-cpus 3 do not fit .*\(2 CPUs\)"):
        replica_cpus([2.0], 2, asked=3)
    with pytest.raises(ConfigError, match="--replica-cpus must be at least 1, got 0"):
        replica_cpus([2.0], 1, asked=0)
    with pytest.raises(ConfigError, match="no node with a CPU"):
        replica_cpus([0.0], 1)
