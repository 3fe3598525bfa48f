"""The raw REST endpoints as CCXT's implicit API (`exchange.private_post_v1_orders(...)`),
one per `google.api.http` binding of the v1 protos that a user's key may call.
Params are the protos' JSON fields; path fields ({market}) are taken from them.
The unified methods (fetch_ticker, create_order, ...) are built on these paths."""

from __future__ import annotations

from ccxt.base.types import Entry

__all__ = ["ImplicitAPI"]

_ONE = {"cost": 1}


class ImplicitAPI:
    public_get_v1_markets = publicGetV1Markets = Entry("v1/markets", "public", "GET", _ONE)
    public_get_v1_markets_market = publicGetV1MarketsMarket = Entry(
        "v1/markets/{market}", "public", "GET", _ONE
    )
    public_get_v1_markets_market_book = publicGetV1MarketsMarketBook = Entry(
        "v1/markets/{market}/book", "public", "GET", _ONE
    )
    public_get_v1_markets_market_trades = publicGetV1MarketsMarketTrades = Entry(
        "v1/markets/{market}/trades", "public", "GET", _ONE
    )
    public_get_v1_markets_market_ticker = publicGetV1MarketsMarketTicker = Entry(
        "v1/markets/{market}/ticker", "public", "GET", _ONE
    )
    public_get_v1_markets_tickers = publicGetV1MarketsTickers = Entry(
        "v1/markets/-/tickers", "public", "GET", _ONE
    )
    public_get_v1_markets_market_candles = publicGetV1MarketsMarketCandles = Entry(
        "v1/markets/{market}/candles", "public", "GET", _ONE
    )
    public_post_v1_tokens = publicPostV1Tokens = Entry("v1/tokens", "public", "POST", _ONE)
    private_get_v1_fees = privateGetV1Fees = Entry("v1/fees", "private", "GET", _ONE)
    private_get_v1_balances = privateGetV1Balances = Entry("v1/balances", "private", "GET", _ONE)
    private_get_v1_orders = privateGetV1Orders = Entry("v1/orders", "private", "GET", _ONE)
    private_get_v1_orders_order_id = privateGetV1OrdersOrderId = Entry(
        "v1/orders/{order_id}", "private", "GET", _ONE
    )
    private_get_v1_orders_lookup = privateGetV1OrdersLookup = Entry(
        "v1/orders:lookup", "private", "GET", _ONE
    )
    private_get_v1_fills = privateGetV1Fills = Entry("v1/fills", "private", "GET", _ONE)
    private_post_v1_orders = privatePostV1Orders = Entry("v1/orders", "private", "POST", _ONE)
    private_post_v1_orders_batchplace = privatePostV1OrdersBatchPlace = Entry(
        "v1/orders:batchPlace", "private", "POST", _ONE
    )
    private_post_v1_orders_order_id_amend = privatePostV1OrdersOrderIdAmend = Entry(
        "v1/orders/{order_id}:amend", "private", "POST", _ONE
    )
    private_post_v1_orders_order_id_cancel = privatePostV1OrdersOrderIdCancel = Entry(
        "v1/orders/{order_id}:cancel", "private", "POST", _ONE
    )
    private_post_v1_orders_cancelall = privatePostV1OrdersCancelAll = Entry(
        "v1/orders:cancelAll", "private", "POST", _ONE
    )
    private_post_v1_orders_cancelallafter = privatePostV1OrdersCancelAllAfter = Entry(
        "v1/orders:cancelAllAfter", "private", "POST", _ONE
    )
    private_get_v1_depositaddresses_asset = privateGetV1DepositAddressesAsset = Entry(
        "v1/depositAddresses/{asset}", "private", "GET", _ONE
    )
    private_get_v1_deposits = privateGetV1Deposits = Entry("v1/deposits", "private", "GET", _ONE)
    private_get_v1_deposits_deposit_id = privateGetV1DepositsDepositId = Entry(
        "v1/deposits/{deposit_id}", "private", "GET", _ONE
    )
    private_get_v1_withdrawals = privateGetV1Withdrawals = Entry(
        "v1/withdrawals", "private", "GET", _ONE
    )
    private_get_v1_withdrawals_withdrawal_id = privateGetV1WithdrawalsWithdrawalId = Entry(
        "v1/withdrawals/{withdrawal_id}", "private", "GET", _ONE
    )
    private_post_v1_withdrawals = privatePostV1Withdrawals = Entry(
        "v1/withdrawals", "private", "POST", _ONE
    )
    private_post_v1_withdrawals_withdrawal_id_cancel = (
        privatePostV1WithdrawalsWithdrawalIdCancel
    ) = Entry("v1/withdrawals/{withdrawal_id}:cancel", "private", "POST", _ONE)
