-- wrk script: POST bodies read from a file (one JSON body per line), round-robin per
-- thread, so the farm never sees one cached body; or, with GET as the file, plain GETs.
--   wrk -t4 -c100 -d10s -s benchmarks/wrk/bodies.lua http://127.0.0.1:8080/predict -- bodies.txt
--   wrk -t4 -c100 -d10s -s benchmarks/wrk/bodies.lua http://127.0.0.1:8080/hello -- GET
local bodies = {}
local i = 0
local get_only = false

function init(args)
    local path = args[1] or error("usage: -- BODIES_FILE | GET")
    if path == "GET" then
        get_only = true
        return
    end
    for line in io.lines(path) do
        bodies[#bodies + 1] = line
    end
    if #bodies == 0 then error("no bodies in " .. path) end
    i = math.random(#bodies)
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
end

function request()
    if get_only then return wrk.format("GET") end
    i = i % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[i])
end

function done(summary, latency, requests)
    local errs = summary.errors
    io.write(string.format(
        "JSON {\"requests\":%d,\"duration_us\":%d,\"rps\":%.1f,\"non2xx\":%d,"
        .. "\"socket_errors\":%d,\"mean_ms\":%.3f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,"
        .. "\"p95_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f}\n",
        summary.requests, summary.duration, summary.requests / summary.duration * 1e6,
        errs.status, errs.connect + errs.read + errs.write + errs.timeout,
        latency.mean / 1000, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
        latency:percentile(95) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
