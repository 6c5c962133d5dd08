"""The broker's local spool (G1): acknowledged means durable even while Kafka is unreachable.

Every scenario counts loss from acknowledged ids (202 answers) against the ids that reach
promptq.results (with a worker and a promptq-sim provider), never from Redis.
"""

import collections
import glob
import json
import os
import signal
import struct
import time

import harness
from harness import T, wait_for

RESULTS = "promptq.results"
REQUESTS = "promptq.requests"


def stack_up(st, broker=None):
    st.redis()
    st.devkafka(brokers=1, partitions=4)
    st.sim("a")
    extra = {"worker": {"lease_ms": 3000}}
    if broker:
        extra["broker"] = broker
    path, cfg = st.config(extra=extra)
    return path, cfg


def readyz(st):
    try:
        return harness.http_json("GET", st.broker_url + "/readyz", timeout=2)
    except OSError:
        return (0, {}, None)


def start_broker(st, path, kafka_up=True):
    b = st.spawn("promptq-broker", "--config", path, name="broker")

    def ok():
        status, _, doc = readyz(st)
        if not b.alive():
            return True
        return status == 200 and (not kafka_up or doc.get("kafka") == "up")

    wait_for(ok, T(20), "broker /readyz")
    assert b.alive(), "broker exited:\n" + b.tail()
    return b


def start_worker(st, path):
    return st.spawn("promptq-worker", "--config", path, name="worker")


def job(prompt, **kw):
    body = {"request": {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}}
    body.update(kw)
    return body


def submit(st, bodies, concurrency=32):
    """POSTs every body; returns [(status, headers, doc)]."""
    return harness.post_many(st.broker_url + "/v1/jobs", bodies, concurrency)


def accepted(answers, durability=None):
    bad = [a for a in answers if a[0] != 202 or
           (durability and a[2].get("durability") != durability)]
    assert not bad, "%d answers not 202 %s, first: %r" % (len(bad), durability or "", bad[:3])
    return [a[2]["id"] for a in answers]


def metric(st, name, labels=""):
    status, _, raw = harness.http("GET", st.broker_url + "/metrics")
    assert status == 200
    want = name + ("{" + labels + "}" if labels else "")
    for line in raw.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def segments(cfg):
    return sorted(glob.glob(os.path.join(cfg["broker"]["spool_dir"], "spool-*.log")))


def results_by_id(st, want_ids, timeout):
    """Reads promptq.results until every wanted id is there; returns {id: [records]}."""
    want = set(want_ids)
    by_id = collections.defaultdict(list)

    def scan():
        by_id.clear()
        for m in st.consume_all(RESULTS):
            rec = json.loads(m["value"])
            by_id[rec["id"]].append(rec)
        return want <= set(by_id)

    try:
        wait_for(scan, timeout, "results for %d ids" % len(want), interval=1.0)
    except AssertionError:
        missing = want - set(by_id)
        raise AssertionError("lost %d of %d acknowledged ids, e.g. %s" %
                             (len(missing), len(want), sorted(missing)[:5]))
    return by_id


def outcome(rec):
    body = rec.get("response") if rec["status"] == "succeeded" else rec.get("error")
    return json.dumps([rec["status"], body], sort_keys=True)


def assert_succeeded_once(by_id, ids):
    for jid in ids:
        recs = by_id[jid]
        assert recs[0]["status"] == "succeeded", recs[0]
        outs = {outcome(r) for r in recs}
        assert len(outs) == 1, "id %s has %d different outcomes" % (jid, len(outs))


def log_text(p):
    with open(p.log_path, errors="replace") as f:
        return f.read()


def test_kafka_up_never_spools():
    with harness.Stack("spool-kafka-up") as st:
        path, cfg = stack_up(st)
        start_broker(st, path)
        ids = accepted(submit(st, [job("up %d" % i) for i in range(1000)]), "kafka")
        assert len(set(ids)) == 1000
        assert segments(cfg) == [], segments(cfg)
        assert metric(st, "promptq_broker_jobs_accepted_total", 'durability="spooled"') == 0
        assert metric(st, "promptq_broker_spool_committed_total") == 0
        msgs = st.consume(REQUESTS, 1000, timeout=T(30))
        assert {m["key"] for m in msgs} == set(ids)
        # a second broker on the same spool dir refuses to start, naming the holder
        other = st.spawn("promptq-broker", "--config", path, name="broker-2")
        assert other.wait(T(10)) != 0
        assert "is locked by pid" in log_text(other), other.tail()


def test_outage_spools_then_drains_to_results():
    with harness.Stack("spool-outage") as st:
        path, cfg = stack_up(st)
        start_broker(st, path)
        st.kafka_.control("down -1")
        t0 = time.monotonic()
        ids = accepted(submit(st, [job("outage %d" % i) for i in range(2000)]), "spooled")
        took = time.monotonic() - t0
        assert len(set(ids)) == 2000
        status, _, doc = readyz(st)
        assert status == 200 and doc["kafka"] == "down" and doc["durability"] == "spooled", doc
        assert segments(cfg), "spooled jobs are on disk"
        assert metric(st, "promptq_broker_spool_pending_records") == 2000
        committed = metric(st, "promptq_broker_spool_committed_total")
        fsyncs = metric(st, "promptq_broker_spool_fsyncs_total")
        assert committed == 2000 and 0 < fsyncs <= committed, (committed, fsyncs)
        print("  2000 spooled in %.1fs, %.1f records per fsync" % (took, committed / fsyncs))

        st.kafka_.control("up -1")
        start_worker(st, path)
        by_id = results_by_id(st, ids, T(60))
        assert_succeeded_once(by_id, ids)
        wait_for(lambda: metric(st, "promptq_broker_spool_pending_records") == 0, T(10),
                 "spool empty")
        assert metric(st, "promptq_broker_spool_drained_total") == 2000
        # drained segments are deleted
        wait_for(lambda: not segments(cfg), T(10), "segment files deleted")
        log = log_text(st.procs[[p.name for p in st.procs].index("broker")])
        assert "Kafka is unreachable" in log and "spool: drained 2000 jobs" in log, log[-2000:]


def test_sigkill_with_spool_then_restart():
    with harness.Stack("spool-sigkill") as st:
        path, cfg = stack_up(st)
        b = start_broker(st, path)
        st.kafka_.control("down -1")
        ids = accepted(submit(st, [job("kill %d" % i) for i in range(800)]), "spooled")
        b.kill(signal.SIGKILL)
        b.wait(T(10))
        segs = segments(cfg)
        assert segs, "the spool survives the broker"
        # a write torn by the crash: a record header promising more bytes than follow
        with open(segs[-1], "ab") as f:
            f.write(struct.pack("<II", 400, 0) + b'{"id":"torn')
        st.kafka_.control("up -1")
        # the restarted broker drains what the killed one left
        b.start()
        wait_for(lambda: readyz(st)[0] == 200, T(20), "restarted broker ready")
        start_worker(st, path)
        by_id = results_by_id(st, ids, T(60))
        assert_succeeded_once(by_id, ids)
        log = log_text(b)
        assert "800 jobs" in log and "left by an earlier run" in log, log[-2000:]
        assert "bytes of torn tail" in log, log[-2000:]
        wait_for(lambda: not segments(cfg), T(10), "segment files deleted")

        # a start during an outage is ready (the spool has room) and spools; a graceful stop
        # keeps the spool for the next start
        st.kafka_.control("down -1")
        assert b.stop() == 0
        b.start()
        wait_for(lambda: readyz(st)[0] == 200, T(20), "broker ready with Kafka down")
        status, _, doc = readyz(st)
        assert doc["durability"] == "spooled", doc
        more = accepted(submit(st, [job("while down %d" % i) for i in range(50)]), "spooled")
        assert b.stop() == 0
        assert "50 jobs stay in the spool" in log_text(b), b.tail()
        st.kafka_.control("up -1")
        b.start()
        by_id = results_by_id(st, more, T(30))
        assert_succeeded_once(by_id, more)


def test_late_delivery_after_spool_runs_once():
    with harness.Stack("spool-late-dr") as st:
        path, cfg = stack_up(st, broker={"ack_timeout_ms": 500})
        start_broker(st, path)
        st.kafka_.control("rtt -1 1500")
        bodies = [job("late %d" % i, id="late-%03d" % i) for i in range(100)]
        t0 = time.monotonic()
        ids = accepted(submit(st, bodies, concurrency=16), "spooled")
        assert time.monotonic() - t0 < T(10)
        # the loop's own produce completes after the spool answered
        wait_for(lambda: metric(st, "promptq_broker_late_deliveries_total") >= len(ids), T(20),
                 "the late delivery reports")
        st.kafka_.control("rtt -1 0")
        # and the drainer produces the spooled copy: the same id reaches the topic twice
        def both_copies():
            keys = collections.Counter(m["key"] for m in st.consume_all(REQUESTS))
            return all(keys[i] >= 2 for i in ids)

        wait_for(both_copies, T(20), "both copies of every job on %s" % REQUESTS, interval=0.5)
        print("  both copies after %.1fs" % (time.monotonic() - t0))
        start_worker(st, path)
        by_id = results_by_id(st, ids, T(30))
        print("  results after %.1fs" % (time.monotonic() - t0))
        assert_succeeded_once(by_id, ids)
        # exactly one terminal record per id, run once
        for jid in ids[:20]:
            assert st.redis_.cli("HGET", "promptq:job:default:" + jid, "status") == "succeeded"
        # each job reached the provider once, although it was on the topic twice
        assert st.sims[0].stats()["requests"] == len(ids), st.sims[0].stats()


def test_full_spool_refuses():
    with harness.Stack("spool-full") as st:
        path, cfg = stack_up(st, broker={"spool_max_bytes": 1048576})
        start_broker(st, path)
        st.kafka_.control("down -1")
        wait_for(lambda: readyz(st)[2].get("kafka") == "down", T(10), "Kafka seen down")
        big = "z" * 20000
        ok, refused = [], None
        for i in range(80):
            status, hdrs, doc = harness.http_json("POST", st.broker_url + "/v1/jobs",
                                                  job(big, id="big-%02d" % i))
            if status == 202:
                assert doc["durability"] == "spooled", doc
                ok.append(doc["id"])
                continue
            refused = (status, hdrs, doc)
            break
        assert refused, "the 1 MiB spool took %d jobs of 20 kB" % len(ok)
        status, hdrs, doc = refused
        assert status == 503 and hdrs.get("retry-after") and \
            doc["error"]["type"] == "unavailable", refused
        assert 30 <= len(ok) <= 52, len(ok)
        status, hdrs, doc = readyz(st)
        assert status == 503 and hdrs.get("retry-after"), (status, doc)
        assert metric(st, "promptq_broker_spool_refusals_total", 'reason="full"') >= 1
        # a refused job left no queued record
        assert harness.http("GET", st.broker_url + "/v1/jobs/big-%02d" % len(ok))[0] == 404
        st.kafka_.control("up -1")
        wait_for(lambda: readyz(st)[0] == 200, T(20), "ready again once Kafka is back")
        msgs = st.consume(REQUESTS, len(ok), timeout=T(20))
        assert {m["key"] for m in msgs} == set(ok)
        wait_for(lambda: metric(st, "promptq_broker_spool_pending_records") == 0, T(10),
                 "spool drained")


def test_job_kafka_refuses_is_set_aside():
    with harness.Stack("spool-rejected") as st:
        path, cfg = stack_up(st)
        start_broker(st, path)
        st.kafka_.control("down -1")
        # once the broker knows Kafka is down it spools at once, without producing: no copy
        # waits in a thread's producer to take the refusal below before the drainer does
        wait_for(lambda: (readyz(st)[2] or {}).get("kafka") == "down", T(10),
                 "the broker to see Kafka down")
        accepted(submit(st, [job("refused", id="refused-1")]), "spooled")
        # the drainer's next Produce is refused for good (MSG_SIZE_TOO_LARGE)
        st.kafka_.control("err 0 1 10")
        st.kafka_.control("up -1")
        rejected = os.path.join(cfg["broker"]["spool_dir"], "rejected", "refused-1.json")
        wait_for(lambda: os.path.exists(rejected), T(15), rejected)
        with open(rejected) as f:
            env = json.load(f)
        assert env["id"] == "refused-1" and env["request"]["messages"][0]["content"] == "refused"
        assert metric(st, "promptq_broker_spool_rejected_total") == 1
        wait_for(lambda: metric(st, "promptq_broker_spool_pending_records") == 0, T(10),
                 "spool empty")
        # the spool goes on with the next jobs
        st.kafka_.control("down -1")
        ids = accepted(submit(st, [job("next %d" % i) for i in range(20)]), "spooled")
        st.kafka_.control("up -1")
        msgs = st.consume(REQUESTS, 20, timeout=T(20))
        assert set(ids) <= {m["key"] for m in msgs}


def test_fatal_producer_error_recreates_producer():
    with harness.Stack("spool-fatal") as st:
        path, cfg = stack_up(st)
        b = start_broker(st, path)
        # OUT_OF_ORDER_SEQUENCE_NUMBER on a Produce request is a fatal idempotence error in
        # librdkafka 2.0.2
        st.kafka_.control("err 0 2 45")
        ids = accepted(submit(st, [job("fatal %d" % i) for i in range(300)], concurrency=16))
        wait_for(lambda: metric(st, "promptq_broker_producer_recreated_total") >= 1, T(10),
                 "a producer recreated")
        log = log_text(b)
        assert "fatal producer error OUT_OF_ORDER_SEQUENCE_NUMBER" in log, log[-2000:]
        # the jobs the broken producer held went to the spool (and were answered from there)
        assert metric(st, "promptq_broker_jobs_accepted_total", 'durability="spooled"') >= 1
        # the new producer works
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", job("after"))
        assert status == 202, doc
        ids.append(doc["id"])
        start_worker(st, path)
        by_id = results_by_id(st, ids, T(30))
        assert_succeeded_once(by_id, ids)

        # the same in the drainer: its first produce after the outage is fatal
        st.kafka_.control("down -1")
        spooled = accepted(submit(st, [job("drain fatal %d" % i) for i in range(200)]),
                           "spooled")
        st.kafka_.control("err 0 1 45")
        st.kafka_.control("up -1")
        by_id = results_by_id(st, spooled, T(30))
        assert_succeeded_once(by_id, spooled)
        log = log_text(b)
        assert "spool drainer: fatal producer error" in log, log[-2000:]
        assert "spool drainer: producer recreated" in log, log[-2000:]


harness.run(globals())
