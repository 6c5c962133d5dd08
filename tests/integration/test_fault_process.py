"""Fault suite, process failures: (c) the worker killed with SIGKILL three times; (f) a second
worker joining and the first leaving mid-run. See faults.py for what is counted."""

import signal
import threading

import faults
import harness
from faults import JOBS
from harness import T, wait_for


def test_c_worker_sigkill_three_times():
    with harness.Stack("fault-kill") as st:
        r, sims, path = faults.stack(st, sim_state={"mode": "ok", "latency_ms": 1000},
                                     worker={"max_inflight": 300})
        faults.start_broker(st, path)
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        tally = faults.Tally("c-worker-sigkill")
        feeder = threading.Thread(target=tally.submit_over, args=(st, JOBS, 10), daemon=True)
        feeder.start()
        for n in range(3):
            got = wait_for(lambda: (lambda c: c if c >= 100 else 0)(faults.leased(r)), T(90),
                           "100 leased jobs before kill %d" % (n + 1), interval=0.1)
            w.kill(signal.SIGKILL)
            w.wait(T(10))
            print("kill %d with %d jobs leased" % (n + 1, got), flush=True)
            w.start()
        feeder.join()
        fig, _ = tally.settle(st, T(300))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


def test_f_worker_joins_and_one_leaves():
    with harness.Stack("fault-membership") as st:
        r, sims, path = faults.stack(st, sim_state={"mode": "ok", "latency_ms": 200},
                                     worker={"max_inflight": 200})
        faults.start_broker(st, path)
        w1 = st.spawn("promptq-worker", "--config", path, name="worker1")
        tally = faults.Tally("f-join-leave")
        feeder = threading.Thread(target=tally.submit_over, args=(st, JOBS, 12), daemon=True)
        feeder.start()
        wait_for(lambda: faults.leased(r) > 20, T(30), "work in progress")
        st.spawn("promptq-worker", "--config", path, name="worker2")
        wait_for(lambda: len(tally.acked) > JOBS // 2, T(60), "half the jobs submitted")
        assert w1.stop(T(30)) == 0, "worker1 did not leave cleanly"
        feeder.join()
        fig, _ = tally.settle(st, T(300))
        assert fig["statuses"] == {"succeeded": len(tally.acked)}, fig["statuses"]


harness.run(globals())
