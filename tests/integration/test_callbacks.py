"""callback_url (DESIGN §3, §5): a finished job's result record is POSTed to its callback_url,
signed with x-promptq-signature (HMAC-SHA256 of "<t>.<body>" with the tenant's secret), retried
with backoff, only to hosts on callbacks.allow_hosts; checked at intake (400) and again by the
worker (a job produced straight into Kafka never met the broker); queued in Redis by the
terminal write so a worker that dies mid-POST does not lose it.

The receiver is a real HTTP server on loopback; its behaviour is chosen by the URL path."""

import hashlib
import hmac
import http.server
import json
import threading
import time

import harness
from harness import T, wait_for

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
SECRETS = {"tenant-a": "secret-of-a", "*": "secret-of-the-rest"}


class Receiver:
    """Records every POST: (path, headers dict lowercased, body bytes, monotonic time).
    /ok/*: 200. /flaky/*: 500 for the first two POSTs of that path, then 200.
    /down/*: 503. /gone/*: 410. /hang/*: the first POST of that path hangs (no answer),
    later ones get 200."""

    def __init__(self):
        self.posts = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with outer.lock:
                    outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                        body, time.monotonic()))
                    seen = sum(1 for p in outer.posts if p[0] == self.path)
                kind = self.path.split("/")[1]
                status = 200
                if kind == "flaky" and seen <= 2:
                    status = 500
                elif kind == "down":
                    status = 503
                elif kind == "gone":
                    status = 410
                elif kind == "hang" and seen == 1:
                    outer.release.wait(60)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def to(self, path):
        with self.lock:
            return [p for p in self.posts if p[0] == path]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def verify(headers, body, secret, tolerance_s=300):
    """The receiver's side of SECURITY.md: recompute, compare in constant time, check age."""
    parts = dict(p.split("=", 1) for p in headers["x-promptq-signature"].split(","))
    t = int(parts["t"])
    if abs(time.time() - t) > tolerance_s:
        return False
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"])


def stack(st, rcv, callbacks=None):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    st.sim("a")
    cb = {"allow_hosts": ["127.0.0.1:%d" % rcv.port], "secrets": SECRETS, "max_attempts": 3,
          "backoff_ms": 300, "max_backoff_ms": 1200, "timeout_ms": 1000, "poll_ms": 100}
    if callbacks:
        cb.update(callbacks)
    path, _ = st.config(extra={"broker": {"api_keys": KEYS}, "worker": {"lease_ms": 3000},
                               "callbacks": cb})
    st.broker(path)
    return r, path


def job(prompt, callback_url=None, **kw):
    e = {"request": {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}}
    if callback_url:
        e["callback_url"] = callback_url
    e.update(kw)
    return e


def submit(st, body, headers):
    status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", body, headers)
    assert status == 202, (status, doc)
    return doc["id"]


def record(r, tenant, jid):
    out = r.cli("HGETALL", "promptq:job:%s:%s" % (tenant, jid)).split("\n")
    return dict(zip(out[0::2], out[1::2]))


def test_delivery_signature_retries_and_refusals():
    rcv = Receiver()
    try:
        with harness.Stack("callbacks") as st:
            r, path = stack(st, rcv)
            wk = st.spawn("promptq-worker", "--config", path, name="worker")

            # refused at intake: each names what is wrong; nothing is queued
            other = "http://127.0.0.1:%d/ok/x" % harness.free_port()
            for url, want in ((other, "not on callbacks.allow_hosts"),
                              ("http://localhost:%d/ok/x" % rcv.port, "not on callbacks.allow_hosts"),
                              ("http://u:p@127.0.0.1:%d/ok/x" % rcv.port, "credentials"),
                              ("ftp://127.0.0.1:%d/ok/x" % rcv.port, "http:// or https://")):
                status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs",
                                                   job("refused", url), A)
                assert status == 400, (url, status, doc)
                assert want in doc["error"]["message"], (url, doc)
                assert "/ok/x" not in doc["error"]["message"], doc  # never echo path/query

            # delivered, signed with the tenant's own secret; the body is the result record
            t0 = time.time()
            ja = submit(st, job("callback a", rcv.url("/ok/a?token=abc")), A)
            jb = submit(st, job("callback b", rcv.url("/ok/b")), B)
            wait_for(lambda: rcv.to("/ok/a?token=abc") and rcv.to("/ok/b"), T(30),
                     "both callbacks")
            (_, ha, body_a, _), = rcv.to("/ok/a?token=abc")
            assert ha["content-type"] == "application/json", ha
            assert ha["x-promptq-attempt"] == "1", ha
            assert verify(ha, body_a, "secret-of-a")
            assert not verify(ha, body_a, "secret-of-the-rest")
            assert not verify(ha, body_a + b" ", "secret-of-a")
            assert int(ha["x-promptq-signature"].split(",")[0][2:]) >= int(t0) - 1
            doc = json.loads(body_a)
            assert doc["id"] == ja and doc["tenant"] == "tenant-a", doc
            assert doc["status"] == "succeeded" and doc["response"]["object"] == "chat.completion"
            status, _, stored = harness.http("GET", st.broker_url + "/v1/jobs/" + ja, headers=A)
            assert status == 200 and stored == body_a, (stored, body_a)
            (_, hb, body_b, _), = rcv.to("/ok/b")
            assert verify(hb, body_b, "secret-of-the-rest")  # tenant-b: the "*" secret
            assert json.loads(body_b)["id"] == jb
            wait_for(lambda: record(r, "tenant-a", ja).get("callback") == "delivered", T(10),
                     "callback recorded delivered")
            assert record(r, "tenant-a", ja)["callback_attempts"] == "1"

            # 500, 500, 200: three POSTs of the same body, backoff growing, fresh signatures
            jf = submit(st, job("flaky", rcv.url("/flaky/1")), A)
            wait_for(lambda: len(rcv.to("/flaky/1")) >= 3, T(30), "three attempts")
            posts = rcv.to("/flaky/1")
            assert [p[1]["x-promptq-attempt"] for p in posts] == ["1", "2", "3"], posts
            assert len({p[2] for p in posts}) == 1
            assert all(verify(p[1], p[2], "secret-of-a") for p in posts)
            gap1, gap2 = posts[1][3] - posts[0][3], posts[2][3] - posts[1][3]
            assert gap1 >= 0.14 and gap2 >= 0.29, (gap1, gap2)  # 300 then 600 ms, jitter >= half
            wait_for(lambda: record(r, "tenant-a", jf).get("callback") == "delivered", T(10),
                     "flaky callback delivered")

            # always 503: gives up after max_attempts (3); 410: gives up at once
            jd = submit(st, job("down", rcv.url("/down/1")), A)
            jg = submit(st, job("gone", rcv.url("/gone/1")), A)
            wait_for(lambda: record(r, "tenant-a", jd).get("callback") == "failed", T(30),
                     "callback failed after 3 attempts")
            status, hd, _ = harness.http("GET", st.broker_url + "/v1/jobs/" + jd, headers=A)
            hd = {k.lower(): v for k, v in dict(hd).items()}
            assert hd.get("x-promptq-callback") == "failed", hd
            assert hd.get("x-promptq-callback-attempts") == "3", hd
            assert hd.get("x-promptq-callback-error") == "HTTP 503", hd
            wait_for(lambda: record(r, "tenant-a", jg).get("callback") == "failed", T(10),
                     "410 fails the callback")
            time.sleep(T(1.5))  # past the largest backoff: nothing more is sent
            assert len(rcv.to("/down/1")) == 3 and len(rcv.to("/gone/1")) == 1
            assert record(r, "tenant-a", jd)["callback_error"] == "HTTP 503"
            assert r.cli("ZCARD", "promptq:callbacks") == "0"

            # produced straight into Kafka to a host not allowed: the job runs, no POST
            st.produce("promptq.requests", [dict(job("direct", other), id="direct-1",
                                                 tenant="tenant-a")])
            wait_for(lambda: record(r, "tenant-a", "direct-1").get("status") == "succeeded",
                     T(30), "direct job finished")
            rec = record(r, "tenant-a", "direct-1")
            assert rec["callback"] == "refused", rec
            assert "not on callbacks.allow_hosts" in rec["callback_error"], rec

            # a cancelled job calls back too (the broker queues it; a worker sends it)
            wk.kill()
            wk.wait(T(20))
            jc = submit(st, job("to cancel", rcv.url("/ok/cancelled")), A)
            status, _, doc = harness.http_json("DELETE", st.broker_url + "/v1/jobs/" + jc,
                                               headers=A)
            assert status == 200 and doc["status"] == "cancelled", doc
            st.spawn("promptq-worker", "--config", path, name="worker2")
            wait_for(lambda: rcv.to("/ok/cancelled"), T(30), "the cancel's callback")
            (_, hc, body_c, _), = rcv.to("/ok/cancelled")
            assert verify(hc, body_c, "secret-of-a")
            assert json.loads(body_c)["status"] == "cancelled"
            time.sleep(T(1))  # the worker meets the cancelled job: no second callback
            assert len(rcv.to("/ok/cancelled")) == 1
            # a callback_url's query may carry the receiver's own token: no log repeats it
            for p in st.procs:
                with open(p.log_path, errors="replace") as f:
                    assert "token=abc" not in f.read(), p.name
    finally:
        rcv.close()


def test_worker_killed_mid_post():
    """The first POST hangs; the worker is SIGKILLed; another worker sends it once the claim
    (timeout_ms + margin) expires. At least once: the receiver sees it twice, same body."""
    rcv = Receiver()
    try:
        with harness.Stack("callbacks-kill") as st:
            r, path = stack(st, rcv)
            w1 = st.spawn("promptq-worker", "--config", path, name="worker1")
            jid = submit(st, job("hang", rcv.url("/hang/1")), A)
            wait_for(lambda: rcv.to("/hang/1"), T(30), "the first POST")
            w1.kill(9)
            st.spawn("promptq-worker", "--config", path, name="worker2")
            wait_for(lambda: record(r, "tenant-a", jid).get("callback") == "delivered", T(30),
                     "delivered by the second worker")
            posts = rcv.to("/hang/1")
            assert len(posts) == 2 and posts[0][2] == posts[1][2], posts
            assert all(verify(p[1], p[2], "secret-of-a") for p in posts)
    finally:
        rcv.close()


harness.run(globals())
