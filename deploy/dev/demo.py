#!/usr/bin/env python3
"""promptq demo on the embedded stack: a batch of prompts through a provider outage.

Starts promptq-devkafka, redis-server, two promptq-sim providers, promptq-broker and
promptq-worker on loopback; submits prompts over HTTP; takes the primary provider down in the
middle of the batch; brings it back; prints what happened to every acknowledged job.
"""

import argparse
import collections
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("PQ_LOG_DIR", os.path.join(ROOT, "build", "demo-logs"))

import harness  # noqa: E402
from harness import wait_for  # noqa: E402


def say(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def job(i):
    return {"request": {"model": "gpt-demo",
                        "messages": [{"role": "user", "content": "demo prompt %d" % i}]},
            "metadata": {"n": i}}


def results(st):
    by_id = {}
    for m in st.consume_all("promptq.results"):
        rec = json.loads(m["value"])
        by_id[rec["id"]] = rec
    return by_id


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=400, help="prompts to submit (default 400)")
    ap.add_argument("--outage", type=float, default=10.0, help="seconds the primary is down")
    args = ap.parse_args()
    half = args.jobs // 2

    with harness.Stack("demo") as st:
        say("starting redis-server, promptq-devkafka and two simulated providers")
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        primary = st.sim("primary")
        backup = st.sim("backup")
        for s in (primary, backup):
            s.set_state({"mode": "ok", "latency_ms": 50})
        path, _ = st.config(
            providers={"primary": {"type": "openai", "base_url": primary.api,
                                   "retries_per_target": 1, "retry_base_ms": 100,
                                   "circuit_cooldown_ms": 1000},
                       "backup": {"type": "openai", "base_url": backup.api}},
            routes={"gpt-demo": [{"provider": "primary", "model": "sim-large"},
                                 {"provider": "backup", "model": "sim-small"}]})
        say("starting promptq-broker on %s and promptq-worker" % st.broker_url)
        st.spawn("promptq-broker", "--config", path, name="broker")
        st.spawn("promptq-worker", "--config", path, name="worker")
        wait_for(lambda: harness.http("GET", st.broker_url + "/readyz", timeout=1)[0] == 200
                 if _up(st.broker_url) else False, 30, "broker ready")

        t0 = time.monotonic()
        say("submitting %d prompts to POST /v1/jobs" % half)
        acked = _submit(st, range(half))
        say("acknowledged %d (each 202 only after Kafka confirmed it)" % len(acked))
        wait_for(lambda: len(set(acked) & set(results(st))) >= half // 2, 60, "first results")

        say("PROVIDER OUTAGE: primary goes down (connections refused)")
        primary.set_state({"mode": "down"})
        acked += _submit(st, range(half, args.jobs))
        say("acknowledged %d more while the primary is down" % (len(acked) - half))
        end = time.monotonic() + args.outage
        while time.monotonic() < end:
            done = results(st)
            n = len(set(acked) & set(done))
            by = collections.Counter(r.get("provider") for r in done.values())
            say("  outage: %d/%d finished, by provider %s" % (n, len(acked), dict(by)))
            time.sleep(2)
        say("primary is back")
        primary.set_state({"mode": "ok", "latency_ms": 50})

        def all_done():
            return len(set(acked) - set(results(st))) == 0
        last = 0
        while not all_done():
            n = len(set(acked) & set(results(st)))
            if n != last:
                say("  recovering: %d/%d finished" % (n, len(acked)))
                last = n
            if time.monotonic() - t0 > 300:
                break
            time.sleep(1)

        done = results(st)
        lost = set(acked) - set(done)
        statuses = collections.Counter(done[i]["status"] for i in acked if i in done)
        by = collections.Counter(done[i]["provider"] for i in acked if i in done)
        say("SUMMARY: acknowledged %d, %s, lost %d, answered by %s, %.1fs" % (
            len(acked), dict(statuses), len(lost), dict(by), time.monotonic() - t0))
        say("process logs: %s" % st.log_dir)
        return 0 if not lost and statuses.get("succeeded") == len(acked) else 1


def _up(url):
    try:
        harness.http("GET", url + "/healthz", timeout=1)
        return True
    except OSError:
        return False


def _submit(st, rng):
    answers = harness.post_many(st.broker_url + "/v1/jobs", [job(i) for i in rng], 16)
    ids = [a[2]["id"] for a in answers if a[0] == 202]
    refused = len(answers) - len(ids)
    if refused:
        say("  %d submissions were refused (not acknowledged, so not promised)" % refused)
    return ids


if __name__ == "__main__":
    sys.exit(main())
