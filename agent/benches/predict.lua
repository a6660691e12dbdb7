-- wrk script for agent/benches/serve.sh: POST single-row :predict requests.
-- BODIES (environment) names a file with one JSON request body per line; each wrk thread
-- cycles through them (a different starting line per thread). PREDICT_PATH is the path,
-- e.g. /v1/models/pdm-failure:predict. done() prints one JSON line (latencies in us).

local reqs = {}
local n, i = 0, 0
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local path = os.getenv("PREDICT_PATH")
  local headers = { ["Content-Type"] = "application/json" }
  for line in io.lines(os.getenv("BODIES")) do
    if #line > 0 then
      n = n + 1
      reqs[n] = wrk.format("POST", path, headers, line)
    end
  end
  i = (id or 0) * 37 % n
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "rps": %.1f, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f, "non2xx": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
