"""Tenants (API keys map to tenants; another tenant's job does not exist), Idempotency-Key on
POST /v1/jobs, the per-tenant rate limit and DELETE /v1/jobs/{id} (cancel). No worker runs: a
job stays queued until the test moves it."""

import json
import threading
import time

import harness
from harness import T, wait_for

ROUTES = {"m1": [{"provider": "sim", "model": "x"}]}
PROVIDERS = {"sim": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def job(prompt):
    return {"request": {"model": "m1", "messages": [{"role": "user", "content": prompt}]}}


def start(st, broker_extra=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    extra = {"broker": {"api_keys": KEYS}}
    if broker_extra:
        extra["broker"].update(broker_extra)
    path, _ = st.config(providers=PROVIDERS, routes=ROUTES, extra=extra)
    st.broker(path)
    return r


def post(st, body, headers):
    return harness.http_json("POST", st.broker_url + "/v1/jobs", body, headers)


def requests_with(st, prompt):
    return [m for m in st.consume_all("promptq.requests")
            if json.loads(m["value"])["request"]["messages"][0]["content"] == prompt]


def test_tenant_isolation():
    with harness.Stack("tenants-isolation") as st:
        start(st)
        status, _, doc = post(st, job("a's job"), A)
        assert status == 202, doc
        jid = doc["id"]
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=A)
        assert status == 200 and doc["tenant"] == "tenant-a", doc
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=B)
        assert status == 404 and doc["error"]["type"] == "not_found", doc
        status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + jid,
                                           headers=B)
        assert status == 404, doc
        # B's failed cancel left A's job alone
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=A)
        assert status == 200 and doc["status"] == "queued", doc
        # an envelope naming another tenant is refused for this key
        body = dict(job("x"), tenant="tenant-b")
        status, _, doc = post(st, body, A)
        assert status == 403, doc
        status, _, _ = harness.http("DELETE", st.broker_url + "/v1/jobs/" + jid)
        assert status == 401


def test_idempotency_key_on_jobs():
    with harness.Stack("tenants-idem") as st:
        start(st)
        h = dict(A, **{"Idempotency-Key": "order-42"})
        status, hdrs, first = post(st, job("idem one"), h)
        assert status == 202, first
        status, hdrs, again = post(st, job("idem one"), h)
        assert status == 202 and again["id"] == first["id"], (first, again)
        assert again["durability"] == first["durability"], again
        assert hdrs["location"] == "/v1/jobs/" + first["id"]
        time.sleep(0.5)
        assert len(requests_with(st, "idem one")) == 1, "a repeat was produced again"

        status, _, doc = post(st, job("idem two"), h)
        assert status == 422 and doc["error"]["type"] == "idempotency_key_reused", doc
        assert len(requests_with(st, "idem two")) == 0

        # keys are per tenant: the same key from tenant B is another job
        status, _, doc_b = post(st, job("idem one"), dict(B, **{"Idempotency-Key": "order-42"}))
        assert status == 202 and doc_b["id"] != first["id"], doc_b

        # concurrent first uses: one job, every answer names it
        answers = []
        body = job("idem concurrent")
        hc = dict(A, **{"Idempotency-Key": "order-43"})

        def one():
            answers.append(post(st, body, hc))
        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T(30))
        assert len(answers) == 12
        assert all(a[0] == 202 for a in answers), [a[:1] + a[2:] for a in answers]
        ids = {a[2]["id"] for a in answers}
        assert len(ids) == 1, ids
        time.sleep(0.5)
        assert len(requests_with(st, "idem concurrent")) == 1

        status, _, doc = post(st, job("x"), dict(A, **{"Idempotency-Key": "has space"}))
        assert status == 400, doc
        status, _, doc = post(st, job("x"), dict(A, **{"Idempotency-Key": "k" * 256}))
        assert status == 400, doc


def test_rate_limit_per_tenant():
    with harness.Stack("tenants-ratelimit") as st:
        start(st, {"tenant_rps": 2, "tenant_burst": 3, "threads": 2})
        got = [post(st, job("rl %d" % i), A) for i in range(8)]
        codes = [g[0] for g in got]
        assert codes.count(202) >= 3 and codes.count(202) <= 5, codes
        limited = [g for g in got if g[0] == 429]
        assert limited, codes
        for status, hdrs, doc in limited:
            assert doc["error"]["type"] == "rate_limited", doc
            assert int(hdrs["retry-after"]) >= 1, hdrs
        # another tenant has its own bucket
        status, _, doc = post(st, job("rl b"), B)
        assert status == 202, doc
        # chat and cancel count too
        status, hdrs, raw = harness.http("POST", st.broker_url + "/v1/chat/completions",
                                         job("x")["request"], A)
        assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limited", raw
        time.sleep(1.2)  # refills at 2/s
        status, _, doc = post(st, job("rl after"), A)
        assert status == 202, doc


def test_cancel():
    with harness.Stack("tenants-cancel") as st:
        r = start(st)
        status, _, doc = post(st, dict(job("to cancel"), metadata={"k": "v"}), A)
        assert status == 202, doc
        jid = doc["id"]
        status, _, rec = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + jid, headers=A)
        assert status == 200, rec
        assert rec["id"] == jid and rec["tenant"] == "tenant-a", rec
        assert rec["status"] == "cancelled" and rec["error"]["type"] == "cancelled", rec
        assert rec["route"] == "m1", rec
        for k in ("provider", "model", "attempts", "metadata", "latency_ms", "created_at",
                  "completed_at", "source"):
            assert k in rec, (k, rec)
        msgs = [m for m in st.consume("promptq.results", 1) if m["key"] == jid]
        assert len(msgs) == 1, msgs
        assert json.loads(msgs[0]["value"]) == rec
        # the record is terminal with that result: a worker's job_begin re-publishes it
        assert r.cli("HGET", "promptq:job:tenant-a:" + jid, "status") == "cancelled"
        assert json.loads(r.cli("HGET", "promptq:job:tenant-a:" + jid, "result")) == rec
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=A)
        assert status == 200 and doc["status"] == "cancelled", doc

        status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + jid, headers=A)
        assert status == 409 and doc["error"]["type"] == "not_cancellable", doc
        status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/jobs/job_nope",
                                           headers=A)
        assert status == 404, doc

        # parked can be cancelled, running cannot
        status, _, doc = post(st, job("running one"), A)
        r.cli("HSET", "promptq:job:tenant-a:" + doc["id"], "status", "running")
        status, _, err = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + doc["id"],
                                           headers=A)
        assert status == 409, err
        assert r.cli("HGET", "promptq:job:tenant-a:" + doc["id"], "status") == "running"
        status, _, doc = post(st, job("parked one"), A)
        r.cli("HSET", "promptq:job:tenant-a:" + doc["id"], "status", "parked")
        status, _, rec = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + doc["id"],
                                           headers=A)
        assert status == 200 and rec["status"] == "cancelled", rec
        wait_for(lambda: any(m["key"] == doc["id"] for m in st.consume_all("promptq.results")),
                 T(10), "the parked job's cancelled result on promptq.results")


harness.run(globals())
