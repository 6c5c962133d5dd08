"""promptq-worker runs its Redis scripts by SHA1 (EVALSHA, loaded at connect). SCRIPT FLUSH
empties Redis's script cache while jobs are in flight: every step then answered NOSCRIPT did not
run, and goes again once as EVAL with the script's text. Each job still succeeds exactly once:
one provider call, one terminal record, one result on promptq.results (G2, G3).
"""

import collections
import json

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"


def envelope(job_id):
    return {"id": job_id,
            "request": {"model": "sim-model",
                        "messages": [{"role": "user", "content": "noscript " + job_id}]}}


def results(st):
    out = collections.defaultdict(list)
    for m in st.consume_all(RESULTS):
        d = json.loads(m["value"])
        out[d["id"]].append(d)
    return out


def wait_results(st, ids, timeout):
    want = set(ids)
    got = {}

    def have_all():
        got.clear()
        got.update(results(st))
        return want <= set(got)

    try:
        wait_for(have_all, timeout, "results for %d jobs" % len(want), interval=0.5)
    except AssertionError:
        missing = sorted(want - set(got))
        raise AssertionError("%d of %d jobs without a result, e.g. %s" %
                             (len(missing), len(want), missing[:5]))
    return got


def test_script_flush_mid_run():
    """Jobs before, during (provider calls in flight, lease renewals due: their finish and renew
    scripts meet the empty cache) and after a SCRIPT FLUSH (their begin scripts meet it)."""
    with harness.Stack("worker_noscript") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = st.sim("a")
        path, _ = st.config(extra={"worker": {"lease_ms": 1500}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")

        before = ["ns-a-%02d" % i for i in range(20)]
        st.produce(REQ, [envelope(i) for i in before], keys=before)
        wait_results(st, before, T(60))
        assert r.cli("SCRIPT", "EXISTS", "0" * 40) == "0"

        # provider calls of 1.2 s: their leases (1.5 s, renewed every 0.5 s) renew after the flush
        s.set_state({"mode": "ok", "latency_ms": 1200})
        during = ["ns-b-%02d" % i for i in range(20)]
        st.produce(REQ, [envelope(i) for i in during], keys=during)
        wait_for(lambda: s.stats()["inflight"] >= 10, T(20), "provider calls in flight")
        assert r.cli("SCRIPT", "FLUSH") == "OK"
        wait_results(st, during, T(60))

        s.set_state({"mode": "ok", "latency_ms": 0})
        assert r.cli("SCRIPT", "FLUSH") == "OK"
        after = ["ns-c-%02d" % i for i in range(20)]
        st.produce(REQ, [envelope(i) for i in after], keys=after)
        got = wait_results(st, after, T(60))

        ids = before + during + after
        got = results(st)
        for i in ids:
            assert len(got[i]) == 1, "%s: %d results" % (i, len(got[i]))
            assert got[i][0]["status"] == "succeeded", got[i][0].get("error")
            assert got[i][0]["attempts"] == 1, got[i][0]
            assert r.cli("HGET", "promptq:job:default:" + i, "status") == "succeeded"
            assert r.cli("HGET", "promptq:job:default:" + i, "deliveries") == "1"
            ttl = int(r.cli("PTTL", "promptq:job:default:" + i))
            assert ttl > 0, "%s: record without a TTL (%d)" % (i, ttl)
            assert r.cli("EXISTS", "promptq:lease:default:" + i) == "0"
        assert s.stats()["requests"] == len(ids), "a job was called twice"
        log = open(w.log_path).read()
        assert "NOSCRIPT" in log, "the flush was never seen: nothing tested"
        stats = r.cli("INFO", "commandstats")
        assert "cmdstat_eval:" in stats, "no step was re-sent as EVAL"
        assert w.stop(T(15)) == 0


harness.run(globals())
