#!/usr/bin/env python3
"""Worker throughput with failover: jobs/s for N jobs on a route whose first target is down vs one whose targets are all up.
Each round is one stack (devkafka keeps ~5 MB per partition): warm-up, then "up" and "down"
back to back; median of 3 rounds.

    PQ_BIN_DIR=build/bin N=5000 python3 tests/bench/failover.py

Jobs are produced straight to promptq.requests with kcat (no broker); the clock runs from the
start of producing to the last result read from promptq.results. The "down" route's first target
is a promptq-sim in mode down (connections refused): its circuit opens after a few failures and
later jobs skip it without a call."""
import json, os, statistics, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness
from harness import T

N = int(os.environ.get("N", "5000"))
REQ, RESULTS = "promptq.requests", "promptq.results"
figs = {"up": [], "down": []}
for rnd in range(3):
    with harness.Stack("bench_failover_%d" % rnd) as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        a, b, d = st.sim("a"), st.sim("b"), st.sim("d")
        d.set_state({"mode": "down"})
        providers = {"a": {"type": "openai", "base_url": a.api},
                     "b": {"type": "anthropic", "base_url": b.url},
                     "d": {"type": "openai", "base_url": d.api}}
        routes = {"up": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}],
                  "down": [{"provider": "d", "model": "m"}, {"provider": "b", "model": "m"}]}
        path, _ = st.config(providers=providers, routes=routes, extra={"worker": {"lease_ms": 30000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        warm = [{"id": "warm-%d" % i, "request": {"model": "up", "messages": [{"role": "user", "content": "w"}]}} for i in range(300)]
        st.produce(REQ, warm, keys=[e["id"] for e in warm])
        st.consume(RESULTS, 300, timeout=T(60))
        total = 300
        for route in ("up", "down"):
            envs = [{"id": "%s-%d" % (route, i),
                     "request": {"model": route, "messages": [{"role": "user", "content": "job %d" % i}]}}
                    for i in range(N)]
            t0 = time.monotonic()
            st.produce(REQ, envs, keys=[e["id"] for e in envs])
            total += N
            msgs = st.consume(RESULTS, total, timeout=T(300))
            dt = time.monotonic() - t0
            assert len(msgs) >= total, (len(msgs), total)
            provs = sorted({json.loads(m["value"])["provider"] for m in msgs[-100:]})
            figs[route].append(N / dt)
            print("round %d %-4s %6.0f jobs/s (%.2f s) served by %s" % (rnd, route, N / dt, dt, provs), flush=True)
        print("sim requests a=%d b=%d" % (a.stats()["requests"], b.stats()["requests"]))
for route in ("up", "down"):
    print("median %-4s %6.0f jobs/s  (%s)" % (route, statistics.median(figs[route]),
          ", ".join("%.0f" % f for f in figs[route])))
