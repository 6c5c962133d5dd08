"""Flow control (DESIGN.md §8): consumption never sits idle while the worker has free slots.

With worker.max_inflight 50 and a provider answering in 200 ms, 500 jobs need 500 / (slots / 0.2 s)
seconds: 2.0 s on promptq.requests (50 slots), 2.3 s on promptq.bulk (44: an eighth is kept for
the interactive lane). Before the worker fetched into a backlog, it paused its consumer at the cap
and librdkafka 2.0.2 did not fetch again until something else woke its broker thread (a metadata
refresh, a heartbeat): the same 500 bulk jobs took 14.8 s here (34 jobs/s). The bound below is
2.5 x the ideal + 1 s (loaded machines), scaled by PQ_TIMEOUT_MULT; the stalled worker needs 6 x.
"""

import re
import time

import harness
from harness import T, wait_for

LATENCY_MS = 200
MAX_INFLIGHT = 50
JOBS = 500


def envelope(job_id):
    return {"id": job_id,
            "request": {"model": "sim-model", "messages": [{"role": "user", "content": "f"}]}}


def succeeded(url):
    _, _, body = harness.http("GET", url + "/metrics")
    text = body.decode() if isinstance(body, bytes) else body
    m = re.search(r'^promptq_worker_jobs_total\{outcome="succeeded"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def up(url):
    try:
        return harness.http("GET", url + "/healthz")[0] == 200
    except Exception:
        return False


def run(st, url, topic, prefix, slots):
    base = succeeded(url)
    ids = ["%s-%04d" % (prefix, i) for i in range(JOBS)]
    t0 = time.monotonic()
    st.produce(topic, [envelope(i) for i in ids], keys=ids)
    ideal = JOBS / (slots * 1000.0 / LATENCY_MS)
    bound = T(2.5 * ideal + 1.0)
    wait_for(lambda: succeeded(url) >= base + JOBS, max(bound, T(60)), "%d jobs" % JOBS,
             interval=0.05)
    took = time.monotonic() - t0
    print("%s: %d jobs in %.2f s (%.0f jobs/s; ideal %.2f s, bound %.2f s)" %
          (topic, JOBS, took, JOBS / took, ideal, bound), flush=True)
    assert took <= bound, "consumption stalled: %.2f s for %d jobs, ideal %.2f s" % (
        took, JOBS, ideal)


def test_no_stall_at_max_inflight():
    with harness.Stack("flow") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = st.sim("a")
        s.set_state({"mode": "ok", "latency_ms": LATENCY_MS})
        port = harness.free_port()
        path, _ = st.config(
            providers={"sim": {"type": "openai", "base_url": s.api, "max_concurrency": 0}},
            extra={"worker": {"max_inflight": MAX_INFLIGHT,
                              "metrics_listen": "127.0.0.1:%d" % port}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        url = "http://127.0.0.1:%d" % port
        wait_for(lambda: up(url), T(20), "worker /healthz")
        # the worker's one group member has its partitions: nothing rebalances inside a run
        wait_for(lambda: "on_rebalance: assigned" in open(w.log_path).read(), T(30),
                 "partitions assigned")
        warm = ["warm-%d" % i for i in range(8)]
        st.produce("promptq.bulk", [envelope(i) for i in warm], keys=warm)
        st.produce("promptq.requests", [envelope("i" + i) for i in warm], keys=warm)
        wait_for(lambda: succeeded(url) >= 16, T(30), "warm-up jobs")
        run(st, url, "promptq.bulk", "bulk", MAX_INFLIGHT - MAX_INFLIGHT // 8)
        run(st, url, "promptq.requests", "req", MAX_INFLIGHT)
        assert len(st.consume_all("promptq.dlq")) == 0


harness.run(globals())
