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
    health key says so); the worker is nearly idle during the outage; SIGKILLed while its retry
    partitions are held, the source offsets were committed: a second worker does not run them
    from promptq.requests. Providers back: every job replayed once and succeeded, ramped."""
    secs = 60 if FULL else 15
    wait_ms = os.environ.get("PQ_IDLE_FETCH_WAIT_MS", "100")
    with harness.Stack("park_replay") as st:
        # librdkafka's fetch loop on the request partitions is most of an idle worker's CPU:
        # the harness's 5 ms fetch wait (for fast tests) alone is ~200 fetches/s; production
        # keeps librdkafka's default of 500 ms
        r, s, path, w = up(st, kafka={"auto.commit.interval.ms": "1000",
                                      "fetch.wait.max.ms": wait_ms})
        set_all(s, {"mode": "down"})
        ids = ["pk-%03d" % i for i in range(200)]
        submit(st, [env(i, "park " + i) for i in ids])
        wait_for(lambda: set(ids) <= parked_ids(st), T(40), "every job on promptq.retry.r",
                 interval=0.5)
        wait_for(lambda: all(status(r, i) == "parked" for i in ids[:10] + ids[-10:]), T(10),
                 "records parked")
        park = [d for d in docs(st, "promptq.retry.r") if d["id"] == ids[0]][0]["park"]
        assert set(park) == {"reason", "attempts", "parked_at", "deliveries", "attempt_log"}, park
        assert park["attempt_log"] and park["attempt_log"][0]["provider"] == "a", park
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

        # a total outage with jobs parked: the worker is nearly idle (< 2 % of a core, < 1 log
        # line per second; 15 s, 60 s with PQ_FAULT_FULL=1)
        hz = os.sysconf("SC_CLK_TCK")
        c0, l0, t0 = cpu_ticks(w.pid), log_lines(w), time.monotonic()
        time.sleep(secs)
        c1, l1, t1 = cpu_ticks(w.pid), log_lines(w), time.monotonic()
        cpu = (c1 - c0) / hz / (t1 - t0)
        rate = (l1 - l0) / (t1 - t0)
        print("total outage over %.0fs (fetch.wait.max.ms=%s): worker CPU %.2f%% of one core, "
              "%.2f log lines/s" % (t1 - t0, wait_ms, cpu * 100, rate))
        assert cpu < 0.02, cpu
        assert rate < 1.0, rate

        # source offsets committed (auto commit of the stored offsets, every second here): a
        # second worker of the group started after a SIGKILL does not run them from
        # promptq.requests
        h, _ = health(r)
        assert h["routes"]["r"]["held_partitions"] > 0, h  # killed while partitions are held
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


def test_source_copy_of_a_parked_job_is_skipped():
    """A source-topic message of a job whose record says parked (an offset commit lost to a
    rebalance, or a client producing one envelope twice) is not run: the job's copy on the
    retry topic owns it, so the provider is not called for it while the route is down and
    promptq.results gets one result per job after the outage, not two."""
    with harness.Stack("park_source_copy") as st:
        r, s, path, w = up(st, sims=("a",))
        s["a"].set_state({"mode": "down"})
        ids = ["copy-%d" % i for i in range(6)]
        envs = [env(i, "copy " + i) for i in ids]
        submit(st, envs)
        wait_for(lambda: all(status(r, i) == "parked" for i in ids), T(30), "jobs parked",
                 interval=0.3)
        calls = s["a"].stats()["requests"]
        submit(st, envs)  # the same messages again on promptq.requests
        wait_for(lambda: log_text(w).count("but parked: its retry-topic copy owns it") ==
                 len(ids), T(20), "the source copies skipped", interval=0.3)
        assert all(status(r, i) == "parked" for i in ids)
        assert len([d for d in docs(st, "promptq.retry.r") if d["id"] in ids]) == len(ids)
        # probes only (every 1 s while open): none of the copies was called
        assert s["a"].stats()["requests"] - calls <= 3, s["a"].stats()
        s["a"].set_state({"mode": "ok"})
        got = results(st, ids, T(60))
        assert all(got[i]["status"] == "succeeded" for i in ids), got
        time.sleep(T(1.5))
        assert len([d for d in docs(st, RESULTS) if d["id"] in ids]) == len(ids)


def test_down_route_never_slows_another():
    """Route ra (provider a) down, route rb (provider b) up: rb's latency while ra's jobs park
    stays near its idle latency; ra back: its jobs replay ramped (20 jobs/s, doubling)."""
    with harness.Stack("park_two_routes") as st:
        routes = {"ra": [{"provider": "a", "model": "m-a"}],
                  "rb": [{"provider": "b", "model": "m-b"}]}
        r, s, path, w = up(st, routes=routes)
        set_all(s, {"mode": "ok", "latency_ms": 20})

        def rb_latency(tag, n=20):
            """Median latency_ms of the results (produce timestamp -> terminal write) of n
            jobs of rb submitted one at a time."""
            ids = ["%s-%02d" % (tag, i) for i in range(n)]
            lat = []
            for i in ids:
                submit(st, [env(i, "b " + i, route="rb")])
                lat.append(results(st, [i], T(20))[i]["latency_ms"] / 1000.0)
            lat.sort()
            return lat[len(lat) // 2]

        idle = rb_latency("idle", 8)
        s["a"].set_state({"mode": "down"})
        ids = ["ra-%03d" % i for i in range(400)]
        submit(st, [env(i, "a " + i, route="ra") for i in ids])
        busy = rb_latency("busy", 8)
        wait_for(lambda: set(ids) <= parked_ids(st, "promptq.retry.ra"), T(40),
                 "ra's jobs parked", interval=0.5)
        parked_busy = rb_latency("parked", 8)
        print("rb median latency (produce timestamp -> terminal write): idle %.3fs, while ra parks "
              "%.3fs, while ra is parked %.3fs" % (idle, busy, parked_busy))
        assert busy < idle + 0.25 and parked_busy < idle + 0.25, (idle, busy, parked_busy)
        assert not [d for d in docs(st, RESULTS) if d["id"].startswith("ra-")]

        t_up = time.time()
        s["a"].set_state({"mode": "ok", "latency_ms": 5})
        got = results(st, ids, T(60))
        assert all(got[i]["status"] == "succeeded" for i in ids)
        done = sorted(ts(got[i]["completed_at"]) for i in ids)
        first = [t for t in done if t < done[0] + 1.0]
        second = [t for t in done if done[0] + 1.0 <= t < done[0] + 2.0]
        third = [t for t in done if done[0] + 2.0 <= t < done[0] + 3.0]
        print("replay of 400 after the probe: %.1fs after up, per second %d, %d, %d, total %.1fs"
              % (done[0] - t_up, len(first), len(second), len(third), done[-1] - done[0]))
        assert len(first) <= 45, len(first)
        assert len(third) > len(first), (len(first), len(third))
        assert done[0] - t_up < 8, done[0] - t_up  # a probe (every 1 s here) noticed it
        assert "route ra is up (circuit a/m-a closed)" in log_text(w)


def test_expiry_ttl_deadline_poison():
    """A parked job older than park_ttl_s, and one whose deadline passes while parked, end
    expired (record, result, dlq "expired"); a deadline already passed: expired without a call;
    redelivered more than max_deliveries without finishing: dlq "poison"."""
    with harness.Stack("park_expiry") as st:
        r, s, path, w = up(st, worker={"park_ttl_s": 3, "max_deliveries": 1},
                           prov={"timeout_ms": 30000})
        set_all(s, {"mode": "down"})
        ids = ["ttl-%02d" % i for i in range(10)]
        soon = datetime.utcfromtimestamp(time.time() + 1.5).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        past = "2020-01-01T00:00:00Z"
        submit(st, [env(i, "ttl " + i) for i in ids] +
               [env("dl-soon", "soon", deadline=soon), env("dl-past", "past", deadline=past)])
        got = results(st, ids + ["dl-soon", "dl-past"], T(30))
        for i in ids + ["dl-soon", "dl-past"]:
            assert got[i]["status"] == "expired", got[i]
            assert got[i]["error"]["type"] == "expired", got[i]
            assert status(r, i) == "expired"
        dl = {d["id"]: d for d in docs(st, DLQ)}
        assert all(dl[i]["error"]["type"] == "expired" for i in ids + ["dl-soon", "dl-past"])
        assert got["dl-past"]["attempts"] == 0, got["dl-past"]
        assert "parked longer" in got[ids[0]]["error"]["message"], got[ids[0]]
        assert set(ids) <= parked_ids(st)  # they were parked first

        # poison: delivered twice (max_deliveries 1) without finishing
        set_all(s, {"mode": "ok"})
        wait_for(lambda: "route r is up" in log_text(w), T(20), "route r up again")
        set_all(s, {"mode": "ok", "latency_ms": 30000})
        submit(st, [env("poison-1", "hang")])
        wait_for(lambda: s["a"].stats()["inflight"] >= 1, T(20), "the call in flight")
        w.kill(signal.SIGKILL)
        w.wait(T(10))
        w2 = st.spawn("promptq-worker", "--config", path, name="worker2")
        res = results(st, ["poison-1"], T(40))["poison-1"]
        assert res["status"] == "failed" and res["error"]["type"] == "poison", res
        assert [d for d in docs(st, DLQ) if d["id"] == "poison-1"][0]["error"]["type"] == "poison"
        assert w2.stop(T(15)) == 0


def test_sighup_new_route_topic_created_first():
    """SIGHUP with a new route: its retry topic exists (kcat -L) before a job uses it; a job of
    the new route parks there while its provider is down and succeeds when it is back."""
    with harness.Stack("park_sighup") as st:
        r, s, path, w = up(st, prov={"circuit_failures": 2})
        wait_for(lambda: "promptq.retry.r auto-created" in log_text(w) or
                 "promptq.retry.r created" in log_text(w), T(20), "retry topic of r created")
        wait_for(lambda: "assigned" in log_text(w), T(20), "the first assignment")
        cfg = json.load(open(path))
        cfg["routes"]["new.route"] = [{"provider": "b", "model": "m-new"}]
        with open(path + ".tmp", "w") as f:
            json.dump(cfg, f)
        os.replace(path + ".tmp", path)
        w.kill(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: 2 providers, 2 routes loaded" in log_text(w), T(20),
                 "the reload")
        md = subprocess.run(["kcat", "-b", st.kafka_.bootstrap, "-L", "-J"], capture_output=True,
                            timeout=T(30))
        topics = {t["topic"] for t in json.loads(md.stdout)["topics"]}
        topic = [t for t in topics if t.startswith("promptq.retry.new")]
        assert topic, topics
        s["b"].set_state({"mode": "down"})
        submit(st, [env("hup-1", "new route", route="new.route")])
        wait_for(lambda: "hup-1" in parked_ids(st, topic[0]), T(30), "parked on " + topic[0],
                 interval=0.5)
        s["b"].set_state({"mode": "ok"})
        res = results(st, ["hup-1"], T(30))["hup-1"]
        assert res["status"] == "succeeded" and res["route"] == "new.route", res


def test_reply_to_published():
    """A job with reply_to: PUBLISH <reply_to> "<tenant>:<id>" after its terminal write, and
    again when a redelivery re-publishes the stored result."""
    with harness.Stack("park_reply") as st:
        r, s, path, w = up(st)
        sub = subprocess.Popen(["redis-cli", "-p", str(r.port), "SUBSCRIBE", "promptq:reply:b1"],
                               stdout=subprocess.PIPE)
        try:
            time.sleep(0.5)
            submit(st, [env("rt-1", "reply", reply_to="promptq:reply:b1", tenant="t1")])
            results(st, ["rt-1"], T(20))
            submit(st, [env("rt-1", "reply", reply_to="promptq:reply:b1", tenant="t1")])
            wait_for(lambda: len([d for d in docs(st, RESULTS) if d["id"] == "rt-1"]) >= 2, T(20),
                     "the result re-published")
            time.sleep(0.5)
        finally:
            sub.terminate()
            out = sub.communicate(timeout=10)[0].decode()
        assert out.count("t1:rt-1") == 2, out


def test_status_page_major_keeps_circuit_open():
    """status_url (statuspage.io status.json) reporting "major": probes that answer do not close
    the circuit, jobs stay parked; back to "none": replayed."""
    page = harness.StatusPage("major")
    try:
        with harness.Stack("park_status") as st:
            r, s, path, w = up(st, sims=("a",), prov={"status_url": page.url})
            s["a"].set_state({"mode": "down"})
            ids = ["sp-%02d" % i for i in range(20)]
            submit(st, [env(i, "sp " + i) for i in ids])
            wait_for(lambda: set(ids) <= parked_ids(st), T(30), "parked", interval=0.5)
            s["a"].set_state({"mode": "ok"})
            n0 = s["a"].stats()["requests"]
            time.sleep(4)
            assert s["a"].stats()["requests"] > n0  # probes answer...
            assert not docs(st, RESULTS)            # ...but the status page says major

            def probed_major():
                c = ((health(r)[0] or {}).get("circuits") or [{}])[0]
                return c.get("status_page") == "major" and c.get("last_probe") and \
                    c["last_probe"]["ok"] is False and "status page major" in \
                    c["last_probe"]["detail"]
            wait_for(probed_major, T(10), "health: a failed probe because of the status page")
            assert not docs(st, RESULTS)
            page.indicator = "none"
            got = results(st, ids, T(40))
            assert all(got[i]["status"] == "succeeded" for i in ids)
    finally:
        page.close()


harness.run(globals())
