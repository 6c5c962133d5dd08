#!/usr/bin/env python3
"""Time to first token through promptq's durable streaming path, next to the same provider
called directly, N concurrent streams.

    PQ_BIN_DIR=build/bin STREAMS=100 RUNS=3 python3 tests/bench/ttft.py
    FETCH_WAIT_MS=1 ...   # the worker's fetch.wait.max.ms (the harness's: 5)
    KAFKA='{"linger.ms": "0"}' ...   # any other librdkafka properties of the kafka section

One stack: redis-server, promptq-devkafka, promptq-broker, promptq-worker and one promptq-sim
(OpenAI format) that streams one word per chunk every CHUNK_MS (default 50). Each round opens
STREAMS concurrent `stream: true` chat completions through the broker (POST
/v1/chat/completions) and, as the peer, the same number straight to the sim; TTFT is from
sending the request to the first `data:` line that carries content. Prints p50/p99 of both and
the difference, median over the rounds, the time to the response head (the job is durable), and
the CPU (utime + stime) of broker, worker and Redis per chunk relayed. Loopback only."""
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
CHUNKS = []  # chunk events (data: lines with choices) read, per stream of the last burst
CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def first_token(host, port, path, body, headers):
    """Seconds to the first content chunk, and whether [DONE] came."""
    c = http.client.HTTPConnection(host, port, timeout=T(60))
    t0 = time.monotonic()
    c.request("POST", path, json.dumps(body), dict(headers, **{"Content-Type": "application/json"}))
    r = c.getresponse()
    HEADS.append(time.monotonic() - t0)
    ttft, done, chunks = None, False, 0
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
            break
        if line.startswith(b"data: "):
            chunks += 1
            if ttft is None:
                ev = json.loads(line[6:])
                if any((ch.get("delta") or {}).get("content") for ch in ev.get("choices", [])):
                    ttft = time.monotonic() - t0
    c.close()
    CHUNKS.append(chunks)
    return ttft, done


def burst(host, port, path, body, headers):
    del HEADS[:]
    del CHUNKS[:]
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
    extra = {"broker": {"api_keys": {KEY: "t"}}}
    if os.environ.get("FETCH_WAIT_MS"):  # the mock answers an empty fetch only after this
        extra["kafka"] = {"fetch.wait.max.ms": os.environ["FETCH_WAIT_MS"]}
    if os.environ.get("KAFKA"):  # more librdkafka properties, as JSON: '{"linger.ms": "0"}'
        extra.setdefault("kafka", {}).update(json.loads(os.environ["KAFKA"]))
    path, _ = st.config(providers=providers, routes=routes, extra=extra)
    worker = st.spawn("promptq-worker", "--config", path, name="worker")
    broker = st.broker(path)
    pids = {"broker": broker.pid, "worker": worker.pid, "redis": st.redis_.proc.pid}
    auth = {"Authorization": "Bearer " + KEY}
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    wait_for(lambda: first_token("127.0.0.1", st.broker_port, "/v1/chat/completions", body,
                                 auth)[1], T(30), "a first stream through the broker")
    sim_host, sim_port = sim.url.split("//")[1].split(":")
    rows = []
    for rnd in range(RUNS):
        d50, d99 = burst(sim_host, int(sim_port), "/v1/chat/completions", body, {})
        c0 = {k: cpu_s(v) for k, v in pids.items()}
        p50, p99 = burst("127.0.0.1", st.broker_port, "/v1/chat/completions", body, auth)
        c1 = {k: cpu_s(v) for k, v in pids.items()}
        h50 = statistics.median(HEADS)
        n = sum(CHUNKS)
        per = {k: (c1[k] - c0[k]) / n * 1e6 for k in pids}
        rows.append((d50, d99, p50, p99, h50, per["broker"], per["worker"], per["redis"]))
        print("round %d: direct p50 %.1f p99 %.1f ms | promptq p50 %.1f p99 %.1f ms "
              "(head, i.e. Kafka-acknowledged, p50 %.1f ms)" % (
                  rnd, d50 * 1e3, d99 * 1e3, p50 * 1e3, p99 * 1e3, h50 * 1e3), flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(8)]
    print("TTFT, %d concurrent streams, chunk %d ms, median of %d rounds:" % (STREAMS, CHUNK_MS,
                                                                            RUNS))
    print("  provider direct: p50 %.1f ms, p99 %.1f ms" % (med[0] * 1e3, med[1] * 1e3))
    print("  through promptq: p50 %.1f ms, p99 %.1f ms (durable: Kafka-acked, worker, Redis "
          "Stream relay)" % (med[2] * 1e3, med[3] * 1e3))
    print("  added: p50 %.1f ms, p99 %.1f ms" % ((med[2] - med[0]) * 1e3, (med[3] - med[1]) * 1e3))
    print("  head (job durable) p50 %.1f ms" % (med[4] * 1e3))
    print("  CPU per relayed chunk (whole stream, job intake included): broker %.0f us, "
          "worker %.0f us, redis %.0f us" % (med[5], med[6], med[7]))
