"""The benchmarks' `--replicas` option (issue 20): `cex up`'s spelling, checked as
`cex up` checks it, repeatable for configurations back to back."""

from __future__ import annotations

import pytest

from bench import bench_marketdata, bench_trading, processes


def test_trading_takes_cex_ups_spelling_once_per_configuration() -> None:
    args = bench_trading._cli(["--replicas", "order=2,marketdata=2", "--replicas", "order=1"])
    assert args.replicas == [{"order": 2, "marketdata": 2}, {"order": 1}]
    assert bench_trading._cli([]).replicas is None  # one stack, CEX_REPLICAS as cex up


@pytest.mark.parametrize(
    "argv",
    [
        ["--replicas", "order=5"],  # past the port layout's room
        ["--replicas", "reflection=2"],  # runs once
        ["--replicas", "nosuch=2"],
        ["--replicas", "order=2", "--state-dir", "/tmp/x"],  # starts stacks of its own
    ],
)
def test_trading_refuses_what_cex_up_refuses(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench_trading._cli(argv)


def test_the_unary_load_has_two_accounts_per_order_replica() -> None:
    assert bench_trading._accounts_for(25, 1) == 1
    assert bench_trading._accounts_for(1000, 1) == 2  # the edge's per-account limit
    assert bench_trading._accounts_for(25, 2) == 4
    assert bench_trading._accounts_for(3000, 2) == 6
    assert bench_trading.replicas_label({"order": 2, "marketdata": 2, "risk": 1}) == (
        "marketdata=2,order=2"
    )
    assert bench_trading.replicas_label({}) == "1 each"


def test_marketdata_takes_the_same_spelling_and_keeps_its_own_count() -> None:
    args = bench_marketdata.parse_args(
        ["--replicas", "order=2,marketdata=2", "--replicas", "marketdata=1"]
    )
    assert args.replicas == [2, 1]
    assert bench_marketdata.parse_args(["--replicas", "order=3"]).replicas == [1]
    assert bench_marketdata.parse_args([]).replicas is None  # one process, direct
    with pytest.raises(SystemExit):
        bench_marketdata.parse_args(["--replicas", "marketdata=9"])


def test_marketdata_runs_every_configuration_in_order() -> None:
    def runs(*argv: str) -> list[tuple[int, bool]]:
        return bench_marketdata.configurations(bench_marketdata.parse_args(list(argv)))

    assert runs() == [(1, False)]  # one process, subscribers straight to it
    assert runs("--replicas", "marketdata=1", "--replicas", "marketdata=2") == [
        (1, True),
        (2, True),
    ]
    assert runs("--replicas", "marketdata=2", "--via", "both") == [(2, True), (2, False)]
    assert runs("--replicas", "marketdata=2", "--via", "direct") == [(2, False)]


def test_cpu_is_counted_for_every_replica(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "stack.json").write_text(
        '{"pids": {"order": 1, "order-2": 2, "marketdata-3": 3, "reflection": 4, "chainsim": 5}}'
    )
    assert processes.pids(tmp_path) == {"order": 1, "order-2": 2, "marketdata-3": 3}
