-- One account's order token bucket, taken atomically (one script = one step).
--
-- KEYS[1]  the bucket (a hash: tokens in micro-tokens, ts in microseconds)
-- ARGV[1]  rate: tokens per second, also the bucket's size (burst = 1 s of rate)
-- ARGV[2]  cost in tokens (1 per order command)
--
-- Returns {allowed (0/1), remaining micro-tokens, retry after in microseconds}.
-- Integers only (micro-units), so a double never rounds a token away. The clock
-- is Redis's own (TIME), so replicas of risk with skewed clocks share one bucket.
-- A missing key is a full bucket: losing Redis forgives at most one burst.

local rate = tonumber(ARGV[1])
local cost = tonumber(ARGV[2]) * 1000000
local size = rate * 1000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = size
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
if elapsed > 10000000 then elapsed = 10000000 end
tokens = math.min(size, tokens + elapsed * rate)

local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = math.ceil((cost - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%d', tokens), 'ts', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], 2000)
return {allowed, tokens, retry}
