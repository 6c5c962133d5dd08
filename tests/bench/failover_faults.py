#!/usr/bin/env python3
"""Provider faults as a new user meets them: promptq's DEFAULTS (only base_url and a key set),
one OpenAI-compatible provider with a primary and a fallback model, an unrelated route on the
same provider, calls through the broker's sync chat (plain and stream: true), every fault one
after another on one stack. Prints, per fault, the client's wall time (median of the runs), the
answer (model or error code) and the attempts per model read from the job record.

    PQ_BIN_DIR=build/bin RUNS=3 python3 tests/bench/failover_faults.py

The silent-provider case waits for the budget cut (broker.sync_timeout_ms 50 s - 1 s, less the
10 s reserve for the fallback: about 39 s), so a run takes a few minutes."""
import json, os, statistics, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness
from harness import T, wait_for

RUNS = int(os.environ.get("RUNS", "3"))
KEY = "bench-key"
AUTH = {"Authorization": "Bearer " + KEY}


def chat(st, route, prompt, stream=False):
    body = {"model": route, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    t0 = time.monotonic()
    status, hdrs, raw = harness.http("POST", st.broker_url + "/v1/chat/completions", body, AUTH,
                                     timeout=T(120))
    took = time.monotonic() - t0
    if stream and status == 200:
        ev = [json.loads(l[6:]) for l in raw.decode().splitlines()
              if l.startswith("data: ") and l != "data: [DONE]"]
        what = ev[0]["model"] if ev else "?"
    else:
        doc = json.loads(raw) if raw else {}
        what = doc.get("model") if status == 200 else "%d %s" % (status, doc["error"].get("code"))
    return took, what, hdrs.get("x-promptq-job-id")


def attempts(st, jid):
    rec = {}

    def done():
        s, _, d = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=AUTH)
        if s == 200 and d["status"] not in ("queued", "running", "parked"):
            rec.update(d)
            return True
        return False
    wait_for(done, T(120), "job %s" % jid, interval=0.2)
    per = {}
    for a in rec.get("attempt_log", []):
        if a.get("class") != "skip":
            per[a["model"]] = per.get(a["model"], 0) + 1
    return " ".join("%s×%d" % kv for kv in per.items())


FAULTS = [
    ("429 without Retry-After on the primary", {"mode": "rate_limit", "retry_after": None}, False),
    ("  same, stream: true", {"mode": "rate_limit", "retry_after": None}, True),
    ("Retry-After: 9999999 on the primary", {"mode": "rate_limit", "retry_after": "9999999"},
     False),
    ("silent primary (accepts, never answers)", {"mode": "hang"}, False),
    ("content_filter (400)", {"mode": "error", "status": 400, "error_code": "content_filter",
                              "error_message": "filtered by policy"}, False),
    ("context_length_exceeded (400)", {"mode": "error", "status": 400,
                                       "error_code": "context_length_exceeded",
                                       "error_message": "maximum context length is 8192"}, False),
    ("other 400 (invalid_value)", {"mode": "error", "status": 400, "error_code": "invalid_value",
                                   "error_message": "bad value"}, False),
]

rows = {}
for rnd in range(RUNS):
    with harness.Stack("bench_faults_%d" % rnd) as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        sim = st.sim("p")
        providers = {"p": {"type": "openai", "base_url": sim.api, "api_key": "sk-bench"}}
        routes = {"chat": [{"provider": "p", "model": "primary"},
                           {"provider": "p", "model": "fallback"}],
                  "other": [{"provider": "p", "model": "other"}]}
        path, _ = st.config(providers=providers, routes=routes,
                            extra={"broker": {"api_keys": {KEY: "t"}}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        st.broker(path)
        wait_for(lambda: chat(st, "chat", "warm")[1] == "primary", T(30), "warm-up")
        for name, state, stream in FAULTS:
            sim.set_state({"models": {"primary": state}})
            took, what, jid = chat(st, "chat", name, stream)
            other = chat(st, "other", "unrelated")[1]
            rows.setdefault(name, []).append((took, what, attempts(st, jid), other))
            sim.set_state({"mode": "ok"})
            # the primary back before the next fault (rests end within max_rest_ms)
            wait_for(lambda: chat(st, "chat", "back")[1] == "primary", T(90), "primary back")

print("%-42s %9s  %-28s %-26s %s" % ("fault (promptq defaults)", "client s", "answer",
                                     "attempts", "unrelated route"))
for name, _, _ in FAULTS:
    r = rows[name]
    print("%-42s %9.3f  %-28s %-26s %s" % (name, statistics.median(x[0] for x in r), r[0][1],
                                           r[0][2], r[0][3]))
