#!/usr/bin/env python3
"""Time to first token through promptq's durable streaming path, next to the same provider
called directly, N concurrent streams.

    PQ_BIN_DIR=build/bin STREAMS=100 RUNS=3 python3 tests/bench/ttft.py

One stack: redis-server, promptq-devkafka, promptq-broker, promptq-worker and one promptq-sim
(OpenAI format) that streams one word per chunk every CHUNK_MS (default 50). Each round opens
STREAMS concurrent `stream: true` chat completions through the broker (POST
/v1/chat/completions) and, as the peer, the same number straight to the sim; TTFT is from
sending the request to the first `data:` line that carries content. Prints p50/p99 of both and
the difference, median over the rounds. Loopback only."""
import http.client
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness  # noqa: E402
from harness import T, wait_for  # noqa: E402

STREAMS = int(os.environ.get("STREAMS", "100"))
RUNS = int(os.environ.get("RUNS", "3"))
CHUNK_MS = int(os.environ.get("CHUNK_MS", "50"))
KEY = "ttft-key"
PROMPT = " ".join("word%d" % i for i in range(20))


HEADS = []  # seconds from the request to the response head, per stream of the last burst


def first_token(host, port, path, body, headers):
    """Seconds to the first content chunk, and whether [DONE] came."""
    c = http.client.HTTPConnection(host, port, timeout=T(60))
    t0 = time.monotonic()
    c.request("POST", path, json.dumps(body), dict(headers, **{"Content-Type": "application/json"}))
    r = c.getresponse()
    HEADS.append(time.monotonic() - t0)
    ttft, done = None, False
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
            break
        if ttft is None and line.startswith(b"data: "):
            ev = json.loads(line[6:])
            if any((ch.get("delta") or {}).get("content") for ch in ev.get("choices", [])):
                ttft = time.monotonic() - t0
    c.close()
    return ttft, done


def burst(host, port, path, body, headers):
    del HEADS[:]
    out = [None] * STREAMS
    def one(i):
        try:
            out[i] = first_token(host, port, path, body, headers)
        except Exception as e:  # noqa: BLE001
            out[i] = (None, repr(e))
    ts = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = [o[0] for o in out if o and o[0] is not None]
    assert len(got) == STREAMS, [o for o in out if not o or o[0] is None][:3]
    got.sort()
    return got[len(got) // 2], got[min(len(got) - 1, int(len(got) * 0.99))]


with harness.Stack("bench_ttft") as st:
    st.redis()
    st.devkafka(brokers=1, partitions=4)
    sim = st.sim("p")
    sim.set_state({"mode": "ok", "chunk_ms": CHUNK_MS})
    providers = {"p": {"type": "openai", "base_url": sim.api, "max_concurrency": 0}}
    routes = {"m": [{"provider": "p", "model": "m"}]}
    path, _ = st.config(providers=providers, routes=routes,
                        extra={"broker": {"api_keys": {KEY: "t"}}})
    st.spawn("promptq-worker", "--config", path, name="worker")
    st.broker(path)
    auth = {"Authorization": "Bearer " + KEY}
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    wait_for(lambda: first_token("127.0.0.1", st.broker_port, "/v1/chat/completions", body,
                                 auth)[1], T(30), "a first stream through the broker")
    sim_host, sim_port = sim.url.split("//")[1].split(":")
    rows = []
    for rnd in range(RUNS):
        d50, d99 = burst(sim_host, int(sim_port), "/v1/chat/completions", body, {})
        p50, p99 = burst("127.0.0.1", st.broker_port, "/v1/chat/completions", body, auth)
        h50 = statistics.median(HEADS)
        rows.append((d50, d99, p50, p99, h50))
        print("round %d: direct p50 %.1f p99 %.1f ms | promptq p50 %.1f p99 %.1f ms "
              "(head, i.e. Kafka-acknowledged, p50 %.1f ms)" % (
                  rnd, d50 * 1e3, d99 * 1e3, p50 * 1e3, p99 * 1e3, h50 * 1e3), flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    print("TTFT, %d concurrent streams, chunk %d ms, median of %d rounds:" % (STREAMS, CHUNK_MS,
                                                                            RUNS))
    print("  provider direct: p50 %.1f ms, p99 %.1f ms" % (med[0] * 1e3, med[1] * 1e3))
    print("  through promptq: p50 %.1f ms, p99 %.1f ms (durable: Kafka-acked, worker, Redis "
          "Stream relay)" % (med[2] * 1e3, med[3] * 1e3))
    print("  added: p50 %.1f ms, p99 %.1f ms" % ((med[2] - med[0]) * 1e3, (med[3] - med[1]) * 1e3))
    print("  head (job durable) p50 %.1f ms" % (med[4] * 1e3))
