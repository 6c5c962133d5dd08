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
import urllib.parse

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


def raw_chat(s, model, content="hi", timeout=None):
    """A socket with an OpenAI chat request sent (the caller reads and closes)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]})
    req = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
           "\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).encode()
    c = socket.create_connection(("127.0.0.1", s.port), timeout=timeout or T(10))
    c.sendall(req)
    return c


def sim_log(s):
    status, _, raw = harness.http("GET", s.control_url + "/_sim/log")
    assert status == 200, raw
    return json.loads(raw)["calls"]


def state_refused(s, state, field):
    status, _, raw = harness.http("POST", s.control_url + "/_sim/state", state)
    msg = json.loads(raw)["error"]["message"]
    assert status == 400 and field in msg, (state, status, raw)


def test_per_model_state():
    with harness.Stack("sim_per_model") as st:
        s = st.sim("a")
        s.set_state({"models": {"m-429": {"mode": "rate_limit", "retry_after": None},
                                "m-slow": {"latency_ms": 300},
                                "dep-err": {"mode": "error", "status": 503},
                                "gem-err": {"mode": "error", "status": 500},
                                "claude-err": {"mode": "error", "status": 529},
                                "ibm/wx-err": {"mode": "rate_limit", "retry_after": ""}}})
        # One model 429 without any Retry-After while another answers 200.
        status, hdrs, raw = chat(s, "hi", model="m-429")
        assert status == 429 and "retry-after" not in hdrs, (status, hdrs)
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert chat(s, "hi", model="m-ok")[0] == 200
        # Slow first byte per model.
        t0 = time.monotonic()
        assert chat(s, "hi", model="m-slow")[0] == 200
        assert time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        assert chat(s, "hi", model="m-fast")[0] == 200
        assert time.monotonic() - t0 < 0.3
        # The model comes from each format's own place: Azure deployment and Gemini model in
        # the path, Anthropic "model" and watsonx "model_id" in the body.
        msgs = [{"role": "user", "content": "x"}]
        az = s.url + "/openai/deployments/%s/chat/completions?api-version=2024-10-21"
        assert harness.http("POST", az % "dep-err", {"messages": msgs})[0] == 503
        assert harness.http("POST", az % "dep-ok", {"messages": msgs, "model": "dep-err"})[0] \
            == 200
        g = s.url + "/v1beta/models/%s:generateContent"
        gbody = {"contents": [{"parts": [{"text": "x"}]}]}
        assert harness.http("POST", g % "gem-err", gbody)[0] == 500
        assert harness.http("POST", g % "gem-ok", gbody)[0] == 200
        ah = {"anthropic-version": "2023-06-01"}
        abody = {"model": "claude-err", "max_tokens": 5, "messages": msgs}
        assert harness.http("POST", s.url + "/v1/messages", abody, headers=ah)[0] == 529
        abody["model"] = "claude-ok"
        assert harness.http("POST", s.url + "/v1/messages", abody, headers=ah)[0] == 200
        wx = s.url + "/ml/v1/text/chat?version=2024-05-01"
        wbody = {"model_id": "ibm/wx-err", "project_id": "p", "messages": msgs}
        status, hdrs, _ = harness.http("POST", wx, wbody)
        assert status == 429 and "retry-after" not in hdrs, (status, hdrs)
        wbody["model_id"] = "ibm/wx-ok"
        assert harness.http("POST", wx, wbody)[0] == 200
        # Non-chat routes keep the top-level state.
        s.set_state({"models": {"sim-model": {"mode": "error", "status": 503}}})
        assert harness.http("GET", s.api + "/models")[0] == 200
        assert harness.http("GET", s.api + "/models/sim-model")[0] == 200
        s.set_state({"mode": "error", "status": 502, "models": {"m-ok": {}}})
        assert chat(s, "hi", model="m-ok")[0] == 200
        assert chat(s, "hi", model="other")[0] == 502
        assert harness.http("GET", s.api + "/models")[0] == 502

        # A per-model hang holds only that model; a new state without it answers the call.
        s.set_state({"models": {"m-hang": {"mode": "hang"}}})
        held = raw_chat(s, "m-hang", "wait")
        wait_for(lambda: s.stats()["inflight"] == 1, T(5), "the call to be held")
        assert chat(s, "hi", model="m-ok")[0] == 200
        s.set_state({"models": {"m-hang": {"mode": "hang"}, "m-x": {"mode": "error"}}})
        held.settimeout(0.3)
        try:
            raise AssertionError("held call answered: %r" % held.recv(64))
        except socket.timeout:
            pass
        s.set_state({"models": {"m-hang": {"latency_ms": 200}}})
        held.settimeout(T(5))
        head = held.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
        held.close()

        # down is global only: refused per model and inside a schedule, naming the field.
        state_refused(s, {"models": {"x": {"mode": "down"}}}, "models.x.mode")
        state_refused(s, {"schedule": {"period_ms": 100, "down_ms": 50,
                                       "down": {"mode": "down"}}}, "schedule.down.mode")
        state_refused(s, {"models": {"x": {"schedule": {"period_ms": 100, "down_ms": 50,
                                                        "down": {"mode": "down"}}}}},
                      "models.x.schedule.down.mode")
        state_refused(s, {"models": {"x": {"models": {}}}}, "models.x.models")
        state_refused(s, {"models": {"x": {"status": 99}}}, "models.x.status")
        state_refused(s, {"models": {"x": "error"}}, "models.x")
        state_refused(s, {"schedule": {"period_ms": 100, "down_ms": 200, "down": {}}},
                      "schedule.down_ms")
        state_refused(s, {"schedule": {"period_ms": 100, "down_ms": 50}}, "schedule")
        # GET shows what was applied.
        got = s.set_state({"models": {"m": {"mode": "reset"}}})["state"]
        assert got["models"]["m"]["mode"] == "reset" and got["mode"] == "ok", got
        assert s.proc.stop() == 0


def test_reset_mode():
    with harness.Stack("sim_reset") as st:
        s = st.sim("a")
        s.set_state({"mode": "reset"})
        c = raw_chat(s, "m")
        try:
            got = c.recv(65536)
            assert got == b"", got  # closed before any header
        except ConnectionResetError:
            pass
        c.close()
        # A plain HTTP client sees a connection error, no status.
        try:
            chat(s, "hi", timeout=T(5))
            raise AssertionError("sim answered in reset mode")
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            assert isinstance(reason, (ConnectionError, http.client.HTTPException)), repr(e)
        # After latency_ms.
        s.set_state({"models": {"m-late": {"mode": "reset", "latency_ms": 300}}})
        t0 = time.monotonic()
        c = raw_chat(s, "m-late")
        try:
            assert c.recv(65536) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 >= 0.3
        c.close()
        assert chat(s, "hi", model="m-other")[0] == 200
        wait_for(lambda: s.stats()["inflight"] == 0, T(5), "no call left")
        log = sim_log(s)
        assert [(e["model"], e["status"], e["outcome"]) for e in log] == \
            [("m", 0, "reset"), ("gpt-test", 0, "reset"), ("m-late", 0, "reset"),
             ("m-other", 200, "ok")], log
        assert s.proc.stop() == 0


def read_head(c):
    """Reads from socket c up to the end of the headers; returns (head, body bytes so far)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = c.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode(), rest


def test_stall_mode():
    with harness.Stack("sim_stall") as st:
        s = st.sim("a")
        s.set_state({"models": {"m-stall": {"mode": "stall"}}})
        c = raw_chat(s, "m-stall", "a long enough prompt to have a body worth cutting")
        head, body = read_head(c)
        assert head.startswith("HTTP/1.1 200"), head
        length = int([ln.split(":", 1)[1] for ln in head.split("\r\n")
                      if ln.lower().startswith("content-length:")][0])
        c.settimeout(0.5)
        try:
            while len(body) < length:
                chunk = c.recv(65536)
                assert chunk, "connection closed while stalled"
                body += chunk
            raise AssertionError("stalled answer completed")
        except socket.timeout:
            pass
        assert 0 < len(body) < length and len(body) == length // 2, (len(body), length)
        assert s.stats()["inflight"] == 1
        # Other models answer meanwhile.
        assert chat(s, "hi", model="m-ok")[0] == 200
        # A new state without the stall sends the rest: the answer completes.
        s.set_state({})
        c.settimeout(T(5))
        while len(body) < length:
            chunk = c.recv(65536)
            assert chunk, "closed before the rest"
            body += chunk
        doc = json.loads(body)
        assert doc["choices"][0]["message"]["content"].startswith("echo: a long"), doc
        c.close()

        # An HTTP client gets status and headers, then its read times out.
        s.set_state({"mode": "stall", "latency_ms": 200})
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=1)
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "m", "messages": [{"role": "user",
                                                                  "content": "x"}]}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and time.monotonic() - t0 >= 0.2
        try:
            resp.read()
            raise AssertionError("stalled body completed")
        except (socket.timeout, TimeoutError):
            pass
        resp.close()  # the response holds the socket too
        conn.close()
        wait_for(lambda: s.stats()["inflight"] == 0, T(5), "the stalled call freed")
        outcomes = [(e["model"], e["status"], e["outcome"]) for e in sim_log(s)]
        assert outcomes == [("m-stall", 200, "stall"), ("m-ok", 200, "ok"),
                            ("m", 0, "stall")], outcomes
        # down resets a stalled call.
        c = raw_chat(s, "m")
        read_head(c)
        s.set_state({"mode": "down"})
        c.settimeout(T(5))
        try:
            while c.recv(65536):
                pass
        except ConnectionResetError:
            pass
        c.close()
        s.set_state({})
        assert s.proc.stop() == 0


def test_error_code_documents():
    with harness.Stack("sim_error_code") as st:
        s = st.sim("a")
        msgs = [{"role": "user", "content": "x"}]
        # OpenAI (and Azure): code in "code", type by status.
        s.set_state({"mode": "error", "status": 400, "error_code": "context_length_exceeded",
                     "error_message": "This model's maximum context length is 8 tokens."})
        status, _, raw = chat(s, "hi")
        assert status == 400 and json.loads(raw) == {"error": {
            "message": "This model's maximum context length is 8 tokens.",
            "type": "invalid_request_error", "param": None,
            "code": "context_length_exceeded"}}, raw
        az = s.url + "/openai/deployments/d/chat/completions?api-version=1"
        status, _, raw = harness.http("POST", az, {"messages": msgs})
        assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"
        s.set_state({"mode": "error", "status": 429, "error_code": "insufficient_quota",
                     "retry_after": None})
        status, hdrs, raw = chat(s, "hi")
        err = json.loads(raw)["error"]
        assert status == 429 and "retry-after" not in hdrs
        assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota", err
        assert err["message"]
        s.set_state({"mode": "error", "status": 429, "error_code": "rate_limit_exceeded"})
        assert json.loads(chat(s, "hi")[2])["error"]["type"] == "rate_limit_error"

        # Anthropic: the code is error.type.
        ah = {"anthropic-version": "2023-06-01"}
        abody = {"model": "c", "max_tokens": 5, "messages": msgs}
        for status_, code in ((529, "overloaded_error"), (400, "invalid_request_error"),
                              (429, "rate_limit_error")):
            s.set_state({"mode": "error", "status": status_, "error_code": code,
                         "error_message": "m-" + code})
            status, _, raw = harness.http("POST", s.url + "/v1/messages", abody, headers=ah)
            assert status == status_ and json.loads(raw) == {
                "type": "error", "error": {"type": code, "message": "m-" + code}}, raw

        # Gemini: the code is error.status, error.code the HTTP status.
        g = s.url + "/v1beta/models/gem:generateContent"
        gbody = {"contents": [{"parts": [{"text": "x"}]}]}
        for status_, code in ((400, "FAILED_PRECONDITION"), (429, "RESOURCE_EXHAUSTED"),
                              (503, "UNAVAILABLE"), (400, "INVALID_ARGUMENT")):
            s.set_state({"mode": "error", "status": status_, "error_code": code})
            status, _, raw = harness.http("POST", g, gbody)
            err = json.loads(raw)["error"]
            assert status == status_ and err["code"] == status_ and err["status"] == code, raw
            assert err["message"]

        # watsonx: errors[0].code.
        s.set_state({"mode": "error", "status": 400, "error_code": "token_quota_reached",
                     "error_message": "quota"})
        wx = s.url + "/ml/v1/text/chat?version=2024-05-01"
        status, _, raw = harness.http("POST", wx, {"model_id": "w", "project_id": "p",
                                                   "messages": msgs})
        doc = json.loads(raw)
        assert status == 400 and doc["errors"] == [{"code": "token_quota_reached",
                                                    "message": "quota"}], doc
        assert doc["status_code"] == 400 and doc["trace"]

        # Per model; error_body still wins; status 200 with a raw body (Gemini safety block).
        blocked = '{"promptFeedback":{"blockReason":"SAFETY"}}'
        s.set_state({"models": {
            "gem": {"mode": "error", "status": 200, "error_body": blocked},
            "o": {"mode": "error", "status": 400, "error_code": "x", "error_body": '{"raw":1}'}}})
        status, _, raw = harness.http("POST", g, gbody)
        assert status == 200 and raw == blocked.encode(), (status, raw)
        status, _, raw = chat(s, "hi", model="o")
        assert status == 400 and raw == b'{"raw":1}'
        assert chat(s, "hi")[0] == 200
        assert s.proc.stop() == 0


def test_schedule_flaps():
    with harness.Stack("sim_schedule") as st:
        s = st.sim("a")
        down = {"mode": "error", "status": 503}
        s.set_state({"models": {"flap": {"schedule": {"period_ms": 600, "down_ms": 300,
                                                      "down": down}}}})
        t0 = time.monotonic()  # the state was applied just before this

        def at(t, model="flap"):
            delay = t0 + t - time.monotonic()
            assert delay > 0, "the test fell behind its schedule"
            time.sleep(delay)
            return chat(s, "hi", model=model)[0]

        # phases: 0.1 down, 0.45 up, 0.7 down (2nd period), 1.05 up, 1.3 down
        got = [at(0.1), at(0.45), at(0.7), at(1.05), at(1.3, "steady"), at(1.32)]
        assert got == [503, 200, 503, 200, 200, 503], got
        # At top level, with the surrounding state not ok, and latency in the down state.
        s.set_state({"mode": "rate_limit", "retry_after": "9",
                     "schedule": {"period_ms": 600, "down_ms": 300,
                                  "down": {"mode": "reset", "latency_ms": 50}}})
        t0 = time.monotonic()
        time.sleep(0.1)
        try:
            chat(s, "hi", timeout=T(5))
            raise AssertionError("answered in a reset window")
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
            pass
        time.sleep(max(0.0, t0 + 0.45 - time.monotonic()))
        status, hdrs, _ = chat(s, "hi")
        assert status == 429 and hdrs["retry-after"] == "9", (status, hdrs)
        assert s.proc.stop() == 0


def test_stats_by_model_and_log():
    with harness.Stack("sim_by_model") as st:
        key = "sk-test-secretsecretsecret9999"
        s = st.sim("a", args=("--key", key))
        auth = {"Authorization": "Bearer " + key}
        s.set_state({"models": {"b": {"mode": "error", "status": 503}}})
        t_start = time.monotonic()
        for m in ("a", "a", "b"):
            chat(s, "hi", model=m, headers=auth)
        assert chat(s, "hi", model="a")[0] == 401  # no key: still counted for model a
        assert harness.http("GET", s.api + "/models", headers=auth)[0] == 200
        stats = s.stats()
        assert stats["by_model"] == {"a": {"requests": 3, "by_status": {"200": 2, "401": 1}},
                                     "b": {"requests": 1, "by_status": {"503": 1}}}, stats
        log = sim_log(s)
        assert [(e["model"], e["path"], e["status"], e["outcome"]) for e in log] == [
            ("a", "/v1/chat/completions", 200, "ok"), ("a", "/v1/chat/completions", 200, "ok"),
            ("b", "/v1/chat/completions", 503, "error"),
            ("a", "/v1/chat/completions", 401, "ok")], log
        ts = [e["t_ms"] for e in log]
        assert ts == sorted(ts) and all(isinstance(t, int) and t >= 0 for t in ts), ts
        assert ts[-1] - ts[0] <= (time.monotonic() - t_start) * 1000 + 5, ts
        # Other formats are logged with their model (path parameter or model_id).
        g = s.url + "/v1beta/models/gem-1:generateContent"
        harness.http("POST", g, {"contents": [{"parts": [{"text": "x"}]}]},
                     headers={"x-goog-api-key": key})
        status, _, raw = harness.http("POST", g + "?key=" + key, {"contents": []})
        assert status == 400
        log = sim_log(s)
        assert [(e["model"], e["path"], e["status"]) for e in log[-2:]] == [
            ("gem-1", "/v1beta/models/gem-1:generateContent", 200),
            ("gem-1", "/v1beta/models/gem-1:generateContent", 400)], log
        # No API key anywhere in stats, log or state.
        for url in ("/_sim/stats", "/_sim/log", "/_sim/state"):
            assert "secret" not in harness.http("GET", s.control_url + url)[2].decode(), url
        # reset clears by_model and the log.
        s.reset()
        assert s.stats()["by_model"] == {} and sim_log(s) == []
        # The log keeps the last 1000 chat calls; by_model is capped like by_path.
        bodies = [{"model": "m%d" % i, "messages": [{"role": "user", "content": "x"}]}
                  for i in range(1005)]
        res = harness.post_many(s.api + "/chat/completions", bodies, headers=auth)
        assert all(r[0] == 200 for r in res)
        log = sim_log(s)
        assert len(log) == 1000, len(log)
        by_model = s.stats()["by_model"]
        assert len(by_model) == 257 and by_model["other"]["requests"] == 1005 - 256, \
            len(by_model)
        assert s.proc.stop() == 0


# ---- streamed answers ----

def read_sse(url, body, headers=None, timeout=10):
    """POSTs body and reads an SSE answer: (status, content type, [(t_s, event, data)], clean)
    where t_s is each event's arrival (monotonic seconds) and clean says the body ended
    properly (chunked end seen)."""
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    events, ev, data, clean = [], None, [], True
    try:
        c.request("POST", u.path + ("?" + u.query if u.query else ""), json.dumps(body), h)
        r = c.getresponse()
        while True:
            line = r.readline()
            if not line:
                break
            line = line.decode().rstrip("\r\n")
            if line == "":
                if data:
                    events.append((time.monotonic(), ev, "\n".join(data)))
                ev, data = None, []
            elif line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        # http.client's readline gives b"" at a close inside the chunked body too: the
        # stream ended properly only if the last (zero) chunk was read
        clean = not r.chunked or r.chunk_left is None
    except http.client.IncompleteRead:
        clean = False
    finally:
        c.close()
    return r.status, r.getheader("content-type"), events, clean


def sim_state(s):
    return json.loads(harness.http("GET", s.control_url + "/_sim/state")[2])


def stream_text(fmt, events):
    """The answer text an event stream carries, and its finish reason."""
    text, finish = "", None
    for _, ev, data in events:
        if data == "[DONE]":
            continue
        d = json.loads(data)
        if fmt in ("openai", "watsonx"):
            for ch in d.get("choices", []):
                text += ch["delta"].get("content") or ""
                finish = ch.get("finish_reason") or finish
        elif fmt == "anthropic":
            if d["type"] == "content_block_delta":
                text += d["delta"]["text"]
            elif d["type"] == "message_delta":
                finish = d["delta"]["stop_reason"]
        else:
            for cand in d.get("candidates", []):
                text += "".join(p["text"] for p in cand["content"]["parts"])
                finish = cand.get("finishReason") or finish
    return text, finish


def stream_cases(s, prompt):
    """(format, url, non-streamed body, streamed body, headers, text of the non-streamed
    answer) per format."""
    msgs = [{"role": "user", "content": prompt}]
    ah = {"anthropic-version": "2023-06-01"}
    ab = {"model": "claude-x", "max_tokens": 100, "messages": msgs}
    gb = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    wb = {"model_id": "ibm/granite", "project_id": "p1", "messages": msgs}
    ob = {"model": "gpt-test", "messages": msgs}
    az = s.url + "/openai/deployments/dep1/chat/completions?api-version=2024-10-21"
    cases = []
    for fmt, url, surl, body, sbody, hdr, get in (
            ("openai", s.api + "/chat/completions", None, ob, dict(ob, stream=True), {},
             lambda d: d["choices"][0]["message"]["content"]),
            ("openai", az, None, {"messages": msgs}, {"messages": msgs, "stream": True}, {},
             lambda d: d["choices"][0]["message"]["content"]),
            ("anthropic", s.url + "/v1/messages", None, ab, dict(ab, stream=True), ah,
             lambda d: d["content"][0]["text"]),
            ("gemini", s.url + "/v1beta/models/gem-s:generateContent",
             s.url + "/v1beta/models/gem-s:streamGenerateContent?alt=sse", gb, gb, {},
             lambda d: d["candidates"][0]["content"]["parts"][0]["text"]),
            ("watsonx", s.url + "/ml/v1/text/chat?version=2024-05-01",
             s.url + "/ml/v1/text/chat_stream?version=2024-05-01", wb, wb, {},
             lambda d: d["choices"][0]["message"]["content"]),
            ("watsonx", s.url + "/ml/v1/text/chat?version=2024-05-01", None, wb,
             dict(wb, stream=True), {}, lambda d: d["choices"][0]["message"]["content"])):
        status, _, raw = harness.http("POST", url, body, headers=dict(hdr) or None)
        assert status == 200, (url, raw)
        cases.append((fmt, surl or url, sbody, hdr, get(json.loads(raw))))
    return cases


def test_streamed_answers_match():
    with harness.Stack("sim_stream") as st:
        s = st.sim("a")
        prompt = "the quick brown fox jumps"
        for fmt, url, body, hdr, want in stream_cases(s, prompt):
            status, ctype, events, clean = read_sse(url, body, hdr)
            assert status == 200 and ctype.startswith("text/event-stream"), (url, status, ctype)
            assert clean, url
            text, finish = stream_text(fmt, events)
            assert text == want == "echo: " + prompt, (url, text, want)
            assert finish in ("stop", "end_turn", "STOP"), (url, finish)
            assert len(events) >= 6, (url, len(events))  # one per word at least
            datas = [d for _, _, d in events]
            if fmt == "openai":
                assert datas[-1] == "[DONE]", url
                assert "usage" not in json.loads(datas[-2]), url  # no include_usage asked
            if fmt == "anthropic":
                names = [e for _, e, _ in events]
                assert names[0] == "message_start" and names[-1] == "message_stop", names
                assert "ping" in names, names
            if fmt == "watsonx":
                last = json.loads(datas[-1])
                assert last["usage"]["total_tokens"] > 0 and last["model_id"] == "ibm/granite"
        # OpenAI usage chunk only with stream_options.include_usage.
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}],
                "stream": True, "stream_options": {"include_usage": True}}
        _, _, events, _ = read_sse(s.api + "/chat/completions", body)
        u = json.loads(events[-2][2])
        assert u["choices"] == [] and u["usage"]["total_tokens"] > 0, u
        # Gemini streams with CRLF line ends, as Gemini does.
        raw = harness.http("POST", s.url + "/v1beta/models/g:streamGenerateContent?alt=sse",
                           {"contents": [{"parts": [{"text": "a b"}]}]})[2]
        assert raw.startswith(b"data: {") and raw.endswith(b"}\r\n\r\n"), raw
        status, _, raw = harness.http("POST", s.url + "/v1beta/models/g:streamGenerateContent",
                                      {"contents": [{"parts": [{"text": "a b"}]}]})
        arr = json.loads(raw)  # without alt=sse: one JSON array of responses
        assert status == 200 and "".join(
            r["candidates"][0]["content"]["parts"][0]["text"] for r in arr) == "echo: a b", raw
        # max_tokens cuts a stream as it cuts an answer.
        _, _, events, _ = read_sse(s.api + "/chat/completions",
                                   {"model": "m", "messages": [{"role": "user", "content": "x" * 40}],
                                    "max_tokens": 3, "stream": True})
        assert stream_text("openai", events) == ("echo: xxxxxx", "length"), events
        # The stats count a streamed answer like any other.
        assert s.stats()["by_status"].get("200", 0) >= 12 and s.stats()["inflight"] == 0
        assert s.proc.stop() == 0


def test_stream_chunk_ms_paces():
    with harness.Stack("sim_stream_pace") as st:
        s = st.sim("a")
        prompt = "one two three four five six"
        s.set_state({"chunk_ms": 60})
        for fmt, url, body, hdr, want in stream_cases(s, prompt):
            t0 = time.monotonic()
            status, _, events, clean = read_sse(url, body, hdr)
            assert status == 200 and clean and stream_text(fmt, events)[0] == want, url
            first, last = events[0][0] - t0, events[-1][0] - t0
            n = len(events)
            assert first < 0.5 * (n - 1) * 0.060, (url, first, n)  # the first event comes at once
            assert last - first >= 0.8 * (n - 1) * 0.060, (url, first, last, n)
        # chunk_ms is in the state and validated.
        assert sim_state(s)["chunk_ms"] == 60
        assert harness.http("POST", s.control_url + "/_sim/state", {"chunk_ms": -1})[0] == 400
        # A client leaving mid-stream frees the call; the sim keeps serving.
        s.set_state({"chunk_ms": 200})
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
        try:
            read_sse(s.api + "/chat/completions", body, timeout=0.3)
        except (socket.timeout, TimeoutError, OSError):
            pass
        wait_for(lambda: s.stats()["inflight"] == 0, 5, "stream call freed after the client left")
        s.set_state({})
        assert read_sse(s.api + "/chat/completions", body)[0] == 200
        assert s.proc.stop() == 0


def test_stream_faults():
    with harness.Stack("sim_stream_faults") as st:
        s = st.sim("a")
        body = {"model": "m", "messages": [{"role": "user", "content": "a b c d e"}],
                "stream": True}
        url = s.api + "/chat/completions"
        # cut after N events: N events, then the connection closes without the chunked end.
        for chunk_ms in (0, 20):
            s.set_state({"stream_cut_after": 3, "chunk_ms": chunk_ms})
            status, _, events, clean = read_sse(url, body)
            assert status == 200 and len(events) == 3 and not clean, (chunk_ms, events, clean)
        # the Nth event malformed: its data is not JSON, the others are.
        s.set_state({"stream_malformed_at": 2})
        _, _, events, clean = read_sse(url, body)
        assert clean and events[-1][2] == "[DONE]"
        bad = []
        for i, (_, _, d) in enumerate(events[:-1]):
            try:
                json.loads(d)
            except ValueError:
                bad.append(i + 1)
        assert bad == [2], bad
        # no [DONE] / message_stop.
        s.set_state({"stream_no_done": True})
        _, _, events, clean = read_sse(url, body)
        assert clean and events[-1][2] != "[DONE]" and \
            stream_text("openai", events) == ("echo: a b c d e", "stop")
        ab = {"model": "c", "max_tokens": 50, "messages": [{"role": "user", "content": "a b"}],
              "stream": True}
        _, _, events, _ = read_sse(s.url + "/v1/messages", ab, {"anthropic-version": "2023-06-01"})
        assert [e for _, e, _ in events][-1] == "message_delta", events
        # malformed mode breaks a stream's first event.
        s.set_state({"mode": "malformed"})
        _, _, events, _ = read_sse(url, body)
        try:
            json.loads(events[0][2])
            assert False, events[0]
        except ValueError:
            pass
        assert sim_state(s)["stream_no_done"] is False
        assert s.proc.stop() == 0


harness.run(globals())
