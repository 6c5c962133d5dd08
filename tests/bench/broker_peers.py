#!/usr/bin/env python3
"""The broker next to its peers (issue "Broker rebuilt for speed"), loopback only, with wrk.

  intake   POST /v1/jobs (a small job envelope) at --conns connections (default 256) to
           promptq-broker on the embedded default (redis-server, promptq-devkafka; no worker:
           intake only), next to pq-bench-hello (tests/bench/hello_server.c, a trivial evhttp
           server with the broker's thread count answering the same 202 body at once).
  chat     POST /v1/chat/completions, non-streamed, at --chat-conns connections (default 64):
           promptq-broker + promptq-worker (durable sync chat: Kafka, the worker's call to
           promptq-sim, the result through Redis) next to Portkey's open-source gateway
           (npm @portkey-ai/gateway, installed by this script into build/bench-node/, started
           with a preload that binds it to 127.0.0.1) calling the same promptq-sim.

Each round runs both sides for --seconds (default 10) after a 2 s warm-up, alternating which
goes first; the figures are medians over --runs rounds (default 3): req/s, p50 / p99 latency
(wrk --latency), and CPU µs per request of each process of the side (utime + stime from
/proc/PID/stat over the measured window); for the broker's intake also Redis's own count and
time of EVALSHA per request (INFO commandstats after CONFIG RESETSTAT). Not a test: not in
ctest.

    python3 tests/bench/broker_peers.py intake|chat|both [--runs 3] [--seconds 10] [--json F]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK = os.sysconf("SC_CLK_TCK")
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402
from harness import wait_for  # noqa: E402

PORTKEY = "@portkey-ai/gateway@1.15.2"
NODE_DIR = os.path.join(ROOT, "build", "bench-node")
KEY = "bench-key"
ROUTE = "bench-model"
JOB = {"request": {"model": ROUTE, "messages": [{"role": "user", "content": "benchmark prompt"}]}}
CHAT = {"model": ROUTE, "messages": [{"role": "user", "content": "benchmark prompt"}]}
# net.Server.listen without a host binds every interface; the gateway gives none: force loopback
LOOPBACK_MJS = """import net from 'node:net';
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...a) {
  if (typeof a[0] === 'number' && typeof a[1] !== 'string') a.splice(1, 0, '127.0.0.1');
  else if (a[0] && typeof a[0] === 'object' && !a[0].host) a[0] = {...a[0], host: '127.0.0.1'};
  return listen.apply(this, a);
};
"""


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def wrk(url, body, headers, conns, seconds):
    """wrk -t1 with a POST script; returns (req/s, p50 ms, p99 ms, requests, non-2xx)."""
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write("wrk.method = 'POST'\nwrk.body = %s\n" % json.dumps(json.dumps(body)))
    for k, v in headers.items():
        lua.write("wrk.headers[%s] = %s\n" % (json.dumps(k), json.dumps(v)))
    lua.close()
    try:
        out = subprocess.run(["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--latency",
                              "--timeout", "30s", "-s", lua.name, url],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(lua.name)

    def lat(pct):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        if not m:
            raise RuntimeError("no %s%% line in wrk output:\n%s" % (pct, out))
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat(50), lat(99), n, int(m.group(1)) if m else 0


def up(fn):
    """fn() == True, or False while the server does not answer yet."""
    def check():
        try:
            return fn()
        except OSError:
            return False
    return check


def evalsha_stats(redis):
    """(calls, usec) of EVALSHA since the last CONFIG RESETSTAT (Redis's own accounting)."""
    for line in redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_evalsha:"):
            f = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return int(f["calls"]), float(f["usec"])
    return 0, 0.0


def measure(name, url, body, headers, conns, seconds, pids, redis=None):
    """Warm-up, then one measured wrk run; CPU µs per request for each of pids {name: pid}.
    With redis (the stack's server): also its EVALSHA commands and time per request."""
    wrk(url, body, headers, conns, 2)
    if redis:
        redis.cli("CONFIG", "RESETSTAT")
    c0 = {k: cpu_s(p) for k, p in pids.items()}
    rps, p50, p99, n, bad = wrk(url, body, headers, conns, seconds)
    c1 = {k: cpu_s(p) for k, p in pids.items()}
    us = {k: round((c1[k] - c0[k]) * 1e6 / max(n, 1), 1) for k in pids}
    extra = ""
    out = {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": n, "non_2xx": bad,
           "cpu_us_per_req": us}
    if redis:
        calls, usec = evalsha_stats(redis)
        out["evalsha_per_req"] = round(calls / max(n, 1), 3)
        out["evalsha_us_per_req"] = round(usec / max(n, 1), 2)
        extra = "  EVALSHA/req %.3f (%.2f us)" % (out["evalsha_per_req"], out["evalsha_us_per_req"])
    print("  %-8s %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms  non-2xx %d  CPU us/req %s%s"
          % (name, rps, p50, p99, bad, us, extra), flush=True)
    return out


def stack(st, worker):
    r = st.redis()
    st.devkafka(brokers=1, partitions=4)
    s = st.sim("a")
    path, _ = st.config(providers={"sim": {"type": "openai", "base_url": s.api,
                                           "max_concurrency": 0}},
                        routes={ROUTE: [{"provider": "sim", "model": "sim-model"}]},
                        extra={"broker": {"api_keys": {KEY: "bench"}},
                               "worker": {"max_inflight": 1024}})
    b = st.broker(path)
    procs = {"broker": b.pid, "redis": r.proc.pid, "devkafka": st.kafka_.proc.pid}
    if worker:
        procs["worker"] = st.spawn("promptq-worker", "--config", path, name="worker").pid
        wait_for(up(lambda: harness.http_json("POST", st.broker_url + "/v1/chat/completions",
                                              CHAT, {"Authorization": "Bearer " + KEY})[0] == 200),
                 60, "a first chat answer", interval=0.5)
    return s, procs


def portkey_start(st, sim):
    if not os.path.exists(os.path.join(NODE_DIR, "node_modules", "@portkey-ai", "gateway")):
        os.makedirs(NODE_DIR, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        NODE_DIR, PORTKEY], check=True, timeout=600)
    pre = os.path.join(NODE_DIR, "loopback.mjs")
    with open(pre, "w") as f:
        f.write(LOOPBACK_MJS)
    port = harness.free_port()
    server = os.path.join(NODE_DIR, "node_modules", "@portkey-ai", "gateway", "build",
                          "start-server.js")
    p = st.spawn("node", "--import", pre, server, "--port=%d" % port, "--headless",
                 name="portkey", env={"NODE_ENV": "production"})
    url = "http://127.0.0.1:%d/v1/chat/completions" % port
    hdrs = {"x-portkey-provider": "openai", "x-portkey-custom-host": sim.api,
            "Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    wait_for(up(lambda: harness.http_json("POST", url, CHAT, hdrs)[0] == 200), 60,
             "portkey answering", interval=0.5)
    # loopback only: the gateway must not listen on another address
    ss = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], capture_output=True,
                        text=True).stdout
    assert ss.strip() and all("127.0.0.1:%d" % port in ln for ln in ss.splitlines()), ss
    return url, hdrs, p.pid


def round_intake(idx, conns, seconds, hello_first):
    out = {}
    with harness.Stack("bench-intake-%d" % idx) as st:
        _, procs = stack(st, worker=False)
        port = harness.free_port()
        hello = st.spawn("pq-bench-hello", str(port), "2", name="hello")
        wait_for(up(lambda: harness.http("POST", "http://127.0.0.1:%d/v1/jobs" % port,
                                         b"{}")[0] == 202), 20, "pq-bench-hello", interval=0.2)
        hdr = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
        sides = [("hello", "http://127.0.0.1:%d/v1/jobs" % port, {"hello": hello.pid}, None),
                 ("broker", st.broker_url + "/v1/jobs", procs, st.redis_)]
        for name, url, pids, redis in (sides if hello_first else sides[::-1]):
            out[name] = measure(name, url, JOB, hdr, conns, seconds, pids, redis)
    return out


def round_chat(idx, conns, seconds, portkey_first):
    out = {}
    with harness.Stack("bench-chat-%d" % idx) as st:
        sim, procs = stack(st, worker=True)
        purl, phdr, ppid = portkey_start(st, sim)
        hdr = {"Authorization": "Bearer " + KEY, "Content-Type": "application/json"}
        sides = [("portkey", purl, phdr, {"portkey": ppid}),
                 ("broker", st.broker_url + "/v1/chat/completions", hdr, procs)]
        for name, url, h, pids in (sides if portkey_first else sides[::-1]):
            out[name] = measure(name, url, CHAT, h, conns, seconds, pids)
    return out


def summary(kind, rounds, peer):
    med = {}
    for side in (peer, "broker"):
        rs = [r[side] for r in rounds]
        med[side] = {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms")}
        med[side]["cpu_us_per_req"] = {
            p: statistics.median(x["cpu_us_per_req"][p] for x in rs)
            for p in rs[0]["cpu_us_per_req"]}
    ratio = med["broker"]["rps"] / med[peer]["rps"]
    print("%s, median of %d: broker %.0f req/s p99 %.2f ms | %s %.0f req/s p99 %.2f ms | "
          "ratio %.2fx | CPU us/req broker-side %s, %s %s"
          % (kind, len(rounds), med["broker"]["rps"], med["broker"]["p99_ms"], peer,
             med[peer]["rps"], med[peer]["p99_ms"], ratio, med["broker"]["cpu_us_per_req"],
             peer, med[peer]["cpu_us_per_req"]), flush=True)
    return {"median": med, "ratio": ratio, "rounds": rounds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["intake", "chat", "both"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=256)
    ap.add_argument("--chat-conns", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {}
    if a.what in ("intake", "both"):
        rounds = []
        for i in range(a.runs):
            print("intake round %d (%d connections)" % (i + 1, a.conns), flush=True)
            rounds.append(round_intake(i, a.conns, a.seconds, i % 2 == 0))
        res["intake"] = summary("intake", rounds, "hello")
    if a.what in ("chat", "both"):
        rounds = []
        for i in range(a.runs):
            print("chat round %d (%d connections)" % (i + 1, a.chat_conns), flush=True)
            rounds.append(round_chat(i, a.chat_conns, a.seconds, i % 2 == 0))
        res["chat"] = summary("chat", rounds, "portkey")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
