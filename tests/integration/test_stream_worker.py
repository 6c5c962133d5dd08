"""Live token streaming, worker side (issue "Live token streaming"): a job whose request has
"stream": true is called upstream as a stream and its chunks are relayed into the job's Redis
Stream (<prefix>stream:<tenant>:<id>, entries t=chunk|restart|end, d=...) while the job runs;
the stored record is the assembled chat.completion. Worker-only stack as in test_failover.py:
envelopes produced straight to promptq.requests, real redis-server, promptq-devkafka and
promptq-sim."""

import json
import signal
import time

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"
PROMPT = "one two three four five six seven eight nine"  # "echo: " + 9 words: 10 words


def provider(kind, sim, **kw):
    p = {"type": kind, "base_url": sim.api if kind == "openai" else sim.url,
         "retry_base_ms": 50, "retry_max_ms": 200, "retries_per_target": 0}
    p.update(kw)
    return p


def env(job_id, stream=True, route="r", usage=False):
    req = {"model": route, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        req["stream"] = True
    if usage:
        req["stream_options"] = {"include_usage": True}
    return {"id": job_id, "request": req}


def entries(r, key):
    """XRANGE key - + as [(type, data)] (redis-cli prints each entry as id, t, type, d, data)."""
    out = r.cli("XRANGE", key, "-", "+")
    if not out:
        return []
    lines = out.split("\n")
    if len(lines) % 5 == 4:
        lines.append("")  # r.cli strips the last (empty) data of an end entry
    assert len(lines) % 5 == 0, lines
    return [(lines[i + 2], lines[i + 4]) for i in range(0, len(lines), 5)]


def result(st, job_id):
    got = {}

    def have():
        for m in st.consume_all(RESULTS):
            d = json.loads(m["value"])
            got.setdefault(d["id"], d)
        return job_id in got

    wait_for(have, T(30), "result of %s" % job_id, interval=0.2)
    return got[job_id]


def text_of(chunks):
    s = ""
    for t, d in chunks:
        assert t == "chunk", (t, d)
        c = json.loads(d)
        assert c["object"] == "chat.completion.chunk", c
        for ch in c["choices"]:
            s += ch["delta"].get("content") or ""
    return s


def follow(r, key):
    """Polls the stream until its end entry; returns (entries, seconds from the first chunk
    entry to the end entry)."""
    first = None
    deadline = time.time() + T(30)
    while time.time() < deadline:
        es = entries(r, key)
        if first is None and any(t == "chunk" for t, _ in es):
            first = time.time()
        if es and es[-1][0] == "end":
            assert first is not None, es
            return es, time.time() - first
        time.sleep(0.05)
    raise AssertionError("no end entry in %s: %s" % (key, entries(r, key)))


def content(res):
    return res["response"]["choices"][0]["message"]["content"]


def split_restart(es):
    """[chunks of the failed attempt], [chunks of the serving attempt] around one restart."""
    kinds = [t for t, _ in es]
    assert kinds.count("restart") == 1 and kinds[-1] == "end", kinds
    i = kinds.index("restart")
    reason = json.loads(es[i][1])["reason"]
    return es[:i], es[i + 1:-1], reason


def test_stream_worker():
    with harness.Stack("stream_worker") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = {n: st.sim(n) for n in ("a", "b", "cut", "bad", "skip", "dead", "rej")}
        providers = {"a": provider("openai", s["a"]), "b": provider("anthropic", s["b"]),
                     "cut": provider("openai", s["cut"]), "bad": provider("gemini", s["bad"]),
                     "skip": provider("openai", s["skip"], stream_malformed="skip"),
                     "bp": provider("anthropic", s["b"], supports_prefill=True),
                     "dead": provider("openai", s["dead"], supports_prefill=True),
                     "brej": provider("anthropic", s["rej"], supports_prefill=True)}
        routes = {"r": [{"provider": "a", "model": "sim-model"}],
                  "rcut": [{"provider": "cut", "model": "sim-model"},
                           {"provider": "b", "model": "sim-model"}],
                  "rbad": [{"provider": "bad", "model": "sim-model"},
                           {"provider": "b", "model": "sim-model"}],
                  "rskip": [{"provider": "skip", "model": "sim-model"},
                            {"provider": "b", "model": "sim-model"}],
                  "rpre": [{"provider": "cut", "model": "sim-model"},
                           {"provider": "bp", "model": "sim-model"}],
                  "rnopre": [{"provider": "cut", "model": "sim-model"},
                             {"provider": "bp", "model": "sim-model", "supports_prefill": 0}],
                  "rrej": [{"provider": "cut", "model": "sim-model"},
                           {"provider": "brej", "model": "sim-model"}],
                  "rpark": [{"provider": "cut", "model": "sim-model"},
                            {"provider": "dead", "model": "sim-model"}]}
        path, _ = st.config(providers=providers, routes=routes,
                            extra={"worker": {"lease_ms": 5000}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        for n in ("a", "b", "cut", "bad", "skip"):
            s[n].set_state({"chunk_ms": 100})
        s["dead"].set_state({"mode": "down"})
        s["rej"].set_state({"chunk_ms": 20, "reject_prefill": True})
        s["cut"].set_state({"chunk_ms": 100, "stream_cut_after": 3})
        s["bad"].set_state({"chunk_ms": 100, "stream_malformed_at": 3})
        s["skip"].set_state({"chunk_ms": 20, "stream_malformed_at": 3})
        key = lambda i: "promptq:stream:default:" + i  # noqa: E731

        # 1. chunks arrive while the job runs; their text is the stored answer; the usage chunk
        # (asked for) last; then end
        st.produce(REQ, [env("s-ok", usage=True)], keys=["s-ok"])
        es, span = follow(r, key("s-ok"))
        res = result(st, "s-ok")
        assert res["status"] == "succeeded" and res["provider"] == "a", res
        assert span >= 0.5, (span, es)
        assert text_of(es[:-1]) == content(res) == "echo: " + PROMPT, (es, res)
        assert es[-1] == ("end", ""), es
        assert res["response"]["object"] == "chat.completion", res
        assert json.loads(es[0][1])["id"] == "s-ok", es[0]
        last = json.loads(es[-2][1])
        assert last["choices"] == [] and last["usage"] == res["response"]["usage"], (last, res)
        assert json.loads(es[-3][1])["choices"][0]["finish_reason"] == "stop", es
        # without include_usage (case 2 on) no chunk has usage
        ttl = int(r.cli("PTTL", key("s-ok")))
        assert 0 < ttl <= 600000, ttl
        assert s["a"].stats()["by_path"].get("/v1/chat/completions") == 1

        # 2. the primary's stream is cut after 3 events: its chunks, restart, the fallback's
        st.produce(REQ, [env("s-cut", route="rcut")], keys=["s-cut"])
        es, _ = follow(r, key("s-cut"))
        res = result(st, "s-cut")
        assert res["status"] == "succeeded" and res["provider"] == "b", res
        before, after, reason = split_restart(es)
        assert before and "echo: ".startswith(text_of(before)[:6]), es
        assert reason == "connect", reason
        assert all("usage" not in json.loads(d) for t, d in es if t == "chunk"), es
        assert text_of(after) == content(res) == "echo: " + PROMPT, (es, res)

        # 3. the primary's third event is malformed (Gemini format): the same
        st.produce(REQ, [env("s-bad", route="rbad")], keys=["s-bad"])
        es, _ = follow(r, key("s-bad"))
        res = result(st, "s-bad")
        assert res["status"] == "succeeded" and res["provider"] == "b", res
        before, after, reason = split_restart(es)
        assert before, es
        assert reason == "malformed", reason
        assert text_of(after) == content(res) == "echo: " + PROMPT, (es, res)

        # 3b. the same fault on a provider with stream_malformed "skip": the broken event is
        # dropped (its word is missing), nothing fails over, nothing broken is relayed
        st.produce(REQ, [env("s-skip", route="rskip")], keys=["s-skip"])
        es, _ = follow(r, key("s-skip"))
        res = result(st, "s-skip")
        assert res["status"] == "succeeded" and res["provider"] == "skip", res
        assert [t for t, _ in es].count("restart") == 0, es
        full, got = ("echo: " + PROMPT).split(), content(res).split()
        assert text_of(es[:-1]) == content(res) and len(got) == len(full) - 1, (es, res)
        assert all(word in full for word in got), res
        wait_for(lambda: "1 malformed stream events skipped" in open(w.log_path).read(), T(5),
                 "the skip logged")

        # 5. the same cut with a fallback that continues an assistant prefill: no restart, the
        # fallback is asked to go on from the text relayed so far (trailing whitespace left
        # out, as Anthropic requires) and its continuation follows under the same stream, no
        # role again, no whitespace twice; the client's text and the stored answer are whole
        b_calls = s["b"].stats()["by_path"].get("/v1/messages", 0)
        st.produce(REQ, [env("s-pre", route="rpre")], keys=["s-pre"])
        es, _ = follow(r, key("s-pre"))
        res = result(st, "s-pre")
        assert res["status"] == "succeeded" and res["provider"] == "bp", res
        assert [t for t, _ in es].count("restart") == 0, es
        assert text_of(es[:-1]) == content(res) == "echo: " + PROMPT, (es, res)
        roles = [json.loads(d)["choices"][0]["delta"].get("role") for t, d in es[:-1]]
        assert roles.count("assistant") == 1 and roles[0] == "assistant", roles
        assert s["b"].stats()["by_path"].get("/v1/messages", 0) == b_calls + 1
        assert res["attempts"] == 2, res

        # 6. the same fallback marked supports_prefill 0 on this target: a restart, as case 2
        st.produce(REQ, [env("s-nopre", route="rnopre")], keys=["s-nopre"])
        es, _ = follow(r, key("s-nopre"))
        res = result(st, "s-nopre")
        before, after, reason = split_restart(es)
        assert before and text_of(after) == content(res) == "echo: " + PROMPT, (es, res)

        # 6b. a fallback marked supports_prefill that refuses the prefill anyway (400): the
        # refusal is the continuation's, not the job's: a restart, then a fresh call there
        st.produce(REQ, [env("s-rej", route="rrej")], keys=["s-rej"])
        es, _ = follow(r, key("s-rej"))
        res = result(st, "s-rej")
        assert res["status"] == "succeeded" and res["provider"] == "brej", res
        before, after, reason = split_restart(es)
        assert before and text_of(after) == content(res) == "echo: " + PROMPT, (es, res)
        assert s["rej"].stats()["by_path"].get("/v1/messages") == 2, s["rej"].stats()

        # 7. the target that would continue is down: the job parks, and the client's stream
        # gets its restart at once (it would otherwise wait for a continuation)
        st.produce(REQ, [env("s-park", route="rpark")], keys=["s-park"])
        wait_for(lambda: [t for t, _ in entries(r, key("s-park"))][-1:] == ["restart"], T(30),
                 "the restart of a parked job's cut stream", interval=0.1)
        wait_for(lambda: r.cli("HGET", "promptq:job:default:s-park", "status") == "parked",
                 T(30), "s-park parked")
        assert "end" not in [t for t, _ in entries(r, key("s-park"))]

        # 8. the response cache ignores "stream" and "stream_options": a streamed request
        # after the same plain one is a cache hit, answered from the record (the stream has
        # only its end)
        plain = dict(env("c-plain", stream=False), cache=True)
        st.produce(REQ, [plain], keys=["c-plain"])
        assert result(st, "c-plain")["provider"] == "a"
        calls = s["a"].stats()["by_path"].get("/v1/chat/completions")
        st.produce(REQ, [dict(env("c-stream", usage=True), cache=True)], keys=["c-stream"])
        res = result(st, "c-stream")
        assert res["status"] == "succeeded" and res["provider"] == "cache", res
        assert content(res) == "echo: " + PROMPT, res
        assert s["a"].stats()["by_path"].get("/v1/chat/completions") == calls
        wait_for(lambda: entries(r, key("c-stream")) == [("end", "")], T(5), "only the end")

        # 4. a non-streamed job writes no stream key
        st.produce(REQ, [env("s-plain", stream=False)], keys=["s-plain"])
        res = result(st, "s-plain")
        assert res["status"] == "succeeded" and content(res) == "echo: " + PROMPT, res
        assert r.cli("EXISTS", key("s-plain")) == "0"


def test_worker_killed_mid_stream():
    """A worker SIGKILLed while its job streams: the lease expires, the next worker runs the
    call again and first relays a restart entry (reason "redelivered"), so the stream never
    shows the lost attempt's partial text glued to the new answer; the new answer follows in
    full, then end; the job has one terminal record and one result on promptq.results. A normal
    streamed job right after works."""
    with harness.Stack("stream_sigkill") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=1)
        a = st.sim("a")
        path, _ = st.config(providers={"a": provider("openai", a)},
                            routes={"r": [{"provider": "a", "model": "sim-model"}]},
                            extra={"worker": {"lease_ms": 2000}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        a.set_state({"chunk_ms": 300})
        key = "promptq:stream:default:s-kill"
        st.produce(REQ, [env("s-kill")], keys=["s-kill"])
        wait_for(lambda: sum(t == "chunk" for t, _ in entries(r, key)) >= 3, T(20),
                 "three chunks relayed", interval=0.05)
        w.kill(signal.SIGKILL)
        w.wait(T(10))
        a.set_state({"chunk_ms": 20})
        st.spawn("promptq-worker", "--config", path, name="worker2")
        es, _ = follow(r, key)
        res = result(st, "s-kill")
        assert res["status"] == "succeeded", res
        before, after, reason = split_restart(es)
        assert len(before) >= 3 and ("echo: " + PROMPT).startswith(text_of(before)), es
        assert reason == "redelivered", reason
        assert text_of(after) == content(res) == "echo: " + PROMPT, (es, res)
        time.sleep(T(1))
        assert [json.loads(m["value"])["id"] for m in st.consume_all(RESULTS)] == ["s-kill"]
        st.produce(REQ, [env("s-after")], keys=["s-after"])
        es, _ = follow(r, "promptq:stream:default:s-after")
        assert [t for t, _ in es].count("restart") == 0, es
        assert text_of(es[:-1]) == content(result(st, "s-after")) == "echo: " + PROMPT, es


harness.run(globals())
