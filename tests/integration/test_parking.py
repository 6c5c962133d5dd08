"""Outage parking and replay (DESIGN.md §2 G4, §3 retry topics, §4 health key, §8), worker side:
envelopes produced straight to promptq.requests, real redis-server, promptq-devkafka and
promptq-sim instances. Every target of a route down -> jobs parked on promptq.retry.<route>
(record parked, source offsets committed); providers back -> replayed at a ramped rate; a down
route never slows another; an idle worker during a total outage; park TTL, deadline and poison
expiry; SIGHUP creates a new route's retry topic; SIGKILL while partitions are held loses
nothing."""

import json
import os
import signal
import subprocess
import time
from datetime import datetime

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"
DLQ = "promptq.dlq"
FULL = os.environ.get("PQ_FAULT_FULL") == "1"


def provider(sim, **kw):
    p = {"type": "openai", "base_url": sim.api, "retries_per_target": 1, "retry_base_ms": 20,
         "retry_max_ms": 100, "timeout_ms": 2000, "circuit_failures": 3,
         "circuit_cooldown_ms": 1000, "probe_interval_ms": 1000}
    p.update(kw)
    return p


def up(st, routes=None, sims=("a", "b"), worker=None, prov=None, kafka=None, start=True,
       partitions=4):
    """redis + devkafka + sims; route "r" walks a then b unless routes says otherwise."""
    r = st.redis()
    st.devkafka(brokers=1, partitions=partitions)
    s = {n: st.sim(n) for n in sims}
    providers = {n: provider(s[n], **(prov or {})) for n in sims}
    if routes is None:
        routes = {"r": [{"provider": n, "model": "m-" + n} for n in sims]}
    extra = {"worker": {"lease_ms": 3000, "max_inflight": 256}}
    if worker:
        harness._merge(extra, {"worker": worker})
    if kafka:
        extra["kafka"] = kafka
    path, cfg = st.config(providers=providers, routes=routes, extra=extra)
    w = st.spawn("promptq-worker", "--config", path, name="worker") if start else None
    return r, s, path, w


def env(job_id, prompt, route="r", **kw):
    e = {"id": job_id, "request": {"model": route,
                                   "messages": [{"role": "user", "content": prompt}]}}
    e.update(kw)
    return e


def submit(st, envs):
    st.produce(REQ, envs, keys=[e["id"] for e in envs])


def docs(st, topic):
    return [json.loads(m["value"]) for m in st.consume_all(topic)]


def results(st, ids, timeout=None):
    want = set(ids)
    got = {}

    def have_all():
        got.clear()
        for d in docs(st, RESULTS):
            got.setdefault(d["id"], d)
        return want <= set(got)
    try:
        wait_for(have_all, timeout or T(30), "results of %d jobs" % len(want), interval=0.3)
    except AssertionError:
        raise AssertionError("%d jobs without a result, e.g. %s" %
                             (len(want - set(got)), sorted(want - set(got))[:5]))
    return {i: got[i] for i in ids}


def content(res):
    return res["response"]["choices"][0]["message"]["content"]


def ts(s):
    return datetime.strptime(s.replace("Z", "+0000"),
                             "%Y-%m-%dT%H:%M:%S.%f%z" if "." in s else "%Y-%m-%dT%H:%M:%S%z"
                             ).timestamp()


def status(r, job_id):
    return r.cli("HGET", "promptq:job:default:" + job_id, "status")


def parked_ids(st, topic="promptq.retry.r"):
    return {d.get("id") for d in docs(st, topic)}


def log_text(proc):
    with open(proc.log_path, errors="replace") as f:
        return f.read()


def set_all(sims, state):
    for s in sims.values():
        s.set_state(state)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def log_lines(proc):
    return len(log_text(proc).splitlines())


def health(r):
    """The first worker health key: (document, PTTL), or (None, None)."""
    keys = [k for k in r.cli("--scan", "--pattern", "promptq:health:*").splitlines() if k]
    if not keys:
        return None, None
    return json.loads(r.cli("GET", keys[0])), r.cli("PTTL", keys[0])


# ---------------------------------------------------------------------------------------------


def test_all_down_parks_then_replays():
    """Every target down: jobs are parked (record parked, on the retry topic with a park object,
    source offsets committed: a second worker started later does not run them from
    promptq.requests). Providers back: every job replayed and succeeded, ramped."""
    with harness.Stack("park_replay") as st:
        r, s, path, w = up(st)
        set_all(s, {"mode": "down"})
        ids = ["pk-%03d" % i for i in range(200)]
        submit(st, [env(i, "park " + i) for i in ids])
        wait_for(lambda: set(ids) <= parked_ids(st), T(40), "every job on promptq.retry.r",
                 interval=0.5)
        wait_for(lambda: all(status(r, i) == "parked" for i in ids[:10] + ids[-10:]), T(10),
                 "records parked")
        park = [d for d in docs(st, "promptq.retry.r") if d["id"] == ids[0]][0]["park"]
        assert set(park) == {"reason", "attempts", "parked_at", "deliveries"}, park
        assert park["deliveries"] >= 1 and ts(park["parked_at"]) > time.time() - 120, park
        msgs = [m for m in st.consume_all("promptq.retry.r") if json.loads(m["value"])["id"] == ids[0]]
        assert msgs[0]["key"] == ids[0], msgs[0]
        assert not docs(st, RESULTS)
        # health key: route down, circuits open, parked counted, TTL a few refresh periods
        def h_ok():
            h, ttl = health(r)
            if not h:
                return False
            rt = h["routes"].get("r", {})
            return rt.get("down") and rt.get("parked", 0) >= 150 and \
                any(c["circuit"] != "closed" for c in h["circuits"])
        wait_for(h_ok, T(15), "health key: route r down with parked jobs")
        h, ttl = health(r)
        assert 0 < int(ttl) <= 15000, ttl
        assert {"provider", "model", "circuit", "last_probe", "status_page"} <= set(h["circuits"][0])
        assert h["inflight"] >= 0 and "routes" in h, h

        # source offsets committed (auto commit of the stored offsets, every 5 s): a second
        # worker of the group started after a SIGKILL does not run them from promptq.requests
        time.sleep(6)
        w.kill(signal.SIGKILL)
        w.wait(T(10))
        calls = {n: x.stats()["requests"] for n, x in s.items()}
        set_all(s, {"mode": "ok", "latency_ms": 10})
        w2 = st.spawn("promptq-worker", "--config", path, name="worker2")
        got = results(st, ids, T(60))
        for i in ids:
            assert got[i]["status"] == "succeeded" and content(got[i]) == "echo: park " + i
            assert got[i]["source"]["topic"] == "promptq.retry.r", got[i]["source"]
        assert all(status(r, i) == "succeeded" for i in ids[:10])
        n_results = len(docs(st, RESULTS))
        assert n_results == len(ids), n_results  # each exactly once
        # ramp: 20 jobs/s at first, doubling every second
        done = sorted(ts(got[i]["completed_at"]) for i in ids)
        first = [t for t in done if t < done[0] + 1.0]
        assert len(first) <= 45, len(first)
        assert done[-1] - done[0] >= 2.0, done[-1] - done[0]
        later = [t for t in done if done[0] + 2.0 <= t < done[0] + 3.0]
        assert len(later) > len(first) or len(ids) - len(first) < 100, (len(first), len(later))
        print("ramp: first second %d jobs, third second %d, all %d in %.1fs" %
              (len(first), len(later), len(ids), done[-1] - done[0]))
        assert w2.stop(T(15)) == 0


harness.run(globals())
