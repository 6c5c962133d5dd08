"""The harness itself: real redis-server on a random port, cleanup even when a test fails."""

import os
import signal

import harness
from harness import T, wait_for


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_redis_on_random_port():
    with harness.Stack("harness-redis") as st:
        r = st.redis()
        assert r.port != 6379
        assert r.cli("SET", "k", "v") == "OK"
        assert r.cli("GET", "k") == "v"
        r.restart()
        assert r.cli("GET", "k") == "", "a restarted redis keeps no data"


def test_processes_stop_when_a_test_fails():
    pids = []
    try:
        with harness.Stack("harness-cleanup") as st:
            r = st.redis()
            pids.append(r.proc.pid)
            raise RuntimeError("deliberate failure")
    except RuntimeError:
        pass
    assert pids and not pid_alive(pids[0]), "redis-server still running after the stack exited"


def test_wait_for_times_out():
    try:
        wait_for(lambda: False, 0.2, "nothing")
    except AssertionError as e:
        assert "nothing" in str(e)
    else:
        raise AssertionError("wait_for did not time out")


def test_spawned_process_gets_sigterm():
    with harness.Stack("harness-spawn") as st:
        p = st.spawn("sleep", "30", name="sleeper")
        assert p.alive()
        assert p.stop(T(5)) == -signal.SIGTERM


harness.run(globals())
