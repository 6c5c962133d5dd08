"""POST /v1/dlq/redrive (DESIGN.md §3, §5) on real processes: promptq-broker and promptq-worker,
redis-server, promptq-devkafka and two promptq-sim providers. Real dlq records are made by the
worker (jobs whose deadline passed -> expired, a route whose only target answers 400 -> refused,
an invalid envelope -> invalid); redrive then re-queues them as NEW jobs with deterministic ids
<orig>.r<partition>-<offset> that succeed, counts exactly, never runs a record twice, stays
inside the caller's tenant and honours the types/route/ids/limit filters; bad bodies are 400,
no key is 401, Kafka down is 503."""

import json
import signal
import subprocess
import time

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"
DLQ = "promptq.dlq"
KEYS = {"key-a": "ta", "key-b": "tb"}
PAST = "2001-01-01T00:00:00Z"


def env(job_id, tenant, route="sim-model", **kw):
    e = {"id": job_id, "tenant": tenant,
         "request": {"model": route, "messages": [{"role": "user", "content": job_id}]}}
    e.update(kw)
    return e


def redrive(st, key, body=None, raw=None):
    headers = {"Authorization": "Bearer " + key} if key else {}
    data = raw if raw is not None else (body if body is not None else None)
    status, hdrs, text = harness.http("POST", st.broker_url + "/v1/dlq/redrive", body=data,
                                      headers=headers, timeout=T(30))
    try:
        doc = json.loads(text)
    except ValueError:
        doc = {"raw": text}
    return status, hdrs, doc


def ok(st, key, body=None):
    status, _, doc = redrive(st, key, body)
    assert status == 200, (status, doc)
    assert doc["object"] == "dlq.redrive", doc
    assert len(doc["jobs"]) == doc["redriven"], doc
    return doc


def counts(doc):
    """scanned counts only the caller's tenant's records."""
    return tuple(doc[k] for k in ("scanned", "matched", "redriven", "already", "skipped"))


def results(st):
    out = {}
    for m in st.consume_all(RESULTS):
        d = json.loads(m["value"])
        out.setdefault(d["id"], []).append(d)
    return out


def header(hdrs, name):
    for k, v in (hdrs.items() if hasattr(hdrs, "items") else hdrs):
        if k.lower() == name.lower():
            return v
    return None


def ready(url):
    try:
        return harness.http("GET", url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def metric(st, name):
    _, _, text = harness.http("GET", st.broker_url + "/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_redrive():
    with harness.Stack("redrive") as st:
        st.redis()
        k = st.devkafka(brokers=1, partitions=4)
        good, bad = st.sim("a"), st.sim("b")
        bad.set_state({"mode": "error", "status": 400})
        path, _ = st.config(
            providers={"a": {"type": "openai", "base_url": good.api},
                       "b": {"type": "openai", "base_url": bad.api}},
            routes={"sim-model": [{"provider": "a", "model": "m-a"}],
                    "refusing": [{"provider": "b", "model": "m-b"}]},
            extra={"broker": {"api_keys": KEYS}, "worker": {"lease_ms": 3000}})
        broker = st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: ready(st.broker_url), T(20), "broker /readyz")

        # nothing dead-lettered yet: an empty scan
        doc = ok(st, "key-a")
        assert counts(doc) == (0, 0, 0, 0, 0) and doc["has_more"] is False, doc

        st.spawn("promptq-worker", "--config", path, name="worker")
        a_exp = ["exp-%d" % i for i in range(3)]
        a_perm = ["perm-%d" % i for i in range(2)]
        b_exp = ["bexp-%d" % i for i in range(2)]
        jobs = ([env(i, "ta", deadline=PAST) for i in a_exp] +
                [env(i, "ta", route="refusing") for i in a_perm] +
                [{"id": "inv-0", "tenant": "ta", "request": {"model": "sim-model"}}] +
                [env(i, "tb", deadline=PAST) for i in b_exp])
        st.produce(REQ, jobs, keys=[j["id"] for j in jobs])
        dlq = st.consume(DLQ, len(jobs), timeout=T(30))
        assert len(dlq) == len(jobs), dlq
        types = {json.loads(m["value"])["id"]: json.loads(m["value"])["error"]["type"]
                 for m in dlq}
        assert types == dict([(i, "expired") for i in a_exp + b_exp] +
                             [(i, "refused") for i in a_perm] + [("inv-0", "invalid")]), types
        where = {json.loads(m["value"])["id"]: (m["partition"], m["offset"]) for m in dlq}
        new_id = {i: "%s.r%d-%d" % (i, p, o) for i, (p, o) in where.items()}
        bad.set_state({"mode": "ok"})
        before = results(st)
        assert not any(".r" in i for i in before), before.keys()

        # request errors: 400 naming the problem, 401 without a key
        for body, want in ((b"{not json", "JSON"), ({"foo": 1, "bar": 2}, '"foo"'),
                           ({"types": ["invalid"]}, "invalid"),
                           ({"types": ["expired", "id_conflict"]}, "id_conflict"),
                           ({"types": []}, "types"), ({"limit": 0}, "limit"),
                           ({"limit": 10001}, "limit"), ({"ids": "exp-0"}, "ids"),
                           ({"ids": ["bad id"]}, "ids"), ({"route": 5}, "route"), ([1], "object")):
            status, _, doc = redrive(st, "key-a", raw=body)
            assert status == 400, (body, status, doc)
            assert want in doc["error"]["message"], (body, doc)
        status, _, doc = redrive(st, "key-a", raw=b'{"zq9secret')
        assert status == 400 and "JSON" in doc["error"]["message"], doc
        assert "zq9secret" not in doc["error"]["message"], doc  # never the body's bytes
        status, _, doc = redrive(st, None, {})
        assert status == 401, (status, doc)
        status, _, doc = redrive(st, "wrong-key", {})
        assert status == 401, (status, doc)

        # route filter: only ta's refused jobs; the others of ta are not counted at all
        doc = ok(st, "key-a", {"route": "refusing"})
        assert counts(doc) == (6, 2, 2, 0, 0) and doc["has_more"] is False, doc
        assert sorted((j["id"], j["redriven_from"], j["error"]) for j in doc["jobs"]) == \
            sorted((new_id[i], i, "refused") for i in a_perm), doc
        # types filter: the expired ones; the refused (not selected) and invalid are skipped
        doc = ok(st, "key-a", {"types": ["expired"]})
        assert counts(doc) == (6, 3, 3, 0, 3), doc
        assert sorted(j["id"] for j in doc["jobs"]) == sorted(new_id[i] for i in a_exp), doc
        # defaults: everything of ta was redriven already; invalid is skipped
        doc = ok(st, "key-a", {})
        assert counts(doc) == (6, 5, 0, 5, 1) and doc["jobs"] == [], doc

        a_new = [new_id[i] for i in a_exp + a_perm]
        got = {}

        def all_done():
            got.clear()
            got.update(results(st))
            return all(i in got for i in a_new)
        wait_for(all_done, T(30), "results of the redriven jobs", interval=0.5)
        for orig in a_exp + a_perm:
            res = got[new_id[orig]]
            assert len(res) == 1 and res[0]["status"] == "succeeded", res
            assert res[0]["tenant"] == "ta" and res[0]["source"]["topic"] == "promptq.bulk", res
            p, o = where[orig]
            assert res[0]["metadata"]["redriven_from"] == {
                "id": orig, "error": types[orig], "partition": p, "offset": o}, res
            status, _, body = harness.http("GET", st.broker_url + "/v1/jobs/" + new_id[orig],
                                           headers={"Authorization": "Bearer key-a"})
            rec = json.loads(body)
            assert status == 200 and rec["status"] == "succeeded", (status, rec)
            assert rec["metadata"]["redriven_from"]["id"] == orig, rec
            # another tenant cannot see it
            status, _, _ = harness.http("GET", st.broker_url + "/v1/jobs/" + new_id[orig],
                                        headers={"Authorization": "Bearer key-b"})
            assert status == 404, status
        # tb's records were never touched by ta's redrives
        assert not any(new_id[i] in got for i in b_exp), sorted(got)

        # redrive again: nothing new runs, no new results
        n_results = sum(len(v) for v in got.values())
        doc = ok(st, "key-a")
        assert counts(doc) == (6, 5, 0, 5, 1), doc
        time.sleep(1.5)
        again = results(st)
        assert sum(len(v) for v in again.values()) == n_results, "a redrive ran a job again"

        # tenant b: ids filter, then limit
        doc = ok(st, "key-b", {"ids": [b_exp[1], "not-there"]})
        assert counts(doc) == (2, 1, 1, 0, 0) and doc["jobs"][0]["id"] == new_id[b_exp[1]], doc
        doc = ok(st, "key-b", {"limit": 1})
        assert doc["redriven"] == 1 and doc["jobs"][0]["id"] == new_id[b_exp[0]], doc
        assert doc["already"] <= 1 and doc["skipped"] == 0, doc
        doc = ok(st, "key-b", {"limit": 1})
        assert counts(doc) == (2, 2, 0, 2, 0) and doc["has_more"] is False, doc
        wait_for(lambda: all(new_id[i] in results(st) for i in b_exp), T(30),
                 "results of tb's redriven jobs", interval=0.5)
        assert metric(st, "promptq_broker_dlq_redriven_total") == 7

        # limit with more left: has_more, and the next call goes on from there
        more = ["exp-more-%d" % i for i in range(6)]
        st.produce(REQ, [env(i, "ta", deadline=PAST) for i in more], keys=more)
        wait_for(lambda: len(st.consume_all(DLQ)) == len(jobs) + len(more), T(30),
                 "dlq records of the new expired jobs", interval=0.5)
        doc = ok(st, "key-a", {"limit": 4, "types": ["expired"]})
        assert doc["redriven"] == 4 and doc["has_more"] is True, doc
        first = {j["redriven_from"] for j in doc["jobs"]}
        doc = ok(st, "key-a", {"limit": 4, "types": ["expired"]})
        assert doc["redriven"] == 2 and doc["has_more"] is False, doc
        assert first | {j["redriven_from"] for j in doc["jobs"]} == set(more), doc

        # the CLI: flags become the body; --json prints the answer verbatim
        p = subprocess.run([harness.binary("promptq"), "--url", st.broker_url, "--key", "key-a",
                            "--json", "dlq", "redrive", "--type", "expired", "--type",
                            "permanent", "--route", "sim-model", "--id", more[0], "--limit",
                            "5"], capture_output=True, text=True, timeout=T(30))
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
        doc = json.loads(p.stdout)
        assert counts(doc) == (12, 1, 0, 1, 0), doc
        p = subprocess.run([harness.binary("promptq"), "--url", st.broker_url, "--key", "key-a",
                            "dlq", "redrive", "--limit", "0"], capture_output=True, text=True,
                           timeout=T(30))
        assert p.returncode == 2 and "--limit" in p.stderr, (p.returncode, p.stderr)

        # Kafka down: 503 with Retry-After within the metadata timeout
        k.control("down -1")
        t0 = time.monotonic()
        status, hdrs, doc = redrive(st, "key-a", {})
        assert status == 503 and doc["error"]["type"] == "unavailable", (status, doc)
        assert header(hdrs, "Retry-After"), hdrs
        assert time.monotonic() - t0 < T(15)

        # SIGTERM while a redrive waits for Kafka: the caller still gets its answer (503), the
        # broker stops cleanly
        import threading
        got = []
        t = threading.Thread(target=lambda: got.append(redrive(st, "key-a", {})))
        t.start()
        time.sleep(0.5)
        broker.kill(signal.SIGTERM)
        assert broker.wait(T(20)) == 0
        t.join(T(20))
        assert len(got) == 1 and got[0][0] == 503, got
        k.control("up -1")


def test_concurrent_and_open_mode():
    """dlq records produced straight into promptq.dlq (no worker): concurrent redrives never
    redrive a record twice (one scan at a time; the queue beyond its bound answers 429), a client
    that hangs up does not disturb the broker, and open mode takes ?tenant=."""
    with harness.Stack("redrive_conc") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        st.sim("a")
        path, _ = st.config()
        n = 240
        recs = [dict(env("d-%03d" % i, "default" if i % 4 else "other", deadline=PAST),
                     error={"type": "expired", "message": "deadline passed"}) for i in range(n)]
        recs.append({"id": "big-1", "tenant": "default", "model": "sim-model", "truncated": True,
                     "error": {"type": "poison"}})
        st.produce(DLQ, recs, keys=[r["id"] for r in recs])
        st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: ready(st.broker_url), T(20), "broker /readyz")

        import socket
        import threading
        answers = []
        lock = threading.Lock()

        def one():
            a = redrive(st, None, {"limit": 20})
            with lock:
                answers.append(a)

        def hang_up():
            # a client that sends a redrive and hangs up while it waits in the queue
            c = socket.create_connection(("127.0.0.1", st.broker_port))
            c.sendall(b"POST /v1/dlq/redrive HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n"
                      b"\r\n{\"limit\": 1}")
            time.sleep(0.02)
            c.close()
        threads = [threading.Thread(target=one) for _ in range(12)]
        hangs = [threading.Thread(target=hang_up) for _ in range(3)]
        for t in threads[:6] + hangs + threads[6:]:
            t.start()
        for t in threads + hangs:
            t.join(T(60))
        codes = sorted(a[0] for a in answers)
        assert len(codes) == 12 and set(codes) <= {200, 429} and codes.count(200) >= 1, codes
        for status, hdrs, doc in answers:
            if status == 429:
                assert header(hdrs, "Retry-After"), hdrs
        ids = [j["id"] for status, _, doc in answers if status == 200 for j in doc["jobs"]]
        assert len(ids) == len(set(ids)), "a record was redriven twice"
        # the hung-up clients' scans ran too (limit 1 each)
        doc = ok(st, None, {"limit": 10000})
        assert doc["matched"] == n * 3 // 4 and doc["skipped"] == 1, doc
        assert doc["redriven"] + doc["already"] == doc["matched"], doc
        assert doc["already"] >= len(ids), doc
        done = doc["already"] + doc["redriven"]
        bulk = st.consume("promptq.bulk", done, timeout=T(20))
        assert len(bulk) == done, (len(bulk), done)
        assert len({m["key"] for m in bulk}) == done, "a job produced twice"
        # open mode: ?tenant= picks the tenant
        status, _, text = harness.http("POST", st.broker_url + "/v1/dlq/redrive?tenant=other",
                                       body={})
        doc = json.loads(text)
        assert status == 200 and counts(doc) == (n // 4, n // 4, n // 4, 0, 0), (status, doc)
        assert all(j["id"].startswith("d-") for j in doc["jobs"]), doc
        status, _, _ = harness.http("POST", st.broker_url + "/v1/dlq/redrive?tenant=bad%20t",
                                    body={})
        assert status == 400

        # a record created by an earlier redrive whose message never reached Kafka (no
        # produced mark, still queued and never delivered: a lost reply or a crash) is
        # produced again rather than counted as already done
        lost = ids[0]
        st.redis_.cli("HDEL", "promptq:job:default:" + lost, "redrive_produced")
        doc = ok(st, None, {"ids": [lost.split(".r")[0]]})
        assert (doc["redriven"], doc["already"]) == (1, 0), doc
        doc = ok(st, None, {"ids": [lost.split(".r")[0]]})  # marked now
        assert (doc["redriven"], doc["already"]) == (0, 1), doc
        assert harness.http("GET", st.broker_url + "/healthz")[0] == 200


harness.run(globals())
