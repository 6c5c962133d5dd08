#!/usr/bin/env python3
"""Benchmark of the worker's flow control at worker.max_inflight: jobs/s, CPU per job, peak RSS.

Each run starts a fresh stack through tests/integration/harness.py: redis-server,
promptq-devkafka (1 broker, --partitions per topic), one promptq-sim answering every call after
--latency-ms (POST /_sim/state {"mode": "ok", "latency_ms": ...}) behind a provider with
max_concurrency 0 (unlimited), then:

  1. preload: kcat produces N = --mult x max_inflight small job envelopes (keyed by id) into
     --topic (promptq.bulk by default) before any worker runs;
  2. starts one promptq-worker with worker.max_inflight M and worker.metrics_listen;
  3. polls the sim's GET /_sim/stats and the worker's GET /metrics every 20 ms until promptq_worker_jobs_total{outcome="succeeded"} = N.

Figures per run:
  jobs/s         N / (first call -> last result): from the first poll of the simulator's
                 GET /_sim/stats that counts a request (its own listener: the worker's busy loop
                 does not delay it) to the first poll of the worker's /metrics that counts every
                 job succeeded. The ideal is M x 1000 / L jobs/s for a provider answering in
                 L ms. "lane" is what the lane can reach: N jobs in ceil(N / slots) rounds of
                 L ms, slots = M on promptq.requests, M - M / 8 on promptq.bulk (an eighth is
                 kept for the interactive lane), so 3 x M bulk jobs need 4 rounds.
  first->last    (succeeded at the last poll - succeeded at the first result) / (time between
                 them). Reads high: the first round's results all come at about the same time.
  CPU us/job     worker utime + stime (/proc/PID/stat, all threads) over the same window / N.
  peak RSS MB    the worker's VmHWM (/proc/PID/status) at the end: peak since it started.
  paused         "consumption paused" lines in the worker's log at info level: the parent
                 commit logs every flow-control pause; the backlog worker logs its backlog-full
                 pauses at debug (only Redis and stopping at info).

The peer is the same run with another worker binary (--peer-bin, e.g. one built at the parent
commit), run alternately with the measured one on fresh stacks, and the ideal.

devkafka keeps about 5 MB per partition: the run prints the bytes of the fullest requests and
results partitions (estimated from N and the sizes of the envelopes and of sampled results);
the worker never reads results, so only the requests must stay inside the window.

Not a test: not registered in ctest. Every wait is bounded; the harness stops every process.

    python3 tests/bench/inflight.py --bin-dir build/bin [--peer-bin /path/promptq-worker]
        [--inflight 2000,5000,10000] [--runs 3] [--json out.json]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK = os.sysconf("SC_CLK_TCK")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=os.environ.get("PQ_BIN_DIR", os.path.join(ROOT, "build", "bin")),
                    help="promptq-worker, -devkafka, -sim (default $PQ_BIN_DIR or build/bin)")
    ap.add_argument("--peer-bin", default=None,
                    help="another promptq-worker to run alternately on the same settings (the peer)")
    ap.add_argument("--log-dir", default=None, help="process logs (default <bin-dir>/../bench-logs)")
    ap.add_argument("--inflight", default="2000,5000,10000", help="worker.max_inflight values")
    ap.add_argument("--runs", type=int, default=3, help="runs per setting and binary (default 3)")
    ap.add_argument("--mult", type=float, default=3.0, help="jobs per run = mult x max_inflight (3)")
    ap.add_argument("--latency-ms", type=int, default=1000, help="the sim's answer delay (1000)")
    ap.add_argument("--topic", default="promptq.bulk", help="promptq.bulk or promptq.requests")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes in one group, each with worker.max_inflight M "
                         "(jobs = mult x M x workers; CPU summed over them, RSS the largest)")
    ap.add_argument("--prompt-bytes", type=int, default=0,
                    help="pad each prompt to this many bytes (the sim echoes it: the answer's "
                         "content is as long); default: a 46-byte prompt")
    ap.add_argument("--partitions", type=int, default=4, help="partitions per topic (default 4)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per run (default 180)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write every figure here")
    ap.add_argument("--perf", default=None,
                    help="perf record -g the worker from its first intake to its last result "
                         "into this file (the last run of the new worker only)")
    a = ap.parse_args()
    a.inflight = [int(x) for x in a.inflight.split(",") if x]
    if a.runs < 1 or not a.inflight or min(a.inflight) < 1 or a.mult <= 0 or a.workers < 1:
        ap.error("runs >= 1, inflight values >= 1, mult > 0, workers >= 1")
    return a


ARGS = parse_args()
os.environ["PQ_BIN_DIR"] = os.path.abspath(ARGS.bin_dir)
os.environ["PQ_LOG_DIR"] = os.path.abspath(
    ARGS.log_dir or os.path.join(ARGS.bin_dir, "..", "bench-logs"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402  (reads PQ_BIN_DIR / PQ_LOG_DIR at import)
from harness import wait_for  # noqa: E402

PROMPT = "benchmark prompt: one short sentence, please."


def proc_cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_hwm_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def counters(url):
    """{outcome: count} of promptq_worker_jobs_total, or None when the endpoint is not up."""
    try:
        status, _, body = harness.http("GET", url + "/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    out = {}
    for line in body.decode().splitlines():
        if line.startswith('promptq_worker_jobs_total{outcome="'):
            k = line.split('"')[1]
            out[k] = int(float(line.split()[-1]))
    return out


def settled(log_path):
    """True when the worker's last rebalance in its log assigned it partitions."""
    last = None
    for line in open(log_path):
        if "pq_consumer_on_rebalance: assigned" in line:
            last = "assigned"
        elif "pq_consumer_on_rebalance: revoked" in line:
            last = "revoked"
    return last == "assigned"


def counters_of(urls):
    """The workers' promptq_worker_jobs_total summed, or None while any endpoint is not up."""
    out = {}
    for u in urls:
        c = counters(u)
        if c is None:
            return None
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def sim_requests(sim):
    """Calls the simulator has received so far (its control listener), or None."""
    try:
        status, _, body = harness.http("GET", sim.control_url + "/_sim/stats", timeout=5)
    except OSError:
        return None
    return json.loads(body).get("requests") if status == 200 else None


def prompt():
    if ARGS.prompt_bytes <= len(PROMPT):
        return PROMPT
    filler = " and a word more"
    return (PROMPT + filler * (ARGS.prompt_bytes // len(filler) + 1))[:ARGS.prompt_bytes]


def envelope(job_id):
    return {"id": job_id,
            "request": {"model": "sim-model", "messages": [{"role": "user", "content": prompt()}]}}


def one_run(label, worker_bin, m, run, perf=None):
    n = int(ARGS.mult * m) * ARGS.workers
    name = "inflight-%s-%d-%d" % (label, m, run)
    with harness.Stack(name) as st:
        st.redis()
        st.devkafka(brokers=1, partitions=ARGS.partitions)
        s = st.sim("a")
        s.set_state({"mode": "ok", "latency_ms": ARGS.latency_ms})
        ports, paths = [], []
        for k in range(ARGS.workers):
            ports.append(harness.free_port())
            paths.append(st.config(
                providers={"sim": {"type": "openai", "base_url": s.api, "max_concurrency": 0}},
                extra={"worker": {"max_inflight": m,
                                  "metrics_listen": "127.0.0.1:%d" % ports[-1]}},
                name="config-%d.json" % k)[0])
        ids = ["j%07d" % i for i in range(n)]
        envs = [envelope(i) for i in ids]
        req_bytes = sum(len(json.dumps(e, separators=(",", ":"))) + len(i) for e, i in zip(envs, ids))
        urls = ["http://127.0.0.1:%d" % p for p in ports]
        if ARGS.workers == 1:  # one worker: the jobs are waiting when it starts
            st.produce(ARGS.topic, envs, keys=ids, timeout=120)
        load0 = loadavg()
        ws = [st.spawn(worker_bin, "--config", path, name="worker-%d" % k if k else "worker")
              for k, path in enumerate(paths)]
        w = ws[0]
        if ARGS.workers > 1:
            # several: the group settles first (each worker's last rebalance an assignment),
            # so the run measures the workers, not their join
            wait_for(lambda: all(settled(x.log_path) for x in ws), 60, "the group to settle")
            time.sleep(1.0)
            st.produce(ARGS.topic, envs, keys=ids, timeout=120)
        load_t0 = time.monotonic()
        deadline = time.monotonic() + ARGS.timeout
        t_in = t_res = t_last = None
        c_res = 0
        cpu0 = 0.0
        timeline = []  # (s since start, received, succeeded) every 20 ms
        while time.monotonic() < deadline:
            if t_in is None and (sim_requests(s) or 0) > 0:
                t_in, cpu0 = time.monotonic(), sum(proc_cpu_s(x.pid) for x in ws)
                if perf:
                    perf_p = subprocess.Popen(["perf", "record", "-F", "999", "--call-graph", os.environ.get("PQ_PERF_CALLGRAPH", "fp"), "-o", perf,
                                               "-p", str(w.pid)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c = counters_of(urls)
            now = time.monotonic()
            if c:
                timeline.append((round(now - load_t0, 3), c.get("received", 0), c.get("succeeded", 0)))
                if t_res is None and c.get("succeeded", 0) > 0:
                    t_res, c_res = now, c["succeeded"]
                if t_in is not None and c.get("succeeded", 0) >= n:
                    t_last = now
                    break
            if not all(x.alive() for x in ws):
                break
            time.sleep(0.02)
        if t_last is None:
            raise AssertionError("%s: %s jobs of %d succeeded in %.0f s" %
                                 (name, (counters_of(urls) or {}).get("succeeded"), n,
                                  ARGS.timeout))
        cpu = sum(proc_cpu_s(x.pid) for x in ws) - cpu0
        if perf:
            perf_p.send_signal(signal.SIGINT)
            perf_p.wait(60)
        hwm = max(proc_hwm_kb(x.pid) for x in ws)
        sample = st.consume("promptq.results", 200, timeout=30)
        res_avg = statistics.mean(len(x["value"] or "") + len(x["key"] or "") for x in sample)
        paused = sum(1 for x in ws for line in open(x.log_path) if "consumption paused" in line)
        r = {
            "label": label, "max_inflight": m, "workers": ARGS.workers, "run": run, "jobs": n,
            "jobs_s": n / (t_last - t_in),
            "first_last_s": (n - c_res) / (t_last - t_res) if t_last > t_res else None,
            "window_s": t_last - t_in,
            "cpu_us_job": cpu / n * 1e6,
            "rss_mb": hwm / 1024.0,
            "paused_log_lines": paused,
            "req_mb_partition": req_bytes / ARGS.partitions / 1e6,
            "res_mb_partition": res_avg * n / ARGS.partitions / 1e6,
            "load_before": load0, "load_after": loadavg(),
            "timeline": timeline,
        }
    print("%-6s M=%-6d run %d: %6.0f jobs/s (first->last %6.0f), window %.2f s, CPU %5.0f us/job, "
          "peak RSS %5.1f MB, paused x%d; partition MB requests %.2f results %.2f; load %.2f->%.2f"
          % (label, m, run, r["jobs_s"], r["first_last_s"] or 0, r["window_s"], r["cpu_us_job"],
             r["rss_mb"], paused, r["req_mb_partition"], r["res_mb_partition"], r["load_before"],
             r["load_after"]), flush=True)
    return r


def main():
    bins = [("new", "promptq-worker")]
    if ARGS.peer_bin:
        bins.append(("peer", os.path.abspath(ARGS.peer_bin)))
    runs = []
    for m in ARGS.inflight:
        for run in range(1, ARGS.runs + 1):
            for label, b in bins:  # alternately: the machine's noise falls on both
                perf = ARGS.perf if label == "new" and run == ARGS.runs and m == ARGS.inflight[-1] else None
                runs.append(one_run(label, b, m, run, perf))
    print("\nmedians of %d runs (latency %d ms, topic %s, %d partitions, jobs = %.1f x max_inflight "
          "x %d worker(s), prompt %d bytes)" % (ARGS.runs, ARGS.latency_ms, ARGS.topic,
                                                ARGS.partitions, ARGS.mult, ARGS.workers,
                                                len(prompt())))
    print("%-6s %8s %9s %9s %10s %12s %10s %10s" % ("worker", "M", "ideal", "lane", "jobs/s",
                                                     "first->last", "CPU us/job", "RSS MB"))
    for m in ARGS.inflight:
        ideal = m * ARGS.workers * 1000.0 / ARGS.latency_ms if ARGS.latency_ms else float("inf")
        slots = (m if ARGS.topic.endswith("requests") else m - m // 8) * ARGS.workers
        n = int(ARGS.mult * m) * ARGS.workers
        lane = n / (-(-n // slots) * ARGS.latency_ms / 1000.0) if ARGS.latency_ms else float("inf")
        for label, _ in bins:
            rs = [r for r in runs if r["label"] == label and r["max_inflight"] == m]
            med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
            print("%-6s %8d %9.0f %9.0f %10.0f %12.0f %10.0f %10.1f" %
                  (label, m, ideal, lane, med("jobs_s"), med("first_last_s"), med("cpu_us_job"),
                   med("rss_mb")))
    if ARGS.json_out:
        with open(ARGS.json_out, "w") as f:
            json.dump({"args": vars(ARGS), "runs": runs}, f, indent=1)


main()
