#!/usr/bin/env python3
"""Redis commands and Redis CPU per job on the worker's happy path.

Each run starts a fresh stack through tests/integration/harness.py: redis-server (no
persistence), promptq-devkafka (1 broker, --partitions per topic), one promptq-sim in mode ok
with no latency and one promptq-worker (worker.metrics_listen for progress), then:

  1. warm-up: --warmup job envelopes produced with kcat straight to promptq.requests; waits
     until the worker counts them succeeded (its group joined, its connections open);
  2. INFO commandstats and INFO cpu;
  3. --jobs more envelopes produced to promptq.requests (new ids, keyed by id, no broker: the
     worker creates each record in its begin script); waits until the worker's
     promptq_worker_jobs_total{outcome="succeeded"} counts them all;
  4. INFO commandstats and INFO cpu again.

Happy path: a job that is leased, called once, succeeds and is published; no cache, callback
or reply_to. Figures per run:
  commands/job   sum of the cmdstat_* "calls" deltas / jobs, and per command. Redis counts the
                 commands a script runs (redis.call) as well as the EVAL/EVALSHA itself, so the
                 total is the work Redis does per job, and "top-level" (EVAL, EVALSHA, SCRIPT,
                 GET, SET, ... sent by a client) is the round trips. The INFO commands of this
                 script are left out; the worker's periodic commands (health key, route ops,
                 callback claims) are in, amortised over the jobs.
  bytes/job      Redis's total_net_input_bytes delta / jobs (what the worker sends it).
  Redis CPU/job  (used_cpu_sys + used_cpu_user) delta / jobs, in microseconds.
The figure reported is the median over --runs runs.

Not a test: not registered in ctest. Every wait is bounded; the harness stops every process.

    python3 tests/bench/redis_cmds.py --bin-dir build/bin [--jobs 5000] [--runs 3] [--json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# commands only a client sends (never a promptq script): the round trips. GET and SET are
# counted with the scripts' commands (the lease SET, the renew GET); on the happy path a client
# sends them only for the worker's health key, a few per second.
TOP_LEVEL = {"eval", "evalsha", "script", "publish", "hgetall", "ping", "select", "auth",
             "subscribe", "xadd"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=os.environ.get("PQ_BIN_DIR", os.path.join(ROOT, "build", "bin")),
                    help="promptq-worker, -devkafka, -sim (default $PQ_BIN_DIR or build/bin)")
    ap.add_argument("--log-dir", default=None, help="process logs (default <bin-dir>/../bench-logs)")
    ap.add_argument("--jobs", type=int, default=5000, help="measured jobs per run (5000)")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up jobs per run (200)")
    ap.add_argument("--runs", type=int, default=3, help="runs (3); the median is reported")
    ap.add_argument("--partitions", type=int, default=4, help="partitions per topic (4)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per wait (180)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write every figure here")
    a = ap.parse_args()
    if a.runs < 1 or a.jobs < 1 or a.warmup < 1:
        ap.error("runs, jobs and warmup >= 1")
    return a


ARGS = parse_args()
os.environ["PQ_BIN_DIR"] = os.path.abspath(ARGS.bin_dir)
os.environ["PQ_LOG_DIR"] = os.path.abspath(
    ARGS.log_dir or os.path.join(ARGS.bin_dir, "..", "bench-logs"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402  (reads PQ_BIN_DIR / PQ_LOG_DIR at import)
from harness import wait_for  # noqa: E402

PROMPT = "benchmark prompt: one short sentence, please."


def envelope(job_id):
    return {"id": job_id,
            "request": {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}}


def succeeded(url):
    try:
        status, _, body = harness.http("GET", url + "/metrics", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith('promptq_worker_jobs_total{outcome="succeeded"'):
            return int(float(line.split()[-1]))
    return 0


def info(r):
    """({command: calls}, cpu seconds, net input bytes) from INFO commandstats / cpu / stats."""
    calls = {}
    cpu = 0.0
    net_in = 0
    for line in r.cli("INFO", "everything").splitlines():
        line = line.strip()
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            calls[name] = int(fields["calls"])
        elif line.startswith(("used_cpu_sys:", "used_cpu_user:")):
            cpu += float(line.split(":", 1)[1])
        elif line.startswith("total_net_input_bytes:"):
            net_in = int(line.split(":", 1)[1])
    return calls, cpu, net_in


def one_run(run):
    n = ARGS.jobs
    with harness.Stack("redis-cmds-%d" % run) as st:
        r = st.redis()
        st.devkafka(brokers=1, partitions=ARGS.partitions)
        s = st.sim("a")
        s.set_state({"mode": "ok", "latency_ms": 0})
        port = harness.free_port()
        path, _ = st.config(
            providers={"sim": {"type": "openai", "base_url": s.api, "max_concurrency": 0}},
            extra={"worker": {"metrics_listen": "127.0.0.1:%d" % port}})
        url = "http://127.0.0.1:%d" % port
        st.spawn("promptq-worker", "--config", path, name="worker")
        warm = ["w%d-%06d" % (run, i) for i in range(ARGS.warmup)]
        st.produce("promptq.requests", [envelope(i) for i in warm], keys=warm)
        wait_for(lambda: (succeeded(url) or 0) >= len(warm), ARGS.timeout, "warm-up jobs")
        time.sleep(0.5)
        base = succeeded(url)
        c0, cpu0, in0 = info(r)
        ids = ["j%d-%07d" % (run, i) for i in range(n)]
        t0 = time.monotonic()
        st.produce("promptq.requests", [envelope(i) for i in ids], keys=ids, timeout=120)
        wait_for(lambda: (succeeded(url) or 0) >= base + n, ARGS.timeout, "measured jobs",
                 interval=0.02)
        wall = time.monotonic() - t0
        c1, cpu1, in1 = info(r)
    c0.pop("info", None)
    c1.pop("info", None)
    per = {k: (c1[k] - c0.get(k, 0)) / n for k in c1 if c1[k] - c0.get(k, 0) > 0}
    res = {
        "run": run, "jobs": n, "wall_s": wall,
        "commands_per_job": sum(per.values()),
        "top_level_per_job": sum(v for k, v in per.items() if k in TOP_LEVEL),
        "by_command": per,
        "bytes_in_per_job": (in1 - in0) / n,
        "redis_cpu_us_per_job": (cpu1 - cpu0) / n * 1e6,
    }
    print("run %d: %5.2f commands/job (top-level %4.2f), %6.0f bytes/job in, Redis CPU %5.1f us/job"
          " (%d jobs in %.1f s)" % (run, res["commands_per_job"], res["top_level_per_job"],
                                    res["bytes_in_per_job"], res["redis_cpu_us_per_job"], n, wall),
          flush=True)
    print("       " + "  ".join("%s %.2f" % (k, v) for k, v in sorted(per.items(), key=lambda x: -x[1])),
          flush=True)
    return res


def main():
    runs = [one_run(i + 1) for i in range(ARGS.runs)]

    def med(key):
        return statistics.median(x[key] for x in runs)

    cmds = sorted({k for x in runs for k in x["by_command"]})
    by = {k: statistics.median(x["by_command"].get(k, 0.0) for x in runs) for k in cmds}
    print("median of %d runs of %d jobs (%s):" % (len(runs), ARGS.jobs, ARGS.bin_dir))
    print("  commands/job   %.2f (top-level %.2f)" % (med("commands_per_job"), med("top_level_per_job")))
    print("  by command     " + "  ".join("%s %.2f" % (k, v) for k, v in
                                           sorted(by.items(), key=lambda x: -x[1])))
    print("  bytes in/job   %.0f" % med("bytes_in_per_job"))
    print("  Redis CPU/job  %.1f us" % med("redis_cpu_us_per_job"))
    if ARGS.json_out:
        with open(ARGS.json_out, "w") as f:
            json.dump({"runs": runs, "median": {"commands_per_job": med("commands_per_job"),
                                                "top_level_per_job": med("top_level_per_job"),
                                                "by_command": by,
                                                "bytes_in_per_job": med("bytes_in_per_job"),
                                                "redis_cpu_us_per_job": med("redis_cpu_us_per_job")}},
                      f, indent=2)


if __name__ == "__main__":
    main()
