#!/usr/bin/env python3
"""Benchmark of promptq's durable path over HTTP (issue 3): jobs/s, per-process CPU and peak RSS.

Each run starts a fresh stack through tests/integration/harness.py (redis-server,
promptq-devkafka, promptq-sim without latency, promptq-broker with 2 threads, promptq-worker with
max_inflight 4096), warms it up, measures three peers, then the durable path:

  durable path   `ab -k -c 64 -n 20000` POSTs the same job envelope to the broker's /v1/jobs.
                 intake = ab's "Time taken" (first connect to last 202);
                 end to end = from starting ab until promptq.results holds a result for every
                 accepted job (sum of the results topic's end offsets, polled every 50 ms over
                 one persistent Kafka connection with a ListOffsets request: no process is
                 spawned and no message is read while measuring).
  peer kafka     kcat producing the same number of job envelopes straight into devkafka
                 (topic bench.raw; linger.ms=1, acks=all, enable.idempotence=true): msgs/s.
  peer http      the same ab command against promptq-sim's POST /v1/chat/completions: req/s.
  peer redis     redis-benchmark running a job_finish-sized EVAL (HGET, HSET of ~1 KB,
                 PEXPIRE) with 64 clients: ops/s (the durable path runs 3 EVALs per job).

Per process over the measured window (start of ab to the last result): CPU seconds
(utime + stime from /proc/PID/stat) and peak RSS (VmHWM from /proc/PID/status, reset through
/proc/PID/clear_refs just before the window, so it is the window's peak).

Not a test: not registered in ctest. Every wait is bounded; the harness stops every process.

    python3 tests/bench/e2e_http.py --bin-dir build/bin [--runs 3] [--jobs 20000] [--json out.json]
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

RESULTS = "promptq.results"
RAW_TOPIC = "bench.raw"
PROMPT = "benchmark prompt: summarise the durable path of promptq in one sentence, please."

# A job_finish-sized compare-and-set: read the status, write the record, set the TTL.
REDIS_EVAL = ("local s = redis.call('HGET', KEYS[1], 'status') "
              "if s == 'succeeded' then return 0 end "
              "redis.call('HSET', KEYS[1], 'status', 'succeeded', 'result', ARGV[1], "
              "'updated_at', '1795911303309') "
              "redis.call('PEXPIRE', KEYS[1], 604800000) return 1")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default=os.environ.get("PQ_BIN_DIR", os.path.join(ROOT, "build", "bin")),
                    help="directory with promptq-broker, -worker, -devkafka, -sim (default $PQ_BIN_DIR or build/bin)")
    ap.add_argument("--log-dir", default=None,
                    help="process logs (default $PQ_LOG_DIR, else <bin-dir>/../bench-logs)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs, each on a fresh stack (default 3)")
    ap.add_argument("--jobs", type=int, default=20000, help="jobs per measured run (default 20000)")
    ap.add_argument("--warmup", type=int, default=2000, help="warm-up jobs per run (default 2000)")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connections (default 64)")
    ap.add_argument("--partitions", type=int, default=8, help="partitions per topic (default 8)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds one measured run may take before it is abandoned (default 300)")
    ap.add_argument("--no-peers", action="store_true", help="skip the kcat, sim and redis peers")
    ap.add_argument("--json", dest="json_out", default=None, help="also write every figure to this file")
    a = ap.parse_args()
    if a.runs < 1 or a.jobs < 1 or a.warmup < 0 or not 1 <= a.connections <= 1000:
        ap.error("runs, jobs >= 1; warmup >= 0; connections 1..1000")
    return a


ARGS = parse_args()
os.environ["PQ_BIN_DIR"] = os.path.abspath(ARGS.bin_dir)
os.environ["PQ_LOG_DIR"] = os.path.abspath(
    ARGS.log_dir or os.environ.get("PQ_LOG_DIR") or os.path.join(ARGS.bin_dir, "..", "bench-logs"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402  (reads PQ_BIN_DIR / PQ_LOG_DIR at import)
from harness import wait_for  # noqa: E402


# ---------------------------------------------------------------- /proc readings

def proc_cpu_s(pid):
    """utime + stime of a whole process (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK


def thread_cpu_s(pid):
    """{tid: (name, utime + stime seconds)} for every thread of a process."""
    out = {}
    base = "/proc/%d/task" % pid
    for tid in os.listdir(base):
        try:
            with open("%s/%s/stat" % (base, tid)) as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK)
    return out


def busiest_thread(before, after):
    """(name, CPU s) of the thread that used most CPU between two thread_cpu_s() readings."""
    best = ("-", 0.0)
    for tid, (name, c) in after.items():
        d = c - before.get(tid, (name, 0.0))[1]
        if d > best[1]:
            best = (name, d)
    return best


def proc_hwm_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def proc_reset_hwm(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0, needs ptrace rights: we started it)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def system_busy_s():
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ---------------------------------------------------------------- Kafka end offsets, cheaply

class EndOffsets:
    """One persistent connection to a single-broker devkafka; ListOffsets v1 (timestamp -1 =
    latest) for every partition of a topic. A poll is one small request: nothing is consumed."""

    def __init__(self, bootstrap):
        host, port = bootstrap.split(",")[0].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.corr = 0

    def _recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise OSError("devkafka closed the connection")
            buf += chunk
        return buf

    def get(self, topic, partitions):
        self.corr += 1
        client = b"pq-bench"
        t = topic.encode()
        req = struct.pack(">hhih", 2, 1, self.corr, len(client)) + client  # ListOffsets v1
        req += struct.pack(">ii", -1, 1) + struct.pack(">h", len(t)) + t
        req += struct.pack(">i", partitions)
        for p in range(partitions):
            req += struct.pack(">iq", p, -1)
        self.sock.sendall(struct.pack(">i", len(req)) + req)
        (size,) = struct.unpack(">i", self._recv(4))
        data = self._recv(size)
        corr, ntopics = struct.unpack_from(">ii", data, 0)
        if corr != self.corr:
            raise OSError("ListOffsets: correlation id %d, expected %d" % (corr, self.corr))
        off, out = 8, {}
        for _ in range(ntopics):
            (tl,) = struct.unpack_from(">h", data, off)
            off += 2 + tl
            (np_,) = struct.unpack_from(">i", data, off)
            off += 4
            for _ in range(np_):
                part, err, _ts, o = struct.unpack_from(">ihqq", data, off)
                off += 22
                if err:
                    raise OSError("ListOffsets %s[%d]: error %d" % (topic, part, err))
                out[part] = o
        if len(out) != partitions:
            raise OSError("ListOffsets %s: %d of %d partitions" % (topic, len(out), partitions))
        return out

    def total(self, topic, partitions):
        return sum(self.get(topic, partitions).values())

    def close(self):
        self.sock.close()


def kcat_end_total(bootstrap, topic, partitions):
    """The same figure through kcat -Q: a cross-check of EndOffsets after each run."""
    argv = ["kcat", "-Q", "-b", bootstrap]
    for p in range(partitions):
        argv += ["-t", "%s:%d:-1" % (topic, p)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    offs = [int(m) for m in re.findall(r"offset (-?\d+)", out.stdout)]
    return sum(offs) if len(offs) == partitions else None


# ---------------------------------------------------------------- child processes with rusage

def run_timed(argv, stdin_path=None, timeout=600):
    """Runs argv; returns (exit code, wall s, CPU s of the child, stdout text)."""
    out = tempfile.TemporaryFile()
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, lambda: p.kill())
    killer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if stdin_path:
        stdin.close()
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    return p.returncode, wall, ru.ru_utime + ru.ru_stime, text


def ab_argv(url, body_path, n, c):
    return ["ab", "-q", "-k", "-s", "30", "-n", str(n), "-c", str(c), "-p", body_path,
            "-T", "application/json", url]


def parse_ab(text):
    def num(label, default=None):
        m = re.search(r"^%s:?\s+([\d.]+)" % re.escape(label), text, re.M)
        return float(m.group(1)) if m else default

    return {"time_s": num("Time taken for tests"), "complete": int(num("Complete requests", 0)),
            "failed": int(num("Failed requests", 0)), "non2xx": int(num("Non-2xx responses", 0)),
            "keepalive": int(num("Keep-Alive requests", 0)),
            "p50_ms": num("  50%"), "p99_ms": num("  99%"), "max_ms": num(" 100%")}


# ---------------------------------------------------------------- the stack

def metric(text, name, labels=""):
    m = re.search(r"^%s%s\s+([\d.e+]+)\s*$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else 0.0


def broker_counts(st):
    _, _, raw = harness.http("GET", st.broker_url + "/metrics", timeout=10)
    text = raw.decode(errors="replace")
    return {"kafka": metric(text, "promptq_broker_jobs_accepted_total", '{durability="kafka"}'),
            "spooled": metric(text, "promptq_broker_jobs_accepted_total", '{durability="spooled"}'),
            "unavailable": metric(text, "promptq_broker_unavailable_total")}


def broker_ready(st):
    try:
        return harness.http("GET", st.broker_url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def write_inputs(d, n):
    job = {"request": {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}}
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}]}
    paths = {"job": os.path.join(d, "job.json"), "chat": os.path.join(d, "chat.json"),
             "raw": os.path.join(d, "raw.tsv")}
    with open(paths["job"], "w") as f:
        json.dump(job, f, separators=(",", ":"))
    with open(paths["chat"], "w") as f:
        json.dump(chat, f, separators=(",", ":"))
    with open(paths["raw"], "w") as f:  # what the broker produces: the envelope plus its id
        for i in range(n):
            jid = "job_BENCH%021d" % i
            env = dict(job, id=jid)
            f.write("%s\t%s\n" % (jid, json.dumps(env, separators=(",", ":"))))
    return paths


def wait_results(offs, parts, target, deadline, done_flag=None):
    """Polls the results topic's end offsets every 50 ms until target; returns (t, total)."""
    while True:
        total = offs.total(RESULTS, parts)
        now = time.monotonic()
        if total >= target and (done_flag is None or done_flag.is_set()):
            return now, total
        if now > deadline:
            return None, total
        time.sleep(0.05)


def bytes_per_partition(msgs):
    """Payload + key bytes of the fullest partition (devkafka keeps about 5 MB per partition)."""
    per = {}
    for m in msgs:
        per[m["partition"]] = per.get(m["partition"], 0) + len(m["value"] or "") + len(m["key"] or "")
    return max(per.values()) if per else 0


def one_run(idx, args, inputs):
    r = {"run": idx}
    with harness.Stack("bench-e2e-%d" % idx) as st:
        redis = st.redis()
        k = st.devkafka(brokers=1, partitions=args.partitions, extra_args=("--topic", RAW_TOPIC))
        sim = st.sim("a")
        sim.set_state({"mode": "ok", "latency_ms": 0, "failure_rate": 0})
        path, _ = st.config(extra={"broker": {"threads": 2}, "worker": {"max_inflight": 4096}})
        broker = st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: broker_ready(st), 20, "broker /readyz")
        worker = st.spawn("promptq-worker", "--config", path, name="worker")
        procs = {"broker": broker.pid, "worker": worker.pid, "devkafka": k.proc.pid,
                 "redis": redis.proc.pid, "sim": sim.proc.pid}
        offs = EndOffsets(k.bootstrap)
        parts = args.partitions
        jobs_url = st.broker_url + "/v1/jobs"

        # warm-up: the worker joins the group, connections and allocators warm up
        if args.warmup:
            rc, _, _, text = run_timed(ab_argv(jobs_url, inputs["job"], args.warmup, args.connections))
            w = parse_ab(text)
            if rc != 0 or w["complete"] != args.warmup or w["non2xx"]:
                raise RuntimeError("warm-up failed (ab rc %d): %s" % (rc, text[-800:]))
            t, total = wait_results(offs, parts, args.warmup, time.monotonic() + 120)
            if t is None:
                raise RuntimeError("warm-up: only %d of %d results in 120 s" % (total, args.warmup))
            time.sleep(1.0)

        # peers, on the same machine and in the same run, while the stack is idle
        if not args.no_peers:
            raw0 = offs.total(RAW_TOPIC, parts)
            rc, wall, cpu, text = run_timed(
                ["kcat", "-P", "-b", k.bootstrap, "-t", RAW_TOPIC, "-K", "\t",
                 "-X", "linger.ms=1", "-X", "acks=all", "-X", "enable.idempotence=true"],
                stdin_path=inputs["raw"])
            produced = offs.total(RAW_TOPIC, parts) - raw0
            if rc != 0 or produced != args.jobs:
                raise RuntimeError("kcat peer: rc %d, %d of %d produced: %s" % (rc, produced, args.jobs, text[-500:]))
            r["peer_kafka"] = {"msgs": produced, "wall_s": wall, "msgs_per_s": produced / wall, "kcat_cpu_s": cpu}

            rc, wall, cpu, text = run_timed(ab_argv(sim.api + "/chat/completions", inputs["chat"], args.jobs,
                                                    args.connections))
            a = parse_ab(text)
            if rc != 0 or a["complete"] != args.jobs or a["non2xx"]:
                raise RuntimeError("sim peer: rc %d: %s" % (rc, text[-800:]))
            r["peer_http"] = {"requests": a["complete"], "time_s": a["time_s"],
                              "req_per_s": a["complete"] / a["time_s"], "ab_cpu_s": cpu}

            payload = "x" * 1000
            rc, wall, cpu, text = run_timed(
                ["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis.port), "--dbnum", "1", "-q",
                 "-c", str(args.connections), "-n", str(args.jobs), "-r", "1000000",
                 "EVAL", REDIS_EVAL, "1", "bench:job:__rand_int__", payload])
            m = re.findall(r"([\d.]+) requests per second", text)
            if rc != 0 or not m:
                raise RuntimeError("redis peer: rc %d: %s" % (rc, text[-500:]))
            redis.cli("-n", "1", "FLUSHDB")
            r["peer_redis"] = {"ops": args.jobs, "ops_per_s": float(m[-1]), "wall_s": wall}
            time.sleep(1.0)

        # the measured run
        base = offs.total(RESULTS, parts)
        counts0 = broker_counts(st)
        cpu0 = {n: proc_cpu_s(p) for n, p in procs.items()}
        thr0 = {n: thread_cpu_s(p) for n, p in procs.items()}
        r["hwm_reset"] = all(proc_reset_hwm(p) for p in procs.values())
        busy0, load0 = system_busy_s(), loadavg()
        ab_done = threading.Event()
        ab_out = {}

        def client():
            ab_out["rc"], ab_out["wall"], ab_out["cpu"], ab_out["text"] = run_timed(
                ab_argv(jobs_url, inputs["job"], args.jobs, args.connections), timeout=args.timeout)
            ab_out["t_end"] = time.monotonic()
            ab_done.set()

        t0 = time.monotonic()
        th = threading.Thread(target=client, daemon=True)
        th.start()
        deadline = t0 + args.timeout
        at_intake_end = None
        target = base + args.jobs
        while True:
            total = offs.total(RESULTS, parts)
            now = time.monotonic()
            if ab_done.is_set() and at_intake_end is None:
                at_intake_end = total - base
                c1 = broker_counts(st)
                accepted = int(c1["kafka"] + c1["spooled"] - counts0["kafka"] - counts0["spooled"])
                target = base + accepted
            if ab_done.is_set() and total >= target:
                t_e2e = now
                break
            if now > deadline:
                raise RuntimeError("run %d: %d of %d results after %.0f s" % (idx, total - base, target - base,
                                                                              args.timeout))
            time.sleep(0.05)
        cpu1 = {n: proc_cpu_s(p) for n, p in procs.items()}
        thr1 = {n: thread_cpu_s(p) for n, p in procs.items()}
        hwm = {n: proc_hwm_kb(p) for n, p in procs.items()}
        busy1, load1 = system_busy_s(), loadavg()
        th.join(10)
        a = parse_ab(ab_out["text"])
        if ab_out["rc"] != 0 or a["complete"] != args.jobs:
            raise RuntimeError("run %d: ab rc %d: %s" % (idx, ab_out["rc"], ab_out["text"][-800:]))
        counts1 = broker_counts(st)
        accepted = int(counts1["kafka"] + counts1["spooled"] - counts0["kafka"] - counts0["spooled"])
        e2e_s = t_e2e - t0
        ours = sum(cpu1[n] - cpu0[n] for n in procs) + ab_out["cpu"]
        r.update({
            "jobs": args.jobs, "accepted": accepted,
            "kafka": int(counts1["kafka"] - counts0["kafka"]),
            "spooled": int(counts1["spooled"] - counts0["spooled"]),
            "unavailable": int(counts1["unavailable"] - counts0["unavailable"]),
            "ab_non2xx": a["non2xx"], "ab_failed": a["failed"], "ab_keepalive": a["keepalive"],
            "intake_s": a["time_s"], "intake_jobs_per_s": accepted / a["time_s"],
            "intake_p50_ms": a["p50_ms"], "intake_p99_ms": a["p99_ms"], "intake_max_ms": a["max_ms"],
            "e2e_s": e2e_s, "e2e_jobs_per_s": accepted / e2e_s,
            "results_at_intake_end": at_intake_end,
            "cpu_s": {n: cpu1[n] - cpu0[n] for n in procs}, "client_cpu_s": ab_out["cpu"],
            "busiest_thread": {n: busiest_thread(thr0[n], thr1[n]) for n in procs},
            "stack_cpu_us_per_job": ours * 1e6 / accepted if accepted else None,
            "peak_rss_mb": {n: hwm[n] / 1024.0 for n in procs},
            "machine_busy_s": busy1 - busy0, "others_cpu_s": max(0.0, busy1 - busy0 - ours),
            "cores": os.cpu_count(), "load_before": load0, "load_after": load1,
        })
        # after the window: cross-check the offsets with kcat, and count distinct result ids
        r["kcat_results_total"] = kcat_end_total(k.bootstrap, RESULTS, parts)
        r["offsets_results_total"] = offs.total(RESULTS, parts)
        msgs = st.consume_all(RESULTS, timeout=120)
        ids = set()
        ok = 0
        r["results_bytes_max_partition"] = bytes_per_partition(msgs)
        r["requests_bytes_max_partition"] = bytes_per_partition(st.consume_all("promptq.requests", timeout=120))
        for m in msgs:
            rec = json.loads(m["value"])
            ids.add(rec["id"])
            ok += rec.get("status") == "succeeded"
        r["results_read"] = len(msgs)
        r["distinct_ids"] = len(ids)
        r["succeeded_records"] = ok
        r["expected_ids"] = args.warmup + accepted
        offs.close()
    return r


# ---------------------------------------------------------------- report

def fnum(v):
    return "?" if v is None else "%.0f" % v


def fmt_run(r):
    n = r["accepted"]
    lines = []
    lines.append("run %d: %d jobs, %d accepted (kafka %d, spooled %d, 503 %d), ab keep-alive %d, "
                 "ab non-2xx %d / length-mismatch %d" % (r["run"], r["jobs"], n, r["kafka"], r["spooled"],
                                                         r["unavailable"], r["ab_keepalive"], r["ab_non2xx"],
                                                         r["ab_failed"]))
    lines.append("  intake      %8.0f jobs/s  (%.2f s, first POST to last 202; latency p50 %s ms, p99 %s ms, max %s ms)"
                 % (r["intake_jobs_per_s"], r["intake_s"], fnum(r["intake_p50_ms"]), fnum(r["intake_p99_ms"]),
                    fnum(r["intake_max_ms"])))
    lines.append("  end to end  %8.0f jobs/s  (%.2f s, to the last result on %s; %d results when intake ended)"
                 % (r["e2e_jobs_per_s"], r["e2e_s"], RESULTS, r["results_at_intake_end"] or 0))
    if "peer_kafka" in r:
        lines.append("  peer kafka  %8.0f msgs/s  (kcat -P, %d envelopes, %.2f s wall incl. start)"
                     % (r["peer_kafka"]["msgs_per_s"], r["peer_kafka"]["msgs"], r["peer_kafka"]["wall_s"]))
        lines.append("  peer http   %8.0f req/s   (ab -k -c %d -> promptq-sim chat/completions, %.2f s)"
                     % (r["peer_http"]["req_per_s"], ARGS.connections, r["peer_http"]["time_s"]))
        lines.append("  peer redis  %8.0f EVAL/s  (redis-benchmark -c %d, job_finish-sized EVAL)"
                     % (r["peer_redis"]["ops_per_s"], ARGS.connections))
    lines.append("  %-10s %8s %12s %12s   %s" % ("process", "CPU s", "CPU us/job", "peak RSS MB",
                                               "busiest thread: CPU s (% of the window)"))
    for name in ("broker", "worker", "devkafka", "redis", "sim"):
        c = r["cpu_s"][name]
        tn, tc = r["busiest_thread"][name]
        lines.append("  %-10s %8.2f %12.1f %12.1f   %s: %.2f (%.0f%%)" % (
            name, c, c * 1e6 / n, r["peak_rss_mb"][name], tn, tc, 100.0 * tc / r["e2e_s"]))
    lines.append("  %-10s %8.2f %12.1f" % ("ab client", r["client_cpu_s"], r["client_cpu_s"] * 1e6 / n))
    lines.append("  %-10s %8.2f %12.1f" % ("all above", r["stack_cpu_us_per_job"] * n / 1e6,
                                           r["stack_cpu_us_per_job"]))
    lines.append("  machine busy %.2f CPU s over %.2f s on %d cores (others: %.2f s); load %.2f -> %.2f"
                 % (r["machine_busy_s"], r["e2e_s"], r["cores"], r["others_cpu_s"], r["load_before"],
                    r["load_after"]))
    lines.append("  check: results end offsets %s (kcat -Q %s), %d read, %d distinct ids of %d expected, "
                 "%d succeeded; VmHWM reset %s" % (r["offsets_results_total"], r["kcat_results_total"],
                                                   r["results_read"], r["distinct_ids"], r["expected_ids"],
                                                   r["succeeded_records"], "yes" if r["hwm_reset"] else "NO"))
    lines.append("  fullest partition: results %.2f MB, requests %.2f MB (payload + key; devkafka keeps ~5 MB)"
                 % (r["results_bytes_max_partition"] / 1e6, r["requests_bytes_max_partition"] / 1e6))
    return "\n".join(lines)


def summary(runs):
    def row(label, vals, fmt="%.0f"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return "  %-26s %10s %10s %10s" % (label, fmt % statistics.median(vals), fmt % min(vals), fmt % max(vals))

    rows = ["summary over %d run(s): median, min, max" % len(runs),
            "  %-26s %10s %10s %10s" % ("figure", "median", "min", "max"),
            row("intake jobs/s", [r["intake_jobs_per_s"] for r in runs]),
            row("end-to-end jobs/s", [r["e2e_jobs_per_s"] for r in runs]),
            row("intake latency p50 ms", [r["intake_p50_ms"] for r in runs]),
            row("intake latency p99 ms", [r["intake_p99_ms"] for r in runs])]
    if all("peer_kafka" in r for r in runs):
        rows += [row("peer kafka msgs/s (kcat)", [r["peer_kafka"]["msgs_per_s"] for r in runs]),
                 row("peer http req/s (sim)", [r["peer_http"]["req_per_s"] for r in runs]),
                 row("peer redis EVAL/s", [r["peer_redis"]["ops_per_s"] for r in runs])]
    for name in ("broker", "worker", "devkafka", "redis", "sim"):
        rows.append(row("%s CPU s" % name, [r["cpu_s"][name] for r in runs], "%.2f"))
    rows.append(row("ab client CPU s", [r["client_cpu_s"] for r in runs], "%.2f"))
    rows.append(row("all processes CPU us/job", [r["stack_cpu_us_per_job"] for r in runs]))
    rows.append(row("worker busiest thread %", [100.0 * r["busiest_thread"]["worker"][1] / r["e2e_s"]
                                               for r in runs]))
    rows.append(row("broker busiest thread %", [100.0 * r["busiest_thread"]["broker"][1] / r["e2e_s"]
                                               for r in runs]))
    for name in ("broker", "worker", "devkafka", "redis", "sim"):
        rows.append(row("%s peak RSS MB" % name, [r["peak_rss_mb"][name] for r in runs], "%.1f"))
    rows.append(row("others' CPU s in window", [r["others_cpu_s"] for r in runs], "%.2f"))
    rows.append(row("load average (start)", [r["load_before"] for r in runs], "%.2f"))
    return "\n".join(x for x in rows if x)


def main():
    args = ARGS
    for prog in ("ab", "kcat", "redis-server", "redis-cli") + (() if args.no_peers else ("redis-benchmark",)):
        if not shutil.which(prog):
            sys.exit("%s not found (ab: apt-get install apache2-utils; kcat; redis-tools)" % prog)
    tmp = tempfile.mkdtemp(prefix="pq-bench-")
    inputs = write_inputs(tmp, args.jobs)
    runs = []
    print("promptq durable-path benchmark: %d run(s) x %d jobs, warm-up %d, %d connections, %d partitions"
          % (args.runs, args.jobs, args.warmup, args.connections, args.partitions), flush=True)
    try:
        for i in range(1, args.runs + 1):
            r = one_run(i, args, inputs)
            runs.append(r)
            print(fmt_run(r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if runs:
            print(summary(runs), flush=True)
        if args.json_out and runs:
            with open(args.json_out, "w") as f:
                json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    bad = [r["run"] for r in runs if r["distinct_ids"] < r["expected_ids"] or r["unavailable"] or r["ab_non2xx"]]
    if bad:
        print("WARNING: runs %s had refused or missing jobs" % bad, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
