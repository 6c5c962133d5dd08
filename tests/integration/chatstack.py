"""The chat waiter's no-worker stack, shared by test_chat.py and test_stream_relay.py: a broker
with an API key on a real redis-server and promptq-devkafka, and the worker's part played by the
test (the terminal write of a job record and the PUBLISH on its reply_to)."""

import json
import socket
import threading
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


class StreamClient(threading.Thread):
    """One streaming chat call over a raw socket; records when the head and each event came."""

    def __init__(self, st, body=None, get=None, headers=None):
        """POST body to /v1/chat/completions, or GET the path get with extra headers."""
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", st.broker_port), timeout=T(60))
        extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items()).encode()
        if get is not None:
            self.sock.sendall(b"GET " + get.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + KEY.encode() + b"\r\n" + extra +
                              b"\r\n")
        else:
            data = json.dumps(body).encode()
            self.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + KEY.encode() + b"\r\n" + extra +
                              b"Content-Type: application/json\r\nContent-Length: " +
                              str(len(data)).encode() + b"\r\n\r\n" + data)
        self.status, self.headers, self.head_at = None, {}, None
        self.events = []  # (monotonic time, event text)
        self.done = threading.Event()
        self.error = None
        self.buf = b""
        self.body = None  # a reply that is not a stream (an error)
        self.start()

    def _fill(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError("connection closed")
        self.buf += d

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def run(self):
        try:
            while b"\r\n\r\n" not in self.buf:
                self._fill()
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.head_at = time.monotonic()
            lines = head.decode().split("\r\n")
            self.status = int(lines[0].split()[1])
            for ln in lines[1:]:
                k, v = ln.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()
            if "chunked" not in self.headers.get("transfer-encoding", ""):
                n = int(self.headers.get("content-length", "0"))
                while len(self.buf) < n:
                    self._fill()
                self.body = self.buf[:n]
                return
            pending = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    break
                while len(self.buf) < size + 2:
                    self._fill()
                pending += self.buf[:size]
                self.buf = self.buf[size + 2:]
                while b"\n\n" in pending:
                    ev, pending = pending.split(b"\n\n", 1)
                    self.events.append((time.monotonic(), ev.decode()))
        except Exception as e:  # noqa: BLE001 - checked by the test
            self.error = e
        finally:
            self.done.set()

    def wait_events(self, n, timeout=None):
        wait_for(lambda: len(self.events) >= n or self.done.is_set(), timeout or T(10),
                 "%d events" % n, interval=0.005)
        assert len(self.events) >= n, (self.events, self.error)
        return self.events[:n]

    def finished(self, timeout=None):
        assert self.done.wait(timeout or T(15)), "stream not ended"
        assert self.error is None, (self.error, self.events)
        return [e for _, e in self.events]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # a FIN now, though run() is in recv
        except OSError:
            pass
        self.sock.close()


def resume(st, job_id, last=None):
    """GET /v1/jobs/{id}/stream (with Last-Event-ID: last)."""
    return StreamClient(st, get="/v1/jobs/%s/stream" % job_id,
                        headers={"Last-Event-ID": last} if last else None)


def event_id(ev):
    return ev.split("\n", 1)[0][len("id: "):] if ev.startswith("id: ") else None
