#!/usr/bin/env python3
"""Benchmark of callback_url delivery: what sending every result to a webhook costs.

Each run starts a fresh stack through tests/integration/harness.py (redis-server,
promptq-devkafka, promptq-sim without latency, promptq-broker with 2 threads, promptq-worker)
plus a webhook receiver on loopback (asyncio, HTTP/1.1 keep-alive, answers 200 and checks the
signature of every 100th POST), warms up, then measures two phases in the same stack:

  plain       `ab -k -c 64 -n N` POSTs a job without callback_url; end to end = until
              promptq.results holds N more results (end offsets, polled every 50 ms).
  callbacks   the same with "callback_url": every result is also POSTed, signed, to the
              receiver; end to end = until the receiver has N POSTs. Also the callback lag:
              receiver time minus the record's completed_at (p50 / p99).

Per phase: CPU seconds of the worker and redis-server (/proc/PID/stat). The phases alternate
order between runs (plain first in odd runs) so a warming machine favours neither.

Not a test: not registered in ctest.

    python3 tests/bench/callbacks.py --bin-dir build/bin [--runs 3] [--jobs 5000] [--json out.json]
"""

import argparse
import asyncio
import datetime
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
sys.path.insert(0, HERE)

SECRET = "bench-secret"
PROMPT = "benchmark prompt: summarise the durable path of promptq in one sentence, please."


class Receiver:
    """Counts POSTs; keeps (receive wall time, completed_at) per POST; verifies every 100th."""

    def __init__(self):
        self.count = 0
        self.lags_ms = []
        self.bad = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", 0, backlog=1024))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _conn(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    if b":" in line:
                        k, v = line.split(b":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                now_ms = time.time() * 1000.0
                self.count += 1
                if self.count % 100 == 0 and not verify(headers, body):
                    self.bad += 1
                try:
                    self.lags_ms.append(now_ms - completed_at_ms(json.loads(body)["completed_at"]))
                except (ValueError, KeyError, TypeError):
                    self.bad += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def verify(headers, body):
    parts = dict(p.split("=", 1) for p in headers[b"x-promptq-signature"].decode().split(","))
    mac = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts["v1"])


def completed_at_ms(v):
    """completed_at as the record has it: RFC 3339 text (or ms)."""
    if isinstance(v, (int, float)):
        return float(v)
    return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000.0


def pct(vals, p):
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(len(vals) * p))] if vals else None


def one_run(idx, args, e2e, harness):
    from harness import wait_for

    rcv = Receiver()
    r = {"run": idx}
    tmp = tempfile.mkdtemp(prefix="pq-bench-cb-")
    plain_path, cb_path = os.path.join(tmp, "plain.json"), os.path.join(tmp, "cb.json")
    job = {"request": {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}}
    with open(plain_path, "w") as f:
        json.dump(job, f)
    with open(cb_path, "w") as f:
        json.dump(dict(job, callback_url="http://127.0.0.1:%d/hook" % rcv.port), f)
    try:
        with harness.Stack("bench-callbacks-%d" % idx) as st:
            redis = st.redis()
            k = st.devkafka(brokers=1, partitions=4)
            sim = st.sim("a")
            sim.set_state({"mode": "ok", "latency_ms": 0, "failure_rate": 0})
            path, _ = st.config(extra={
                "broker": {"threads": 2},
                "callbacks": {"allow_hosts": ["127.0.0.1:%d" % rcv.port],
                              "secrets": {"*": SECRET}, "max_inflight": 256, "poll_ms": 100}})
            broker = st.spawn("promptq-broker", "--config", path, name="broker")
            wait_for(lambda: e2e.broker_ready(st), 20, "broker /readyz")
            worker = st.spawn("promptq-worker", "--config", path, name="worker")
            offs = e2e.EndOffsets(k.bootstrap)
            url = st.broker_url + "/v1/jobs"

            def phase(body_path, with_cb):
                base = offs.total(e2e.RESULTS, 4)
                rc0 = rcv.count
                cpu0 = {n: e2e.proc_cpu_s(p.pid) for n, p in
                        (("worker", worker), ("redis", redis.proc))}
                t0 = time.monotonic()
                busy0 = e2e.system_busy_s()
                rc, _, _, text = e2e.run_timed(e2e.ab_argv(url, body_path, args.jobs, 64))
                a = e2e.parse_ab(text)
                if rc != 0 or a["complete"] != args.jobs or a["non2xx"]:
                    raise RuntimeError("ab failed (rc %d): %s" % (rc, text[-600:]))
                deadline = time.monotonic() + 300
                if with_cb:
                    while rcv.count - rc0 < args.jobs and time.monotonic() < deadline:
                        time.sleep(0.05)
                    done = rcv.count - rc0
                else:
                    t, done = e2e.wait_results(offs, 4, base + args.jobs, deadline)
                    done -= base
                wall = time.monotonic() - t0
                busy = (e2e.system_busy_s() - busy0) / wall / (os.cpu_count() or 1)
                if done < args.jobs:
                    raise RuntimeError("only %d of %d in 300 s" % (done, args.jobs))
                cpu = {n: e2e.proc_cpu_s(p.pid) - cpu0[n] for n, p in
                       (("worker", worker), ("redis", redis.proc))}
                return {"rate": args.jobs / wall, "intake": args.jobs / a["time_s"],
                        "cpu_worker": cpu["worker"], "cpu_redis": cpu["redis"], "busy": busy}

            phase(plain_path, False)  # warm-up
            rcv.lags_ms.clear()
            order = [False, True] if idx % 2 else [True, False]
            for with_cb in order:
                r["callbacks" if with_cb else "plain"] = phase(cb_path if with_cb else plain_path,
                                                               with_cb)
            lags = rcv.lags_ms[-args.jobs:]
            r["lag_p50_ms"], r["lag_p99_ms"] = pct(lags, 0.5), pct(lags, 0.99)
            r["bad_signatures"] = rcv.bad
            _, _, raw = harness.http("GET", st.broker_url + "/metrics", timeout=10)
    finally:
        rcv.close()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(os.path.dirname(HERE)),
                                                      "build", "bin"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ["PQ_BIN_DIR"] = os.path.abspath(args.bin_dir)
    import harness
    import e2e_http as e2e

    runs = []
    for i in range(1, args.runs + 1):
        r = one_run(i, args, e2e, harness)
        runs.append(r)
        print("run %d: plain %.0f jobs/s (worker %.2f cpu-s, redis %.2f, cores %.0f%% busy) | "
              "callbacks %.0f jobs/s (worker %.2f cpu-s, redis %.2f, cores %.0f%% busy), "
              "lag p50 %.0f ms p99 %.0f ms, bad signatures %d"
              % (i, r["plain"]["rate"], r["plain"]["cpu_worker"], r["plain"]["cpu_redis"],
                 100 * r["plain"]["busy"], r["callbacks"]["rate"], r["callbacks"]["cpu_worker"],
                 r["callbacks"]["cpu_redis"], 100 * r["callbacks"]["busy"], r["lag_p50_ms"],
                 r["lag_p99_ms"], r["bad_signatures"]), flush=True)

    def med(f):
        return statistics.median(f(r) for r in runs)

    print("\nmedian of %d runs, %d jobs each, 64 connections:" % (len(runs), args.jobs))
    print("  end to end without callbacks  %6.0f jobs/s   worker %.2f cpu-s  redis %.2f cpu-s"
          % (med(lambda r: r["plain"]["rate"]), med(lambda r: r["plain"]["cpu_worker"]),
             med(lambda r: r["plain"]["cpu_redis"])))
    print("  end to end with callbacks     %6.0f jobs/s   worker %.2f cpu-s  redis %.2f cpu-s"
          % (med(lambda r: r["callbacks"]["rate"]), med(lambda r: r["callbacks"]["cpu_worker"]),
             med(lambda r: r["callbacks"]["cpu_redis"])))
    print("  callback lag after completed_at: p50 %.0f ms, p99 %.0f ms"
          % (med(lambda r: r["lag_p50_ms"]), med(lambda r: r["lag_p99_ms"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
