-- auth measures every account's traded volume over the last 30 days
-- (ListTradedVolumes, ADR 0016): the fills of a time window, without a scan of
-- all history.
CREATE INDEX fills_by_time ON fills (trade_time);
