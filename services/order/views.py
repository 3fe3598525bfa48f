"""Orders, fills and executions as the wire shows them (domain -> proto)."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from google.protobuf import timestamp_pb2

from cex.order.v1 import order_pb2
from cex.type.v1 import types_pb2 as t
from services.chassis import Catalog
from services.chassis.money import decimal_text

from .domain import Execution, OrderRecord
from .store import FillRow

__all__ = ["execution_report", "fill_proto", "order_proto", "timestamp"]


def timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _average(order: OrderRecord, catalog: Catalog) -> str:
    if not order.filled_quantity:
        return ""
    market = catalog.markets.get(order.market)
    unit = market.quote.unit if market else Decimal("0.00000001")
    average = order.filled_quote_quantity / order.filled_quantity
    return decimal_text(average.quantize(unit, ROUND_HALF_EVEN))


def _fee_asset(order: OrderRecord, catalog: Catalog) -> str:
    if order.fee_asset:
        return order.fee_asset
    market = catalog.markets.get(order.market)
    if market is None:
        return ""
    return market.base.symbol if order.side == t.SIDE_BUY else market.quote.symbol


def order_proto(order: OrderRecord, catalog: Catalog) -> order_pb2.Order:
    out = order_pb2.Order(
        order_id=order.order_id,
        client_order_id=order.client_order_id,
        account_id=order.account_id,
        market=order.market,
        side=order.side,  # type: ignore[arg-type]
        type=order.type,  # type: ignore[arg-type]
        time_in_force=order.time_in_force,  # type: ignore[arg-type]
        self_trade_prevention=order.self_trade_prevention,  # type: ignore[arg-type]
        price=decimal_text(order.price),
        stop_price=decimal_text(order.stop_price),
        quantity=decimal_text(order.quantity),
        quote_quantity=decimal_text(order.quote_quantity),
        filled_quantity=decimal_text(order.filled_quantity),
        remaining_quantity=decimal_text(order.remaining_quantity)
        if order.state not in (5, 6, 7, 8)
        else "0",
        filled_quote_quantity=decimal_text(order.filled_quote_quantity),
        average_price=_average(order, catalog),
        cumulative_fee=decimal_text(order.cumulative_fee),
        fee_asset=_fee_asset(order, catalog),
        post_only=order.post_only,
        state=order.state,  # type: ignore[arg-type]
        reject_reason=order.reject_reason,
        cancel_reason=order.cancel_reason,  # type: ignore[arg-type]
        create_time=timestamp(order.create_time),
        update_time=timestamp(order.update_time),
        version=order.version,
    )
    if order.expire_time is not None:
        out.expire_time.CopyFrom(timestamp(order.expire_time))
    if order.trigger_time is not None:
        out.trigger_time.CopyFrom(timestamp(order.trigger_time))
    return out


def fill_proto(fill: FillRow) -> order_pb2.Fill:
    return order_pb2.Fill(
        trade_id=fill.trade_id,
        order_id=fill.order_id,
        client_order_id=fill.client_order_id,
        account_id=fill.account_id,
        market=fill.market,
        side=fill.side,  # type: ignore[arg-type]
        price=decimal_text(fill.price),
        quantity=decimal_text(fill.quantity),
        quote_quantity=decimal_text(fill.quote_quantity),
        fee=decimal_text(fill.fee),
        fee_asset=fill.fee_asset,
        liquidity=fill.liquidity,  # type: ignore[arg-type]
        trade_time=timestamp(fill.trade_time),
    )


def execution_report(
    execution: Execution, catalog: Catalog, sequence: int = 0
) -> order_pb2.ExecutionReport:
    o = execution.order
    return order_pb2.ExecutionReport(
        sequence=sequence,
        execution_id=execution.execution_id,
        execution_type=execution.execution_type,  # type: ignore[arg-type]
        order_id=o.order_id,
        client_order_id=o.client_order_id,
        account_id=o.account_id,
        market=o.market,
        side=o.side,  # type: ignore[arg-type]
        order_type=o.type,  # type: ignore[arg-type]
        order_state=o.state,  # type: ignore[arg-type]
        price=decimal_text(o.price),
        quantity=decimal_text(o.quantity),
        last_price=execution.last_price,
        last_quantity=execution.last_quantity,
        last_quote_quantity=execution.last_quote_quantity,
        cumulative_quantity=decimal_text(o.filled_quantity),
        cumulative_quote_quantity=decimal_text(o.filled_quote_quantity),
        remaining_quantity=decimal_text(o.remaining_quantity),
        average_price=_average(o, catalog),
        fee=execution.fee,
        fee_asset=execution.fee_asset,
        liquidity=execution.liquidity,  # type: ignore[arg-type]
        trade_id=execution.trade_id,
        cancel_reason=execution.cancel_reason,  # type: ignore[arg-type]
        reject_reason=execution.reject_reason,
        event_time=timestamp(execution.event_time),
        match_seq=execution.match_seq,
    )
