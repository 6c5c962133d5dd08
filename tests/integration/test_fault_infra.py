"""Fault suite, infrastructure: (d) every devkafka broker down during intake (jobs spooled by
the broker, drained when Kafka is back); (e) Redis killed and restarted mid-run. See faults.py
for what is counted."""

import threading
import time

import faults
import harness
from faults import JOBS, OUTAGE_S
from harness import T, wait_for


def test_d_kafka_down_during_intake():
    with harness.Stack("fault-kafka") as st:
        r, sims, path = faults.stack(st)
        faults.start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker")
        tally = faults.Tally("d-kafka-down")
        tally.submit(st, JOBS // 4)
        st.kafka_.control("down -1")
        tally.submit_over(st, JOBS // 2, OUTAGE_S)
        spooled = tally.durability.get("spooled", 0)
        st.kafka_.control("up -1")
        tally.submit(st, JOBS - JOBS // 4 - JOBS // 2)
        assert tally.refused == 0, "%d jobs refused while the spool had room" % tally.refused
        assert spooled >= JOBS // 2, "only %d of %d outage jobs spooled" % (spooled, JOBS // 2)
        fig, _ = tally.settle(st, T(240))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


def test_e_redis_killed_and_restarted():
    with harness.Stack("fault-redis") as st:
        r, sims, path = faults.stack(st, sim_state={"mode": "ok", "latency_ms": 300})
        faults.start_broker(st, path)
        st.spawn("promptq-worker", "--config", path, name="worker")
        tally = faults.Tally("e-redis-restart")
        feeder = threading.Thread(target=tally.submit_over, args=(st, JOBS, OUTAGE_S),
                                  daemon=True)
        feeder.start()
        wait_for(lambda: faults.leased(r) > 20, T(30), "work in progress")
        r.kill()
        time.sleep(5)
        r.restart()
        feeder.join()
        fig, _ = tally.settle(st, T(240))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


harness.run(globals())
