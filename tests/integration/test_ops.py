"""Operator endpoints of promptq-broker (DESIGN.md §5): GET /v1/health and GET /v1/parked
aggregate the workers' health keys (real promptq-worker processes, real redis-server,
promptq-devkafka and promptq-sim); replay is accepted for a configured route only; the CLI's `promptq health` and `promptq parked` print them; a redis URL naming
localhost is resolved on the loop (evdns) and works."""

import json
import subprocess

import harness
from harness import T, wait_for

ROUTE = "r"


def provider(sim):
    return {"type": "openai", "base_url": sim.api, "retries_per_target": 1, "retry_base_ms": 20,
            "retry_max_ms": 100, "timeout_ms": 2000, "circuit_failures": 3,
            "circuit_cooldown_ms": 1000, "probe_interval_ms": 1000}


def up(st, workers=1, redis_url=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    s = st.sim("a")
    s.set_state({"mode": "ok", "latency_ms": 5})
    extra = {"worker": {"lease_ms": 3000, "max_inflight": 256}}
    if redis_url:
        extra["redis"] = {"url": redis_url}
    path, _ = st.config(providers={"a": provider(s)},
                        routes={ROUTE: [{"provider": "a", "model": "m-a"}]}, extra=extra)
    b = st.spawn("promptq-broker", "--config", path, name="broker")
    wait_for(lambda: ready(st.broker_url), T(20), "broker /readyz")
    ws = [st.spawn("promptq-worker", "--config", path, name="worker%d" % i)
          for i in range(workers)]
    return r, s, path, b, ws


def ready(url):
    try:
        return harness.http("GET", url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def get(st, path, headers=None):
    status, _, body = harness.http("GET", st.broker_url + path, headers=headers or {})
    return status, json.loads(body)


def health(st):
    return get(st, "/v1/health")


def done(st, ids):
    """Waits until every job succeeded (a worker's circuits appear once it called a target)."""
    wait_for(lambda: all(get(st, "/v1/jobs/" + i)[1].get("status") == "succeeded"
                         for i in ids), T(30), "jobs succeeded")


def submit(st, n, prefix):
    ids = []
    for i in range(n):
        status, _, body = harness.http(
            "POST", st.broker_url + "/v1/jobs",
            body={"request": {"model": ROUTE,
                              "messages": [{"role": "user", "content": "%s %d" % (prefix, i)}]}})
        assert status == 202, (status, body)
        ids.append(json.loads(body)["id"])
    return ids


def cli(st, *args):
    p = subprocess.run([harness.binary("promptq"), "--url", st.broker_url] + list(args),
                       capture_output=True, text=True, timeout=T(30))
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------


def test_health_ok_then_degraded_with_parked():
    """One worker, provider up: status ok, the worker listed, circuits closed, route up. The
    provider down with jobs submitted: jobs parked; /v1/health shows the route down with parked
    > 0 and an open circuit (degraded or down), /v1/parked the same; the CLI prints both; an
    operator replay is accepted (202) for the route, 404 for an unknown one."""
    with harness.Stack("ops_health") as st:
        r, s, path, b, ws = up(st)
        done(st, submit(st, 2, "warm"))

        def ok():
            code, h = health(st)
            return code == 200 and h["status"] == "ok" and h["workers"] and h["providers"]
        wait_for(ok, T(30), "/v1/health ok with the worker listed")
        code, h = health(st)
        assert h["broker"]["kafka"] == "up", h
        assert set(h["broker"]["spool"]) == {"pending_records", "pending_bytes", "full"}, h
        assert len(h["workers"]) == 1, h
        w = h["workers"][0]
        assert w["instance"] and w["updated_at"] > 0 and w["paused"] is False, w
        assert [(p["provider"], p["model"], p["circuit"]) for p in h["providers"]] == \
            [("a", "m-a", "closed")], h
        assert h["routes"][ROUTE]["down"] is False and h["routes"][ROUTE]["parked"] == 0, h
        assert "password" not in json.dumps(h) and "api_key" not in json.dumps(h)
        rc, out, err = cli(st, "health")
        assert rc == 0, (rc, out, err)
        assert "ok" in out and w["instance"] in out and "closed" in out, out

        code, p = get(st, "/v1/parked")
        assert code == 200 and [x["route"] for x in p["routes"]] == [ROUTE], p
        assert p["routes"][0]["parked"] == 0 and p["routes"][0]["retry_topic"] == \
            "promptq.retry." + ROUTE, p

        # provider down: jobs park
        s.set_state({"mode": "down"})
        submit(st, 20, "park")

        def degraded():
            code, h = health(st)
            rt = h["routes"].get(ROUTE, {})
            return code == 503 and h["status"] in ("degraded", "down") and rt.get("down") \
                and rt.get("parked", 0) > 0
        wait_for(degraded, T(40), "/v1/health: route down with parked jobs")
        code, h = health(st)
        assert h["providers"][0]["circuit"] in ("open", "half_open"), h
        assert h["providers"][0]["last_probe"] is None or "ok" in h["providers"][0]["last_probe"]
        code, p = get(st, "/v1/parked?route=" + ROUTE)
        assert code == 200 and len(p["routes"]) == 1, p
        assert p["routes"][0]["down"] is True and p["routes"][0]["parked"] > 0, p
        assert p["routes"][0]["replay_rate"] == 0, p
        code, p = get(st, "/v1/parked?route=nope")
        assert code == 404 and p["error"]["type"] == "not_found", p

        rc, out, err = cli(st, "health")
        assert rc != 0 and ROUTE in out and "parked" in out, (rc, out, err)
        rc, out, err = cli(st, "parked", ROUTE)
        assert rc == 0 and ROUTE in out and "parked" in out, (rc, out, err)

        # the operator requests are accepted (their effects: test_parked_ops.py, test_redrive.py)
        code, _, body = harness.http("POST", st.broker_url + "/v1/parked/%s/replay" % ROUTE)
        assert code == 202 and json.loads(body)["object"] == "parked.replay", (code, body)
        code, _, body = harness.http("POST", st.broker_url + "/v1/parked/unknown-route/replay")
        assert code == 404, (code, body)
        code, _, _ = harness.http("PUT", st.broker_url + "/v1/health")
        assert code == 405, code

        # provider back: replayed, ok again
        s.set_state({"mode": "ok", "latency_ms": 5})
        wait_for(lambda: health(st)[1]["status"] == "ok", T(40), "/v1/health ok again")


def test_two_workers_summed_then_none():
    """Two workers: both listed, parked summed across them; no worker alive (keys gone): down;
    Redis gone: down with the broker's own state (redis down)."""
    with harness.Stack("ops_two") as st:
        r, s, path, b, ws = up(st, workers=2)
        done(st, submit(st, 16, "warm"))
        wait_for(lambda: len(health(st)[1]["workers"]) == 2, T(30), "both workers listed")
        code, h = health(st)
        assert code == 200 and h["status"] == "ok", h
        assert len({w["instance"] for w in h["workers"]}) == 2, h
        # both called the target (jobs spread over the partitions of both), or one did
        assert h["providers"][0]["workers"] in (1, 2) and h["providers"][0]["circuit"] == \
            "closed", h

        s.set_state({"mode": "down"})
        submit(st, 40, "two")

        def summed():
            keys = [k for k in r.cli("--scan", "--pattern", "promptq:health:*").splitlines()
                    if k]
            if len(keys) != 2:
                return False
            per = [json.loads(r.cli("GET", k))["routes"].get(ROUTE, {}).get("parked", 0)
                   for k in keys]
            code, p = get(st, "/v1/parked")
            rt = [x for x in p["routes"] if x["route"] == ROUTE][0]
            # equal to the sum of the keys read just before (both refresh every 5 s: retry)
            return sum(per) > 0 and rt["parked"] == sum(per) and rt["workers"] == 2
        wait_for(summed, T(40), "parked summed over both workers' health keys")

        for w in ws:
            w.kill()
        for w in ws:
            w.wait(T(20))
        # a stopped worker's key lives out its TTL; drop them rather than wait 15 s
        for k in r.cli("--scan", "--pattern", "promptq:health:*").splitlines():
            if k:
                r.cli("DEL", k)
        code, h = health(st)
        assert code == 503 and h["status"] == "down" and h["workers"] == [], h
        assert h["broker"]["redis"] == "up", h
        rc, out, err = cli(st, "health")
        assert rc != 0 and "down" in out, (rc, out, err)

        # Redis gone: the broker still answers its own state, Redis down
        r.kill()
        code, h = health(st)
        assert code == 503 and h["status"] == "down" and h["broker"]["redis"] == "down", h
        assert h["broker"]["kafka"] == "up", h


def test_auth_and_localhost_redis():
    """With API keys: /v1/health without a key is 401, with any valid key 200. The broker's redis
    URL names localhost (resolved on the loop through /etc/hosts by evdns): jobs are accepted
    and /v1/health reads the worker's key."""
    with harness.Stack("ops_localhost") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = st.sim("a")
        s.set_state({"mode": "ok", "latency_ms": 5})
        path, _ = st.config(providers={"a": provider(s)},
                            routes={ROUTE: [{"provider": "a", "model": "m-a"}]},
                            extra={"worker": {"lease_ms": 3000}})
        bpath, _ = st.config(providers={"a": provider(s)},
                             routes={ROUTE: [{"provider": "a", "model": "m-a"}]},
                             extra={"redis": {"url": "redis://localhost:%d/0" % r.port},
                                    "broker": {"api_keys": {"sk-ops-1": "t1"}}},
                             name="broker.json")
        st.spawn("promptq-broker", "--config", bpath, name="broker")
        wait_for(lambda: ready(st.broker_url), T(20), "broker /readyz")
        st.spawn("promptq-worker", "--config", path, name="worker")
        code, body = get(st, "/v1/health")
        assert code == 401, (code, body)
        auth = {"Authorization": "Bearer sk-ops-1"}
        wait_for(lambda: get(st, "/v1/health", auth)[1].get("status") == "ok", T(30),
                 "/v1/health ok through redis://localhost")
        status, _, body = harness.http("POST", st.broker_url + "/v1/jobs", headers=auth,
                                       body={"request": {"model": ROUTE, "messages": [
                                           {"role": "user", "content": "hi"}]}})
        assert status == 202, (status, body)
        jid = json.loads(body)["id"]
        wait_for(lambda: get(st, "/v1/jobs/" + jid, auth)[1].get("status") == "succeeded",
                 T(30), "job done")
        with open(st.procs[-2].log_path, errors="replace") as f:
            log = f.read()
        # hiredis was handed the address evdns found, not the name
        assert "redis connected (127.0.0.1:%d)" % r.port in log, log[-2000:]


harness.run(globals())
