"""A provider behind HTTPS with a private CA (providers.*.ca_file): the worker trusts that CA
for the provider's base_url only, and verification stays on: the same server without ca_file
is refused (connect error, failover to the next target), and --check-config names a ca_file
it cannot read or one set on a plain http:// base_url.
"""

import http.server as hs
import json
import os
import ssl
import subprocess
import threading

import harness
from harness import T, wait_for

REQ = "promptq.requests"
RESULTS = "promptq.results"


class TlsProvider:
    """An OpenAI-compatible HTTPS server on loopback answering "tls: <prompt>"."""

    def __init__(self, crt, key):
        self.requests = 0
        outer = self

        class H(hs.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                body = json.dumps({
                    "id": "chatcmpl-tls", "object": "chat.completion", "created": 1,
                    "model": req["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant",
                        "content": "tls: " + req["messages"][-1]["content"]}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = hs.ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self.srv.socket = ctx.wrap_socket(self.srv.socket, server_side=True)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = "https://127.0.0.1:%d/v1" % self.srv.server_address[1]

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def check_config(path):
    p = subprocess.run([os.path.join(harness.BIN_DIR, "promptq-worker"), "--config", path,
                        "--check-config"], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


def results(st, ids):
    got = {}

    def have_all():
        for m in st.consume_all(RESULTS):
            d = json.loads(m["value"])
            got[d["id"]] = d
        return set(ids) <= set(got)

    wait_for(have_all, T(60), "results of %s" % ids, interval=0.5)
    return got


def test_private_ca_trusted_only_where_configured():
    with harness.Stack("tls_ca") as st:
        ca, crt, key = harness.make_test_ca(st.dir)
        tls = TlsProvider(crt, key)
        try:
            st.redis()
            st.devkafka(brokers=1, partitions=1)
            s = st.sim("a")
            providers = {
                # The CA is trusted for the URLs under private's base_url (a path of its
                # own on the same server here); untrusted's URLs are not under it.
                "private": {"type": "openai", "base_url": tls.url + "/private", "ca_file": ca},
                "untrusted": {"type": "openai", "base_url": tls.url, "retries_per_target": 0},
                "sim": {"type": "openai", "base_url": s.api},
            }
            routes = {
                "tls-model": [{"provider": "private", "model": "m"}],
                "tls-untrusted": [{"provider": "untrusted", "model": "m"},
                                  {"provider": "sim", "model": "sim-model"}],
            }
            path, _ = st.config(providers=providers, routes=routes,
                                extra={"worker": {"lease_ms": 3000}})
            rc, out = check_config(path)
            assert rc == 0, out
            st.spawn("promptq-worker", "--config", path, name="worker")
            env = lambda i, route: {"id": i, "request": {  # noqa: E731
                "model": route, "messages": [{"role": "user", "content": i}]}}
            st.produce(REQ, [env("tls-1", "tls-model"), env("tls-2", "tls-untrusted"),
                             env("tls-3", "tls-model")], keys=["tls-1", "tls-2", "tls-3"])
            got = results(st, ["tls-1", "tls-2", "tls-3"])
            for i in ("tls-1", "tls-3"):
                r = got[i]
                assert r["status"] == "succeeded" and r["provider"] == "private", r
                assert r["response"]["choices"][0]["message"]["content"] == "tls: " + i, r
            r = got["tls-2"]
            assert r["status"] == "succeeded" and r["provider"] == "sim", r
            first = r["attempt_log"][0]
            assert first["provider"] == "untrusted" and first["outcome"] == "connect", r
            assert r["attempt_log"][1]["provider"] == "sim", r
            assert tls.requests == 2, tls.requests  # the refused handshake never sent a request

            bad = dict(providers)
            bad["private"] = dict(providers["private"], ca_file=os.path.join(st.dir, "nope.pem"))
            bpath, _ = st.config(providers=bad, routes=routes, name="bad1.json")
            rc, out = check_config(bpath)
            assert rc != 0 and "providers.private.ca_file" in out and "nope.pem" in out, out
            bad["private"] = {"type": "openai", "base_url": s.api, "ca_file": ca}
            bpath, _ = st.config(providers=bad, routes=routes, name="bad2.json")
            rc, out = check_config(bpath)
            assert rc != 0 and "providers.private.ca_file" in out and "https" in out, out
        finally:
            tls.close()


harness.run(globals())
