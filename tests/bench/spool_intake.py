#!/usr/bin/env python3
"""Broker intake with Kafka down (every job spooled: fsync'd to the broker's local spool) next to
Kafka up (every job confirmed by Kafka), measured in the same stack and session.

    python3 tests/bench/spool_intake.py [--bin-dir build/bin] [--runs 3] [--jobs 20000]

Load client: ab -k -c 64 (apache2-utils, installed when missing), one 150-byte job body. For each
mode prints req/s, p50/p99 latency, and with Kafka down the records per fsync (group commit)
from the broker's metrics. Loopback only; every wait is bounded.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))


def metric(harness, st, name, labels=""):
    _, _, raw = harness.http("GET", st.broker_url + "/metrics")
    want = name + ("{" + labels + "}" if labels else "")
    for line in raw.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def ab(st, body_path, n, c):
    out = subprocess.run(["ab", "-q", "-k", "-s", "30", "-n", str(n), "-c", str(c),
                          "-p", body_path, "-T", "application/json", st.broker_url + "/v1/jobs"],
                         capture_output=True, text=True, timeout=300).stdout
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return {"rps": float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "failed": int(re.search(r"Failed requests:\s+(\d+)", out).group(1)),
            "p50_ms": int(re.search(r"\n\s+50%\s+(\d+)", out).group(1)),
            "p99_ms": int(re.search(r"\n\s+99%\s+(\d+)", out).group(1))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", default=os.path.join(HERE, "..", "..", "build", "bin"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    os.environ["PQ_BIN_DIR"] = os.path.abspath(args.bin_dir)
    if not shutil.which("ab"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "apache2-utils"], check=True)
    import harness
    from harness import wait_for

    tmp = tempfile.mkdtemp(prefix="pq-bench-spool-")
    body_path = os.path.join(tmp, "body.json")
    with open(body_path, "w") as f:
        json.dump({"request": {"model": "sim-model", "messages": [
            {"role": "user", "content": "Summarise the spool design in one line."}]}}, f)

    def kafka_state(st):
        try:
            return harness.http_json("GET", st.broker_url + "/readyz", timeout=2)[2].get("kafka")
        except (OSError, AttributeError):
            return None

    figures = {"up": [], "down": []}
    with harness.Stack("bench-spool") as st:
        st.redis()
        k = st.devkafka(partitions=8)
        st.sim("a")
        path, _ = st.config(extra={"log": {"level": "warn"}})
        st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: kafka_state(st) == "up", 30, "broker ready, Kafka up")
        ab(st, body_path, 2000, args.connections)  # warm-up
        for i in range(args.runs):
            for mode in ("up", "down"):
                k.control("down -1" if mode == "down" else "up -1")
                wait_for(lambda: kafka_state(st) == mode, 30, "broker sees Kafka " + mode)
                c0 = metric(harness, st, "promptq_broker_spool_committed_total")
                f0 = metric(harness, st, "promptq_broker_spool_fsyncs_total")
                r = ab(st, body_path, args.jobs, args.connections)
                c1 = metric(harness, st, "promptq_broker_spool_committed_total")
                f1 = metric(harness, st, "promptq_broker_spool_fsyncs_total")
                r["records_per_fsync"] = round((c1 - c0) / (f1 - f0), 1) if f1 > f0 else None
                r["load"] = os.getloadavg()[0]
                figures[mode].append(r)
                print("run %d kafka %-4s %s" % (i + 1, mode, json.dumps(r)), flush=True)
            # Kafka back: let the drainer empty the spool before the next pair of runs.
            k.control("up -1")
            wait_for(lambda: metric(harness, st, "promptq_broker_spool_pending_records") == 0,
                     120, "spool drained", interval=0.5)
    shutil.rmtree(tmp, ignore_errors=True)
    for mode in ("up", "down"):
        rps = [r["rps"] for r in figures[mode]]
        print("kafka %-4s median %.0f req/s [%.0f-%.0f]" % (mode, statistics.median(rps),
                                                          min(rps), max(rps)))
    per = [r["records_per_fsync"] for r in figures["down"] if r["records_per_fsync"]]
    if per:
        print("records per fsync (kafka down): median %.1f" % statistics.median(per))


if __name__ == "__main__":
    main()
