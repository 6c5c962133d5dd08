"""Fault suite, provider outages: (a) every provider down while jobs arrive, the worker killed
mid-outage, then back; (b) providers flapping. See faults.py for what is counted."""

import json
import signal
import threading
import time

import faults
import harness
from faults import JOBS, OUTAGE_S, RETRY_TOPIC
from harness import T, wait_for


def test_a_total_outage_parks_and_replays():
    with harness.Stack("fault-outage") as st:
        r, sims, path = faults.stack(st)
        faults.start_broker(st, path)
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        tally = faults.Tally("a-total-outage")
        tally.submit(st, 50)
        wait_for(lambda: set(tally.acked) <= set(tally.results(st)), T(60), "warm-up jobs")

        faults.set_all(sims, {"mode": "down"})
        t_down = time.monotonic()
        half = JOBS // 2
        tally.submit_over(st, half, OUTAGE_S / 3)
        w.kill(signal.SIGKILL)  # mid-outage, with parked and in-flight jobs
        w.wait(T(10))
        w.start()
        tally.submit_over(st, JOBS - half, OUTAGE_S / 3)

        # Every job acknowledged during the outage is parked: on the retry topic, record parked.
        outage_ids = set(tally.acked[50:])

        def parked():
            on_topic = {json.loads(m["value"]).get("id") for m in st.consume_all(RETRY_TOPIC)}
            return outage_ids <= on_topic

        wait_for(parked, T(OUTAGE_S + 60), "every outage job on %s" % RETRY_TOPIC, interval=1.0)
        sample = sorted(outage_ids)[:20]
        statuses = {r.cli("HGET", "promptq:job:default:" + i, "status") for i in sample}
        assert statuses == {"parked"}, statuses
        assert all(s.stats()["requests"] < 5 * len(outage_ids) for s in sims)

        left = OUTAGE_S - (time.monotonic() - t_down)
        if left > 0:
            time.sleep(left)
        faults.set_all(sims, {"mode": "ok", "latency_ms": 20})
        fig, by_id = tally.settle(st, T(240))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


def test_b_flapping_providers():
    with harness.Stack("fault-flap") as st:
        r, sims, path = faults.stack(st)
        faults.start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker")
        tally = faults.Tally("b-flapping")
        stop = threading.Event()

        def flap():
            up = False
            while not stop.is_set():
                faults.set_all(sims, {"mode": "ok", "latency_ms": 20} if up else {"mode": "down"})
                up = not up
                stop.wait(2.0)
            faults.set_all(sims, {"mode": "ok", "latency_ms": 20})

        t = threading.Thread(target=flap, daemon=True)
        t.start()
        try:
            tally.submit_over(st, JOBS, OUTAGE_S)
        finally:
            stop.set()
            t.join(10)
        fig, _ = tally.settle(st, T(240))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


harness.run(globals())
