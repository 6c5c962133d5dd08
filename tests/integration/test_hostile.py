"""Hostile request heads sent as raw bytes to a broker-only stack (redis + devkafka, no worker):
each is a 400 JSON error naming what is wrong, with Connection: close, and a normal request right
after still gets 202. RFC 9112: two Content-Length headers, Content-Length "+N", whitespace
before the colon (libevent would keep "Content-Length " as a name and read no body, leaving the
body to be parsed as the next request), HTTP/1.1 without Host or with two; a NUL byte in an
Idempotency-Key (libevent cuts the value at it). Also: "%00" in an Idempotency-Key is three
ordinary characters (not decoded, not shortened), and a client's reply_to is refused."""

import json
import socket

import harness
from harness import T

ROUTE = "sim-model"
ROUTES = {ROUTE: [{"provider": "sim", "model": "m"}]}
PROVIDERS = {"sim": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}


def body(content="hello", **kw):
    doc = {"request": {"model": ROUTE, "messages": [{"role": "user", "content": content}]}}
    doc.update(kw)
    return json.dumps(doc).encode()


def raw(port, data):
    """Sends data on a new connection; returns (status, headers dict lowercased, body bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=T(10))
    try:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            c = s.recv(65536)
            if not c:
                break
            out += c
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        want = int(hdrs.get("content-length", "0"))
        while len(rest) < want:
            c = s.recv(65536)
            if not c:
                break
            rest += c
        return status, hdrs, rest[:want]
    finally:
        s.close()


def request(headers, data, line=b"POST /v1/jobs HTTP/1.1"):
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + data


def cl(data):
    return b"Content-Length: " + str(len(data)).encode()


def assert_400(port, data, want, what, close=True):
    status, hdrs, raw_body = raw(port, data)
    assert status == 400, (what, status, raw_body)
    assert hdrs.get("content-type") == "application/json", (what, hdrs, raw_body)
    doc = json.loads(raw_body)
    assert set(doc["error"]) >= {"type", "message"}, (what, doc)
    assert doc["error"]["type"] == "invalid_request", (what, doc)
    assert want in doc["error"]["message"], (what, doc)
    if close:  # a bad head: the bytes after it cannot be trusted to start the next request
        assert hdrs.get("connection", "").lower() == "close", (what, hdrs)


def assert_202(port, what, headers=(), data=None):
    data = data if data is not None else body(what)
    status, _, raw_body = raw(port, request([b"Host: x", cl(data)] + list(headers), data))
    assert status == 202, (what, status, raw_body)
    return json.loads(raw_body)["id"]


def start(st):
    st.redis()
    st.devkafka(brokers=1, partitions=4)
    path, _ = st.config(providers=PROVIDERS, routes=ROUTES)
    st.broker(path)
    return st.broker_port


def test_hostile_heads():
    with harness.Stack("hostile-heads") as st:
        port = start(st)
        b = body("x")
        short = b'{"a":1}'
        cases = [
            ("two different Content-Length",
             request([b"Host: x", cl(b), b"Content-Length: 5"], b), "Content-Length: given more than once"),
            ("the same Content-Length twice",
             request([b"Host: x", cl(b), cl(b)], b), "Content-Length: given more than once"),
            ("Content-Length +N",
             request([b"Host: x", b"Content-Length: +" + str(len(b)).encode()], b),
             "Content-Length: must be decimal digits only"),
            ("whitespace before the colon (Content-Length)",
             request([b"Host: x", b"Content-Length : " + str(len(b)).encode()], b),
             'header "Content-Length ": the name holds whitespace'),
            ("whitespace before the colon (another header)",
             request([b"Host: x", b"X-Foo\t: bar", cl(b)], b), 'header "X-Foo\t": the name'),
            ("HTTP/1.1 without Host", request([cl(b)], b), "Host: required in HTTP/1.1"),
            ("two Host headers", request([b"Host: x", b"Host: y", cl(b)], b),
             "Host: given more than once"),
            ("a raw NUL in Idempotency-Key",
             request([b"Host: x", b"Idempotency-Key: abc\x00def", cl(b)], b),
             "Idempotency-Key (or another header or the request line): holds a NUL byte"),
            ("a raw NUL at the end of Idempotency-Key",
             request([b"Host: x", b"Idempotency-Key: abc\x00", cl(b)], b), "NUL byte"),
        ]
        for what, data, want in cases:
            assert_400(port, data, want, what)
            assert_202(port, "after " + what)
        # libevent itself refuses a negative Content-Length (and Content-Length with
        # Transfer-Encoding) before the broker sees the request: 400, its own HTML body
        for data in (request([b"Host: x", b"Content-Length: -1"], short),
                     request([b"Host: x", cl(b), b"Transfer-Encoding: chunked"], b)):
            status, _, raw_body = raw(port, data)
            assert status == 400, raw_body
            assert_202(port, "after libevent's 400")
        # HTTP/1.0 needs no Host; "Key:value" without a space is fine
        status, _, raw_body = raw(port, request([cl(b)], b, line=b"POST /v1/jobs HTTP/1.0"))
        assert status == 202, raw_body
        status, _, raw_body = raw(port, request([b"Host:x", b"Content-Length:%d" % len(b)], b))
        assert status == 202, raw_body


def test_idempotency_key_percent_is_literal():
    with harness.Stack("hostile-idem") as st:
        port = start(st)
        first = assert_202(port, "pct", [b"Idempotency-Key: abc%00def"], body("one"))
        again = assert_202(port, "pct again", [b"Idempotency-Key: abc%00def"], body("one"))
        assert again == first
        # "abc" is another key than "abc%00def": another body is a new job, not a 422
        other = assert_202(port, "abc", [b"Idempotency-Key: abc"], body("two"))
        assert other != first


def test_client_reply_to_refused():
    """reply_to is the Redis channel a worker publishes the finished id on: only the broker sets
    it (for its own sync waiters), so a client's would let it make workers publish anywhere."""
    with harness.Stack("hostile-reply-to") as st:
        port = start(st)
        for chan in ("promptq:reply:other-broker", "__keyspace@0__:x", "anything"):
            data = body("r", reply_to=chan)
            assert_400(port, request([b"Host: x", cl(data)], data),
                       "reply_to: set by the broker", "reply_to " + chan, close=False)
            assert_202(port, "after reply_to " + chan)


harness.run(globals())
