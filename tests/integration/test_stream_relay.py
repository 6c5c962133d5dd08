"""POST /v1/chat/completions with "stream": true relays the job's Redis Stream live.

No worker: the test plays it (XADD of chunk / restart / end entries to the job's stream
promptq:stream:{tenant}:{id}, the terminal write of the record and the PUBLISH on reply_to) and
reads the answer with a raw socket, so the time each event arrives is known:
  * headers (200, text/event-stream, x-promptq-job-id) before any chunk exists;
  * chunks relayed verbatim, in order, with "id: <entry id>", each within a fraction of a second
    of its XADD, with no polling (INFO commandstats: XREAD calls only per entry batch or block);
  * "end" gives [DONE]; "restart" an error event (code stream_restarted) and [DONE];
  * a job without stream entries ends with the record's answer replayed as events;
  * a terminal record after chunks but without "end" (the worker died) ends with an error event;
  * a client that goes away mid-stream frees its waiter and its reader connection;
  * broker.sync_timeout_ms ends a started stream with an error event code "timeout".
"""

import json
import time

import harness
from harness import T, wait_for
from chatstack import (AUTH, TENANT, StreamClient, chat_body, cmdstat, completion, event_id,
                       finish, metric, no_worker_stack, queued_envelope, resume)


def skey(env):
    return "promptq:stream:%s:%s" % (env["tenant"], env["id"])


def xadd(r, env, t, d=""):
    return r.cli("XADD", skey(env), "MAXLEN", "~", "4096", "*", "t", t, "d", d)


def chunk_json(env, content=None, role=None, finish_reason=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return json.dumps({"id": env["id"], "object": "chat.completion.chunk", "created": 1700000000,
                       "model": "x", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}]},
                      separators=(",", ":"))


def start(st, r, prompt, **kw):
    c = StreamClient(st, chat_body(prompt, stream=True, **kw))
    env = queued_envelope(st, prompt)
    assert env["request"]["stream"] is True, env
    wait_for(lambda: c.head_at is not None or c.done.is_set(), T(10), "headers")
    assert c.status == 200, (c.status, c.error)
    assert c.headers["content-type"].startswith("text/event-stream"), c.headers
    assert c.headers["cache-control"] == "no-cache", c.headers
    assert c.headers["x-promptq-job-id"] == env["id"], c.headers
    assert r.cli("EXISTS", skey(env)) == "0"  # the head went out before any chunk
    return c, env


def readers(r):
    return sum(1 for ln in r.cli("CLIENT", "LIST").splitlines() if "cmd=xread" in ln)


def test_stream_relay():
    with harness.Stack("stream-relay") as st:
        r = no_worker_stack(st)

        # live relay: in order, with ids, fast, no polling
        c, env = start(st, r, "p-live")
        wait_for(lambda: readers(r) == 1, T(5), "the stream's reader blocked in XREAD")
        x0 = cmdstat(r, "xread")
        time.sleep(1.0)
        assert cmdstat(r, "xread") == x0, "XREAD polled while nothing was added"
        ids, datas, lags = [], [], []
        for i, (content, role) in enumerate([("", "assistant"), ("Hel", None), ("lo", None)]):
            d = chunk_json(env, content, role)
            t0 = time.monotonic()
            ids.append(xadd(r, env, "chunk", d))
            datas.append(d)
            ts, _ = c.wait_events(i + 1)[i]
            lags.append(ts - t0)
            time.sleep(0.05)
        d = chunk_json(env, finish_reason="stop")
        ids.append(xadd(r, env, "chunk", d))
        datas.append(d)
        ids.append(xadd(r, env, "end"))
        events = c.finished()
        finish(r, env, "succeeded", completion("Hello"))
        assert events == ["id: %s\ndata: %s" % (i, d) for i, d in zip(ids, datas)] + \
            ["data: [DONE]"], events  # plain, as OpenAI's last event
        print("first-event lags (s):", ["%.4f" % x for x in lags])
        assert max(lags) < T(0.3), lags
        assert cmdstat(r, "xread") - x0 <= 8, cmdstat(r, "xread") - x0
        wait_for(lambda: readers(r) == 0, T(5), "reader closed")
        c.close()

        # restart after chunks: an error event, then [DONE]
        c, env = start(st, r, "p-restart")
        xadd(r, env, "chunk", chunk_json(env, "partial", "assistant"))
        c.wait_events(1)
        rid = xadd(r, env, "restart", json.dumps({"reason": "upstream reset"}))
        events = c.finished()
        assert len(events) == 3 and events[-1] == "data: [DONE]", events
        assert events[1].startswith("id: %s\ndata: " % rid), events
        err = json.loads(events[1].split("data: ", 1)[1])["error"]
        assert err["code"] == "stream_restarted" and err["type"] == "server_error", err
        assert "upstream reset" in err["message"], err
        c.close()

        # no stream entries (cache hit, a worker that does not stream): the record replayed
        c, env = start(st, r, "p-whole", stream_options={"include_usage": True})
        time.sleep(0.3)
        finish(r, env, "succeeded", completion("echo: p-whole"))
        events = c.finished()
        assert events[-1] == "data: [DONE]", events
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert len(chunks) == 4, chunks
        assert chunks[1]["choices"][0]["delta"] == {"content": "echo: p-whole"}, chunks
        assert chunks[3]["usage"]["total_tokens"] == 5, chunks
        c.close()

        # a failed job without entries: the error as an event on the started stream
        c, env = start(st, r, "p-failed")
        finish(r, env, "failed", error={"type": "server_error", "provider": "sim"})
        events = c.finished()
        assert events[-1] == "data: [DONE]", events
        assert json.loads(events[0][len("data: "):])["error"]["code"] == "server_error", events
        c.close()

        # chunks, then the record is terminal without an end (the worker died)
        c, env = start(st, r, "p-died")
        xadd(r, env, "chunk", chunk_json(env, "half", "assistant"))
        c.wait_events(1)
        finish(r, env, "succeeded", completion("half and the rest"))
        events = c.finished()
        assert events[-1] == "data: [DONE]", events
        err = json.loads(events[1].split("data: ", 1)[1])["error"]
        assert err["code"] == "stream_restarted" and env["id"] in err["message"], err
        c.close()

        # a client that goes away mid-stream frees its waiter and reader
        c, env = start(st, r, "p-gone")
        xadd(r, env, "chunk", chunk_json(env, "x", "assistant"))
        c.wait_events(1)
        c.close()
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == 0, T(5), "waiter freed")
        wait_for(lambda: readers(r) == 0 and metric(st, "promptq_broker_inflight_requests") == 0,
                 T(5), "reader freed")
        xadd(r, env, "chunk", chunk_json(env, "y"))
        # the broker keeps answering
        status, _, _ = harness.http("GET", st.broker_url + "/v1/models", headers=AUTH)
        assert status == 200
        c, env = start(st, r, "p-after")
        xadd(r, env, "chunk", chunk_json(env, "ok", "assistant"))
        xadd(r, env, "end")
        events = c.finished()
        assert len(events) == 2 and events[1] == "data: [DONE]", events
        c.close()

    with harness.Stack("stream-timeout") as st:
        r = no_worker_stack(st, sync_timeout_ms=1500)
        c, env = start(st, r, "p-slow")
        xadd(r, env, "chunk", chunk_json(env, "slow", "assistant"))
        events = c.finished(T(10))
        assert events[-1] == "data: [DONE]", events
        err = json.loads(events[1].split("data: ", 1)[1])["error"]
        assert err["code"] == "timeout", err
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/" + env["id"],
                                           headers=AUTH)
        assert status == 200 and doc["status"] == "queued", doc


def test_stream_resume():
    """GET /v1/jobs/{id}/stream, one stack, case after case: a client that lost its chat stream
    comes back with Last-Event-ID and gets the rest, live; a finished job's stream is read again
    from its entries, or from its record once the entries expired; a POST /v1/jobs stream job is
    followed the same way; bad requests get 400/404 and touch nothing."""
    with harness.Stack("stream-resume") as st:
        r = no_worker_stack(st)

        # a chat stream cut after two chunks, resumed after the first: the second at once,
        # then the live tail
        c, env = start(st, r, "p-cut")
        ids = [xadd(r, env, "chunk", chunk_json(env, "", "assistant")),
               xadd(r, env, "chunk", chunk_json(env, "Hel"))]
        c.wait_events(2)
        c.close()
        wait_for(lambda: metric(st, "promptq_broker_chat_waiting") == 0, T(5), "waiter freed")
        c2 = resume(st, env["id"], ids[0])
        got = c2.wait_events(1)
        assert c2.status == 200 and c2.headers["x-promptq-job-id"] == env["id"], c2.headers
        assert c2.headers["content-type"].startswith("text/event-stream"), c2.headers
        assert event_id(got[0][1]) == ids[1], got
        ids.append(xadd(r, env, "chunk", chunk_json(env, "lo")))
        assert event_id(c2.wait_events(2)[1][1]) == ids[2]
        ids.append(xadd(r, env, "chunk", chunk_json(env, finish_reason="stop")))
        xadd(r, env, "end")
        events = c2.finished()
        assert [event_id(e) for e in events] == ids[1:] + [None], events
        assert events[-1] == "data: [DONE]", events
        finish(r, env, "succeeded", completion("Hello"))
        c2.close()

        # the finished job: from its start (the stream's entries, with their ids), and after
        # its last chunk ([DONE] only)
        c3 = resume(st, env["id"])
        events = c3.finished()
        assert [event_id(e) for e in events] == ids + [None], events
        c3.close()
        c4 = resume(st, env["id"], ids[-1])
        assert c4.finished() == ["data: [DONE]"]
        c4.close()

        # the entries expired: the whole answer from the record, as events without ids
        r.cli("DEL", skey(env))
        c5 = resume(st, env["id"], ids[1])
        events = c5.finished()
        assert events[-1] == "data: [DONE]" and all(event_id(e) is None for e in events), events
        docs = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert all("choices" in d for d in docs), events
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])
        assert text == "Hello", events
        c5.close()

        # bad requests: named, and nothing else changes
        for path, hdrs, code in [("/v1/jobs/no-such-job/stream", {}, 404),
                                 ("/v1/jobs/%s/stream" % env["id"], {"Last-Event-ID": "x"}, 400),
                                 ("/v1/jobs/%s/stream" % env["id"], {"Last-Event-ID": "1-"}, 400)]:
            status, _, doc = harness.http_json("GET", st.broker_url + path,
                                               headers=dict(AUTH, **hdrs))
            assert status == code, (path, status, doc)
            assert doc["error"]["message"], doc
        status, _, doc = harness.http_json("GET", st.broker_url + "/v1/jobs/%s/stream" % env["id"])
        assert status == 401, (status, doc)
        status, _, _ = harness.http_json("POST", st.broker_url + "/v1/jobs/%s/stream" % env["id"],
                                         {}, headers=AUTH)
        assert status == 405

        # a POST /v1/jobs job with "stream": true, followed before it starts; a restart after
        # a chunk the client had is news to it (an error event); the job's broker gets no
        # reply_to message here, so the block-timeout read or the end entry answers
        status, _, doc = harness.http_json(
            "POST", st.broker_url + "/v1/jobs",
            {"request": {"model": "m1", "stream": True,
                         "messages": [{"role": "user", "content": "p-jobs"}]}}, headers=AUTH)
        assert status == 202, doc
        jenv = {"id": doc["id"], "tenant": TENANT}
        c6 = resume(st, jenv["id"])
        wait_for(lambda: c6.head_at is not None, T(10), "headers of a queued job's stream")
        assert c6.status == 200 and not c6.events, (c6.status, c6.events)
        first = xadd(r, jenv, "chunk", chunk_json(jenv, "part", "assistant"))
        c6.wait_events(1)
        c6.close()
        rid = xadd(r, jenv, "restart", json.dumps({"reason": "upstream reset"}))
        c7 = resume(st, jenv["id"], first)
        events = c7.finished()
        assert event_id(events[0]) == rid and events[-1] == "data: [DONE]", events
        assert json.loads(events[0].split("data: ", 1)[1])["error"]["code"] == \
            "stream_restarted", events
        c7.close()
        # the new attempt's chunks and end, then the record: from the start, the reader stops
        # at the restart as the live client did; after it, the new answer
        nid = xadd(r, jenv, "chunk", chunk_json(jenv, "whole", "assistant"))
        xadd(r, jenv, "end")
        finish(r, jenv, "succeeded", completion("whole"), publish=False)
        c8 = resume(st, jenv["id"], rid)
        events = c8.finished()
        assert [event_id(e) for e in events] == [nid, None], events
        c8.close()

        # a job without stream entries at all (no "stream": true): answered from its record by
        # the read after a block without entries
        status, _, doc = harness.http_json(
            "POST", st.broker_url + "/v1/jobs",
            {"request": {"model": "m1", "messages": [{"role": "user", "content": "p-plain"}]}},
            headers=AUTH)
        assert status == 202, doc
        penv = {"id": doc["id"], "tenant": TENANT}
        c9 = resume(st, penv["id"])
        wait_for(lambda: c9.head_at is not None, T(10), "headers")
        finish(r, penv, "succeeded", completion("plain answer"), publish=False)
        events = c9.finished(T(25))
        assert events[-1] == "data: [DONE]" and "plain answer" in "".join(events), events
        c9.close()

        # a chat stream repeated with its Idempotency-Key and Last-Event-ID: the same job, the
        # events after that one; a malformed Last-Event-ID on a chat is 400
        body = chat_body("p-idem", stream=True)
        hdr = {"Idempotency-Key": "resume-1"}
        c10 = StreamClient(st, body, headers=hdr)
        ienv = queued_envelope(st, "p-idem")
        ids = [xadd(r, ienv, "chunk", chunk_json(ienv, "", "assistant")),
               xadd(r, ienv, "chunk", chunk_json(ienv, "one"))]
        c10.wait_events(2)
        c10.close()
        c11 = StreamClient(st, body, headers=dict(hdr, **{"Last-Event-ID": ids[0]}))
        got = c11.wait_events(1)
        assert c11.headers["x-promptq-job-id"] == ienv["id"], c11.headers
        assert event_id(got[0][1]) == ids[1], got
        xadd(r, ienv, "end")
        assert c11.finished()[-1] == "data: [DONE]"
        c11.close()
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/chat/completions",
                                           chat_body("p-bad-id", stream=True),
                                           headers=dict(AUTH, **{"Last-Event-ID": "abc"}))
        assert status == 400 and "Last-Event-ID" in doc["error"]["message"], (status, doc)

        # nothing left open
        wait_for(lambda: readers(r) == 0 and metric(st, "promptq_broker_inflight_requests") == 0,
                 T(5), "readers and slots freed")


harness.run(globals())
