"""The durable path end to end: broker -> devkafka -> worker -> sim -> Redis + promptq.results.

"Lost" is counted from acknowledged ids (202 answers, or what we produced) against the ids on
promptq.results, never from Redis.
"""

import collections
import json
import signal
import time

import harness
from harness import T, wait_for

RESULTS = "promptq.results"


def stack_up(st, worker_extra=None, sim_state=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    s = st.sim("a")
    if sim_state:
        s.set_state(sim_state)
    extra = {"worker": {"lease_ms": 3000}}
    if worker_extra:
        harness._merge(extra, worker_extra)
    path, cfg = st.config(extra=extra)
    return r, s, path


def start_broker(st, path):
    b = st.spawn("promptq-broker", "--config", path, name="broker")
    wait_for(lambda: ready(st.broker_url), T(20), "broker /readyz")
    return b


def ready(url):
    try:
        return harness.http("GET", url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def job(prompt, **kw):
    body = {"request": {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}}
    body.update(kw)
    return body


def submit(st, bodies, concurrency=16):
    answers = harness.post_many(st.broker_url + "/v1/jobs", bodies, concurrency)
    bad = [a for a in answers if a[0] != 202]
    assert not bad, "not acknowledged: %d, first: %r" % (len(bad), bad[:3])
    return [a[2]["id"] for a in answers]


def results_by_id(st, want_ids, timeout):
    """Reads promptq.results until every wanted id is there (or timeout)."""
    want = set(want_ids)
    by_id = collections.defaultdict(list)

    def scan():
        by_id.clear()
        for m in st.consume_all(RESULTS):
            rec = json.loads(m["value"])
            assert m["key"] == rec["id"], "result key %r != id %r" % (m["key"], rec["id"])
            by_id[rec["id"]].append(rec)
        return want <= set(by_id)

    try:
        wait_for(scan, timeout, "results for %d ids" % len(want), interval=1.0)
    except AssertionError:
        missing = want - set(by_id)
        # where the first few stand in Redis: lost, still running, or done but not on the topic
        where = {j: st.redis_.cli("HGET", "promptq:job:default:" + j, "status")
                 for j in sorted(missing)[:5]}
        raise AssertionError("no result for %d of %d acknowledged ids (%d results read); "
                             "their Redis status: %s" %
                             (len(missing), len(want), sum(map(len, by_id.values())), where))
    return by_id


def content(rec):
    return rec["response"]["choices"][0]["message"]["content"]


def outcome(rec):
    body = rec.get("response") if rec["status"] == "succeeded" else rec.get("error")
    return json.dumps([rec["status"], body], sort_keys=True)


def assert_one_outcome_per_id(by_id):
    for jid, recs in by_id.items():
        outs = {outcome(r) for r in recs}
        assert len(outs) == 1, "id %s has %d different outcomes" % (jid, len(outs))


def prompt_of(rec, prompts_by_id):
    return prompts_by_id[rec["id"]]


def test_a_http_jobs_all_succeed():
    with harness.Stack("e2e-http") as st:
        r, s, path = stack_up(st)
        start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker")
        prompts = ["http prompt %d" % i for i in range(1000)]
        ids = submit(st, [job(p) for p in prompts])
        assert len(set(ids)) == 1000
        by_id = results_by_id(st, ids, T(120))
        for jid, p in zip(ids, prompts):
            recs = by_id[jid]
            assert recs[0]["status"] == "succeeded", recs[0]
            assert content(recs[0]) == "echo: " + p, (content(recs[0]), p)
            assert recs[0]["route"] == "sim-model" and recs[0]["provider"] == "sim"
        assert_one_outcome_per_id(by_id)
        # the Redis record agrees and GET serves it
        st_code, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + ids[7])
        assert st_code == 200 and doc["status"] == "succeeded", doc
        assert r.cli("HGET", "promptq:job:default:" + ids[7], "status") == "succeeded"


def test_b_direct_producer_without_ids():
    with harness.Stack("e2e-kcat") as st:
        r, s, path = stack_up(st)
        st.spawn("promptq-worker", "--config", path, name="worker")
        prompts = ["kcat prompt %d" % i for i in range(1000)]
        st.produce("promptq.requests",
                   [{"model": "sim-model", "messages": [{"role": "user", "content": p}]}
                    for p in prompts])
        by_prompt = collections.defaultdict(set)
        by_id = collections.defaultdict(list)

        def scan():
            by_prompt.clear()
            by_id.clear()
            for m in st.consume_all(RESULTS):
                rec = json.loads(m["value"])
                by_id[rec["id"]].append(rec)
                by_prompt[content(rec)[len("echo: "):]].add(rec["id"])
            return len(by_prompt) >= 1000

        wait_for(scan, T(120), "1000 results", interval=1.0)
        assert set(by_prompt) == set(prompts)
        for p, ids in by_prompt.items():
            assert len(ids) == 1, "prompt %r under ids %s" % (p, ids)
            (jid,) = ids
            assert jid.startswith("kafka-") and len(jid) == 30, jid
            assert all(c in "0123456789abcdef" for c in jid[6:]), jid
            assert by_id[jid][0]["status"] == "succeeded"
            assert r.cli("HGET", "promptq:job:default:" + jid, "status") == "succeeded"
        assert_one_outcome_per_id(by_id)


def count_running(r):
    """Jobs leased and not terminal right now."""
    return len([k for k in r.cli("--scan", "--pattern", "promptq:lease:*").splitlines() if k])


def test_c_worker_sigkill_three_times():
    with harness.Stack("e2e-sigkill") as st:
        r, s, path = stack_up(st, worker_extra={"worker": {"max_inflight": 400}},
                              sim_state={"mode": "ok", "latency_ms": 1500})
        start_broker(st, path)
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        prompts = ["kill prompt %d" % i for i in range(2000)]
        ids = submit(st, [job(p) for p in prompts], concurrency=32)
        for n in range(3):
            running = wait_for(lambda: (lambda c: c if c >= 200 else 0)(count_running(r)),
                               T(60), "200 leased jobs before kill %d" % (n + 1), interval=0.1)
            w.kill(signal.SIGKILL)
            w.wait(T(10))
            print("kill %d landed with %d jobs leased" % (n + 1, running), flush=True)
            w.start()
        by_id = results_by_id(st, ids, T(240))
        assert_one_outcome_per_id(by_id)
        seen = {}
        for jid, p in zip(ids, prompts):
            rec = by_id[jid][0]
            assert rec["status"] == "succeeded", rec
            assert content(rec) == "echo: " + p
            assert p not in seen, "prompt %r under two ids" % p
            seen[p] = jid
        extra = set(by_id) - set(ids)
        assert not extra, "results for ids nobody submitted: %s" % sorted(extra)[:5]


def test_d_second_worker_joins_mid_run():
    with harness.Stack("e2e-join") as st:
        r, s, path = stack_up(st, worker_extra={"worker": {"max_inflight": 200}},
                              sim_state={"mode": "ok", "latency_ms": 200})
        start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker1")
        prompts = ["join prompt %d" % i for i in range(1500)]
        ids = submit(st, [job(p) for p in prompts[:700]])
        wait_for(lambda: count_running(r) > 50, T(30), "work in progress")
        st.spawn("promptq-worker", "--config", path, name="worker2")
        ids += submit(st, [job(p) for p in prompts[700:]])
        by_id = results_by_id(st, ids, T(180))
        assert_one_outcome_per_id(by_id)
        for jid, p in zip(ids, prompts):
            assert content(by_id[jid][0]) == "echo: " + p


def test_e_id_reused_with_another_request():
    with harness.Stack("e2e-conflict") as st:
        r, s, path = stack_up(st)
        start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker")
        url = st.broker_url + "/v1/jobs"
        code, _, doc = harness.http_json("POST", url, job("first", id="client-1"))
        assert code == 202 and doc["id"] == "client-1", (code, doc)
        code, _, doc = harness.http_json("POST", url, job("same body again", id="client-1"))
        assert code == 409, (code, doc)
        assert doc["error"]["type"] and "client-1" in doc["error"]["message"], doc
        by_id = results_by_id(st, ["client-1"], T(60))
        assert content(by_id["client-1"][0]) == "echo: first"

        # a direct producer reusing the id with another request: dlq id_conflict, not run
        calls = s.stats()["requests"]
        st.produce("promptq.requests", [job("sneaky", id="client-1")], keys=["client-1"])
        dlq = wait_for(lambda: [m for m in st.consume_all("promptq.dlq")
                                if json.loads(m["value"]).get("id") == "client-1"],
                       T(60), "id_conflict on promptq.dlq", interval=0.5)
        err = json.loads(dlq[0]["value"])["error"]
        assert err["type"] == "id_conflict", err
        time.sleep(1)
        assert s.stats()["requests"] == calls, "the conflicting job reached the provider"
        assert r.cli("HGET", "promptq:job:default:client-1", "status") == "succeeded"


harness.run(globals())
