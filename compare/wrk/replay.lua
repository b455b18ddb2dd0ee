-- Every request a replay: POST with one fixed body and one Idempotency-Key, the same for
-- every request of every connection (against a path without the layer the header means
-- nothing). The compare tool records the key first with the same request, and passes the
-- body and the key after `--`, so both come from one place:
--
--   wrk -t2 -c64 -d5s -s replay.lua http://127.0.0.1:PORT/idem -- '{"sku":"book"}' '"bench-1"'

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

-- Runs in each wrk thread before its request is formatted.
function init(args)
   wrk.body = args[1]
   wrk.headers["Idempotency-Key"] = args[2]
end
