-- W3C trace context (traceparent, tracestate) of what started a saga, so that
-- its steps are spans of the same trace whichever replica drives them, and of
-- the step that wrote an outbox event, so that the relay puts it in the
-- message's headers. NULL when tracing was off.
ALTER TABLE sagas ADD COLUMN trace_context jsonb;
ALTER TABLE outbox ADD COLUMN trace_context jsonb;
