"""POST /v1/chat/completions (OpenAI-compatible, durable, synchronous wait) and GET /v1/models.

Two parts:
  * protocol tests without a worker: the test plays the worker's part (terminal write of the
    job record, then PUBLISH "<tenant>:<id>" on the envelope's reply_to) to check the waiter
    protocol: answers for every terminal status, subscribe-then-read, re-read after the
    subscriber reconnects, no polling (Redis INFO commandstats), timeout, client disconnect,
    idempotent repeats;
  * the official OpenAI Node SDK (tests/node/chat.test.mjs, node --test) against a real
    promptq-worker and promptq-sim: completion, streaming, models, errors, 504 without SDK
    retry and the job still completing. These need the worker to PUBLISH to reply_to.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import harness
from harness import T, wait_for
from chatstack import (AUTH, DEAD, KEY, ROUTES, TENANT, StreamClient, chat_body, cmdstat,
                       completion, event_id, finish, metric, no_worker_stack, queued_envelope,
                       resume, start_broker)

ROOT = harness.ROOT
NODE_DIR = os.path.join(ROOT, "tests", "node")


class Call(threading.Thread):
    """One POST /v1/chat/completions in the background."""

    def __init__(self, st, body, headers=None):
        super().__init__(daemon=True)
        self.url = st.broker_url + "/v1/chat/completions"
        self.body, self.headers = body, dict(AUTH, **(headers or {}))
        self.result = None
        self.start()

    def run(self):
        try:
            self.result = harness.http("POST", self.url, self.body, self.headers, timeout=T(60))
        except Exception as e:  # noqa: BLE001 - reported by answer()
            self.result = e

    def answer(self, timeout=None):
        self.join(timeout or T(30))
        assert not self.is_alive(), "chat call still waiting"
        assert not isinstance(self.result, Exception), self.result
        status, hdrs, raw = self.result
        return status, hdrs, raw


# ---- protocol tests (the test plays the worker) ----

def test_reply_to_answer_and_sse():
    with harness.Stack("chat-answer") as st:
        r = no_worker_stack(st)
        c = Call(st, chat_body("p-plain", temperature=0))
        env = queued_envelope(st, "p-plain")
        assert env["tenant"] == TENANT and env["id"].startswith("job_"), env
        assert env["reply_to"] == "promptq:reply:chat-b1", env
        assert "stream" not in env["request"], env
        time.sleep(0.3)
        finish(r, env, "succeeded", completion("echo: p-plain"))
        status, hdrs, raw = c.answer()
        assert status == 200, (status, raw)
        assert hdrs["x-promptq-job-id"] == env["id"]
        doc = json.loads(raw)
        assert doc["id"] == env["id"], doc  # the job id, not the provider's
        assert doc["choices"][0]["message"]["content"] == "echo: p-plain"
        assert doc["usage"]["total_tokens"] == 5
        # the stored response's own bytes: spacing, escapes and member order kept, the id the
        # job's (inserted when the provider gave none); a response naming "id" twice is read
        # the long way, so every reader sees the job's id
        stored = {
            "no-id": ' { "object" : "chat.completion", "note": "caf\\u00e9 \\"q\\"", '
                     '"choices": [{"index": 0, "message": {"role": "assistant", "content": '
                     '"spliced"}, "finish_reason": "stop"}] } ',
            "two-ids": '{"id": "chatcmpl-a", "object": "chat.completion", "id": "chatcmpl-b", '
                       '"choices": []}',
            "empty": "{}",
        }
        for case, text in stored.items():
            c = Call(st, chat_body("p-" + case))
            env = queued_envelope(st, "p-" + case)
            finish(r, env, "succeeded", response_text=text)
            status, hdrs, raw = c.answer()
            assert status == 200, (case, status, raw)
            doc = json.loads(raw)
            assert doc["id"] == env["id"], (case, raw)
            if case == "no-id":
                assert raw.decode().startswith('{"id":"%s", "object" : ' % env["id"]), raw
                assert 'caf\\u00e9 \\"q\\"' in raw.decode(), raw
                assert doc["note"] == 'caf\u00e9 "q"', doc
                assert doc["choices"][0]["message"]["content"] == "spliced", doc
            elif case == "two-ids":
                assert raw.decode().count('"id"') == 1, raw
            else:
                assert doc == {"id": env["id"]}, doc

        c = Call(st, chat_body("p-sse", stream=True, stream_options={"include_usage": True}))
        env = queued_envelope(st, "p-sse")
        # kept for the worker, which streams upstream and relays chunks (test_stream_relay.py)
        assert env["request"]["stream"] is True, env
        assert env["request"]["stream_options"] == {"include_usage": True}, env
        finish(r, env, "succeeded", completion("echo: p-sse"))
        status, hdrs, raw = c.answer()
        assert status == 200, (status, raw)
        assert hdrs["content-type"].startswith("text/event-stream"), hdrs
        events = [e for e in raw.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert len(chunks) == 4, chunks
        for ch in chunks:
            assert ch["object"] == "chat.completion.chunk" and ch["id"] == env["id"], ch
            assert ch["created"] == 1700000000 and ch["model"] == "x", ch
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[1]["choices"][0]["delta"] == {"content": "echo: p-sse"}
        assert chunks[2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5


def test_terminal_statuses_map_to_openai_errors():
    cases = [
        ("failed", {"type": "refused", "message": "x", "provider": "sim", "status": 400},
         400, "invalid_request_error", "refused"),
        ("failed", {"type": "server_error", "message": "x", "provider": "sim", "status": 503},
         502, "upstream_error", "server_error"),
        ("failed", {"type": "poison", "message": "x", "provider": None, "status": None},
         500, "server_error", "poison"),
        ("expired", {"type": "expired", "message": "x", "provider": None, "status": None},
         504, "timeout", "expired"),
        ("cancelled", {"type": "cancelled", "message": "x", "provider": None, "status": None},
         409, "invalid_request_error", "cancelled"),
    ]
    with harness.Stack("chat-errors") as st:
        r = no_worker_stack(st)
        for i, (status, error, code, etype, ecode) in enumerate(cases):
            prompt = "p-err-%d" % i
            c = Call(st, chat_body(prompt))
            env = queued_envelope(st, prompt)
            # a provider error text must never reach the client
            error = dict(error, message="provider said SECRET-BODY-%d" % i)
            finish(r, env, status, error=error)
            got, hdrs, raw = c.answer()
            doc = json.loads(raw)
            assert got == code, (status, error, got, raw)
            assert doc["error"]["type"] == etype and doc["error"]["code"] == ecode, doc
            assert "SECRET-BODY" not in raw.decode(), raw
            assert hdrs["x-promptq-job-id"] == env["id"]
            if code in (400, 409, 504):
                assert hdrs.get("x-should-retry") == "false", hdrs


def test_no_polling_and_reread_after_subscriber_reconnect():
    with harness.Stack("chat-nopoll") as st:
        r = no_worker_stack(st)
        n = 6
        calls = [Call(st, chat_body("p-np-%d" % i)) for i in range(n)]
        envs = [queued_envelope(st, "p-np-%d" % i) for i in range(n)]
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == n, T(10), "all waiting")
        reads0 = cmdstat(r, "hmget") + cmdstat(r, "hgetall")
        time.sleep(2.5)  # waiting must not cost Redis commands
        reads1 = cmdstat(r, "hmget") + cmdstat(r, "hgetall")
        assert reads1 == reads0, "waiters polled Redis: %d -> %d reads" % (reads0, reads1)
        assert reads1 <= n, "more than one read per waiter before any message: %d" % reads1

        # Terminal writes without a message, then the subscriber connections are killed: after
        # resubscribing every waiter reads its record again and gets its answer.
        for env in envs[:3]:
            finish(r, env, "succeeded", completion("late " + env["id"]), publish=False)
        time.sleep(0.5)
        assert all(c.is_alive() for c in calls[:3]), "answered without a message?"
        subs0 = metric(st, "promptq_broker_reply_subscriptions_total")
        r.cli("CLIENT", "KILL", "TYPE", "pubsub")
        for c, env in zip(calls[:3], envs[:3]):
            status, _, raw = c.answer()
            assert status == 200 and json.loads(raw)["id"] == env["id"], (status, raw)
        assert metric(st, "promptq_broker_reply_subscriptions_total") > subs0

        for env in envs[3:]:
            finish(r, env, "succeeded", completion("echo"))
        for c in calls[3:]:
            assert c.answer()[0] == 200
        reads2 = cmdstat(r, "hmget") + cmdstat(r, "hgetall")
        # one read on arrival, one per message, one per waiter per resubscription (2 loops)
        assert reads2 - reads0 <= 3 * n, "reads not proportional to jobs: %d" % (reads2 - reads0)


def test_waiters_survive_a_redis_restart():
    with harness.Stack("chat-redis-restart") as st:
        r = st.redis(persist=True)
        st.devkafka(brokers=1, partitions=4)
        path, _ = st.config(providers=DEAD, routes=ROUTES,
                            extra={"broker": {"api_keys": {KEY: TENANT},
                                              "sync_timeout_ms": 30000}})
        start_broker(st, path)
        calls = [Call(st, chat_body("p-rr-%d" % i)) for i in range(2)]
        envs = [queued_envelope(st, "p-rr-%d" % i) for i in range(2)]
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == 2, T(10), "waiters")
        subs0 = metric(st, "promptq_broker_reply_subscriptions_total")
        r.kill()
        time.sleep(0.5)
        r.restart()
        wait_for(lambda: metric(st, "promptq_broker_reply_subscriptions_total") >= subs0 + 2,
                 T(15), "the loops to subscribe again")
        # one finished while the broker was resubscribing (no message reaches it), one after
        finish(r, envs[0], "succeeded", completion("echo: a"), publish=False)
        r.cli("CLIENT", "KILL", "TYPE", "pubsub")
        assert calls[0].answer()[0] == 200
        finish(r, envs[1], "succeeded", completion("echo: b"))
        status, _, raw = calls[1].answer()
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "echo: b"


def test_wait_timeout_and_client_disconnect():
    with harness.Stack("chat-timeout") as st:
        r = no_worker_stack(st, sync_timeout_ms=1200)
        t0 = time.monotonic()
        status, hdrs, raw = harness.http("POST", st.broker_url + "/v1/chat/completions",
                                         chat_body("p-timeout"), AUTH)
        took = time.monotonic() - t0
        assert status == 504, (status, raw)
        assert 1.0 <= took < T(6), took
        assert hdrs["x-should-retry"] == "false" and hdrs["x-promptq-job-id"].startswith("job_")
        assert json.loads(raw)["error"]["code"] == "timeout"
        env = queued_envelope(st, "p-timeout")
        assert env["id"] == hdrs["x-promptq-job-id"]
        # the job is still there to complete
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + env["id"],
                                           headers=AUTH)
        assert status == 200 and doc["status"] == "queued", doc

    with harness.Stack("chat-disconnect") as st:
        no_worker_stack(st, sync_timeout_ms=30000)
        body = json.dumps(chat_body("p-gone")).encode()
        s = socket.create_connection(("127.0.0.1", st.broker_port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == 1, T(10), "a waiter")
        s.close()
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == 0, T(3), "waiter freed")
        assert metric(st, "promptq_broker_chat_abandoned_total") == 1
        assert metric(st, "promptq_broker_inflight_requests") == 0
        # keep-alive connections still work after a waiter was answered on them
        status, _, _ = harness.http("GET", st.broker_url + "/v1/models", headers=AUTH)
        assert status == 200


def test_idempotent_chat_and_validation():
    with harness.Stack("chat-idem") as st:
        r = no_worker_stack(st)
        h = {"Idempotency-Key": "chat-idem-1"}
        body = chat_body("p-idem")
        calls = [Call(st, body, h) for _ in range(3)]  # concurrent first uses
        env = queued_envelope(st, "p-idem")
        time.sleep(1.0)
        finish(r, env, "succeeded", completion("echo: p-idem"))
        for c in calls:
            status, hdrs, raw = c.answer()
            assert status == 200, (status, raw)
            assert hdrs["x-promptq-job-id"] == env["id"]
            assert json.loads(raw)["choices"][0]["message"]["content"] == "echo: p-idem"
        # a later repeat gets the stored result at once; nothing new was queued
        status, hdrs, raw = harness.http("POST", st.broker_url + "/v1/chat/completions", body,
                                         dict(AUTH, **h))
        assert status == 200 and hdrs["x-promptq-job-id"] == env["id"], (status, raw)
        mine = [m for m in st.consume_all("promptq.requests")
                if json.loads(m["value"])["request"]["messages"][0]["content"] == "p-idem"]
        assert len(mine) == 1, "a repeat queued the job again: %d" % len(mine)
        status, _, raw = harness.http("POST", st.broker_url + "/v1/chat/completions",
                                      chat_body("p-idem-other"), dict(AUTH, **h))
        assert status == 422 and json.loads(raw)["error"]["type"] == "idempotency_key_reused"

        # validation: OpenAI-shaped errors, nothing queued
        url = st.broker_url + "/v1/chat/completions"
        status, hdrs, raw = harness.http("POST", url, chat_body("x", model="nope"), AUTH)
        err = json.loads(raw)["error"]
        assert status == 404 and err["code"] == "model_not_found", raw
        assert err["type"] == "invalid_request_error" and "param" in err, err
        status, _, raw = harness.http("POST", url, b"{not json", AUTH)
        assert status == 400, raw
        status, _, raw = harness.http("POST", url, {"model": "m1", "messages": []}, AUTH)
        assert status == 400, raw
        status, _, raw = harness.http("POST", url, {"request": chat_body("x"), "id": "mine"},
                                      AUTH)
        assert status == 400, raw
        status, hdrs, raw = harness.http("POST", url, chat_body("x"),
                                         {"Authorization": "Bearer wrong"})
        assert status == 401, raw
        status, _, raw = harness.http("GET", url, None, AUTH)
        assert status == 405, raw

        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/models", headers=AUTH)
        assert status == 200 and doc["object"] == "list", doc
        assert sorted(m["id"] for m in doc["data"]) == ["m1", "m2"], doc
        assert all(m["object"] == "model" and m["owned_by"] == "promptq" and
                   isinstance(m["created"], int) for m in doc["data"]), doc
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/models/m2", headers=AUTH)
        assert status == 200 and doc["id"] == "m2", doc
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/models/zz", headers=AUTH)
        assert status == 404, doc
        status, _, _ = harness.http("GET", st.broker_url + "/v1/models")
        assert status == 401


def test_not_durable_is_503():
    with harness.Stack("chat-503") as st:
        no_worker_stack(st, extra={"broker": {"ack_timeout_ms": 200,
                                              "spool_max_bytes": 1048576}})
        st.kafka_.control("down -1")
        # fill the spool so the job can be neither produced nor spooled
        big = "y" * 60000
        for _ in range(40):
            status, _, _ = harness.http("POST", st.broker_url + "/v1/jobs",
                                        {"request": chat_body(big)}, AUTH)
            if status == 503:
                break
        status, hdrs, raw = harness.http("POST", st.broker_url + "/v1/chat/completions",
                                         chat_body(big), AUTH)
        assert status == 503, (status, raw)
        assert "retry-after" in hdrs and hdrs["x-promptq-job-id"].startswith("job_"), hdrs


# ---- the OpenAI Node SDK against a real worker ----

def test_openai_node_sdk_with_worker():
    """Needs promptq-worker to PUBLISH "<tenant>:<id>" to the envelope's reply_to."""
    node = harness.node_ready()
    with harness.Stack("chat-node") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        fast = st.sim("fast")
        slow = st.sim("slow")
        slow.set_state({"latency_ms": 4000})
        providers = {"fast": {"type": "openai", "base_url": fast.api},
                     "slow": {"type": "openai", "base_url": slow.api, "timeout_ms": 20000}}
        routes = {"sim-model": [{"provider": "fast", "model": "sim-model"}],
                  "slow-model": [{"provider": "slow", "model": "slow-model"}]}
        path, _ = st.config(providers=providers, routes=routes,
                            extra={"broker": {"api_keys": {KEY: TENANT},
                                              "sync_timeout_ms": 2500},
                                   "worker": {"lease_ms": 3000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        start_broker(st, path)
        # warm up: the worker has joined its group once a plain job completes
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs",
                                           {"request": {"model": "sim-model", "messages": [
                                               {"role": "user", "content": "warm"}]}}, AUTH)
        assert status == 202, doc
        wait_for(lambda: harness.http_json("GET", st.broker_url + "/v1/jobs/" + doc["id"],
                                           headers=AUTH)[2].get("status") == "succeeded",
                 T(30), "the warm-up job to succeed")
        env = dict(os.environ, PQ_BASE_URL=st.broker_url + "/v1", PQ_API_KEY=KEY,
                   PQ_MODEL="sim-model", PQ_SLOW_MODEL="slow-model",
                   PQ_MODELS="sim-model,slow-model")
        log = os.path.join(st.log_dir, "node-test.log")
        with open(log, "wb") as f:
            out = subprocess.run([node, "--test", "--test-reporter=spec",
                                  os.path.join(NODE_DIR, "chat.test.mjs")],
                                 cwd=NODE_DIR, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 timeout=T(120))
        with open(log, "rb") as f:
            text = f.read().decode(errors="replace")
        assert out.returncode == 0, "node tests failed:\n" + text[-6000:]
        assert "pass 5" in text and "fail 0" in text, text[-3000:]


def stream_text(events):
    out = ""
    for e in events:
        if e.startswith("id: ") or e.startswith("data: {"):
            doc = json.loads(e.split("data: ", 1)[1])
            assert "error" not in doc, doc
            for ch in doc.get("choices", []):
                out += ch["delta"].get("content") or ""
    return out


def test_stream_cut_and_resumed_with_worker():
    """A real worker streams a paced answer (the sim sends one word every 100 ms): the first
    chunk reaches the client long before the last is generated; the client drops after three
    events and comes back with Last-Event-ID; the two parts are the whole answer, once, and
    the job's record holds the same answer. Then the worker is SIGKILLed mid-stream: the
    client's stream ends with a restart error event, and a resume after it gets the new
    answer of the worker that took the job over."""
    with harness.Stack("chat-resume") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        sim = st.sim("paced")
        sim.set_state({"chunk_ms": 100})
        path, _ = st.config(providers={"sim": {"type": "openai", "base_url": sim.api}},
                            routes={"sim-model": [{"provider": "sim", "model": "sim-model"}]},
                            extra={"broker": {"api_keys": {KEY: TENANT}},
                                   "worker": {"lease_ms": 2000}})
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        start_broker(st, path)
        prompt = " ".join("w%d" % i for i in range(20))
        want = "echo: " + prompt

        c = StreamClient(st, chat_body(prompt, model="sim-model", stream=True))
        first = c.wait_events(3, T(30))
        t_first = first[0][0]
        c.close()
        jid = c.headers["x-promptq-job-id"]
        last = event_id(first[-1][1])
        c2 = resume(st, jid, last)
        rest = c2.finished(T(30))
        t_last = c2.events[-1][0]
        c2.close()
        print("first event to last: %.2f s" % (t_last - t_first))
        assert t_last - t_first > 1.0, (t_first, t_last)  # 21 words at 100 ms: ~2 s
        ids = [event_id(e) for _, e in first] + [event_id(e) for e in rest[:-1]]
        assert len(set(ids)) == len(ids) and None not in ids, ids
        assert rest[-1] == "data: [DONE]", rest
        assert stream_text([e for _, e in first]) + stream_text(rest) == want, (first, rest)
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=AUTH)
        assert status == 200 and doc["response"]["choices"][0]["message"]["content"] == want, doc

        # the worker killed mid-stream: the live client sees a clean restart marker; a resume
        # after it follows the new attempt to its end
        sim.set_state({"chunk_ms": 150})
        c3 = StreamClient(st, chat_body(prompt + " again", model="sim-model", stream=True))
        c3.wait_events(3, T(30))
        w.kill(signal.SIGKILL)
        w.wait(T(10))
        w.start()
        events = c3.finished(T(60))
        c3.close()
        err = json.loads(events[-2].split("data: ", 1)[1])["error"]
        assert err["code"] == "stream_restarted", events
        jid = c3.headers["x-promptq-job-id"]
        c4 = resume(st, jid, event_id(events[-2]))
        rest = c4.finished(T(60))
        c4.close()
        assert rest[-1] == "data: [DONE]" and stream_text(rest) == want + " again", rest
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + jid, headers=AUTH)
        assert doc["status"] == "succeeded" and \
            doc["response"]["choices"][0]["message"]["content"] == want + " again", doc


harness.run(globals())
