"""Operator requests on parked jobs (DESIGN §5), through promptq-broker to the workers:
POST /v1/parked/{route}/replay closes the route's circuits by force and replays its parked jobs
at once (here while the provider's status page still says "major", which alone keeps them
parked); DELETE /v1/parked/{route} drops the caller's tenant's parked jobs (they end as
cancelled without a provider call, another tenant's jobs are untouched). Real redis-server,
promptq-devkafka, promptq-sim, broker and worker."""

import time

import harness
from harness import T, wait_for

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
ROUTE = "team/model-1"  # a route name with a "/" (percent-encoded in the path)
PATH = "team%2Fmodel-1"


def up(st, page, persist=False):
    r = st.redis(persist=persist)
    st.devkafka(brokers=1, partitions=4)
    s = st.sim("a")
    prov = {"type": "openai", "base_url": s.api, "retries_per_target": 0, "timeout_ms": 2000,
            "circuit_failures": 2, "circuit_cooldown_ms": 300, "probe_interval_ms": 300,
            "status_url": page.url}
    path, _ = st.config(providers={"sim": prov}, routes={ROUTE: [{"provider": "sim",
                                                                   "model": "m"}]},
                        extra={"broker": {"api_keys": KEYS, "admin_tenants": ["tenant-a"]},
                               "worker": {"lease_ms": 3000, "max_inflight": 256}})
    st.broker(path)
    st.spawn("promptq-worker", "--config", path, name="worker")
    return r, s, path


def submit(st, n, headers, tag):
    ids = []
    for i in range(n):
        body = {"request": {"model": ROUTE,
                            "messages": [{"role": "user", "content": "%s %d" % (tag, i)}]}}
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", body, headers)
        assert status == 202, doc
        ids.append(doc["id"])
    return ids


def status_of(st, jid, headers):
    status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=headers)
    assert status == 200, doc
    return doc


def worker_log(st):
    w = [p for p in st.procs if p.name == "worker"][0]
    with open(w.log_path, errors="replace") as f:
        return f.read()


def all_status(st, ids, headers, want):
    return all(status_of(st, i, headers)["status"] == want for i in ids)


def test_replay_now_overrides_the_status_page():
    page = harness.StatusPage()
    try:
        page.indicator = "major"  # read every 5 s: set before the outage
        with harness.Stack("parked-replay") as st:
            r, s, _ = up(st, page)
            s.set_state({"mode": "down"})
            ids = submit(st, 8, A, "replay")
            wait_for(lambda: all_status(st, ids, A, "parked"), T(30), "jobs parked",
                     interval=0.3)
            # the provider is back, but its status page says major: probes keep it open
            s.set_state({"mode": "ok"})
            time.sleep(T(2))
            assert all_status(st, ids, A, "parked")

            status, _, doc = harness.http_json("POST", st.broker_url + "/v1/parked/nope/replay",
                                               headers=A)
            assert status == 404, doc
            status, _, doc = harness.http_json("GET", st.broker_url + "/v1/parked/%s/replay"
                                               % PATH, headers=A)
            assert status == 405, doc
            status, _, doc = harness.http_json("POST", st.broker_url + "/v1/parked/%s/replay"
                                               % PATH)
            assert status == 401, doc
            # a replay acts for every tenant: only an admin tenant's key may ask
            status, _, doc = harness.http_json("POST", st.broker_url + "/v1/parked/%s/replay"
                                               % PATH, headers=B)
            assert status == 403 and "admin_tenants" in doc["error"]["message"], doc
            time.sleep(T(1.5))
            assert all_status(st, ids, A, "parked")
            t0 = time.time()
            status, _, doc = harness.http_json("POST", st.broker_url + "/v1/parked/%s/replay"
                                               % PATH, headers=A)
            assert status == 202 and doc["route"] == ROUTE, doc
            assert doc["object"] == "parked.replay" and doc["requested_at"] >= int(t0 * 1000) - 5
            wait_for(lambda: all_status(st, ids, A, "succeeded"), T(30),
                     "replayed after the operator's request", interval=0.3)
    finally:
        page.close()


def test_drop_ends_only_the_callers_parked_jobs():
    page = harness.StatusPage()
    try:
        with harness.Stack("parked-drop") as st:
            r, s, _ = up(st, page)
            s.set_state({"mode": "down"})
            a_ids = submit(st, 6, A, "drop a")
            b_ids = submit(st, 6, B, "drop b")
            wait_for(lambda: all_status(st, a_ids, A, "parked") and
                     all_status(st, b_ids, B, "parked"), T(30), "jobs parked", interval=0.3)
            calls = s.stats()["requests"]
            status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/parked/" + PATH,
                                               headers=A)
            assert status == 202, doc
            assert doc["object"] == "parked.drop" and doc["tenant"] == "tenant-a", doc
            # the workers read it within a second; then the provider comes back: B's jobs
            # replay, A's end as cancelled without a call
            wait_for(lambda: "dropped tenant tenant-a's parked jobs" in worker_log(st), T(10),
                     "the worker read the drop", interval=0.2)
            s.set_state({"mode": "ok"})
            wait_for(lambda: all_status(st, b_ids, B, "succeeded"), T(40), "B replayed",
                     interval=0.3)
            wait_for(lambda: all_status(st, a_ids, A, "cancelled"), T(20), "A dropped",
                     interval=0.3)
            for i in a_ids:
                doc = status_of(st, i, A)
                assert "dropped by an operator" in doc["error"]["message"], doc
            # B's six replays plus probes; none of A's six
            assert s.stats()["requests"] - calls < 6 + 6, s.stats()
            rec = r.cli("HGETALL", "promptq:ops:route:" + ROUTE).split("\n")
            assert "drop:tenant-a" in rec and "drop:tenant-b" not in rec, rec
    finally:
        page.close()


def test_a_fresh_worker_reads_drops_before_replaying():
    """A worker started after a drop replays nothing before it has read the route's operator
    requests: while that read fails (the ops key made unreadable: a string where the hash
    belongs) its parked jobs stay parked and the provider, back by then, gets no call; once
    the read works the dropped jobs end as cancelled, still without a call."""
    page = harness.StatusPage()
    try:
        with harness.Stack("parked-drop-fresh") as st:
            r, s, path = up(st, page)
            s.set_state({"mode": "down"})
            ids = submit(st, 6, A, "fresh")
            wait_for(lambda: all_status(st, ids, A, "parked"), T(30), "jobs parked",
                     interval=0.3)
            w = [p for p in st.procs if p.name == "worker"][0]
            w.kill()
            w.wait(T(20))
            status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/parked/" + PATH,
                                               headers=A)
            assert status == 202, doc
            ops = "promptq:ops:route:" + ROUTE
            r.cli("RENAME", ops, ops + ".saved")
            r.cli("SET", ops, "unreadable")
            s.set_state({"mode": "ok"})
            calls = s.stats()["requests"]
            w2 = st.spawn("promptq-worker", "--config", path, name="worker2")
            wait_for(lambda: "assigned" in open(w2.log_path, errors="replace").read(), T(20),
                     "the new worker's assignment")
            time.sleep(T(3))
            assert all_status(st, ids, A, "parked") and s.stats()["requests"] == calls
            r.cli("RENAME", ops + ".saved", ops)  # one step: RENAME replaces the string
            wait_for(lambda: all_status(st, ids, A, "cancelled"), T(30), "dropped jobs ended",
                     interval=0.5)
            assert s.stats()["requests"] == calls, s.stats()
    finally:
        page.close()


harness.run(globals())
