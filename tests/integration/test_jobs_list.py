"""GET /v1/jobs?status=&after=&limit=: the tenant's jobs newest first in the OpenAI list shape.
Tenant isolation, pagination (no duplicates, nothing skipped), the status filter and its scan cap
(an empty page with has_more and a cursor), parameter errors, 401, 503 without Redis, index
entries of expired or deleted records dropped, and jobs produced straight into Kafka (indexed by
the worker) or sent through chat completions appearing once they ran."""

import time
import urllib.parse

import harness
from harness import T, wait_for

ROUTES = {"m1": [{"provider": "sim", "model": "x"}]}
PROVIDERS = {"sim": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
TERMINAL = ("succeeded", "failed", "expired", "cancelled")


def job(prompt):
    return {"request": {"model": "m1", "messages": [{"role": "user", "content": prompt}]}}


def start(st, redis_extra=None):
    """Broker only (no worker: jobs stay queued), API keys for tenants a and b."""
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    extra = {"broker": {"api_keys": KEYS}}
    if redis_extra:
        extra["redis"] = redis_extra
    path, _ = st.config(providers=PROVIDERS, routes=ROUTES, extra=extra)
    st.broker(path)
    return r


def submit(st, n, headers, tag):
    """Posts n jobs one after another (each in a later millisecond); returns their ids, oldest
    first."""
    ids = []
    for i in range(n):
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs",
                                           job("%s %d" % (tag, i)), headers)
        assert status == 202, (status, doc)
        ids.append(doc["id"])
        time.sleep(0.003)
    return ids


def listing(st, headers=None, **params):
    q = urllib.parse.urlencode(params)
    return harness.http_json("GET", st.broker_url + "/v1/jobs" + ("?" + q if q else ""),
                             headers=headers)


def page(st, headers=None, **params):
    status, _, doc = listing(st, headers, **params)
    assert status == 200, (status, doc)
    assert doc["object"] == "list" and isinstance(doc["data"], list), doc
    return doc


def walk(st, headers=None, **params):
    """Every page until has_more is false; returns the pages."""
    pages = []
    after = None
    while True:
        p = dict(params)
        if after:
            p["after"] = after
        doc = page(st, headers, **p)
        pages.append(doc)
        if not doc["has_more"]:
            return pages
        assert doc["last_id"], doc
        after = doc["last_id"]
        assert len(pages) < 100, "paging does not end"


def test_pagination_and_isolation():
    with harness.Stack("jobs_list-pages") as st:
        r = start(st)
        a_ids = submit(st, 45, A, "a")
        b_ids = submit(st, 3, B, "b")

        pages = walk(st, A, limit=20)
        assert [len(p["data"]) for p in pages] == [20, 20, 5], [len(p["data"]) for p in pages]
        assert [p["has_more"] for p in pages] == [True, True, False]
        listed = [j["id"] for p in pages for j in p["data"]]
        assert len(set(listed)) == len(listed), "duplicates across pages"
        assert listed == a_ids[::-1], "not every job once, newest first"
        for p in pages:
            assert p["first_id"] == p["data"][0]["id"] and p["last_id"] == p["data"][-1]["id"], p
        first = pages[0]["data"][0]
        assert first["object"] == "job" and first["status"] == "queued", first
        assert first["route"] == "m1" and first["attempts"] == 0, first
        assert "provider" not in first and "model" not in first, first
        # the times are those of GET /v1/jobs/{id}
        status, _, one = harness.http_json("GET", st.broker_url + "/v1/jobs/" + first["id"],
                                           headers=A)
        assert status == 200, one
        assert one["created_at"] == first["created_at"], (one, first)
        assert one["updated_at"] == first["updated_at"], (one, first)
        created = [j["created_at"] for p in pages for j in p["data"]]
        assert created == sorted(created, reverse=True), created

        # the default limit is 20
        doc = page(st, A)
        assert len(doc["data"]) == 20 and doc["has_more"], doc

        # B sees its own jobs only, and A none of B's
        doc = page(st, B)
        assert [j["id"] for j in doc["data"]] == b_ids[::-1], doc
        assert not doc["has_more"]
        assert not set(b_ids) & set(listed)
        # B cannot page from A's cursor: it is not in B's listing
        status, _, doc = listing(st, B, after=a_ids[10])
        assert status == 400 and "after" in doc["error"]["message"], doc
        # a tenant without jobs: an empty list
        assert r.cli("EXISTS", "promptq:jobs:tenant-a") == "1"
        assert int(r.cli("ZCARD", "promptq:jobs:tenant-a")) == 45
        ttl = int(r.cli("PTTL", "promptq:jobs:tenant-a"))
        assert 0 < ttl <= 604800 * 1000, ttl


def test_status_filter_and_scan_cap():
    with harness.Stack("jobs_list-status") as st:
        start(st)
        ids = submit(st, 45, A, "s")
        # cancel the two oldest and the newest
        cancelled = [ids[0], ids[1], ids[44]]
        for jid in cancelled:
            status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + jid,
                                               headers=A)
            assert status == 200 and doc["status"] == "cancelled", doc

        doc = page(st, A, status="cancelled")
        assert [j["id"] for j in doc["data"]] == cancelled[::-1], doc
        assert not doc["has_more"], doc
        for j in doc["data"]:
            assert j["status"] == "cancelled" and "provider" in j and "model" in j, j
            assert j["provider"] is None, j  # nobody answered
        doc = page(st, A, status="queued", limit=100)
        assert [j["id"] for j in doc["data"]] == [i for i in ids[::-1] if i not in cancelled]
        assert page(st, A, status="running")["data"] == []
        assert page(st, B, status="cancelled")["data"] == []

        # limit 1 scans at most 20 entries per page: the first page finds ids[44] and stops at
        # ids[25] (cursor); the second scans ids[24] to ids[5] and finds nothing: an empty page
        # with has_more and a cursor; the third finds ids[1] (ids[0] makes has_more), the fourth
        # ids[0]
        pages = walk(st, A, status="cancelled", limit=1)
        got = [j["id"] for p in pages for j in p["data"]]
        assert got == cancelled[::-1], got
        assert [len(p["data"]) for p in pages] == [1, 0, 1, 1], pages
        assert [p["last_id"] for p in pages] == [ids[25], ids[5], ids[1], ids[0]], pages
        assert pages[1]["first_id"] is None and pages[1]["has_more"], pages[1]
        assert [p["has_more"] for p in pages] == [True, True, True, False], pages


def test_bad_parameters_and_auth():
    with harness.Stack("jobs_list-params") as st:
        start(st)
        submit(st, 2, A, "p")
        for params, name in [({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                             ({"limit": "abc"}, "limit"), ({"limit": "5x"}, "limit"),
                             ({"limit": "-1"}, "limit"), ({"status": "done"}, "status"),
                             ({"after": "not an id!"}, "after"),
                             ({"after": "job_unknown"}, "after")]:
            status, _, doc = listing(st, A, **params)
            assert status == 400, (params, status, doc)
            assert doc["error"]["message"].startswith(name), (params, doc)
        assert len(page(st, A, limit=100)["data"]) == 2
        assert len(page(st, A, limit=1)["data"]) == 1

        status, _, doc = listing(st)
        assert status == 401, (status, doc)
        status, _, doc = listing(st, {"Authorization": "Bearer wrong"})
        assert status == 401, (status, doc)
        status, hdrs, _ = harness.http("PUT", st.broker_url + "/v1/jobs", b"{}", A)
        assert status == 405 and "GET" in hdrs.get("allow", ""), (status, hdrs)


def test_gone_records_leave_the_index():
    with harness.Stack("jobs_list-gone") as st:
        r = start(st)
        ids = submit(st, 5, A, "g")
        # a record deleted (as if expired): the listing skips it and drops its entry
        r.cli("DEL", "promptq:job:tenant-a:" + ids[2])
        doc = page(st, A)
        assert [j["id"] for j in doc["data"]] == [ids[4], ids[3], ids[1], ids[0]], doc
        assert r.cli("ZSCORE", "promptq:jobs:tenant-a", ids[2]) == "", "entry kept"
        assert int(r.cli("ZCARD", "promptq:jobs:tenant-a")) == 4
        # an entry older than result_ttl_s is trimmed by the next job's add
        old_ms = int(time.time() * 1000) - 604800 * 1000 - 60000
        r.cli("ZADD", "promptq:jobs:tenant-a", str(old_ms), "ancient")
        assert int(r.cli("ZCARD", "promptq:jobs:tenant-a")) == 5
        newer = submit(st, 1, A, "g2")
        assert r.cli("ZSCORE", "promptq:jobs:tenant-a", "ancient") == "", "old entry kept"
        assert int(r.cli("ZCARD", "promptq:jobs:tenant-a")) == 5
        assert page(st, A)["data"][0]["id"] == newer[0]
        # no Redis: 503 with Retry-After, not an empty list
        r.kill()
        wait_for(lambda: listing(st, A)[0] == 503, T(10), "503 without Redis")
        status, hdrs, doc = listing(st, A)
        assert status == 503 and hdrs.get("retry-after") == "1", (status, hdrs, doc)


def test_expired_records_and_index():
    with harness.Stack("jobs_list-ttl") as st:
        r = start(st, redis_extra={"result_ttl_s": 2})
        ids = submit(st, 3, A, "t")
        ttl = int(r.cli("PTTL", "promptq:jobs:tenant-a"))
        assert 0 < ttl <= 2000, ttl
        wait_for(lambda: r.cli("EXISTS", "promptq:job:tenant-a:" + ids[0]) == "0", T(10),
                 "the records to expire")
        wait_for(lambda: page(st, A)["data"] == [], T(10), "an empty listing")
        wait_for(lambda: r.cli("EXISTS", "promptq:jobs:tenant-a") == "0", T(10),
                 "the index to expire")
        later = submit(st, 1, A, "t2")
        assert [j["id"] for j in page(st, A)["data"]] == later


def test_kafka_and_chat_jobs_listed():
    with harness.Stack("jobs_list-worker") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        st.sim("a")
        path, _ = st.config(extra={"worker": {"lease_ms": 3000}})
        st.broker(path)
        st.spawn("promptq-worker", "--config", path, name="worker")

        # open mode: the tenant comes from ?tenant=
        def tenant_jobs(tenant, **params):
            return page(st, None, tenant=tenant, **params)["data"]

        env = {"id": "direct-1", "tenant": "t-k",
               "request": {"model": "sim-model",
                           "messages": [{"role": "user", "content": "straight in"}]}}
        st.produce("promptq.requests", [env], keys=["direct-1"])
        bare = {"model": "sim-model", "messages": [{"role": "user", "content": "bare"}]}
        st.produce("promptq.requests", [bare])

        def done(tenant, n):
            data = tenant_jobs(tenant)
            return len(data) >= n and all(j["status"] == "succeeded" for j in data)
        wait_for(lambda: done("t-k", 1), T(60), "direct-1 listed as succeeded")
        (j,) = tenant_jobs("t-k")
        assert j["id"] == "direct-1" and j["route"] == "sim-model", j
        assert j["provider"] == "sim" and j["model"] == "sim-model" and j["attempts"] == 1, j
        assert tenant_jobs("t-k", status="succeeded")[0]["id"] == "direct-1"
        assert tenant_jobs("t-k", status="queued") == []
        assert "direct-1" not in [x["id"] for x in tenant_jobs("default")]

        # the bare body got a kafka- id in the default tenant; a chat completion follows it
        wait_for(lambda: done("default", 1), T(60), "the bare job listed as succeeded")
        status, hdrs, doc = harness.http_json("POST", st.broker_url + "/v1/chat/completions",
                                              {"model": "sim-model", "messages": [
                                                  {"role": "user", "content": "chat"}]})
        assert status == 200, (status, doc)
        chat_id = hdrs["x-promptq-job-id"]
        wait_for(lambda: done("default", 2), T(30), "the chat job listed as succeeded")
        data = tenant_jobs("default")
        assert len(data) == 2, data
        assert data[0]["id"] == chat_id and data[1]["id"].startswith("kafka-"), data
        assert r.cli("ZCARD", "promptq:jobs:default") == "2"


harness.run(globals())
