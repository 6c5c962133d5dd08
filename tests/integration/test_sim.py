"""promptq-sim: OpenAI wire format, validation, control modes and stats over loopback HTTP."""

import errno
import http.client
import json
import os
import resource
import socket
import sys
import time
import urllib.error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import T, wait_for  # noqa: E402


def chat(s, content, model="gpt-test", headers=None, timeout=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return harness.http("POST", s.api + "/chat/completions", body, headers=headers,
                        timeout=timeout)


def chat_json(s, content, **kw):
    status, hdrs, raw = chat(s, content, **kw)
    return status, hdrs, json.loads(raw)


def assert_openai_error(status, raw, want_status, param=None):
    assert status == want_status, (status, raw)
    doc = json.loads(raw)
    err = doc["error"]
    assert isinstance(err["message"], str) and err["message"], doc
    assert err["type"] == "invalid_request_error", doc
    assert "param" in err and "code" in err, doc
    if param is not None:
        assert err["param"] == param, doc
    return err


def test_chat_completion_echo():
    with harness.Stack("sim_chat") as st:
        s = st.sim("a")
        status, hdrs, doc = chat_json(s, "hello there")
        assert status == 200, doc
        assert hdrs["content-type"].startswith("application/json")
        assert doc["id"].startswith("chatcmpl-") and doc["object"] == "chat.completion"
        assert isinstance(doc["created"], int) and doc["model"] == "gpt-test"
        ch = doc["choices"][0]
        assert ch["index"] == 0 and ch["finish_reason"] == "stop" and ch["logprobs"] is None
        assert ch["message"] == {"role": "assistant", "content": "echo: hello there",
                                 "refusal": None}, ch
        u = doc["usage"]
        assert u["prompt_tokens"] == 3 and u["completion_tokens"] == 5, u  # 11 and 17 bytes / 4
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]

        # The LAST message is echoed; content parts are concatenated; ids count up.
        body = {"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one, "},
                                         {"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": "part two"}]}]}
        status, _, raw = harness.http("POST", s.api + "/chat/completions", body)
        doc2 = json.loads(raw)
        assert status == 200, raw
        assert doc2["choices"][0]["message"]["content"] == "echo: part one, part two"
        assert doc2["id"] != doc["id"]

        # max_tokens: at most 4 bytes per token, finish_reason "length".
        status, _, doc = chat_json(s, "x" * 100, max_tokens=5)
        assert status == 200
        assert doc["choices"][0]["message"]["content"] == "echo: " + "x" * 14
        assert doc["choices"][0]["finish_reason"] == "length"
        assert doc["usage"]["completion_tokens"] <= 5
        status, _, doc = chat_json(s, "short", max_completion_tokens=100)
        assert doc["choices"][0]["finish_reason"] == "stop"


def test_bad_requests():
    with harness.Stack("sim_bad") as st:
        s = st.sim("a")
        url = s.api + "/chat/completions"
        ok_msgs = [{"role": "user", "content": "hi"}]
        st_, _, raw = harness.http("POST", url, {"messages": ok_msgs})
        assert_openai_error(st_, raw, 400, "model")
        st_, _, raw = harness.http("POST", url, {"model": "", "messages": ok_msgs})
        assert_openai_error(st_, raw, 400, "model")
        st_, _, raw = harness.http("POST", url, {"model": "m", "messages": []})
        assert_openai_error(st_, raw, 400, "messages")
        st_, _, raw = harness.http("POST", url, {"model": "m"})
        assert_openai_error(st_, raw, 400, "messages")
        st_, _, raw = harness.http("POST", url, {"model": "m",
                                                 "messages": [{"role": "wizard", "content": "x"}]})
        assert_openai_error(st_, raw, 400, "messages[0].role")
        st_, _, raw = harness.http("POST", url, {"model": "m", "messages": [{"role": "user"}]})
        assert_openai_error(st_, raw, 400, "messages[0].content")
        st_, _, raw = harness.http("POST", url, {"model": "m", "messages": ["hi"]})
        assert_openai_error(st_, raw, 400, "messages[0]")
        st_, _, raw = harness.http("POST", url, {"model": "m", "messages": ok_msgs,
                                                 "max_tokens": 0})
        assert_openai_error(st_, raw, 400, "max_tokens")
        st_, _, raw = harness.http("POST", url, b"{not json",
                                   headers={"Content-Type": "application/json"})
        assert_openai_error(st_, raw, 400)
        st_, _, raw = harness.http("POST", url, b"[1,2]",
                                   headers={"Content-Type": "application/json"})
        assert_openai_error(st_, raw, 400)
        st_, _, raw = harness.http("POST", url, json.dumps({"model": "m", "messages": ok_msgs}),
                                   headers={"Content-Type": "text/plain"})
        assert_openai_error(st_, raw, 400)
        # Unknown path and wrong method: OpenAI-shaped 404 / 405.
        st_, _, raw = harness.http("GET", s.api + "/nope")
        assert st_ == 404 and "error" in json.loads(raw)
        st_, _, raw = harness.http("GET", url)
        assert st_ == 405 and "error" in json.loads(raw)


def test_models_list():
    with harness.Stack("sim_models") as st:
        s = st.sim("a")
        status, _, raw = harness.http("GET", s.api + "/models")
        doc = json.loads(raw)
        assert status == 200 and doc["object"] == "list"
        assert [m["id"] for m in doc["data"]] == ["sim-model"], doc
        assert chat(s, "hi", model="gpt-4o-mini")[0] == 200
        doc = json.loads(harness.http("GET", s.api + "/models")[2])
        ids = sorted(m["id"] for m in doc["data"])
        assert ids == ["gpt-4o-mini", "sim-model"], ids
        for m in doc["data"]:
            assert m["object"] == "model" and m["owned_by"] == "promptq-sim"
            assert isinstance(m["created"], int)
        status, _, raw = harness.http("GET", s.api + "/models/gpt-4o-mini")
        assert status == 200 and json.loads(raw)["id"] == "gpt-4o-mini"
        assert harness.http("GET", s.api + "/models/unknown")[0] == 404


def test_api_keys():
    with harness.Stack("sim_keys") as st:
        key1, key2 = "sk-test-aaaaaaaaaaaaaaaaaaaaaaaa1111", "sk-test-bbbbbbbbbbbbbbbbbbbbbbbb2222"
        s = st.sim("a", args=("--key", key1, "--key", key2))
        status, _, raw = chat(s, "hi")
        assert_openai_error(status, raw, 401)
        bad = "sk-test-cccccccccccccccccccccccc3333"
        status, _, raw = chat(s, "hi", headers={"Authorization": "Bearer " + bad})
        err = assert_openai_error(status, raw, 401)
        assert err["code"] == "invalid_api_key"
        assert bad not in raw.decode() and "3333" in err["message"], err  # masked fragment only
        for k in (key1, key2):
            status, _, raw = chat(s, "hi", headers={"Authorization": "Bearer " + k})
            assert status == 200, raw
        # The control API needs no key.
        assert s.stats()["by_status"] == {"401": 2, "200": 2}


def is_refused(exc):
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, ConnectionRefusedError) or \
        getattr(reason, "errno", None) == errno.ECONNREFUSED


def test_down_then_up_same_port():
    with harness.Stack("sim_down") as st:
        s = st.sim("a")
        # An idle keep-alive connection made before the outage must not survive it.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=T(5))
        conn.request("GET", "/v1/models")
        assert conn.getresponse().read()
        s.set_state({"mode": "down"})
        try:
            chat(s, "hi", timeout=T(5))
            raise AssertionError("sim answered while down")
        except urllib.error.URLError as e:
            assert is_refused(e), repr(e)
        try:
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
            raise AssertionError("keep-alive connection survived down")
        except (OSError, http.client.HTTPException):
            pass
        conn.close()
        assert s.stats()["listening"] is False
        s.set_state({"mode": "ok"})
        status, _, doc = chat_json(s, "back again")
        assert status == 200 and doc["choices"][0]["message"]["content"] == "echo: back again"
        # Down requested through the provider listener itself: answered, then closed.
        status, _, raw = harness.http("POST", s.url + "/_sim/state", {"mode": "down"})
        assert status == 200 and json.loads(raw)["state"]["mode"] == "down"
        wait_for(lambda: not s.stats()["listening"], T(5), "provider listener closed")
        try:
            chat(s, "hi", timeout=T(5))
            raise AssertionError("sim answered while down")
        except urllib.error.URLError as e:
            assert is_refused(e), repr(e)
        s.set_state({})  # all defaults: ok
        assert chat(s, "hi")[0] == 200
        assert s.proc.stop() == 0


def test_error_status():
    with harness.Stack("sim_error") as st:
        s = st.sim("a")
        s.set_state({"mode": "error", "status": 503})
        status, hdrs, raw = chat(s, "hi")
        assert status == 503, status
        err = json.loads(raw)["error"]
        assert err["type"] == "server_error" and err["message"]
        assert "retry-after" not in hdrs
        assert harness.http("GET", s.api + "/models")[0] == 503
        s.set_state({"mode": "error", "status": 500, "error_body": '{"oops":"sk-secret-1"}',
                     "retry_after": "2"})
        status, hdrs, raw = chat(s, "hi")
        assert status == 500 and raw == b'{"oops":"sk-secret-1"}' and hdrs["retry-after"] == "2"


def test_rate_limit_retry_after():
    with harness.Stack("sim_429") as st:
        s = st.sim("a")
        s.set_state({"mode": "rate_limit", "retry_after": "7"})
        status, hdrs, raw = chat(s, "hi")
        assert status == 429 and hdrs["retry-after"] == "7", (status, hdrs)
        assert "retry-after-ms" not in hdrs
        err = json.loads(raw)["error"]
        assert err["code"] == "rate_limit_exceeded" and err["message"]
        s.set_state({"mode": "rate_limit", "retry_after_ms": 1500})
        status, hdrs, _ = chat(s, "hi")
        assert status == 429 and hdrs["retry-after"] == "1" and hdrs["retry-after-ms"] == "1500"


def test_latency():
    with harness.Stack("sim_latency") as st:
        s = st.sim("a")
        s.set_state({"latency_ms": 300})
        t0 = time.monotonic()
        status, _, _ = chat(s, "slow")
        took = time.monotonic() - t0
        assert status == 200 and 0.3 <= took < 3.0, took
        s.set_state({"mode": "error", "status": 502, "latency_ms": 300})
        t0 = time.monotonic()
        assert chat(s, "slow")[0] == 502
        assert time.monotonic() - t0 >= 0.3
        s.set_state({})
        t0 = time.monotonic()
        assert chat(s, "fast")[0] == 200
        assert time.monotonic() - t0 < 0.3


def test_hang():
    with harness.Stack("sim_hang") as st:
        s = st.sim("a")
        s.set_state({"mode": "hang"})
        t0 = time.monotonic()
        try:
            chat(s, "anyone?", timeout=1)
            raise AssertionError("sim answered while hanging")
        except (TimeoutError, socket.timeout, urllib.error.URLError) as e:
            assert isinstance(getattr(e, "reason", e), (TimeoutError, socket.timeout)), repr(e)
        assert 0.9 <= time.monotonic() - t0 < T(3)
        # The client gave up: the held call is released.
        wait_for(lambda: s.stats()["inflight"] == 0, T(5), "inflight back to 0")
        assert s.stats()["max_inflight"] == 1
        # A waiting client is answered when the state leaves hang.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=T(10))
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "m",
                                      "messages": [{"role": "user", "content": "wait"}]}),
                     headers={"Content-Type": "application/json"})
        wait_for(lambda: s.stats()["inflight"] == 1, T(5), "the call to be held")
        s.set_state({"mode": "ok"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200 and doc["choices"][0]["message"]["content"] == "echo: wait"
        conn.close()
        # SIGTERM with a call still held (latency) exits 0 and drops it.
        s.set_state({"latency_ms": 10000})
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=T(10))
        conn.request("GET", "/v1/models")
        wait_for(lambda: s.stats()["inflight"] == 1, T(5), "the call to be held")
        assert s.proc.stop() == 0
        try:
            conn.getresponse().read()
            raise AssertionError("held call answered after SIGTERM")
        except (OSError, http.client.HTTPException):
            pass
        conn.close()


def test_malformed():
    with harness.Stack("sim_malformed") as st:
        s = st.sim("a")
        s.set_state({"mode": "malformed"})
        for path, method, body in (("/chat/completions", "POST",
                                    {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                                   ("/models", "GET", None)):
            status, hdrs, raw = harness.http(method, s.api + path, body)
            assert status == 200 and raw, (status, raw)
            try:
                json.loads(raw)
                raise AssertionError("body parsed as JSON: %r" % raw)
            except ValueError:
                pass


def test_failure_rate():
    with harness.Stack("sim_failure_rate") as st:
        s = st.sim("a")
        s.set_state({"failure_rate": 0.5})
        body = {"model": "m", "messages": [{"role": "user", "content": "coin"}]}
        res = harness.post_many(s.api + "/chat/completions", [body] * 200, concurrency=8)
        codes = [r[0] for r in res]
        errors = codes.count(500)
        assert codes.count(200) + errors == 200, set(codes)
        assert 60 <= errors <= 140, errors
        stats = s.stats()
        assert stats["by_status"] == {"200": 200 - errors, "500": errors}, stats
        s.set_state({"failure_rate": 1.0, "status": 529})
        assert chat(s, "x")[0] == 529


def test_stats_and_reset():
    with harness.Stack("sim_stats") as st:
        s = st.sim("stats-sim")
        for i in range(3):
            assert chat(s, "n%d" % i)[0] == 200
        assert chat(s, "x", model="")[0] == 400
        assert harness.http("GET", s.api + "/models")[0] == 200
        st_ = s.stats()
        assert st_["name"] == "stats-sim"
        assert st_["requests"] == 5, st_
        assert st_["by_status"] == {"200": 4, "400": 1}, st_
        assert st_["by_path"] == {"/v1/chat/completions": 4, "/v1/models": 1}, st_
        assert st_["inflight"] == 0 and st_["max_inflight"] >= 1
        # 3 answers of prompt "nI" (1 token) + "echo: nI" (2 tokens)
        assert st_["tokens"] == 9, st_
        s.reset()
        st_ = s.stats()
        assert st_["requests"] == 0 and st_["by_status"] == {} and st_["by_path"] == {}
        assert st_["tokens"] == 0


def test_state_validation_and_replace():
    with harness.Stack("sim_state") as st:
        s = st.sim("a")
        url = s.control_url + "/_sim/state"
        for bad, field in (({"mode": "sideways"}, "mode"), ({"status": 99}, "status"),
                           ({"latency_ms": -1}, "latency_ms"), ({"failure_rate": 2}, "failure_rate"),
                           ({"retry_after": "\n"}, "retry_after"), ({"colour": "red"}, "colour")):
            status, _, raw = harness.http("POST", url, bad)
            assert status == 400 and field in json.loads(raw)["error"]["message"], (bad, raw)
        assert harness.http("POST", url, b"[]")[0] == 400
        got = s.set_state({"mode": "error", "status": 502, "latency_ms": 10})
        assert got["ok"] is True and got["state"]["status"] == 502
        # The whole state is replaced: absent fields go back to their defaults.
        s.set_state({"mode": "rate_limit"})
        status, _, raw = harness.http("GET", url)
        state = json.loads(raw)
        assert status == 200 and state["mode"] == "rate_limit" and state["status"] == 500
        assert state["latency_ms"] == 0 and state["retry_after"] == "1"
        # The control port serves nothing else.
        assert harness.http("GET", s.control_url + "/v1/models")[0] == 404


def test_many_concurrent_held_connections():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    n = 2000 if resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2200 else 500
    with harness.Stack("sim_many") as st:
        s = st.sim("a")
        s.set_state({"mode": "hang"})
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        req = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
               "\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).encode()
        socks = []
        try:
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", s.port), timeout=T(10))
                c.sendall(req)
                socks.append(c)
            wait_for(lambda: s.stats()["inflight"] == n, T(20), "%d held calls" % n)
            s.set_state({"mode": "ok"})
            for c in socks:
                head = c.recv(64)
                assert head.startswith(b"HTTP/1.1 200"), head
            assert s.stats()["max_inflight"] == n
        finally:
            for c in socks:
                c.close()


def test_other_wire_formats():
    with harness.Stack("sim_formats") as st:
        s = st.sim("a", args=("--key", "k-good"))
        msgs = [{"role": "user", "content": "fmt"}]
        # Azure OpenAI: api-key header, api-version required, deployment in the path.
        az = s.url + "/openai/deployments/dep1/chat/completions"
        status, _, raw = harness.http("POST", az + "?api-version=2024-10-21", {"messages": msgs},
                                      headers={"api-key": "k-good"})
        doc = json.loads(raw)
        assert status == 200 and doc["model"] == "dep1", raw
        assert doc["choices"][0]["message"]["content"] == "echo: fmt"
        assert harness.http("POST", az, {"messages": msgs}, headers={"api-key": "k-good"})[0] == 400
        assert harness.http("POST", az + "?api-version=x", {"messages": msgs},
                            headers={"api-key": "bad"})[0] == 401

        # Anthropic Messages: x-api-key + anthropic-version, max_tokens required.
        ah = {"x-api-key": "k-good", "anthropic-version": "2023-06-01"}
        body = {"model": "claude-x", "max_tokens": 2, "system": "be terse",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "long prompt"}]}]}
        status, _, raw = harness.http("POST", s.url + "/v1/messages", body, headers=ah)
        doc = json.loads(raw)
        assert status == 200 and doc["type"] == "message" and doc["id"].startswith("msg_"), raw
        assert doc["content"] == [{"type": "text", "text": "echo: lo"}]
        assert doc["stop_reason"] == "max_tokens" and doc["usage"]["output_tokens"] == 2
        del body["max_tokens"]
        status, _, raw = harness.http("POST", s.url + "/v1/messages", body, headers=ah)
        doc = json.loads(raw)
        assert status == 400 and doc["type"] == "error"
        assert doc["error"]["type"] == "invalid_request_error" and "max_tokens" in doc["error"]["message"]
        status, _, raw = harness.http("POST", s.url + "/v1/messages", body,
                                      headers={"x-api-key": "nope", "anthropic-version": "x"})
        assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"

        # Gemini generateContent: key in x-goog-api-key or ?key=.
        g = s.url + "/v1beta/models/gemini-x:generateContent"
        gbody = {"contents": [{"role": "user", "parts": [{"text": "gem"}]}]}
        status, _, raw = harness.http("POST", g, gbody, headers={"x-goog-api-key": "k-good"})
        doc = json.loads(raw)
        assert status == 200, raw
        cand = doc["candidates"][0]
        assert cand["content"]["parts"][0]["text"] == "echo: gem" and cand["finishReason"] == "STOP"
        assert doc["usageMetadata"]["totalTokenCount"] >= 2
        status, _, raw = harness.http("POST", g + "?key=k-good", {"contents": []})
        assert status == 400 and json.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"

        # watsonx: IAM apikey -> token, then chat with the token.
        form = "grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=%s"
        ct = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, raw = harness.http("POST", s.url + "/identity/token", form % "k-good", headers=ct)
        tok = json.loads(raw)
        assert status == 200 and tok["token_type"] == "Bearer" and tok["expires_in"] > 0, raw
        assert harness.http("POST", s.url + "/identity/token", form % "k-bad", headers=ct)[0] == 400
        wx = s.url + "/ml/v1/text/chat?version=2024-05-01"
        wbody = {"model_id": "ibm/granite", "project_id": "p1", "messages": msgs}
        status, _, raw = harness.http("POST", wx, wbody,
                                      headers={"Authorization": "Bearer " + tok["access_token"]})
        doc = json.loads(raw)
        assert status == 200 and doc["model_id"] == "ibm/granite", raw
        assert doc["choices"][0]["message"]["content"] == "echo: fmt"
        status, _, raw = harness.http("POST", wx, wbody, headers={"Authorization": "Bearer forged"})
        assert status == 401 and json.loads(raw)["status_code"] == 401

        # Modes apply to every format, each answering in its own error shape.
        s.set_state({"mode": "error", "status": 529})
        status, _, raw = harness.http("POST", s.url + "/v1/messages", body, headers=ah)
        assert status == 529 and json.loads(raw)["error"]["type"] == "overloaded_error"
        s.set_state({"mode": "rate_limit", "retry_after": "3"})
        status, hdrs, raw = harness.http("POST", g, gbody, headers={"x-goog-api-key": "k-good"})
        assert status == 429 and hdrs["retry-after"] == "3"
        assert json.loads(raw)["error"]["status"] == "RESOURCE_EXHAUSTED"
        # SIGTERM exits 0 (under ASan this also fails on leaks).
        assert s.proc.stop() == 0


harness.run(globals())
