"""The failover policy against real provider faults, one case after another on ONE long-lived
stack (redis-server, promptq-devkafka, promptq-broker, promptq-worker, three promptq-sim
providers), as production meets them: one fault must not poison the next request.

Each case sets the sims' per-model faults, sends interactive calls through the broker's sync
chat (POST /v1/chat/completions) and/or the jobs API, and checks the answering model, the
client-visible error (status, code, reason), wall time bounds and the attempts per target
(the job record's attempt_log and the sims' call logs). Every case ends with the sims healthy
and a plain call answered by the primary, so a case that poisoned the stack fails the next.
"""

import json
import re
import threading
import time

import harness
from harness import T, wait_for

KEY = "policy-key"
TENANT = "acme"
AUTH = {"Authorization": "Bearer " + KEY}
SYNC_MS = 8000


def prov(kind, sim, **kw):
    p = {"type": kind, "base_url": sim.api if kind == "openai" else sim.url,
         "api_key": "k-" + sim.name,
         "connect_timeout_ms": 1000, "first_byte_timeout_ms": 1500, "idle_timeout_ms": 500,
         "timeout_ms": 4000, "retries_per_target": 1, "retry_base_ms": 50, "retry_max_ms": 200,
         "max_rest_ms": 3000, "max_retry_wait_ms": 1000, "circuit_failures": 4,
         "circuit_cooldown_ms": 1000, "probe_interval_ms": 500}
    p.update(kw)
    return p


def tgt(provider, model, **kw):
    t = {"provider": provider, "model": model}
    t.update(kw)
    return t


class Policy:
    """The stack and its helpers."""

    def __init__(self, st):
        self.st = st
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        self.oa = st.sim("oa")
        self.an = st.sim("an")
        self.ge = st.sim("ge")
        providers = {"oa": prov("openai", self.oa), "an": prov("anthropic", self.an),
                     "ge": prov("gemini", self.ge)}
        slow = {"first_byte_timeout_ms": 20000, "timeout_ms": 20000}
        routes = {
            "chat": {"targets": [tgt("oa", "m-main", max_context_tokens=8000),
                                 tgt("oa", "m-backup", max_context_tokens=128000),
                                 tgt("an", "claude-x")],
                     "reserve_ms": 2000},
            "other": [tgt("oa", "m-other")],
            "strict": {"targets": [tgt("oa", "m-strict"), tgt("an", "claude-x")],
                       "on_bad_request": "end"},
            "gem": [tgt("ge", "g-1"), tgt("oa", "m-backup")],
            "slow": {"targets": [tgt("oa", "m-slow", **slow), tgt("an", "claude-slow", **slow)],
                     "reserve_ms": 2000},
        }
        extra = {"broker": {"api_keys": {KEY: TENANT}, "sync_timeout_ms": SYNC_MS},
                 "worker": {"lease_ms": 5000, "park_ttl_s": 600}}
        self.path, _ = st.config(providers=providers, routes=routes, extra=extra)
        self.worker = st.spawn("promptq-worker", "--config", self.path, name="worker")
        self.broker = st.broker(self.path)
        self.sims = (self.oa, self.an, self.ge)

    # ---- sims ----

    def healthy(self):
        for s in self.sims:
            s.set_state({"mode": "ok"})

    def log(self, sim, since_ms=0):
        status, _, raw = harness.http("GET", sim.control_url + "/_sim/log")
        assert status == 200, raw
        return [c for c in json.loads(raw)["calls"] if c["t_ms"] >= since_ms]

    def calls(self, sim, model, since_ms=0):
        return [c for c in self.log(sim, since_ms) if c["model"] == model]

    def now_ms(self, sim):
        """Starts a fresh call log on sim (POST /_sim/reset); calls(sim, m, 0) then counts
        from here."""
        sim.reset()
        return 0

    # ---- calls ----

    def chat(self, route, prompt, timeout=None, **kw):
        body = {"model": route, "messages": [{"role": "user", "content": prompt}]}
        body.update(kw)
        t0 = time.monotonic()
        status, hdrs, raw = harness.http("POST", self.st.broker_url + "/v1/chat/completions",
                                         body, AUTH, timeout=timeout or T(30))
        took = time.monotonic() - t0
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        return status, hdrs, doc, took

    def job(self, job_id, timeout=None):
        """The job record once terminal."""
        rec = {}

        def done():
            status, _, doc = harness.http_json("GET", self.st.broker_url + "/v1/jobs/" + job_id,
                                               headers=AUTH)
            if status == 200 and doc.get("status") in ("succeeded", "failed", "expired",
                                                       "cancelled"):
                rec.update(doc)
                return True
            return False
        wait_for(done, timeout or T(30), "job %s terminal" % job_id, interval=0.1)
        return rec

    def submit(self, route, prompt, job_id):
        status, _, doc = harness.http_json(
            "POST", self.st.broker_url + "/v1/jobs",
            {"id": job_id, "request": {"model": route,
                                       "messages": [{"role": "user", "content": prompt}]}},
            AUTH)
        assert status == 202, (status, doc)

    def primary_serves(self, tag):
        """The case left nothing behind: the primary answers a plain call again. Rests end
        within max_rest_ms (3 s) and circuits close within a probe or two."""
        last = {}

        def ok():
            status, _, doc, _ = self.chat("chat", "after " + tag)
            last["r"] = (status, doc)
            return status == 200 and doc["model"] == "m-main"
        t0 = time.monotonic()
        wait_for(ok, T(12), "the primary serving again after %s (last %r)" % (tag, last))
        return time.monotonic() - t0


MEASURED = []


def measure(case, took, rec):
    """One line of the figures the closing note and RELIABILITY.md quote: the wall time a
    client saw and the attempts per target of that job."""
    per = {}
    for a in rec.get("attempt_log", []):
        if a.get("class") != "skip":
            per[a["model"]] = per.get(a["model"], 0) + 1
    MEASURED.append("%-34s %6.2f s  %s -> %s" % (case, took, " ".join(
        "%s×%d" % kv for kv in per.items()) or "-",
        rec.get("model") if rec.get("status") == "succeeded" else
        "%s %s" % (rec.get("status"), (rec.get("error") or {}).get("type"))))


def attempt_log(doc_or_rec):
    return [(a["model"], a["outcome"], a.get("class")) for a in doc_or_rec["attempt_log"]]


def job_id(hdrs):
    return hdrs.get("x-promptq-job-id")


# ---- cases, run in this order on one stack ----------------------------------------------


def case_baseline(p):
    status, hdrs, doc, took = p.chat("chat", "hello")
    assert status == 200, (status, doc)
    assert doc["model"] == "m-main" and doc["usage"]["total_tokens"] > 0, doc
    rec = p.job(job_id(hdrs))
    assert rec["provider"] == "oa" and rec["model"] == "m-main", rec


def case_429_one_model_does_not_block_the_fallback(p):
    """A 429 without Retry-After on m-main rests (oa key, m-main) only: m-backup on the SAME key
    answers at once, an unrelated route on that key keeps working, nothing parks."""
    p.oa.set_state({"models": {"m-main": {"mode": "rate_limit", "retry_after": None}}})
    t_start = p.now_ms(p.oa)
    for i in range(3):
        status, hdrs, doc, took = p.chat("chat", "limited %d" % i)
        assert status == 200, (status, doc)
        assert doc["model"] == "m-backup", doc
        assert took < 3.0, took
        rec = p.job(job_id(hdrs))
        assert rec["provider"] == "oa" and rec["model"] == "m-backup", rec
        measure("429 no Retry-After (one model)", took, rec)
        assert ("m-main", "rate_limited", "retry") in attempt_log(rec) or \
            ("m-main", "rate_limited", "skip") in attempt_log(rec), rec
        # the answering attempt's usage only
        assert rec["response"]["usage"] == doc["usage"], (rec, doc)
        # the unrelated route on the same provider and key
        status, _, doc2, took2 = p.chat("other", "unrelated %d" % i)
        assert status == 200 and doc2["model"] == "m-other", doc2
    # jobs API, a burst: every one served by the fallback, none parked
    ids = ["rl-%d-%d" % (int(time.time()), i) for i in range(10)]
    for i, jid in enumerate(ids):
        p.submit("chat", "burst %d" % i, jid)
    for jid in ids:
        rec = p.job(jid)
        assert rec["status"] == "succeeded" and rec["model"] == "m-backup", rec
    # m-main was not hammered: it rests with a growing backoff (at most a few calls)
    main_calls = p.calls(p.oa, "m-main", t_start)
    assert 1 <= len(main_calls) <= 8, main_calls
    status, _, parked = harness.http_json("GET", p.st.broker_url + "/v1/parked", headers=AUTH)
    assert status == 200, parked
    assert all(r.get("parked", 0) == 0 for r in parked.get("routes", [])
               if r.get("route") == "chat"), parked
    p.healthy()
    p.primary_serves("429")


def case_retry_after_beyond_cap(p):
    """Retry-After: 9999999 (115 days) rests (key, m-main) for max_rest_ms (3 s) only; the job
    moves on at once; after the cap the primary serves again."""
    p.oa.set_state({"models": {"m-main": {"mode": "rate_limit", "retry_after": "9999999"}}})
    status, hdrs, doc, took = p.chat("chat", "far retry-after")
    assert status == 200 and doc["model"] == "m-backup", doc
    assert took < 3.0, took
    measure("Retry-After 9999999", took, p.job(job_id(hdrs)))
    t_healthy = time.monotonic()
    p.healthy()
    p.primary_serves("Retry-After 9999999")
    assert time.monotonic() - t_healthy < 3.0 + 5.0, "the rest was not capped"


def case_silent_provider_costs_one_timeout(p):
    """m-main accepts and never answers: one first-byte timeout (1.5 s), then m-backup."""
    p.oa.set_state({"models": {"m-main": {"mode": "hang"}}})
    t_start = p.now_ms(p.oa)
    status, hdrs, doc, took = p.chat("chat", "silent")
    assert status == 200 and doc["model"] == "m-backup", doc
    assert 1.4 <= took < 4.0, took
    rec = p.job(job_id(hdrs))
    first = rec["attempt_log"][0]
    assert (first["model"], first["outcome"], first["class"], first.get("timeout")) == \
        ("m-main", "timeout", "failover", "first_byte"), rec
    measure("silent (first byte 1.5 s)", took, rec)
    assert 1400 <= first["latency_ms"] < 2500, first
    assert len(p.calls(p.oa, "m-main", t_start)) == 1, "a silent provider must cost one call"
    p.healthy()
    p.primary_serves("hang")


def case_stall_idle_gap(p):
    """m-main sends headers and half a body, then nothing: the idle timeout (0.5 s) fails over."""
    p.oa.set_state({"models": {"m-main": {"mode": "stall"}}})
    status, hdrs, doc, took = p.chat("chat", "stalled")
    assert status == 200 and doc["model"] == "m-backup", doc
    rec = p.job(job_id(hdrs))
    first = rec["attempt_log"][0]
    assert (first["outcome"], first.get("timeout")) == ("timeout", "idle"), rec
    measure("stalled body (idle 0.5 s)", took, rec)
    assert 400 <= first["latency_ms"] < 1500, first
    assert took < 3.0, took
    p.healthy()
    p.primary_serves("stall")


def case_reset_before_headers_retried_then_next(p):
    """A reset before any header is a connection error: retried once on the same target
    (retries_per_target 1), then the next target."""
    p.oa.set_state({"models": {"m-main": {"mode": "reset"}}})
    status, hdrs, doc, took = p.chat("chat", "reset")
    assert status == 200 and doc["model"] == "m-backup", doc
    rec = p.job(job_id(hdrs))
    measure("reset before headers", took, rec)
    assert attempt_log(rec)[:2] == [("m-main", "connect", "retry"), ("m-main", "connect", "retry")], rec
    assert attempt_log(rec)[-1] == ("m-backup", "ok", "ok"), rec
    p.healthy()
    p.primary_serves("reset")


def case_context_length(p):
    """context_length_exceeded moves only to a target with a larger max_context_tokens; with
    none left the call ends with the provider's reason."""
    reason = ("This model's maximum context length is 8000 tokens. However, your messages "
              "resulted in 9100 tokens.")
    p.oa.set_state({"models": {"m-main": {"mode": "error", "status": 400,
                                          "error_code": "context_length_exceeded",
                                          "error_message": reason}}})
    status, hdrs, doc, took = p.chat("chat", "long prompt")
    assert status == 200 and doc["model"] == "m-backup", doc
    measure("context_length -> larger target", took, p.job(job_id(hdrs)))
    # the larger target refuses too: claude-x has no larger max_context_tokens: end cleanly
    p.oa.set_state({"models": {m: {"mode": "error", "status": 400,
                                   "error_code": "context_length_exceeded",
                                   "error_message": reason} for m in ("m-main", "m-backup")}})
    t_an = p.now_ms(p.an)
    status, hdrs, doc, took = p.chat("chat", "longer prompt")
    assert status == 400, (status, doc)
    assert doc["error"]["code"] == "context_length_exceeded", doc
    assert "maximum context length is 8000 tokens" in doc["error"]["message"], doc
    assert hdrs.get("x-should-retry") == "false", hdrs
    assert p.calls(p.an, "claude-x", t_an) == [], "claude-x has no larger context"
    rec = p.job(job_id(hdrs))
    measure("context_length, none larger: 400", took, rec)
    assert rec["status"] == "failed" and rec["error"]["code"] == "context_length_exceeded", rec
    assert ("claude-x", "context_length_exceeded", "skip") in attempt_log(rec), rec
    p.healthy()
    p.primary_serves("context length")


def case_content_filter_ends(p):
    """A content-policy refusal ends the call with the provider's reason; no fallback."""
    reason = "The response was filtered due to the prompt triggering content management policy."
    p.oa.set_state({"models": {"m-main": {"mode": "error", "status": 400,
                                          "error_code": "content_filter",
                                          "error_message": reason}}})
    t0 = p.now_ms(p.oa)
    status, hdrs, doc, took = p.chat("chat", "something filtered")
    assert status == 400, (status, doc)
    assert doc["error"]["code"] == "content_filter", doc
    assert "content management policy" in doc["error"]["message"], doc
    assert p.calls(p.oa, "m-backup", t0) == [], "a content filter must not fail over"
    rec = p.job(job_id(hdrs))
    assert rec["error"]["reason"] == reason, rec
    measure("content_filter: 400", took, rec)
    assert attempt_log(rec) == [("m-main", "content_filter", "end")], rec
    p.healthy()
    p.primary_serves("content filter")


def case_bad_request_next_provider_or_end(p):
    """Another 400: never the same provider again -> claude-x (route chat); on_bad_request end
    (route strict) -> the call ends."""
    p.oa.set_state({"models": {"m-main": {"mode": "error", "status": 400,
                                          "error_code": "invalid_value",
                                          "error_message": "Invalid value for 'top_k'."}}})
    t0 = p.now_ms(p.oa)
    status, hdrs, doc, took = p.chat("chat", "odd request")
    assert status == 200 and doc["model"] == "claude-x", doc
    assert p.calls(p.oa, "m-backup", t0) == [], "m-backup is the same provider"
    rec = p.job(job_id(hdrs))
    assert ("m-backup", "refused", "skip") in attempt_log(rec), rec
    measure("other 400 -> next provider", took, rec)

    p.oa.set_state({"models": {"m-strict": {"mode": "error", "status": 400,
                                            "error_code": "invalid_value",
                                            "error_message": "Invalid value for 'top_k'."}}})
    t_an = p.now_ms(p.an)
    status, hdrs, doc, took = p.chat("strict", "odd request")
    assert status == 400, (status, doc)
    assert "Invalid value for 'top_k'." in doc["error"]["message"], doc
    assert p.calls(p.an, "claude-x", t_an) == [], "on_bad_request end"
    measure("other 400, on_bad_request end", took, p.job(job_id(hdrs)))
    p.healthy()
    p.primary_serves("bad request")


def case_anthropic_and_gemini_classes(p):
    """Anthropic overloaded (529) is retried then failed over; Gemini RESOURCE_EXHAUSTED rests
    g-1 and fails over; a Gemini safety block ends the call as content_filter."""
    p.oa.set_state({"models": {"m-main": {"mode": "error", "status": 503}}})
    p.an.set_state({"models": {"claude-x": {"mode": "error", "status": 529,
                                            "error_code": "overloaded_error",
                                            "error_message": "Overloaded"}}})
    p.oa.set_state({"models": {"m-main": {"mode": "error", "status": 503},
                               "m-backup": {"mode": "error", "status": 503}}})
    p.now_ms(p.an)
    status, hdrs, doc, took = p.chat("chat", "everyone busy", timeout=T(30))
    # every target failed retryably: the job parks (a sync caller gets 504 at the budget)
    rec_id = job_id(hdrs)
    assert status == 504, (status, doc)
    # claude-x's 529 was retried once (retries_per_target 1) before the job parked
    first_pass = [c["status"] for c in p.calls(p.an, "claude-x")][:2]
    assert first_pass == [529, 529], p.calls(p.an, "claude-x")
    p.healthy()
    rec = p.job(rec_id, timeout=T(30))  # replayed once the route is up again
    assert rec["status"] == "succeeded" and rec["source"]["topic"] == "promptq.retry.chat", rec
    measure("all busy (503/529): 504, parked", took, rec)

    p.ge.set_state({"models": {"g-1": {"mode": "error", "status": 429,
                                       "error_code": "RESOURCE_EXHAUSTED",
                                       "error_message": "Quota exceeded"}}})
    status, hdrs, doc, took = p.chat("gem", "gemini busy")
    assert status == 200 and doc["model"] == "m-backup", doc
    measure("Gemini RESOURCE_EXHAUSTED", took, p.job(job_id(hdrs)))
    p.ge.set_state({"models": {"g-1": {"mode": "error", "status": 200,
                                       "error_body": json.dumps(
                                           {"promptFeedback": {"blockReason": "SAFETY"}})}}})
    time.sleep(3.2)  # g-1's rest after the 429 (max_rest_ms) is over
    status, hdrs, doc, took = p.chat("gem", "blocked")
    assert status == 400 and doc["error"]["code"] == "content_filter", (status, doc)
    measure("Gemini safety block: 400", took, p.job(job_id(hdrs)))
    p.healthy()
    p.primary_serves("anthropic/gemini")


def case_flapping_primary(p):
    """m-main answers 503 for the first 700 ms of every 1.4 s: every call succeeds (failing
    over while it is down) and traffic returns to m-main in its up windows."""
    p.oa.set_state({"models": {"m-main": {"schedule": {"period_ms": 1400, "down_ms": 700,
                                                       "down": {"mode": "error",
                                                                "status": 503}}}}})
    served = []
    t_end = time.monotonic() + 8
    while time.monotonic() < t_end:
        status, hdrs, doc, took = p.chat("chat", "flap")
        assert status == 200, (status, doc)
        served.append((time.monotonic(), doc["model"]))
        time.sleep(0.1)
    models = [m for _, m in served]
    assert "m-backup" in models, models
    # the primary came back in the later up windows, not only at the start
    later = [m for t, m in served if t > t_end - 4]
    assert "m-main" in later, served
    MEASURED.append("%-34s %d calls in 8 s: m-main %d, m-backup %d, all 200" % (
        "flapping 503 (0.7 s of 1.4 s)", len(models), models.count("m-main"),
        models.count("m-backup")))
    p.healthy()
    back = p.primary_serves("flapping")
    MEASURED.append("%-34s %6.2f s until m-main answers again" % ("recovery after flapping", back))


def case_budget_tries_the_fallback_before_the_504(p):
    """Both targets of route slow accept and never answer, with first-byte timeouts (20 s)
    longer than the budget (sync 8 s - 1 s): the first attempt is cut to leave reserve_ms for
    the fallback, the fallback is called before the client's 504, the job parks after the
    budget and completes once the providers answer."""
    p.oa.set_state({"models": {"m-slow": {"mode": "hang"}}})
    p.an.set_state({"models": {"claude-slow": {"mode": "hang"}}})
    t_an = p.now_ms(p.an)
    t0 = time.monotonic()
    status, hdrs, doc, took = p.chat("slow", "nobody answers")
    assert status == 504, (status, doc)
    assert SYNC_MS / 1000 - 0.5 <= took < SYNC_MS / 1000 + 2.0, took
    an_calls = p.calls(p.an, "claude-slow", t_an)
    assert len(an_calls) == 1, an_calls
    # the fallback was called well before the 504
    jid = job_id(hdrs)
    p.healthy()
    rec = p.job(jid, timeout=T(40))
    assert rec["status"] == "succeeded", rec
    first = rec["attempt_log"][0]
    assert first["model"] == "m-slow" and first["outcome"] == "timeout", rec
    assert first["latency_ms"] <= SYNC_MS - 1000 - 2000 + 300, first
    second = rec["attempt_log"][1]
    assert second["model"] == "claude-slow" and second["outcome"] == "timeout", rec
    assert first["latency_ms"] + second["latency_ms"] <= SYNC_MS, rec
    measure("budget: both silent (504, parked)", took, rec)
    p.primary_serves("budget")


def case_streaming_through_failover(p):
    """stream: true through the same policy: a 429 on m-main, the SSE answer comes from
    m-backup."""
    p.oa.set_state({"models": {"m-main": {"mode": "rate_limit", "retry_after": None}}})
    body = {"model": "chat", "stream": True,
            "messages": [{"role": "user", "content": "stream me"}]}
    t0 = time.monotonic()
    status, hdrs, raw = harness.http("POST", p.st.broker_url + "/v1/chat/completions", body,
                                     AUTH, timeout=T(30))
    took = time.monotonic() - t0
    assert status == 200, (status, raw)
    assert hdrs.get("content-type", "").startswith("text/event-stream"), hdrs
    events = [json.loads(l[6:]) for l in raw.decode().splitlines()
              if l.startswith("data: ") and l != "data: [DONE]"]
    assert events and all(e["model"] == "m-backup" for e in events), events
    assert "data: [DONE]" in raw.decode()
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == "echo: stream me", text
    measure("stream: 429 on the primary", took, p.job(job_id(hdrs)))
    p.healthy()
    p.primary_serves("stream")


def case_no_secret_in_errors(p):
    """A provider error whose message echoes the key: the client sees no fragment of it."""
    echo = "Incorrect API key provided: k-oa. You can find your API key at the dashboard."
    p.oa.set_state({"models": {"m-strict": {"mode": "error", "status": 400,
                                            "error_code": "invalid_request_error",
                                            "error_message": echo}}})
    status, hdrs, doc, took = p.chat("strict", "leak?")
    assert status == 400, (status, doc)
    raw = json.dumps(doc)
    rec = p.job(job_id(hdrs))
    for text in (raw, json.dumps(rec)):
        assert "k-oa" not in text, text
    p.healthy()
    with open(p.worker.log_path, errors="replace") as f:
        assert "k-oa" not in f.read()


CASES = [case_baseline, case_429_one_model_does_not_block_the_fallback,
         case_retry_after_beyond_cap, case_silent_provider_costs_one_timeout,
         case_stall_idle_gap, case_reset_before_headers_retried_then_next, case_context_length,
         case_content_filter_ends, case_bad_request_next_provider_or_end,
         case_anthropic_and_gemini_classes, case_flapping_primary,
         case_budget_tries_the_fallback_before_the_504, case_streaming_through_failover,
         case_no_secret_in_errors]


def test_policy_cases_on_one_stack():
    with harness.Stack("failover_policy") as st:
        p = Policy(st)
        p.primary_serves("start")
        timings = []
        for case in CASES:
            t0 = time.monotonic()
            case(p)
            timings.append("%s %.1fs" % (case.__name__, time.monotonic() - t0))
            print("  ok %s" % timings[-1], flush=True)
        print("fault                              client  attempts per target -> answered by")
        for line in MEASURED:
            print("  " + line, flush=True)


if __name__ == "__main__":
    harness.run(globals())
