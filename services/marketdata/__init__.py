"""marketdata: public views: L2 books, trades, tickers, candles."""
