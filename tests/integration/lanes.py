"""Shared pieces of the lanes scenario: tests/integration/test_lanes.py (wide margins, in CI)
and tests/bench/lanes.py (the figures, medians of several rounds)."""

import json
import re
import statistics
import time

import harness
from harness import T, wait_for

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


def up(url):
    try:
        return harness.http("GET", url + "/healthz")[0] == 200
    except Exception:
        return False


def scenario(st):
    """Runs the scenario on a fresh stack: returns (idle latency ms, interactive latencies under
    the bulk backlog, bulk jobs/s alone, bulk jobs/s with the interactive jobs running)."""
    st.redis()
    st.devkafka(brokers=1, partitions=8)
    s = st.sim("a")
    s.set_state({"latency_ms": 50})
    port = harness.free_port()
    path, _ = st.config(extra={"worker": {"metrics_listen": "127.0.0.1:%d" % port},
                               "kafka": {"max.partition.fetch.bytes": "65536",
                                         "fetch.max.bytes": "1000000"}})
    st.spawn("promptq-worker", "--config", path, name="worker")
    url = "http://127.0.0.1:%d" % port
    wait_for(lambda: up(url), T(20), "the worker's metrics endpoint")
    # idle interactive latency (the first also waits for the group join)
    probe_latencies(st, send_probes(st, "warm", 1, 0))
    idle = statistics.median(probe_latencies(st, send_probes(st, "idle", 6, 0.2)))
    rate_alone, _ = run_bulk(st, url, "alone", 8000)
    rate_loaded, probes = run_bulk(
        st, url, "loaded", 20000, during=lambda: send_probes(st, "busy", 20, 0.2))
    return idle, probe_latencies(st, probes), rate_alone, rate_loaded
