-- The balance owner is match's writer (ADR 0013): it settles each trade in the
-- commit that journals it, so there is no consumer of match events whose
-- position to keep. (settled_trades stays: the unique key that makes settling
-- a trade twice fail the commit.)
DROP TABLE market_cursors;
