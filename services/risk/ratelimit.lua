-- Order token buckets, taken atomically: one script call is one step for all
-- the buckets it names (risk sends the takes of concurrent checks together).
--
-- KEYS[i]        a bucket (a hash: tokens in micro-tokens, ts in microseconds)
-- ARGV[2i - 1]   its rate: tokens per second, also its size (burst = 1 s of rate)
-- ARGV[2i]       the cost in tokens (1 per order command)
--
-- Returns, per key, {allowed (0/1), remaining micro-tokens, retry after in
-- microseconds}, flattened. Integers only (micro-units), so a double never
-- rounds a token away. The clock is Redis's own (TIME), so replicas of risk
-- with skewed clocks share one bucket. A missing key is a full bucket: losing
-- Redis forgives at most one burst. A key named twice is taken twice, in order.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}

for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i]) * 1000000
  local size = rate * 1000000
  local state = redis.call('HMGET', key, 'tokens', 'ts')
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
  redis.call('HSET', key, 'tokens', string.format('%d', tokens), 'ts', string.format('%d', now))
  redis.call('PEXPIRE', key, 2000)
  out[3 * i - 2] = allowed
  out[3 * i - 1] = tokens
  out[3 * i] = retry
end
return out
