"""CCXT's unified structures, checked field by field as CCXT documents them
(the Manual's "Market structure", "Order structure", ...; the same fields and
value sets as the checks in CCXT's own test suite, ccxt/test/exchange/base/,
which the pinned ccxt 4.5.64 wheel does not ship).

Each check asserts the keys, their types, the value sets, and the arithmetic
that ties fields together (filled + remaining = amount, a timestamp and its
datetime agree). A missing key or a key of the wrong type fails."""

from __future__ import annotations

from typing import Any

NUMBER = (int, float)
TIMEFRAMES_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                 "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}  # fmt: skip


def _keys(entry: dict[str, Any], keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in entry]
    assert not missing, f"{where}: missing {missing} in {sorted(entry)}"


def _number(entry: dict[str, Any], key: str, where: str, *, optional: bool = False) -> None:
    value = entry[key]
    if value is None and optional:
        return
    assert isinstance(value, NUMBER) and not isinstance(value, bool), (
        f"{where}.{key} is {value!r}, not a number"
    )


def _time(exchange: Any, entry: dict[str, Any], where: str, *, optional: bool = False) -> None:
    stamp = entry["timestamp"]
    if stamp is None and optional:
        assert entry["datetime"] is None
        return
    assert isinstance(stamp, int) and stamp > 1_500_000_000_000, f"{where}.timestamp {stamp!r}"
    assert entry["datetime"] == exchange.iso8601(stamp), f"{where}.datetime"


def market(exchange: Any, m: dict[str, Any]) -> None:
    where = f"market {m.get('symbol')}"
    _keys(m, ["id", "symbol", "base", "quote", "baseId", "quoteId", "active", "type", "spot",
              "margin", "swap", "future", "option", "contract", "precision", "limits", "info"],
          where)  # fmt: skip
    assert m["symbol"] == f"{m['base']}/{m['quote']}"
    assert m["id"] == f"{m['baseId']}-{m['quoteId']}"
    assert (m["type"], m["spot"], m["swap"], m["future"], m["option"], m["contract"]) == (
        "spot", True, False, False, False, False)  # fmt: skip
    assert isinstance(m["active"], bool)
    for key in ("amount", "price"):
        _number(m["precision"], key, f"{where}.precision")
        assert m["precision"][key] > 0
    for key in ("amount", "price", "cost"):
        _keys(m["limits"][key], ["min", "max"], f"{where}.limits.{key}")
        _number(m["limits"][key], "min", f"{where}.limits.{key}")
        _number(m["limits"][key], "max", f"{where}.limits.{key}", optional=True)


def currency(exchange: Any, c: dict[str, Any]) -> None:
    where = f"currency {c.get('code')}"
    _keys(c, ["id", "code", "name", "active", "deposit", "withdraw", "fee", "precision",
              "limits", "networks", "info"], where)  # fmt: skip
    assert c["code"] == c["id"]
    _number(c, "precision", where)
    assert 0 < c["precision"] <= 1
    _number(c, "fee", where, optional=True)
    assert isinstance(c["networks"], dict)


def ticker(exchange: Any, t: dict[str, Any], symbol: str | None = None) -> None:
    where = f"ticker {t.get('symbol')}"
    _keys(t, ["symbol", "timestamp", "datetime", "high", "low", "bid", "bidVolume", "ask",
              "askVolume", "vwap", "open", "close", "last", "previousClose", "change",
              "percentage", "average", "baseVolume", "quoteVolume", "info"], where)  # fmt: skip
    if symbol is not None:
        assert t["symbol"] == symbol
    _time(exchange, t, where)
    for key in ("high", "low", "bid", "ask", "open", "close", "last", "baseVolume"):
        _number(t, key, where, optional=True)
    if t["bid"] is not None and t["ask"] is not None:
        assert t["bid"] < t["ask"], f"{where}: crossed {t['bid']} >= {t['ask']}"
    if t["high"] is not None:
        assert t["low"] <= t["last"] <= t["high"]


def order_book(exchange: Any, book: dict[str, Any], symbol: str) -> None:
    _keys(book, ["symbol", "bids", "asks", "timestamp", "datetime", "nonce"], "order book")
    assert book["symbol"] == symbol
    for side, better in (("bids", lambda a, b: a > b), ("asks", lambda a, b: a < b)):
        levels = book[side]
        for price, amount in levels:
            assert isinstance(price, NUMBER) and isinstance(amount, NUMBER) and amount > 0
        assert all(better(levels[i][0], levels[i + 1][0]) for i in range(len(levels) - 1))
    if book["bids"] and book["asks"]:
        assert book["bids"][0][0] < book["asks"][0][0]


def trade(exchange: Any, t: dict[str, Any], symbol: str | None = None) -> None:
    where = f"trade {t.get('id')}"
    _keys(t, ["info", "id", "timestamp", "datetime", "symbol", "order", "type", "side",
              "takerOrMaker", "price", "amount", "cost", "fee"], where)  # fmt: skip
    _time(exchange, t, where)
    if symbol is not None:
        assert t["symbol"] == symbol
    assert t["side"] in ("buy", "sell")
    assert t["takerOrMaker"] in ("taker", "maker")
    for key in ("price", "amount", "cost"):
        _number(t, key, where)
    assert abs(t["price"] * t["amount"] - t["cost"]) < 1e-9 * max(1.0, t["cost"])


def my_trade(exchange: Any, t: dict[str, Any], symbol: str | None = None) -> None:
    trade(exchange, t, symbol)
    assert isinstance(t["order"], str) and t["order"]
    fee = t["fee"]
    _keys(fee, ["cost", "currency"], f"trade {t['id']}.fee")
    _number(fee, "cost", f"trade {t['id']}.fee")
    assert fee["cost"] >= 0 and fee["currency"] in exchange.currencies


def ohlcv(exchange: Any, rows: list[list[Any]], timeframe: str) -> None:
    step = TIMEFRAMES_MS[timeframe]
    for row in rows:
        assert len(row) == 6, row
        stamp, open_, high, low, close, volume = row
        assert isinstance(stamp, int) and stamp % step == 0, row
        assert all(isinstance(v, NUMBER) for v in row[1:]), row
        assert low <= min(open_, close) <= max(open_, close) <= high and volume >= 0, row
    stamps = [row[0] for row in rows]
    assert stamps == sorted(set(stamps)), "candles oldest first, one per interval"


def balance(exchange: Any, b: dict[str, Any]) -> None:
    _keys(b, ["info", "free", "used", "total", "timestamp", "datetime"], "balance")
    for code, account in b.items():
        if code in ("info", "free", "used", "total", "timestamp", "datetime"):
            continue
        assert code in exchange.currencies, code
        _keys(account, ["free", "used", "total"], f"balance {code}")
        assert account["free"] + account["used"] == account["total"], (code, account)
        assert (b["free"][code], b["used"][code], b["total"][code]) == (
            account["free"], account["used"], account["total"])  # fmt: skip


STATUSES = ("open", "closed", "canceled", "expired", "rejected")


def order(exchange: Any, o: dict[str, Any], symbol: str | None = None) -> None:
    where = f"order {o.get('id')}"
    _keys(o, ["info", "id", "clientOrderId", "timestamp", "datetime", "lastTradeTimestamp",
              "symbol", "type", "timeInForce", "postOnly", "side", "price", "triggerPrice",
              "amount", "cost", "average", "filled", "remaining", "status", "fee", "trades"],
          where)  # fmt: skip
    assert isinstance(o["id"], str) and o["id"]
    _time(exchange, o, where)
    if symbol is not None:
        assert o["symbol"] == symbol
    assert o["type"] in ("limit", "market")
    assert o["side"] in ("buy", "sell")
    assert o["timeInForce"] in ("GTC", "IOC", "FOK", "PO", "GTD")
    assert o["postOnly"] in (True, False)
    assert o["status"] in STATUSES
    for key in ("filled", "remaining", "cost"):
        _number(o, key, where)
        assert o[key] >= 0
    _number(o, "price", where, optional=o["type"] == "market")
    _number(o, "average", where, optional=True)
    if o["amount"] is not None:
        assert abs(o["filled"] + o["remaining"] - o["amount"]) < 1e-12 or o["status"] != "open"
        assert o["amount"] >= o["filled"]
    if o["fee"] is not None:
        _keys(o["fee"], ["cost", "currency"], f"{where}.fee")


def transaction(exchange: Any, t: dict[str, Any], kind: str) -> None:
    where = f"{kind} {t.get('id')}"
    _keys(t, ["info", "id", "txid", "timestamp", "datetime", "network", "address",
              "addressTo", "addressFrom", "tag", "tagTo", "tagFrom", "type", "amount",
              "currency", "status", "updated", "comment", "fee"], where)  # fmt: skip
    assert t["type"] == kind
    _time(exchange, t, where)
    _number(t, "amount", where)
    assert t["amount"] > 0
    assert t["currency"] in exchange.currencies
    assert t["status"] in ("pending", "ok", "failed", "canceled")
    if t["fee"] is not None:
        _keys(t["fee"], ["cost", "currency"], f"{where}.fee")


def deposit_address(exchange: Any, a: dict[str, Any], code: str) -> None:
    _keys(a, ["info", "currency", "network", "address", "tag"], "deposit address")
    assert a["currency"] == code
    assert isinstance(a["address"], str) and a["address"]


def trading_fee(exchange: Any, f: dict[str, Any], symbol: str) -> None:
    _keys(f, ["info", "symbol", "maker", "taker", "percentage", "tierBased"], "trading fee")
    assert f["symbol"] == symbol
    _number(f, "maker", "trading fee")
    _number(f, "taker", "trading fee")
    assert 0 <= f["maker"] <= f["taker"] < 1
