"""The port layout with replicas, and `--replicas` parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cex_stack.supervisor import Stack
from cex_stack.topology import MAX_REPLICAS, SERVICES, Ports, parse_replicas


def test_every_replica_has_ports_of_its_own_inside_the_range() -> None:
    ports = Ports(base=20000)
    taken = ports.all()
    assert len(taken) == len(set(taken))
    assert all(20000 <= p < 20100 for p in taken)
    order = next(s for s in SERVICES if s.name == "order")
    assert ports.grpc(order) == 20016 and ports.metrics(order) == 20036  # as before
    for replica in range(2, MAX_REPLICAS + 1):
        assert ports.grpc(order, replica) in taken
        assert ports.metrics(order, replica) in taken
    with pytest.raises(ValueError):
        ports.grpc(order, MAX_REPLICAS + 1)


def test_replicas_parse_and_refuse_what_cannot_run_twice() -> None:
    assert parse_replicas("") == {}
    assert parse_replicas("order=2, marketdata=3") == {"order": 2, "marketdata": 3}
    assert parse_replicas("match=2") == {"match": 2}  # the writer and its standby
    for bad in (
        "reflection=2",
        "order=0",
        f"order={MAX_REPLICAS + 1}",
        "nope=2",
        "order",
    ):
        with pytest.raises(ValueError):
            parse_replicas(bad)


def test_the_writers_standby_starts_last_and_its_callers_reach_both(tmp_path: Path) -> None:
    stack = Stack(tmp_path, Ports(base=20000), {"CEX_SERVICE_SECRET": "x"}, replicas={"match": 2})
    waves = [[c.name for c in wave] for wave in stack.plan()]
    assert waves[-2] == ["match-2"] and waves[-1] == ["envoy"]  # after every service
    assert "match" in waves[1]
    by_name = {c.name: c for wave in stack.plan() for c in wave}
    match, standby = by_name["match"].env, by_name["match-2"].env
    assert match is not None and standby is not None
    assert match["CEX_GRPC_PORT"] != standby["CEX_GRPC_PORT"]
    both = f"ipv4:127.0.0.1:{match['CEX_GRPC_PORT']},127.0.0.1:{standby['CEX_GRPC_PORT']}"
    for caller, variable in (("order", "ORDER_MATCH_TARGET"), ("ledger", "LEDGER_MATCH_TARGET")):
        env = by_name[caller].env
        assert env is not None and env[variable] == both


def test_each_order_replica_has_its_own_name_consumer_and_ports(tmp_path: Path) -> None:
    stack = Stack(tmp_path, Ports(base=20000), {"CEX_SERVICE_SECRET": "x"}, replicas={"order": 2})
    names = [c.name for wave in stack.plan() for c in wave]
    assert names.count("order") == 1 and names.count("order-2") == 1
    by_name = {c.name: c for wave in stack.plan() for c in wave}
    first, second = by_name["order"].env, by_name["order-2"].env
    assert first is not None and second is not None
    assert (first["ORDER_REPLICA"], second["ORDER_REPLICA"]) == ("order", "order-2")
    assert "ORDER_CONSUMER_NAME" not in first  # replica 1 keeps the durable it had
    assert second["ORDER_CONSUMER_NAME"] == "order-state-2"
    assert first["CEX_GRPC_PORT"] != second["CEX_GRPC_PORT"]
    assert first["CEX_METRICS_PORT"] != second["CEX_METRICS_PORT"]


def test_other_services_replicate_without_sharing_a_listener_or_a_lease(tmp_path: Path) -> None:
    stack = Stack(
        tmp_path,
        Ports(base=20000),
        {"CEX_SERVICE_SECRET": "x"},
        replicas={"auth": 2, "funding": 2},
    )
    by_name = {c.name: c.env or {} for wave in stack.plan() for c in wave}
    assert by_name["auth"]["CEX_JWKS_PORT"] == str(stack.ports.jwks)
    assert by_name["auth-2"]["CEX_JWKS_PORT"] == "0"  # the JWKS is served by the first
    assert by_name["funding"]["FUNDING_INSTANCE"] != by_name["funding-2"]["FUNDING_INSTANCE"]
