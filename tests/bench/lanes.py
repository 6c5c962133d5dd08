#!/usr/bin/env python3
"""Benchmark of the lanes (DESIGN.md §8): the interactive lane (promptq.requests) is served before the bulk lane
(promptq.bulk). With a 20,000-line backlog on promptq.bulk against a sim answering in ~50 ms, an
interactive job's latency stays within 2x of its idle latency, while the bulk backlog keeps at
least half of its unloaded rate. Envelopes are produced straight to the topics with kcat (small
prompts, 8 partitions: well inside devkafka's ~5 MB per partition)."""

import json
import re
import statistics
import time

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import T, wait_for  # noqa: E402

REQ = "promptq.requests"
BULK = "promptq.bulk"
RESULTS = "promptq.results"


def envelope(job_id, prompt):
    return {"id": job_id,
            "request": {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}}


def succeeded(url):
    _, _, body = harness.http("GET", url + "/metrics")
    text = body.decode() if isinstance(body, bytes) else body
    m = re.search(r'^promptq_worker_jobs_total\{outcome="succeeded"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def produce_bulk(st, prefix, n):
    ids = ["%s-%05d" % (prefix, i) for i in range(n)]
    st.produce(BULK, [envelope(i, "b") for i in ids], keys=ids)


def probe_latencies(st, ids):
    """latency_ms of the probes' results (created = the Kafka timestamp kcat set)."""
    got = {}

    def have():
        for m in st.consume_all(RESULTS):
            d = json.loads(m["value"])
            if d.get("id") in ids:
                got[d["id"]] = d
        return len(got) == len(ids)

    wait_for(have, T(60), "the probes' results", interval=0.5)
    assert all(d["status"] == "succeeded" for d in got.values())
    for i in ids:
        d = got[i]
    return [got[i]["latency_ms"] for i in ids]


def send_probes(st, prefix, n, gap):
    ids = []
    for i in range(n):
        jid = "%s-%02d" % (prefix, i)
        st.produce(REQ, [envelope(jid, "i")], keys=[jid])
        ids.append(jid)
        time.sleep(gap)
    return ids


def run_bulk(st, url, prefix, n, during=None):
    """Produces n bulk jobs, returns (jobs/s, whatever during() returned)."""
    base = succeeded(url)
    produce_bulk(st, prefix, n)
    t0 = time.monotonic()
    out = during() if during else None
    wait_for(lambda: succeeded(url) >= base + n, T(90), "%d bulk jobs" % n, interval=0.05)
    return n / (time.monotonic() - t0), out


def one_round(n):
    with harness.Stack("bench-lanes-%d" % n) as st:
        st.redis()
        st.devkafka(brokers=1, partitions=8)
        s = st.sim("a")
        s.set_state({"latency_ms": 50})
        port = harness.free_port()
        path, _ = st.config(extra={"worker": {"metrics_listen": "127.0.0.1:%d" % port},
                                   "kafka": {"max.partition.fetch.bytes": "65536", "fetch.max.bytes": "1000000"}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        url = "http://127.0.0.1:%d" % port
        wait_for(lambda: _up(url), T(20), "the worker's metrics endpoint")
        # idle interactive latency (the first also waits for the group join)
        warm = send_probes(st, "warm", 1, 0)
        probe_latencies(st, warm)
        idle = statistics.median(probe_latencies(st, send_probes(st, "idle", 6, 0.2)))
        rate_alone, _ = run_bulk(st, url, "alone", 8000)
        rate_loaded, probes = run_bulk(
            st, url, "loaded", 20000, during=lambda: send_probes(st, "busy", 20, 0.2))
        lat = probe_latencies(st, probes)
        fig = {"idle_ms": idle, "loaded_median_ms": statistics.median(lat),
               "loaded_max_ms": max(lat), "bulk_alone": round(rate_alone),
               "bulk_loaded": round(rate_loaded), "load": os.getloadavg()[0]}
        print("ROUND %d %s" % (n, json.dumps(fig)), flush=True)
        return fig


def _up(url):
    try:
        return harness.http("GET", url + "/healthz")[0] == 200
    except Exception:
        return False


if __name__ == "__main__":
    rounds = [one_round(i + 1) for i in range(int(os.environ.get("ROUNDS", "3")))]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print("MEDIAN %s" % json.dumps(med))
    print("interactive under load / idle: %.2fx (target <= 2x); bulk with probes / alone: "
          "%.2f (target >= 0.5)" % (med["loaded_median_ms"] / med["idle_ms"],
                                    med["bulk_loaded"] / med["bulk_alone"]))
