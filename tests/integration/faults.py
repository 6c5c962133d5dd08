"""Shared pieces of the fault suite (test_fault_*.py).

Every scenario counts, from what clients were told and what promptq.results holds:
  acknowledged  ids the broker answered 202 for (or that we produced straight to Kafka)
  terminal      acknowledged ids with at least one result on promptq.results
  lost          acknowledged ids with no result at all (must be 0)
  differing     ids whose results disagree on the outcome: status and answer content, or error
                type (must be 0; an id may appear more than once, re-published verbatim)
Sizes: CI runs the short variant (>= 1,000 jobs, outages >= 15 s); PQ_FAULT_FULL=1 runs the
full one (5,000 jobs, 60 s outages). Each scenario appends its figures to
PQ_LOG_DIR/faults-summary.jsonl, from which RELIABILITY.md is written.
"""

import collections
import json
import os
import threading
import time

import harness
from harness import T, wait_for

FULL = os.environ.get("PQ_FAULT_FULL") == "1"
JOBS = 5000 if FULL else 1000
OUTAGE_S = 60 if FULL else 15
ROUTE = "sim-model"
RETRY_TOPIC = "promptq.retry." + ROUTE


def stack(st, sims=("primary", "backup"), redis_persist=True, worker=None, provider=None,
          sim_state=None):
    """redis + devkafka + sims + a config whose route walks the sims in order."""
    r = st.redis(persist=redis_persist)
    st.devkafka(brokers=1, partitions=4)
    ss = [st.sim(n) for n in sims]
    for s in ss:
        s.set_state(sim_state or {"mode": "ok", "latency_ms": 20})
    prov = {"type": "openai", "retries_per_target": 1, "retry_base_ms": 50,
            "retry_max_ms": 500, "timeout_ms": 3000, "circuit_cooldown_ms": 1000,
            "probe_interval_ms": 1000}
    if provider:
        prov.update(provider)
    providers = {}
    for s in ss:
        providers[s.name] = dict(prov, base_url=s.api)
    extra = {"worker": {"lease_ms": 3000, "max_inflight": 512}}
    if worker:
        harness._merge(extra, {"worker": worker})
    path, _ = st.config(providers=providers,
                        routes={ROUTE: [{"provider": s.name, "model": "m-" + s.name}
                                        for s in ss]},
                        extra=extra)
    return r, ss, path


def start_broker(st, path, name="broker"):
    b = st.spawn("promptq-broker", "--config", path, name=name)
    wait_for(lambda: _ready(st.broker_url), T(20), "broker /readyz")
    return b


def _ready(url):
    try:
        return harness.http("GET", url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def set_all(sims, state):
    for s in sims:
        s.set_state(state)


def body(prompt):
    return {"request": {"model": ROUTE, "messages": [{"role": "user", "content": prompt}]}}


class Tally:
    def __init__(self, scenario):
        self.scenario = scenario
        self.acked = []
        self.prompt = {}
        self.refused = 0
        self.durability = collections.Counter()
        self.t0 = time.monotonic()
        self._n = 0
        self._lock = threading.Lock()

    def submit(self, st, n, concurrency=16):
        """Submits n new prompts over HTTP; returns how many were acknowledged."""
        with self._lock:
            start = self._n
            self._n += n
        prompts = ["%s prompt %d" % (self.scenario, i) for i in range(start, start + n)]
        answers = harness.post_many(st.broker_url + "/v1/jobs", [body(p) for p in prompts],
                                    concurrency)
        ok = 0
        with self._lock:
            for p, (code, _, doc) in zip(prompts, answers):
                if code == 202:
                    self.acked.append(doc["id"])
                    self.prompt[doc["id"]] = p
                    self.durability[doc.get("durability")] += 1
                    ok += 1
                else:
                    self.refused += 1
        return ok

    def submit_over(self, st, n, seconds, batches=10):
        """Spreads n submissions over about `seconds`."""
        per = max(1, n // batches)
        left = n
        for i in range(batches):
            t = time.monotonic()
            k = per if i < batches - 1 else left
            self.submit(st, k)
            left -= k
            time.sleep(max(0.0, seconds / batches - (time.monotonic() - t)))

    def results(self, st):
        by_id = collections.defaultdict(list)
        for m in st.consume_all("promptq.results"):
            rec = json.loads(m["value"])
            by_id[rec["id"]].append(rec)
        return by_id

    def settle(self, st, timeout):
        """Waits until every acknowledged id has a result; returns the figures (asserts none
        lost, none differing, every prompt answered by its own content)."""
        want = set(self.acked)
        holder = {}

        def done():
            holder["by_id"] = self.results(st)
            return want <= set(holder["by_id"])

        try:
            wait_for(done, timeout, "results for %d acknowledged jobs" % len(want), interval=1.0)
        except AssertionError:
            pass
        by_id = holder["by_id"]
        lost = sorted(want - set(by_id))
        differing = [i for i in want & set(by_id) if len({outcome(r) for r in by_id[i]}) > 1]
        statuses = collections.Counter(by_id[i][0]["status"] for i in want if i in by_id)
        wrong = [i for i in want if i in by_id and by_id[i][0]["status"] == "succeeded"
                 and content(by_id[i][0]) != "echo: " + self.prompt[i]]
        fig = {"scenario": self.scenario, "full": FULL, "acknowledged": len(want),
               "refused": self.refused, "terminal": len(want) - len(lost), "lost": len(lost),
               "differing_duplicates": len(differing),
               "republished": sum(len(by_id[i]) - 1 for i in want if i in by_id),
               "statuses": dict(statuses), "durability": dict(self.durability),
               "seconds": round(time.monotonic() - self.t0, 1)}
        print("FIGURES " + json.dumps(fig, sort_keys=True), flush=True)
        _record(fig)
        assert not lost, "lost %d acknowledged jobs, e.g. %s" % (len(lost), lost[:5])
        assert not differing, "%d ids with differing outcomes, e.g. %s" % (len(differing),
                                                                          differing[:5])
        assert not wrong, "%d answers for the wrong prompt, e.g. %s" % (len(wrong), wrong[:5])
        return fig, by_id


def content(rec):
    try:
        return rec["response"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None


def outcome(rec):
    if rec["status"] == "succeeded":
        return ("succeeded", content(rec))
    return (rec["status"], (rec.get("error") or {}).get("type"))


def _record(fig):
    d = os.environ.get("PQ_LOG_DIR", os.path.join(harness.ROOT, "build", "test-logs"))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "faults-summary.jsonl"), "a") as f:
        f.write(json.dumps(fig, sort_keys=True) + "\n")


def leased(r):
    """Jobs leased by a worker and not terminal right now."""
    return len([k for k in r.cli("--scan", "--pattern", "promptq:lease:*").splitlines() if k])
