-- A place is also known by its client's key, (account, client_order_id): the
-- writer answers a second place with the same key (whatever its order id) with
-- the first one's outcome, or refuses it if it asks for something else
-- (ADR 0013: the gateway's retry after a crash needs no record of its own).
-- Rows journaled before this have no key (NULL: not deduplicated this way).
ALTER TABLE journal ADD COLUMN client_key text;

CREATE UNIQUE INDEX journal_client_key ON journal (writer_group, client_key)
    WHERE client_key IS NOT NULL;
