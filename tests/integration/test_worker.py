"""promptq-worker on its own: envelopes produced straight to promptq.requests (no broker), a real
redis-server, promptq-devkafka and promptq-sim. Checks G2/G3/G5 from the worker's side: one result
per job, derived ids, dlq for invalid/unknown/conflicting jobs, deduplicated redeliveries,
retries through a provider outage and no job lost when the worker is SIGKILLed mid-flight.
"""

import collections
import json
import re
import signal
import time

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"
DLQ = "promptq.dlq"


def stack_up(st, sim_state=None, worker=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    s = st.sim("a")
    if sim_state:
        s.set_state(sim_state)
    extra = {"worker": {"lease_ms": 3000}}
    if worker:
        harness._merge(extra, {"worker": worker})
    path, _ = st.config(extra=extra)
    return r, s, path


def start_worker(st, path, name="worker", *args):
    return st.spawn("promptq-worker", "--config", path, *args, name=name)


def envelope(job_id, prompt, route="sim-model", **kw):
    e = {"request": {"model": route, "messages": [{"role": "user", "content": prompt}]}}
    if job_id is not None:
        e["id"] = job_id
    e.update(kw)
    return e


def values(msgs):
    return [json.loads(m["value"]) for m in msgs]


def by_id(docs):
    out = collections.defaultdict(list)
    for d in docs:
        out[d.get("id")].append(d)
    return out


def wait_results(st, ids, timeout):
    """Waits until every id has at least one result; returns {id: [result docs]} (all ids)."""
    want = set(ids)
    got = {}

    def have_all():
        got.clear()
        got.update(by_id(values(st.consume_all(RESULTS))))
        return want <= set(got)

    try:
        wait_for(have_all, timeout, "results for %d jobs" % len(want), interval=0.5)
    except AssertionError:
        missing = sorted(want - set(got))
        raise AssertionError("%d of %d jobs without a result, e.g. %s" %
                             (len(missing), len(want), missing[:5]))
    return got


def content(result):
    return result["response"]["choices"][0]["message"]["content"]


def test_jobs_with_ids():
    with harness.Stack("worker_ids") as st:
        r, s, path = stack_up(st)
        w = start_worker(st, path)
        n = 300
        ids = ["job-%03d" % i for i in range(n)]
        st.produce(REQ, [envelope(i, "prompt %s" % i, metadata={"n": k})
                         for k, i in enumerate(ids)], keys=ids)
        got = wait_results(st, ids, T(60))
        time.sleep(0.5)  # a duplicate would be published right behind
        got = by_id(values(st.consume_all(RESULTS)))
        for k, i in enumerate(ids):
            assert len(got[i]) == 1, (i, len(got[i]))
            res = got[i][0]
            assert res["status"] == "succeeded", res
            assert content(res) == "echo: prompt %s" % i, res
            assert res["tenant"] == "default" and res["route"] == "sim-model", res
            assert res["provider"] == "sim" and res["model"] == "sim-model", res
            assert res["attempts"] == 1 and res["metadata"] == {"n": k}, res
            assert res["response"]["object"] == "chat.completion", res
            assert res["source"]["topic"] == REQ and res["source"]["offset"] >= 0, res
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", res["completed_at"])
        for i in ids[::10]:
            assert r.cli("HGET", "promptq:job:default:" + i, "status") == "succeeded", i
        assert s.stats()["requests"] == n
        assert w.alive()


def test_bare_bodies_get_kafka_ids():
    with harness.Stack("worker_bare") as st:
        r, s, path = stack_up(st)
        start_worker(st, path)
        n = 50
        bodies = [{"model": "sim-model", "messages": [{"role": "user", "content": "bare %d" % i}]}
                  for i in range(n)]
        st.produce(REQ, bodies)

        def all_in():
            return len(st.consume_all(RESULTS)) >= n
        wait_for(all_in, T(60), "%d results" % n, interval=0.5)
        time.sleep(0.5)
        docs = values(st.consume_all(RESULTS))
        assert len(docs) == n, len(docs)
        ids = [d["id"] for d in docs]
        assert len(set(ids)) == n, "ids not unique"
        for d in docs:
            assert re.match(r"^kafka-[0-9a-f]{24}$", d["id"]), d["id"]
            assert d["status"] == "succeeded"
        assert sorted(content(d) for d in docs) == sorted("echo: bare %d" % i for i in range(n))
        assert r.cli("HGET", "promptq:job:default:" + ids[0], "status") == "succeeded"


def test_unknown_route_invalid_and_conflicts():
    with harness.Stack("worker_dlq") as st:
        r, s, path = stack_up(st)
        start_worker(st, path)
        st.produce(REQ, [envelope("unknown-1", "hi", route="no-such-route")], keys=["unknown-1"])
        st.produce(REQ, ["this is {not json"], keys=["garbage"])
        st.produce(REQ, [{"id": "bad id with spaces", "request": {"model": "sim-model"}}],
                   keys=["badid"])
        # the same envelope twice: the second is not sent to the provider
        dup = envelope("dup-1", "twice")
        st.produce(REQ, [dup, dup], keys=["dup-1", "dup-1"])

        got = wait_results(st, ["unknown-1", "dup-1"], T(30))
        unk = got["unknown-1"][0]
        assert unk["status"] == "failed" and unk["error"]["type"] == "not_found", unk
        assert unk["attempts"] == 0, unk

        wait_for(lambda: len(got_dup(st)) >= 2, T(20), "dup-1 re-published")
        dups = got_dup(st)
        assert len(dups) == 2 and dups[0] == dups[1], dups  # verbatim
        assert s.stats()["requests"] == 1, s.stats()

        # the same id with another request: dlq id_conflict, the record is untouched
        st.produce(REQ, [envelope("dup-1", "another prompt")], keys=["dup-1"])

        def dlq_types():
            return [(d.get("id"), d["error"]["type"]) for d in values(st.consume_all(DLQ))]
        wait_for(lambda: ("dup-1", "id_conflict") in dlq_types(), T(20), "dlq id_conflict")
        dlq = values(st.consume_all(DLQ))
        types = collections.Counter(d["error"]["type"] for d in dlq)
        assert types["invalid"] == 2, dlq
        assert any(d.get("raw") == "this is {not json" for d in dlq), dlq
        assert any(d.get("id") == "bad id with spaces" and d["error"]["type"] == "invalid"
                   for d in dlq), dlq
        unk_dlq = [d for d in dlq if d.get("id") == "unknown-1"]
        assert len(unk_dlq) == 1 and unk_dlq[0]["error"]["type"] == "not_found", dlq
        assert unk_dlq[0]["request"]["model"] == "no-such-route"
        assert r.cli("HGET", "promptq:job:default:dup-1", "status") == "succeeded"
        assert s.stats()["requests"] == 1
        assert len(got_dup(st)) == 2  # no result for the conflicting copy


def got_dup(st):
    return [d for d in values(st.consume_all(RESULTS)) if d.get("id") == "dup-1"]


def test_provider_500_then_ok():
    with harness.Stack("worker_retry") as st:
        r, s, path = stack_up(st, sim_state={"mode": "error", "status": 500})
        start_worker(st, path)
        st.produce(REQ, [envelope("retry-1", "survive")], keys=["retry-1"])
        wait_for(lambda: s.stats()["requests"] >= 2, T(10), "retries against the 500s")
        time.sleep(3 - 0.5)
        s.set_state({"mode": "ok"})
        got = wait_results(st, ["retry-1"], T(30))
        res = got["retry-1"][0]
        assert res["status"] == "succeeded" and content(res) == "echo: survive", res
        assert res["attempts"] >= 3, res
        assert len(got["retry-1"]) == 1


def test_sigkill_mid_flight_loses_nothing():
    with harness.Stack("worker_kill") as st:
        r, s, path = stack_up(st, sim_state={"latency_ms": 2000})
        w = start_worker(st, path)
        n = 100
        ids = ["kill-%03d" % i for i in range(n)]
        st.produce(REQ, [envelope(i, "p %s" % i) for i in ids], keys=ids)
        wait_for(lambda: s.stats()["inflight"] >= 50, T(20), "calls in flight at the sim")
        w.kill(signal.SIGKILL)
        w.wait(T(5))
        s.set_state({"latency_ms": 50})
        start_worker(st, path, name="worker2")
        got = wait_results(st, ids, T(60))
        for i in ids:
            assert got[i][0]["status"] == "succeeded" and content(got[i][0]) == "echo: p " + i
        # a result, once published, is the one stored in Redis
        stored = json.loads(r.cli("HGET", "promptq:job:default:" + ids[0], "result"))
        assert stored == got[ids[0]][0]


def test_sigterm_hands_back_and_exits_0():
    with harness.Stack("worker_term") as st:
        r, s, path = stack_up(st, sim_state={"latency_ms": 4000})
        w = start_worker(st, path, "worker", "--grace-ms", "1000")
        ids = ["term-%02d" % i for i in range(20)]
        st.produce(REQ, [envelope(i, "t %s" % i) for i in ids], keys=ids)
        wait_for(lambda: s.stats()["inflight"] >= 20, T(20), "calls in flight at the sim")
        t0 = time.monotonic()
        w.kill(signal.SIGTERM)
        assert w.wait(T(10)) == 0
        assert time.monotonic() - t0 < T(8)
        # handed back: leases released at once, so a new worker runs them without waiting
        assert r.cli("EXISTS", "promptq:lease:default:" + ids[0]) == "0"
        s.set_state({"latency_ms": 0})
        start_worker(st, path, name="worker2")
        got = wait_results(st, ids, T(30))
        assert all(got[i][0]["status"] == "succeeded" for i in ids)


def test_redis_outage_pauses_then_resumes():
    with harness.Stack("worker_redis") as st:
        r, s, path = stack_up(st)
        w = start_worker(st, path)
        first = ["before-%02d" % i for i in range(10)]
        st.produce(REQ, [envelope(i, i) for i in first], keys=first)
        wait_results(st, first, T(30))
        r.kill()
        wait_for(lambda: "consumption paused: redis unavailable" in open(w.log_path).read(),
                 T(10), "the worker to pause on the Redis outage")
        calls = s.stats()["requests"]
        later = ["during-%02d" % i for i in range(30)]
        st.produce(REQ, [envelope(i, i) for i in later], keys=later)
        time.sleep(2)
        assert s.stats()["requests"] == calls, "provider called while Redis was down"
        r.restart()
        got = wait_results(st, later, T(30))
        assert all(got[i][0]["status"] == "succeeded" and content(got[i][0]) == "echo: " + i
                   for i in later)
        assert all(r.cli("HGET", "promptq:job:default:" + i, "status") == "succeeded"
                   for i in later[:5])


def test_offset_reset_is_logged_and_counted():
    """A committed offset that fell out of the log (devkafka evicts beyond ~5 MB per partition)
    resets to earliest; the worker says so as an error (G5)."""
    with harness.Stack("worker_reset") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        st.sim("a")
        path, _ = st.config(extra={"worker": {"lease_ms": 3000}})
        w = start_worker(st, path)
        ids = ["reset-%d" % i for i in range(5)]
        st.produce(REQ, [envelope(i, i) for i in ids], keys=ids)
        wait_results(st, ids, T(30))
        # one group member per worker: it took its results' partition, so the final commit of a
        # stop right now must work (no rebalance of a second member in the way)
        assert w.stop(T(15)) == 0  # commits offset 5
        assert "final commit" not in open(w.log_path).read(), "the final commit failed"
        filler = "x" * 2000
        for _ in range(4):  # ~8 MB: offsets 0..5 are evicted
            st.produce(REQ, [filler] * 1000)
        w2 = start_worker(st, path, name="worker2")
        wait_for(lambda: "offset reset" in open(w2.log_path).read(), T(30),
                 "the offset reset to be logged")
        log = open(w2.log_path).read()
        line = [x for x in log.splitlines() if "offset reset" in x][0]
        assert " error " in line or "\"level\":\"error\"" in line, line
        assert w2.stop(T(15)) == 0
        assert "offset_resets=1" in open(w2.log_path).read().splitlines()[-2]


def produce_big(st, topic, key, value):
    """kcat with a raised message.max.bytes: a record over the worker producer's 1,000,000."""
    import subprocess
    argv = ["kcat", "-P", "-b", st.kafka_.bootstrap, "-t", topic, "-K", "\t",
            "-X", "message.max.bytes=4000000"]
    data = ("%s\t%s\n" % (key, json.dumps(value, separators=(",", ":")))).encode()
    out = subprocess.run(argv, input=data, capture_output=True, timeout=T(60))
    assert out.returncode == 0, out.stderr.decode()


def test_large_result_fails_too_large_and_frees_the_partition():
    """A 1.03 MB prompt the sim echoes back: its result can never fit the producer's
    message.max.bytes (1,000,000), nor its envelope + error on the dlq. The job fails as
    too_large with a small result, the dlq gets a small stand-in, and the next job on the same
    partition is not stuck behind it (G2/G5)."""
    with harness.Stack("worker_too_large") as st:
        r, s, path = stack_up(st)
        w = start_worker(st, path)
        big = "b" * 1030000
        produce_big(st, REQ, "k", envelope("big-1", big))
        st.produce(REQ, [envelope("after-1", "after-1")], keys=["k"])
        got = wait_results(st, ["big-1", "after-1"], T(40))
        res = got["big-1"][0]
        assert res["status"] == "failed", res["status"]
        assert res["error"]["type"] == "too_large", res["error"]
        assert got["after-1"][0]["status"] == "succeeded"
        dlq = by_id(values(st.consume_all(DLQ)))
        assert dlq["big-1"] and dlq["big-1"][0].get("truncated") is True, dlq.keys()
        assert r.cli("HGET", "promptq:job:default:big-1", "status") == "failed"
        log = open(w.log_path).read()
        assert "capped at" in log
        assert w.stop(T(15)) == 0


class RedisProxy:
    """TCP proxy to Redis. drop_mark: once, forwards the command holding it and then drops the
    connection before the reply reaches the worker. hold: while set, replies are kept back."""

    @staticmethod
    def keys_mark(*keys):
        """The RESP framing of consecutive command arguments: with the job's lease key first,
        ("promptq:lease:T:ID", "promptq:callbacks") marks its terminal write and
        ("promptq:lease:T:ID", "promptq:jobs:T") its begin (scripts go by EVALSHA, their text
        only in the SCRIPT LOAD at connect)."""
        return b"".join(b"%s\r\n$%d\r\n" % (k.encode(), len(keys[i + 1]))
                        for i, k in enumerate(keys[:-1])) + keys[-1].encode() + b"\r\n"

    def __init__(self, port, drop_mark=None):
        import socket
        import threading
        self.port_to = port
        self.drop_mark = drop_mark
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.dropped = 0
        self.cut = None
        self.hold = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.port_to))
            threading.Thread(target=self._up, args=(c, u), daemon=True).start()
            threading.Thread(target=self._down, args=(c, u), daemon=True).start()

    def _close(self, c, u):
        import socket
        for x in (c, u):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _up(self, c, u):
        buf = b""
        while True:
            try:
                d = c.recv(65536)
            except OSError:
                d = b""
            if not d:
                return self._close(c, u)
            buf = (buf + d)[-4096:]
            if self.drop_mark:
                with self.lock:
                    if self.dropped == 0 and self.drop_mark in buf:
                        self.dropped = 1
                        self.cut = (c, u)
            try:
                u.sendall(d)
            except OSError:
                return self._close(c, u)

    def _down(self, c, u):
        while True:
            try:
                d = u.recv(65536)
            except OSError:
                d = b""
            if not d or self.cut == (c, u):
                return self._close(c, u)
            while self.hold.is_set():
                time.sleep(0.01)
            try:
                c.sendall(d)
            except OSError:
                return self._close(c, u)


def test_lost_finish_reply_still_reaches_the_dlq():
    """The connection drops after Redis ran the terminal write of a failing job: the re-issued
    write finds the record terminal with our own result, which is still our win: the failed
    job reaches promptq.dlq (G2)."""
    with harness.Stack("worker_lost_finish") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        st.sim("a")
        proxy = RedisProxy(r.port, RedisProxy.keys_mark("promptq:lease:default:lost-1",
                                                        "promptq:callbacks"))
        path, _ = st.config(extra={"worker": {"lease_ms": 3000},
                                   "redis": {"url": "redis://127.0.0.1:%d" % proxy.port}})
        w = start_worker(st, path)
        st.produce(REQ, [envelope("lost-1", "x", route="no-such-route")], keys=["lost-1"])
        got = wait_results(st, ["lost-1"], T(30))
        assert got["lost-1"][0]["status"] == "failed"
        wait_for(lambda: "lost-1" in by_id(values(st.consume_all(DLQ))), T(20),
                 "the failed job on the dlq")
        assert proxy.dropped == 1, "the finish reply was not dropped"
        assert r.cli("HGET", "promptq:job:default:lost-1", "status") == "failed"
        assert w.stop(T(15)) == 0


def test_hand_back_during_begin_starts_no_call():
    """SIGTERM while the lease scripts' replies are still on their way: the jobs are handed
    back first; the late replies start no provider call and their leases are released."""
    with harness.Stack("worker_term_begin") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        s = st.sim("a")
        proxy = RedisProxy(r.port)
        path, _ = st.config(extra={"worker": {"lease_ms": 20000},
                                   "redis": {"url": "redis://127.0.0.1:%d" % proxy.port}})
        w = start_worker(st, path, "worker", "--grace-ms", "300")
        wait_for(lambda: "subscribed" in open(w.log_path).read() or
                 "assigned" in open(w.log_path).read(), T(20), "the worker to join")
        time.sleep(1)
        proxy.hold.set()
        ids = ["hb-%02d" % i for i in range(5)]
        st.produce(REQ, [envelope(i, i) for i in ids], keys=ids)
        wait_for(lambda: r.cli("EXISTS", "promptq:lease:default:" + ids[-1]) == "1", T(20),
                 "the begin scripts to run")
        w.kill(signal.SIGTERM)
        time.sleep(0.8)  # grace over: handed back while the begin replies are held
        proxy.hold.clear()
        assert w.wait(T(10)) == 0
        assert s.stats()["requests"] == 0, "a provider call started after the hand-back"
        wait_for(lambda: all(r.cli("EXISTS", "promptq:lease:default:" + i) == "0" for i in ids),
                 T(5), "the leases to be released")
        assert all(r.cli("HGET", "promptq:job:default:" + i, "status") == "queued" for i in ids)


def test_lost_lease_stops_calls_until_it_is_free():
    """Another owner takes the lease of a running job: the worker stops its call and makes no
    further one while that owner holds it; once the lease is free the job runs and finishes."""
    with harness.Stack("worker_lease_lost") as st:
        r, s, path = stack_up(st, sim_state={"latency_ms": 2500}, worker={"lease_ms": 1500})
        w = start_worker(st, path)
        st.produce(REQ, [envelope("ll-1", "ll-1")], keys=["ll-1"])
        lease = "promptq:lease:default:ll-1"
        wait_for(lambda: s.stats()["inflight"] == 1, T(20), "the call in flight")
        r.cli("SET", lease, "someone-else", "PX", "60000")
        wait_for(lambda: "lease lost to another owner" in open(w.log_path).read(), T(5),
                 "the worker to notice the lost lease")
        wait_for(lambda: s.stats()["inflight"] == 0, T(5), "the call to be cancelled")
        calls = s.stats()["requests"]
        time.sleep(3)
        assert s.stats()["requests"] == calls, "called again while another owner held the lease"
        assert "ll-1" not in by_id(values(st.consume_all(RESULTS)))
        r.cli("DEL", lease)
        got = wait_results(st, ["ll-1"], T(20))
        assert got["ll-1"][0]["status"] == "succeeded"
        assert w.stop(T(15)) == 0


def test_redis_reconnect_is_not_another_delivery():
    """The connection drops after Redis ran a job's begin script: the re-issued begin is the
    same delivery, so with max_deliveries 1 the job runs instead of failing as poison."""
    with harness.Stack("worker_begin_reconnect") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        st.sim("a")
        proxy = RedisProxy(r.port, RedisProxy.keys_mark("promptq:lease:default:rc-1",
                                                        "promptq:jobs:default"))
        path, _ = st.config(extra={"worker": {"lease_ms": 3000, "max_deliveries": 1},
                                   "redis": {"url": "redis://127.0.0.1:%d" % proxy.port}})
        w = start_worker(st, path)
        st.produce(REQ, [envelope("rc-1", "rc-1")], keys=["rc-1"])
        got = wait_results(st, ["rc-1"], T(30))
        assert proxy.dropped == 1, "the begin reply was not dropped"
        assert got["rc-1"][0]["status"] == "succeeded", got["rc-1"][0].get("error")
        assert r.cli("HGET", "promptq:job:default:rc-1", "deliveries") == "1"
        assert w.stop(T(15)) == 0


def test_metrics_endpoint():
    """worker.metrics_listen serves GET /metrics (a counter moves with work) and /healthz."""
    with harness.Stack("worker_metrics") as st:
        port = harness.free_port()
        r, s, path = stack_up(st, worker={"metrics_listen": "127.0.0.1:%d" % port})
        w = start_worker(st, path)
        url = "http://127.0.0.1:%d" % port
        wait_for(lambda: _get(url + "/healthz")[0] == 200, T(20), "/healthz to answer 200")
        status, _, body = harness.http("GET", url + "/healthz")
        assert json.loads(body)["redis"] is True

        def received():
            status, _, body = harness.http("GET", url + "/metrics")
            assert status == 200
            text = body.decode() if isinstance(body, bytes) else body
            m = re.search(r'^promptq_worker_jobs_total\{outcome="received"\} (\S+)$', text, re.M)
            assert m, text[:500]
            return float(m.group(1))

        before = received()
        ids = ["m-%d" % i for i in range(3)]
        st.produce(REQ, [envelope(i, i) for i in ids], keys=ids)
        wait_results(st, ids, T(30))
        wait_for(lambda: received() >= before + 3, T(10), "the received counter to move")
        assert harness.http("GET", url + "/nope")[0] == 404
        assert w.stop(T(15)) == 0


def _get(url):
    try:
        return harness.http("GET", url)
    except Exception:
        return (0, {}, b"")


def test_redis_host_name_resolved_off_the_loop():
    """A Redis host given by name is resolved with evdns, then connected by address; after a
    Redis restart it is resolved and connected again."""
    with harness.Stack("worker_redis_dns") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        st.sim("a")
        path, _ = st.config(extra={"worker": {"lease_ms": 3000},
                                   "log": {"level": "debug"},
                                   "redis": {"url": "redis://localhost:%d" % r.port}})
        w = start_worker(st, path)
        st.produce(REQ, [envelope("dns-1", "dns-1")], keys=["dns-1"])
        got = wait_results(st, ["dns-1"], T(30))
        assert got["dns-1"][0]["status"] == "succeeded"
        log = open(w.log_path).read()
        assert re.search(r"redis localhost resolved to (127\.0\.0\.1|::1)", log), log[-2000:]
        r.kill()
        r.restart()
        st.produce(REQ, [envelope("dns-2", "dns-2")], keys=["dns-2"])
        got = wait_results(st, ["dns-2"], T(30))
        assert got["dns-2"][0]["status"] == "succeeded"
        assert w.stop(T(15)) == 0


harness.run(globals())
