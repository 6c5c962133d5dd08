"""The chat waiter's no-worker stack, shared by test_chat.py and test_stream_relay.py: a broker
with an API key on a real redis-server and promptq-devkafka, and the worker's part played by the
test (the terminal write of a job record and the PUBLISH on its reply_to)."""

import json
import time

import harness
from harness import T, wait_for

KEY = "chat-key"
TENANT = "acme"
AUTH = {"Authorization": "Bearer " + KEY}
DEAD = {"sim": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}
ROUTES = {"m1": [{"provider": "sim", "model": "x"}], "m2": [{"provider": "sim", "model": "y"}]}


def start_broker(st, path, name="broker"):
    """The broker on path, once /readyz answers (harness.Stack.broker)."""
    return st.broker(path, name=name)


def no_worker_stack(st, sync_timeout_ms=20000, extra=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    ex = {"broker": {"api_keys": {KEY: TENANT}, "sync_timeout_ms": sync_timeout_ms,
                     "instance_id": "chat-b1"}}
    if extra:
        harness._merge(ex, extra)
    path, cfg = st.config(providers=DEAD, routes=ROUTES, extra=ex)
    start_broker(st, path)
    return r


def metric(st, name, labels=""):
    status, _, raw = harness.http("GET", st.broker_url + "/metrics")
    assert status == 200
    want = name + ("{" + labels + "}" if labels else "")
    for line in raw.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def cmdstat(r, cmd):
    for line in r.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_%s:" % cmd):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def chat_body(prompt, model="m1", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body.update(kw)
    return body


def queued_envelope(st, prompt, timeout=None):
    """The envelope the broker produced for the chat with this prompt."""
    def find():
        for m in st.consume_all("promptq.requests"):
            env = json.loads(m["value"])
            if env["request"]["messages"][0]["content"] == prompt:
                return env
        return None
    return wait_for(find, timeout or T(15), "the chat job on promptq.requests", interval=0.2)


def finish(r, env, status, response=None, error=None, publish=True, response_text=None):
    """Plays the worker: terminal write of the record, then PUBLISH on reply_to.
    response_text: the response as these exact bytes (spacing, escapes, duplicate names)."""
    rec = {"id": env["id"], "tenant": env["tenant"], "status": status, "route": "m1",
           "provider": "sim", "model": "x", "attempts": 1, "metadata": None, "latency_ms": 5,
           "created_at": "2026-01-01T00:00:00.000Z", "completed_at": "2026-01-01T00:00:01.000Z",
           "source": {"topic": "promptq.requests", "partition": 0, "offset": 0}}
    if response is not None:
        rec["response"] = response
    if error is not None:
        rec["error"] = error
    key = "promptq:job:%s:%s" % (env["tenant"], env["id"])
    text = json.dumps(rec)
    if response_text is not None:
        text = text[:-1] + ', "response": ' + response_text + "}"
    r.cli("HSET", key, "status", status, "result", text)
    if publish:
        r.cli("PUBLISH", env["reply_to"], "%s:%s" % (env["tenant"], env["id"]))


def completion(content, model="x"):
    return {"id": "chatcmpl-provider-1", "object": "chat.completion", "created": 1700000000,
            "model": model, "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
