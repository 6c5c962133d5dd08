"""promptq-worker against hostile provider answers: envelopes produced straight to
promptq.requests (no broker), a real redis-server, promptq-devkafka and promptq-sim answering a
raw body. Each answer must end its job in exactly one terminal state (G2), with the content the
provider sent, never parked or redelivered forever."""

import json
import time

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"


def results(st, job_id):
    return [d for d in (json.loads(m["value"]) for m in st.consume_all(RESULTS))
            if d["id"] == job_id]


def wait_one(st, job_id):
    got = []

    def have():
        got[:] = results(st, job_id)
        return got

    wait_for(have, T(30), "a result for " + job_id, interval=0.3)
    return got[0]


def content(res):
    return res["response"]["choices"][0]["message"]["content"]


def completion(text):
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                       "model": "sim-model",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                 "total_tokens": 2}})


def test_nul_in_provider_content():
    """A provider answer whose content is "a\\u0000b" succeeds once with its content intact
    (result, Redis record, cache); before, every adapter refused it as malformed and the job
    parked and came back forever."""
    with harness.Stack("hostile_worker_nul_provider") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = st.sim("a")
        s.set_state({"mode": "error", "status": 200, "error_body": completion("a\u0000b")})
        path, _ = st.config(extra={"worker": {"lease_ms": 3000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        req = {"model": "sim-model", "messages": [{"role": "user", "content": "nul please"}]}
        st.produce(REQ, [{"id": "nul-1", "cache": True, "request": req}], keys=["nul-1"])
        wait_for(lambda: results(st, "nul-1"), T(30), "a result for nul-1", interval=0.3)
        time.sleep(1.5)
        got = results(st, "nul-1")
        assert len(got) == 1, got
        res = got[0]
        assert res["status"] == "succeeded", res
        assert res["response"]["choices"][0]["message"]["content"] == "a\u0000b", res
        assert s.stats()["requests"] == 1, s.stats()
        assert r.cli("HGET", "promptq:job:default:nul-1", "status") == "succeeded"
        s.set_state({"mode": "error", "status": 500})
        st.produce(REQ, [{"id": "nul-2", "cache": True, "request": req}], keys=["nul-2"])
        wait_for(lambda: results(st, "nul-2"), T(30), "a result for nul-2", interval=0.3)
        res2 = results(st, "nul-2")[0]
        assert res2["status"] == "succeeded" and res2["provider"] == "cache", res2
        assert res2["response"]["choices"][0]["message"]["content"] == "a\u0000b", res2


def test_nul_in_cached_content():
    """A cached answer whose content holds U+0000 (stored as "a\\u0000b", as json_dumps writes
    it): a cache hit serves it once, content intact in the result and the Redis record, instead
    of reading it as a miss and calling the provider (which here is failing)."""
    with harness.Stack("hostile_worker_nul_cache") as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=4)
        s = st.sim("a")
        path, _ = st.config(extra={"worker": {"lease_ms": 3000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        req = {"model": "sim-model", "messages": [{"role": "user", "content": "nul please"}]}
        st.produce(REQ, [{"id": "nul-1", "cache": True, "request": req}], keys=["nul-1"])
        assert wait_one(st, "nul-1")["status"] == "succeeded"
        keys = []
        wait_for(lambda: keys.extend(r.cli("KEYS", "promptq:cache:default:*").split()) or keys,
                 T(10), "the cache entry")
        entry = json.loads(r.cli("GET", keys[0]))
        entry["response"]["choices"][0]["message"]["content"] = "a\u0000b"
        assert r.cli("SET", keys[0], json.dumps(entry), "KEEPTTL") == "OK"

        s.set_state({"mode": "error", "status": 500})
        calls = s.stats()["requests"]
        st.produce(REQ, [{"id": "nul-2", "cache": True, "request": req}], keys=["nul-2"])
        res = wait_one(st, "nul-2")
        time.sleep(1.0)  # a second result would show by now
        assert len(results(st, "nul-2")) == 1
        assert res["status"] == "succeeded" and res["provider"] == "cache", res
        assert content(res) == "a\u0000b", res
        assert s.stats()["requests"] == calls, "the provider was called"
        assert r.cli("HGET", "promptq:job:default:nul-2", "status") == "succeeded"
        stored = r.cli("HGET", "promptq:job:default:nul-2", "response")
        assert "a\\u0000b" in stored, stored


harness.run(globals())
