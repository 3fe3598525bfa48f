-- The kill switch log doubles as an outbox: each row is published once on
-- JetStream (risk.events.kill_switch) and then marked, so the order service
-- learns of every change even if risk crashes between commit and publish.
ALTER TABLE kill_switch_log ADD COLUMN published boolean NOT NULL DEFAULT false;
CREATE INDEX kill_switch_log_unpublished ON kill_switch_log (id) WHERE NOT published;
