-- wrk script for bench/run.py: POST /v1/chat/completions as many users.
--
--   BENCH_TOKENS_FILE=tokens.txt BENCH_STREAM_RATIO=0.5 BENCH_THINK_MS=0 \
--     wrk -t1 -c16 -d12s --latency -s bench/chat.lua http://127.0.0.1:PORT/v1/chat/completions
--
-- BENCH_TOKENS_FILE has one JWT per line (one per user); requests rotate over the users.
-- A deterministic share BENCH_STREAM_RATIO (0..1) of requests asks for `"stream": true`;
-- BENCH_STREAM_CHUNKS asks the fast upstream for that many SSE chunks per streamed answer
-- (realistic answers are hundreds of chunks; each one crosses the processor).
-- BENCH_JSON_MAX_TOKENS > 0 gives the JSON requests that max_tokens (0: none).
-- BENCH_THINK_MS > 0 paces each connection: it waits an exponentially distributed think
-- time with that mean before each request (a "moderate load" instead of flat out).
-- Configuration comes from the environment because wrk decides whether a script paces
-- (has a global delay()) before init() sees any arguments.
-- Every request is formatted once in init(), so request() costs one table lookup.
-- done() prints one machine-readable line, `BENCH_JSON {...}`, that run.py parses
-- (latencies in microseconds; `status` counts non-2xx/3xx responses).

local plain = {}
local streamed = {}
local n = 0
local idx = 0
local ratio = 0
local acc = 0
local thread_count = 0
local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "0") or 0

if think_ms > 0 then
  function delay()
    return math.floor(-think_ms * math.log(1 - math.random()) + 0.5)
  end
end

local BODY = nil  -- made in init(): its max_tokens comes from the environment
local STREAM_BODY = nil  -- made in init(): the chunk count comes from the environment

function setup(thread)
  thread:set("thread_id", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  local path = os.getenv("BENCH_TOKENS_FILE")
  ratio = tonumber(os.getenv("BENCH_STREAM_RATIO") or "0") or 0
  local chunks = tonumber(os.getenv("BENCH_STREAM_CHUNKS") or "3") or 3
  -- max_tokens: a bounded stream, which the gate hands to Envoy (docs/streams.md)
  STREAM_BODY = '{"model":"gpt-4o-mini","stream":true,"max_tokens":256,"x_test":{"chunks":' .. chunks .. '},'
    .. '"messages":[{"role":"user","content":'
    .. '"Say hello to the Solaris benchmark in one short sentence, please."}]}'
  -- BENCH_JSON_MAX_TOKENS > 0: bounded JSON answers, which the gate hands to Envoy
  local json_max = tonumber(os.getenv("BENCH_JSON_MAX_TOKENS") or "0") or 0
  local bound = ''
  if json_max > 0 then
    bound = '"max_tokens":' .. json_max .. ','
  end
  BODY = '{"model":"gpt-4o-mini",' .. bound .. '"messages":[{"role":"user","content":'
    .. '"Say hello to the Solaris benchmark in one short sentence, please."}]}'
  math.randomseed(os.time() + (thread_id or 0))
  for line in io.lines(path) do
    if #line > 0 then
      n = n + 1
      local headers = {
        ["Content-Type"] = "application/json",
        ["Authorization"] = "Bearer " .. line,
      }
      plain[n] = wrk.format("POST", "/v1/chat/completions", headers, BODY)
      streamed[n] = wrk.format("POST", "/v1/chat/completions", headers, STREAM_BODY)
    end
  end
  if n == 0 then
    error("no tokens in " .. tostring(path))
  end
  -- Threads start at different users so they do not march in lock step.
  idx = ((thread_id or 0) * 7919) % n
end

function request()
  idx = idx % n + 1
  acc = acc + ratio
  if acc >= 1 then
    acc = acc - 1
    return streamed[idx]
  end
  return plain[idx]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
      .. '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
