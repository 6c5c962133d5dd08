#!/usr/bin/env python3
"""HTTP/1.1 against HTTP/2 to one TLS provider: jobs/s, worker CPU per job, connections opened.

Each run starts a fresh stack through tests/integration/harness.py: redis-server,
promptq-devkafka (1 broker, 4 partitions) and tests/bench/h2_provider.mjs (Node's own http2 /
https modules on 127.0.0.1, a CA and certificate made for the run, answering every call after
--latency-ms) speaking HTTP/2 only or HTTP/1.1 only. The provider has ca_file set to the run's
CA and max_concurrency 0. kcat preloads N = --mult x max_inflight envelopes into
promptq.requests, then one promptq-worker (worker.max_inflight M) runs them. The two protocols
alternate run by run, so the machine's noise falls on both.

  jobs/s       N / (the provider's first answered call -> every job succeeded)
  CPU us/job   worker utime + stime (/proc/PID/stat) over that window / N
  connections  TLS connections the provider accepted during the run
  peak RSS MB  the worker's VmHWM

Not a test: not registered in ctest.

    python3 tests/bench/h2.py --bin-dir build/bin [--inflight 10000] [--runs 3] [--json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK = os.sysconf("SC_CLK_TCK")

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--bin-dir", default=os.environ.get("PQ_BIN_DIR", os.path.join(ROOT, "build", "bin")))
ap.add_argument("--inflight", default="10000", help="worker.max_inflight values (comma list)")
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--mult", type=float, default=3.0, help="jobs per run = mult x max_inflight")
ap.add_argument("--latency-ms", type=int, default=1000)
ap.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
ap.add_argument("--json", dest="json_out", default=None)
ARGS = ap.parse_args()
os.environ["PQ_BIN_DIR"] = os.path.abspath(ARGS.bin_dir)
os.environ.setdefault("PQ_LOG_DIR", os.path.join(ARGS.bin_dir, "..", "bench-logs"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402
from harness import wait_for  # noqa: E402


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def hwm_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def get_json(url):
    try:
        status, _, body = harness.http("GET", url, timeout=5)
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        return None


def succeeded(url):
    try:
        status, _, body = harness.http("GET", url + "/metrics", timeout=5)
    except OSError:
        return 0
    for line in body.decode().splitlines() if status == 200 else []:
        if line.startswith('promptq_worker_jobs_total{outcome="succeeded"}'):
            return int(float(line.split()[-1]))
    return 0


def one_run(proto, m, run):
    n = int(ARGS.mult * m)
    with harness.Stack("h2-%s-%d-%d" % (proto, m, run)) as st:
        ca, crt, key = harness.make_test_ca(st.dir)
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        port, sport = harness.free_port(), harness.free_port()
        st.spawn("node", os.path.join(HERE, "h2_provider.mjs"), "--proto", proto, "--port", port,
                 "--stats-port", sport, "--cert", crt, "--key", key, "--latency-ms",
                 ARGS.latency_ms, name="provider")
        stats_url = "http://127.0.0.1:%d/stats" % sport
        wait_for(lambda: get_json(stats_url) is not None, 30, "the provider's stats")
        mport = harness.free_port()
        path, _ = st.config(
            providers={"tls": {"type": "openai", "base_url": "https://127.0.0.1:%d/v1" % port,
                               "ca_file": ca, "max_concurrency": 0}},
            routes={"m": [{"provider": "tls", "model": "m"}]},
            extra={"worker": {"max_inflight": m, "metrics_listen": "127.0.0.1:%d" % mport}})
        ids = ["j%07d" % i for i in range(n)]
        st.produce("promptq.requests",
                   [{"id": i, "request": {"model": "m", "messages": [
                       {"role": "user", "content": "one short sentence, please."}]}} for i in ids],
                   keys=ids, timeout=120)
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        murl = "http://127.0.0.1:%d" % mport
        deadline = time.monotonic() + ARGS.timeout
        t0 = t1 = None
        cpu0 = 0.0
        while time.monotonic() < deadline and w.alive():
            if t0 is None and ((get_json(stats_url) or {}).get("requests") or 0) > 0:
                t0, cpu0 = time.monotonic(), cpu_s(w.pid)
            if t0 is not None and succeeded(murl) >= n:
                t1 = time.monotonic()
                break
            time.sleep(0.02)
        if t1 is None:
            raise AssertionError("%s M=%d: %d of %d jobs succeeded" % (proto, m, succeeded(murl), n))
        r = {"proto": proto, "max_inflight": m, "run": run, "jobs": n, "jobs_s": n / (t1 - t0),
             "cpu_us_job": (cpu_s(w.pid) - cpu0) / n * 1e6, "rss_mb": hwm_mb(w.pid),
             "connections": get_json(stats_url)["connections"]}
    print("%s M=%d run %d: %.0f jobs/s, CPU %.0f us/job, %d connections, peak RSS %.1f MB" %
          (proto, m, run, r["jobs_s"], r["cpu_us_job"], r["connections"], r["rss_mb"]), flush=True)
    return r


def main():
    runs = []
    for m in [int(x) for x in ARGS.inflight.split(",") if x]:
        for run in range(1, ARGS.runs + 1):
            for proto in ("h1", "h2"):
                runs.append(one_run(proto, m, run))
    print("\nmedians of %d runs (latency %d ms, jobs = %.1f x max_inflight)" %
          (ARGS.runs, ARGS.latency_ms, ARGS.mult))
    print("%-5s %7s %8s %11s %12s %8s" % ("proto", "M", "jobs/s", "CPU us/job", "connections", "RSS MB"))
    for m in sorted({r["max_inflight"] for r in runs}):
        for proto in ("h1", "h2"):
            rs = [r for r in runs if r["proto"] == proto and r["max_inflight"] == m]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            print("%-5s %7d %8.0f %11.0f %12.0f %8.1f" % (proto, m, med("jobs_s"), med("cpu_us_job"),
                                                        med("connections"), med("rss_mb")))
    if ARGS.json_out:
        with open(ARGS.json_out, "w") as f:
            json.dump({"args": vars(ARGS), "runs": runs}, f, indent=1)


main()
