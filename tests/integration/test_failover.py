"""Failover chains, retries, keys, rate limits, circuits, cache and provider formats (DESIGN §4,
§6-§8), worker side: envelopes produced straight to promptq.requests, real redis-server,
promptq-devkafka and promptq-sim instances of different wire formats."""

import json
import time
from datetime import datetime

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"
DLQ = "promptq.dlq"


def provider(kind, sim, **kw):
    """A provider config of wire format kind pointing at sim."""
    p = {"type": kind}
    if kind == "openai":
        p["base_url"] = sim.api
    else:
        p["base_url"] = sim.url
    if kind == "azure_openai":
        p["api_version"] = "2024-10-21"
    if kind == "watsonx":
        p["iam_url"] = sim.url + "/identity/token"
        p["project_id"] = "proj-1"
        p.setdefault("api_key", "wx-key")
    p.update({"retry_base_ms": 50, "retry_max_ms": 200})
    p.update(kw)
    return p


def chain(*names, model="sim-model"):
    return [{"provider": n, "model": model} for n in names]


def up(st, sims=("a", "b", "c"), sim_args=None, providers=None, routes=None, extra=None):
    st.redis()
    st.devkafka(brokers=1, partitions=4)
    s = {}
    for n in sims:
        s[n] = st.sim(n, args=(sim_args or {}).get(n, ()))
    if providers is None:
        providers = {"a": provider("openai", s["a"]), "b": provider("anthropic", s["b"]),
                     "c": provider("gemini", s["c"])}
    if routes is None:
        routes = {"r": chain("a", "b", "c")}
    cfg_extra = {"worker": {"lease_ms": 5000}}
    if extra:
        harness._merge(cfg_extra, extra)
    path, _ = st.config(providers=providers, routes=routes, extra=cfg_extra)
    w = st.spawn("promptq-worker", "--config", path, name="worker")
    return s, w


def env(job_id, prompt, route="r", **kw):
    e = {"id": job_id, "request": {"model": route,
                                   "messages": [{"role": "user", "content": prompt}]}}
    req_extra = kw.pop("request", None)
    if req_extra:
        e["request"].update(req_extra)
    e.update(kw)
    return e


def submit(st, envs):
    st.produce(REQ, envs, keys=[e["id"] for e in envs])


def results(st, ids, timeout=None):
    want = set(ids)
    got = {}

    def have_all():
        got.clear()
        for m in st.consume_all(RESULTS):
            d = json.loads(m["value"])
            got.setdefault(d["id"], d)
        return want <= set(got)
    try:
        wait_for(have_all, timeout or T(30), "results of %d jobs" % len(want), interval=0.3)
    except AssertionError:
        raise AssertionError("missing results: %s" % sorted(want - set(got))[:5])
    return {i: got[i] for i in ids}


def content(res):
    return res["response"]["choices"][0]["message"]["content"]


def ts(s):
    return datetime.strptime(s.replace("Z", "+0000"),
                             "%Y-%m-%dT%H:%M:%S.%f%z" if "." in s else "%Y-%m-%dT%H:%M:%S%z"
                             ).timestamp()


def log_text(proc):
    with open(proc.log_path, errors="replace") as f:
        return f.read()


def outcomes(res):
    return [(a["provider"], a["outcome"]) for a in res.get("attempt_log", [])]


# ---------------------------------------------------------------------------------------------


def test_formats_and_first_down():
    """openai -> anthropic -> gemini: the first down, every job is served by the second in its
    format; then the second down too: the third. Then each of the five formats on its own."""
    with harness.Stack("failover_down") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = {n: st.sim(n) for n in ("a", "b", "c", "all")}
        al = s["all"]
        providers = {"a": provider("openai", s["a"]), "b": provider("anthropic", s["b"]),
                     "c": provider("gemini", s["c"]),
                     "f-openai": provider("openai", al), "f-azure": provider("azure_openai", al),
                     "f-anthropic": provider("anthropic", al), "f-gemini": provider("gemini", al),
                     "f-watsonx": provider("watsonx", al)}
        routes = {"r": chain("a", "b", "c")}
        for f in ("openai", "azure", "anthropic", "gemini", "watsonx"):
            routes["only-" + f] = chain("f-" + f)
        routes["skip"] = chain("f-anthropic", "f-openai")
        path, _ = st.config(providers=providers, routes=routes,
                            extra={"worker": {"lease_ms": 5000}})
        st.spawn("promptq-worker", "--config", path, name="worker")

        s["a"].set_state({"mode": "down"})
        ids = ["down-%02d" % i for i in range(20)]
        submit(st, [env(i, "hello %s" % i) for i in ids])
        got = results(st, ids)
        for i in ids:
            res = got[i]
            assert res["status"] == "succeeded" and res["provider"] == "b", res
            assert content(res) == "echo: hello %s" % i, res
            assert res["response"]["object"] == "chat.completion", res
            assert res["response"]["choices"][0]["finish_reason"] == "stop", res
            assert outcomes(res)[-1] == ("b", "ok"), res
            # refused connections, or skipped once they opened a's circuit
            assert outcomes(res)[0] in (("a", "connect"), ("a", "circuit_open")), res
        assert s["c"].stats()["requests"] == 0

        s["b"].set_state({"mode": "error", "status": 503})
        ids2 = ["down2-%02d" % i for i in range(10)]
        submit(st, [env(i, "again %s" % i) for i in ids2])
        got = results(st, ids2)
        for i in ids2:
            assert got[i]["provider"] == "c" and content(got[i]) == "echo: again %s" % i, got[i]
            assert got[i]["response"]["usage"]["total_tokens"] > 0, got[i]

        # every format on its own, mapped back to an OpenAI chat.completion
        fids = []
        for f in ("openai", "azure", "anthropic", "gemini", "watsonx"):
            fids.append("fmt-" + f)
            submit(st, [env("fmt-" + f, "format %s" % f, route="only-" + f,
                            request={"max_tokens": 50})])
        got = results(st, fids)
        for f in ("openai", "azure", "anthropic", "gemini", "watsonx"):
            res = got["fmt-" + f]
            assert res["status"] == "succeeded" and res["provider"] == "f-" + f, res
            assert content(res) == "echo: format %s" % f, res
            assert res["response"]["object"] == "chat.completion", res
            assert res["attempts"] == 1, res
        paths = s["all"].stats()["by_path"]
        for p in ("/v1/chat/completions", "/openai/deployments/sim-model/chat/completions",
                  "/v1/messages", "/v1beta/models/sim-model:generateContent",
                  "/ml/v1/text/chat", "/identity/token"):
            assert paths.get(p) == 1, paths

        # a request a target cannot express (temperature 1.5 for Anthropic) skips it, recorded
        submit(st, [env("skip-1", "too hot", route="skip", request={"temperature": 1.5})])
        res = results(st, ["skip-1"])["skip-1"]
        assert res["status"] == "succeeded" and res["provider"] == "f-openai", res
        assert outcomes(res) == [("f-anthropic", "unsupported"), ("f-openai", "ok")], res
        assert res["attempts"] == 1, res
        assert s["all"].stats()["by_path"]["/v1/messages"] == 1


def test_retry_after_short_is_waited_long_moves_on():
    with harness.Stack("failover_retry_after") as st:
        s, w = up(st, routes={"r": chain("a", "b", "c"), "rc": chain("c")})
        # Retry-After: 1 with a later target ready: the key rests for that model and the job
        # moves on at once (no wait behind a rate limit while another target can answer)
        s["a"].set_state({"mode": "rate_limit", "retry_after": "1"})
        submit(st, [env("ra-1", "move on")])
        res = results(st, ["ra-1"])["ra-1"]
        assert res["status"] == "succeeded" and res["provider"] == "b", res
        assert [o for o in outcomes(res) if o[1] != "rate_limited"] == [("b", "ok")], res
        assert res["attempt_log"][0]["status"] == 429, res
        assert s["a"].stats()["requests"] == 1
        s["a"].set_state({"mode": "ok"})
        # the last target of its route: the job waits for the key (within max_retry_wait_ms)
        s["c"].set_state({"mode": "rate_limit", "retry_after": "1"})
        t0 = time.monotonic()
        submit(st, [env("ra-1c", "wait for it", route="rc")])
        wait_for(lambda: s["c"].stats()["requests"] >= 1, T(10), "the first 429")
        s["c"].set_state({"mode": "ok"})
        res = results(st, ["ra-1c"])["ra-1c"]
        assert res["status"] == "succeeded" and res["provider"] == "c", res
        assert outcomes(res) == [("c", "rate_limited"), ("c", "ok")], res
        assert time.monotonic() - t0 >= 1.0
        assert res["latency_ms"] >= 1000, res
        time.sleep(1.1)  # c's key rest (1 s) is over before the dated case below

        # Retry-After: 60 (over max_retry_wait_ms): the next target at once
        s["a"].set_state({"mode": "rate_limit", "retry_after": "60"})
        t0 = time.monotonic()
        submit(st, [env("ra-60", "do not wait")])
        res = results(st, ["ra-60"])["ra-60"]
        took = time.monotonic() - t0
        assert res["status"] == "succeeded" and res["provider"] == "b", res
        assert res["latency_ms"] < 5000 and took < 10, (res, took)
        # the key rests for those 60 s: later jobs skip the target without calling it
        before = s["a"].stats()["requests"]
        submit(st, [env("ra-60b", "skip")])
        res = results(st, ["ra-60b"])["ra-60b"]
        assert res["provider"] == "b" and ("a", "rate_limited") in outcomes(res), res
        assert s["a"].stats()["requests"] == before
        # Retry-After as an HTTP date (about 2 s ahead) is honoured the same way
        when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
        s["c"].set_state({"mode": "rate_limit", "retry_after": when})
        c_before = s["c"].stats()["requests"]
        t0 = time.monotonic()
        submit(st, [env("ra-date", "dated", route="rc")])
        wait_for(lambda: s["c"].stats()["requests"] > c_before, T(10), "the dated 429")
        s["c"].set_state({"mode": "ok"})
        res = results(st, ["ra-date"])["ra-date"]
        assert res["provider"] == "c" and outcomes(res) == [("c", "rate_limited"), ("c", "ok")], res
        assert time.monotonic() - t0 >= 0.9, res


def test_keys_rotate_then_next_target():
    with harness.Stack("failover_keys") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        a = st.sim("a", args=("--key", "good-a"))
        b = st.sim("b", args=("--key", "good-b"))
        c = st.sim("c")
        providers = {"a": provider("openai", a, api_keys=["bad-a1", "good-a"]),
                     "b": provider("anthropic", b, api_keys=["bad-b1", "bad-b2"]),
                     "c": provider("gemini", c)}
        path, _ = st.config(providers=providers,
                            routes={"r": chain("a"), "r2": chain("b", "c")},
                            extra={"worker": {"lease_ms": 5000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        # one bad key of two: the next key serves; the bad one rests (few 401s)
        ids = ["key-%02d" % i for i in range(20)]
        for i in ids[:2]:
            submit(st, [env(i, "k %s" % i)])
            results(st, [i])
        submit(st, [env(i, "k %s" % i) for i in ids[2:]])
        got = results(st, ids)
        for i in ids:
            assert got[i]["status"] == "succeeded" and got[i]["provider"] == "a", got[i]
        by = a.stats()["by_status"]
        assert by.get("200") == 20, by
        assert 1 <= by.get("401", 0) <= 2, by  # then the bad key rests
        # every key refused: the next target
        ids = ["keys-%02d" % i for i in range(5)]
        submit(st, [env(ids[0], "all bad", route="r2")])
        res = results(st, ids[:1])[ids[0]]
        assert res["status"] == "succeeded" and res["provider"] == "c", res
        assert outcomes(res)[:2] == [("b", "authentication"), ("b", "authentication")], res
        assert b.stats()["by_status"] == {"401": 2}, b.stats()
        submit(st, [env(i, "all bad %s" % i, route="r2") for i in ids[1:]])
        got = results(st, ids[1:])
        for i in ids[1:]:
            assert got[i]["provider"] == "c", got[i]
        assert b.stats()["requests"] == 2  # both keys rest: no more calls


def test_all_refuse_is_failed_on_dlq():
    with harness.Stack("failover_refuse") as st:
        s, w = up(st)
        for n in "abc":
            s[n].set_state({"mode": "error", "status": 400})
        submit(st, [env("refused-1", "nobody wants this")])
        res = results(st, ["refused-1"])["refused-1"]
        assert res["status"] == "failed", res
        err = res["error"]
        assert err["type"] == "refused" and err["provider"] == "c" and err["status"] == 400, err
        assert "every target refused" in err["message"] and "c answered HTTP 400" in \
            err["message"], err
        assert [o for _, o in outcomes(res)] == ["refused"] * 3, res
        for n in "abc":
            assert s[n].stats()["requests"] == 1  # a refusal is not retried
        dlq = [json.loads(m["value"]) for m in st.consume(DLQ, 1, timeout=T(20))]
        assert dlq and dlq[0]["id"] == "refused-1" and dlq[0]["error"]["status"] == 400, dlq


def test_timeout_fails_over_malformed_retried_then_next():
    with harness.Stack("failover_timeout") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = {n: st.sim(n) for n in "abc"}
        providers = {"a": provider("openai", s["a"], timeout_ms=300, retries_per_target=1),
                     "b": provider("anthropic", s["b"], retries_per_target=1),
                     "c": provider("gemini", s["c"])}
        path, _ = st.config(providers=providers, routes={"r": chain("a", "b", "c")},
                            extra={"worker": {"lease_ms": 5000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        s["a"].set_state({"mode": "ok", "latency_ms": 3000})
        s["b"].set_state({"mode": "malformed"})
        submit(st, [env("slow-1", "too slow")])
        res = results(st, ["slow-1"])["slow-1"]
        assert res["status"] == "succeeded" and res["provider"] == "c", res
        # a timeout fails over at once (a silent provider costs one timeout); malformed
        # answers are retried on the same target first
        assert outcomes(res) == [("a", "timeout"), ("b", "malformed"), ("b", "malformed"),
                                 ("c", "ok")], res
        assert res["attempts"] == 4, res
        assert res["attempt_log"][0]["class"] == "failover", res
        assert res["attempt_log"][0]["timeout"] == "total", res
        # Timed out at 300 ms, not after the sim's 3 s (the wall clock from submit would also
        # count the worker's first group join, so the attempt log is what is checked).
        assert 250 <= res["attempt_log"][0]["latency_ms"] < 2000, res


def test_rpm_and_tpm_spread_calls():
    with harness.Stack("failover_rates") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        a = st.sim("a")
        b = st.sim("b")
        providers = {"a": provider("openai", a, rpm=120),   # 2 calls/s
                     "b": provider("anthropic", b, tpm=6000)}  # 100 tokens/s
        path, _ = st.config(providers=providers,
                            routes={"ra": chain("a"), "rb": chain("b")},
                            extra={"worker": {"lease_ms": 5000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        ids = ["rpm-%02d" % i for i in range(10)]
        submit(st, [env(i, "r %s" % i, route="ra") for i in ids])
        # tpm: about 100 prompt tokens + 20 max_tokens per call
        tids = ["tpm-%02d" % i for i in range(6)]
        submit(st, [env(i, ("%s " % i) + "x" * 392, route="rb", request={"max_tokens": 20})
                    for i in tids])
        got = results(st, ids + tids, T(40))
        for i in ids + tids:
            assert got[i]["status"] == "succeeded" and got[i]["attempts"] == 1, got[i]
        assert a.stats()["by_status"] == {"200": 10}, a.stats()  # none refused
        assert b.stats()["by_status"] == {"200": 6}, b.stats()
        done = sorted(ts(got[i]["completed_at"]) for i in ids)
        # a burst of 2, then 2 per second: 10 calls take about 4 s
        assert done[-1] - done[0] >= 3.0, done
        tdone = sorted(ts(got[i]["completed_at"]) for i in tids)
        # 120 tokens each at 100 tokens/s (burst 100): 6 calls take about 5-6 s
        assert tdone[-1] - tdone[0] >= 3.5, tdone


def test_circuit_opens_skips_and_probes():
    with harness.Stack("failover_circuit") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        a = st.sim("a")
        b = st.sim("b")
        providers = {"a": provider("openai", a, retries_per_target=0, circuit_window=10,
                                   circuit_ratio=0.5, circuit_failures=1000,
                                   circuit_cooldown_ms=2000, probe_interval_ms=2000,
                                   probe="models"),
                     "b": provider("anthropic", b)}
        path, _ = st.config(providers=providers, routes={"r": chain("a", "b")},
                            extra={"worker": {"lease_ms": 5000}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        a.set_state({"mode": "ok", "failure_rate": 0.7, "status": 500})
        ids = ["cb-%02d" % i for i in range(30)]
        for k in range(0, 30, 5):  # a few at a time, so the circuit sees them in order
            submit(st, [env(i, "c %s" % i) for i in ids[k:k + 5]])
            results(st, ids[k:k + 5])
        wait_for(lambda: "circuit a/sim-model opened" in log_text(w), T(5), "circuit opened")
        assert "of the last" in log_text(w)  # opened by the ratio, not consecutive failures
        a.set_state({"mode": "error", "status": 500})  # the probes fail: it stays open
        n0 = a.stats()["requests"]
        t0 = time.monotonic()
        ids2 = ["cbo-%02d" % i for i in range(20)]
        submit(st, [env(i, "open %s" % i) for i in ids2])
        got = results(st, ids2)
        for i in ids2:
            assert got[i]["provider"] == "b", got[i]
        skipped = sum(1 for i in ids2 if ("a", "circuit_open") in outcomes(got[i]))
        elapsed = time.monotonic() - t0
        n1 = a.stats()["requests"]
        # only probes reach a (one per 2 s at most), no job's call
        assert n1 - n0 <= 1 + int(elapsed / 2), (n0, n1, elapsed)
        assert skipped >= 15, skipped
        # a probe after the cooldown, even without traffic
        wait_for(lambda: a.stats()["requests"] > n1, T(6), "a probe of the open circuit")
        assert a.stats()["by_path"].get("/v1/models", 0) >= 1, a.stats()  # probe: "models"
        a.set_state({"mode": "ok"})
        wait_for(lambda: "circuit a/sim-model closed" in log_text(w), T(8), "circuit closed")
        ids3 = ["cbc-%02d" % i for i in range(5)]
        submit(st, [env(i, "closed %s" % i) for i in ids3])
        got = results(st, ids3)
        for i in ids3:
            assert got[i]["provider"] == "a", got[i]


def test_cache_hit_makes_no_call():
    with harness.Stack("failover_cache") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        a = st.sim("a")
        path, _ = st.config(providers={"a": provider("openai", a)}, routes={"r": chain("a")},
                            extra={"worker": {"lease_ms": 5000},
                                   "cache": {"temperature_zero": True, "ttl_s": 60}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        submit(st, [env("cache-1", "remember me", cache=True)])
        first = results(st, ["cache-1"])["cache-1"]
        assert first["provider"] == "a", first
        wait_for(lambda: st.redis_.cli("KEYS", "promptq:cache:default:*") != "", T(5),
                 "the cache entry")
        submit(st, [env("cache-2", "remember me", cache=True)])
        res = results(st, ["cache-2"])["cache-2"]
        assert res["status"] == "succeeded" and res["provider"] == "cache", res
        assert res["cached_from"] == {"provider": "a", "model": "sim-model"}, res
        assert res["attempts"] == 0 and content(res) == "echo: remember me", res
        assert a.stats()["requests"] == 1
        # temperature 0 is cached by config; cache: false opts out
        submit(st, [env("t0-1", "cold", request={"temperature": 0})])
        results(st, ["t0-1"])
        wait_for(lambda: len(st.redis_.cli("KEYS", "promptq:cache:default:*").split()) == 2,
                 T(5), "the second cache entry")
        submit(st, [env("t0-2", "cold", request={"temperature": 0}),
                    env("t0-3", "cold", request={"temperature": 0}, cache=False)])
        got = results(st, ["t0-2", "t0-3"])
        assert got["t0-2"]["provider"] == "cache", got
        assert got["t0-3"]["provider"] == "a", got
        assert a.stats()["requests"] == 3


def test_watsonx_token_reused():
    with harness.Stack("failover_watsonx") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        x = st.sim("x", args=("--key", "wx-key"))
        path, _ = st.config(providers={"x": provider("watsonx", x, api_key="wx-key"),
                                       "xbad": provider("watsonx", x, api_key="wrong-key")},
                            routes={"r": chain("x"), "rbad": chain("xbad", "x")},
                            extra={"worker": {"lease_ms": 5000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        ids = ["wx-%02d" % i for i in range(40)]
        submit(st, [env(i, "watson %s" % i) for i in ids])
        got = results(st, ids)
        for i in ids:
            assert got[i]["status"] == "succeeded" and got[i]["provider"] == "x", got[i]
            assert content(got[i]) == "echo: watson %s" % i, got[i]
        paths = x.stats()["by_path"]
        assert paths.get("/identity/token") == 1, paths  # one exchange for 40 concurrent jobs
        assert paths.get("/ml/v1/text/chat") == 40, paths
        # IAM refuses a key: that target is skipped as refused, the next one serves
        submit(st, [env("wx-bad", "bad key", route="rbad")])
        res = results(st, ["wx-bad"])["wx-bad"]
        assert res["provider"] == "x", res
        assert outcomes(res)[0] == ("xbad", "authentication"), res
        assert x.stats()["by_path"].get("/identity/token") == 2
        # IAM revokes the tokens it issued: a job's call with the old token answers 401, the
        # worker drops the cached token and takes a fresh one (one exchange for all), and the
        # call succeeds; a job that starts after the refresh (its partition's messages came
        # later) uses the fresh token at once
        x.set_state({"revoke_tokens": True})
        ids = ["wx-rv-%d" % i for i in range(5)]
        submit(st, [env(i, "revoked %s" % i) for i in ids])
        got = results(st, ids)
        for i in ids:
            assert got[i]["status"] == "succeeded" and got[i]["attempts"] in (1, 2), got[i]
            assert content(got[i]) == "echo: revoked %s" % i, got[i]
            if got[i]["attempts"] == 2:
                assert outcomes(got[i])[0] == ("x", "authentication"), got[i]
        retried = sum(1 for i in ids if got[i]["attempts"] == 2)
        assert retried >= 1, got  # the first call after the revocation carried the old token
        paths = x.stats()["by_path"]
        assert paths.get("/identity/token") == 3, paths
        assert paths.get("/ml/v1/text/chat") == 41 + len(ids) + retried, paths


harness.run(globals())
