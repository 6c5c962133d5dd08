#!/usr/bin/env python3
"""promptq demo on the embedded stack: a batch of prompts through a provider outage.

Starts promptq-devkafka, redis-server, two promptq-sim providers, promptq-broker and
promptq-worker on loopback and submits prompts over HTTP in four acts: all providers up; the
primary down (jobs fail over to the backup); every provider down (jobs park on the route's
retry topic); providers back (parked jobs replay). Prints what happened to every acknowledged
job and exits non-zero if any was lost or did not succeed.
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
    ap.add_argument("--outage", type=float, default=15.0,
                    help="seconds every provider is down (default 15)")
    args = ap.parse_args()

    with harness.Stack("demo") as st:
        say("starting redis-server, promptq-devkafka and two simulated providers")
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        primary = st.sim("primary")
        backup = st.sim("backup")
        for s in (primary, backup):
            s.set_state({"mode": "ok", "latency_ms": 50})
        fast = {"type": "openai", "retries_per_target": 1, "retry_base_ms": 100,
                "circuit_cooldown_ms": 1000, "probe_interval_ms": 1000}
        path, _ = st.config(
            providers={"primary": dict(fast, base_url=primary.api),
                       "backup": dict(fast, base_url=backup.api)},
            routes={"gpt-demo": [{"provider": "primary", "model": "sim-large"},
                                 {"provider": "backup", "model": "sim-small"}]})
        say("starting promptq-broker on %s and promptq-worker" % st.broker_url)
        st.spawn("promptq-broker", "--config", path, name="broker")
        st.spawn("promptq-worker", "--config", path, name="worker")
        wait_for(lambda: harness.http("GET", st.broker_url + "/readyz", timeout=1)[0] == 200
                 if _up(st.broker_url) else False, 30, "broker ready")

        t0 = time.monotonic()
        n1 = args.jobs * 3 // 8
        n2 = args.jobs * 3 // 8
        n3 = args.jobs - n1 - n2
        say("1) all providers up: submitting %d prompts to POST /v1/jobs" % n1)
        acked = _submit(st, range(n1))
        say("   acknowledged %d (each 202 only after Kafka confirmed it)" % len(acked))
        _progress(st, acked, 60, "   ")

        say("2) PRIMARY DOWN (connections refused): submitting %d more" % n2)
        primary.set_state({"mode": "down"})
        acked += _submit(st, range(n1, n1 + n2))
        _progress(st, acked, 60, "   failover: ")

        say("3) EVERY PROVIDER DOWN for %.0fs: submitting %d more" % (args.outage, n3))
        backup.set_state({"mode": "down"})
        outage_ids = _submit(st, range(n1 + n2, args.jobs))
        acked += outage_ids
        end = time.monotonic() + args.outage
        while time.monotonic() < end:
            parked = outage_ids_on(st, "promptq.retry.gpt-demo", outage_ids)
            say("   outage: %d/%d parked on promptq.retry.gpt-demo, %d/%d finished" % (
                parked, len(outage_ids), len(set(acked) & set(results(st))), len(acked)))
            time.sleep(2)

        say("4) providers are back: parked jobs replay (ramped)")
        primary.set_state({"mode": "ok", "latency_ms": 50})
        backup.set_state({"mode": "ok", "latency_ms": 50})
        _progress(st, acked, 300, "   replay: ")

        done = results(st)
        lost = set(acked) - set(done)
        statuses = collections.Counter(done[i]["status"] for i in acked if i in done)
        by = collections.Counter(done[i]["provider"] for i in acked if i in done)
        say("SUMMARY: acknowledged %d, %s, lost %d, answered by %s, %.1fs" % (
            len(acked), dict(statuses), len(lost), dict(by), time.monotonic() - t0))
        say("process logs: %s" % st.log_dir)
        return 0 if not lost and statuses.get("succeeded") == len(acked) else 1


def outage_ids_on(st, topic, ids):
    on = {json.loads(m["value"]).get("id") for m in st.consume_all(topic)}
    return len(on & set(ids))


def _progress(st, acked, timeout, prefix):
    """Prints progress until every acknowledged job has a result (or timeout)."""
    end = time.monotonic() + timeout
    last = None
    while True:
        done = results(st)
        mine = [done[i] for i in acked if i in done]
        by = dict(collections.Counter(r.get("provider") for r in mine))
        line = "%s%d/%d finished, answered by %s" % (prefix, len(mine), len(acked), by)
        if line != last:
            say(line)
            last = line
        if len(mine) == len(acked) or time.monotonic() > end:
            return
        time.sleep(1)


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
