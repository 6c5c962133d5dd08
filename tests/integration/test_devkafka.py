"""promptq-devkafka: librdkafka's mock cluster on loopback, its flags, control lines and signals.

Real kcat clients talk to a real promptq-devkafka process over 127.0.0.1.
"""

import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import T, wait_for  # noqa: E402

STD_TOPICS = ["promptq.requests", "promptq.bulk", "promptq.results", "promptq.dlq"]


def kcat_produce(bootstrap, topic, lines, *extra):
    """Runs kcat -P; returns (exit code, stderr)."""
    argv = ["kcat", "-P", "-b", bootstrap, "-t", topic] + list(extra)
    out = subprocess.run(argv, input=("\n".join(lines) + "\n").encode(), capture_output=True,
                         timeout=T(60))
    return out.returncode, out.stderr.decode(errors="replace")


def kcat_all(bootstrap, topic):
    """Every message of topic as a list of payload strings (reads to the end)."""
    out = subprocess.run(["kcat", "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e",
                          "-q", "-J", "-X", "fetch.wait.max.ms=5"],
                         capture_output=True, timeout=T(60))
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return [json.loads(l)["payload"] for l in out.stdout.decode().splitlines() if l.strip()]


def metadata(bootstrap, topic=None):
    argv = ["kcat", "-L", "-J", "-b", bootstrap]
    if topic:
        argv += ["-t", topic]
    out = subprocess.run(argv, capture_output=True, timeout=T(30))
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return json.loads(out.stdout)


def topic_partitions(md, name):
    for t in md["topics"]:
        if t["topic"] == name:
            return t["partitions"]
    raise AssertionError("topic %s not in metadata: %s" % (name, [t["topic"] for t in md["topics"]]))


def test_produce_consume_and_bootstrap_file():
    with harness.Stack("devkafka_basic") as st:
        k = st.devkafka()
        first = k.proc.wait_line(lambda l: True, T(5))
        assert first == "bootstrap=" + k.bootstrap, (first, k.bootstrap)
        assert k.bootstrap.startswith("127.0.0.1:"), k.bootstrap
        with open(k.bootstrap_file) as f:
            assert f.read() == k.bootstrap + "\n"

        values = ["message-%03d" % i for i in range(100)]
        st.produce("promptq.requests", values)
        msgs = st.consume("promptq.requests", 100, timeout=T(30))
        assert len(msgs) == 100, len(msgs)
        assert sorted(m["value"] for m in msgs) == values
        # Default --partitions 4: the messages spread over the 4 partitions of the topic.
        md = metadata(k.bootstrap)
        for name in STD_TOPICS:
            assert len(topic_partitions(md, name)) == 4, name


def test_down_up_all_brokers():
    with harness.Stack("devkafka_downup") as st:
        k = st.devkafka()
        rc, err = kcat_produce(k.bootstrap, "promptq.requests", ["before"])
        assert rc == 0, err

        assert k.control("down -1") == "ok down -1"
        t0 = time.monotonic()
        rc, err = kcat_produce(k.bootstrap, "promptq.requests", ["while-down"],
                               "-X", "message.timeout.ms=3000")
        assert rc != 0, "produce succeeded although every broker is down: " + err
        assert time.monotonic() - t0 < T(20)

        assert k.control("up -1") == "ok up -1"
        rc, err = kcat_produce(k.bootstrap, "promptq.requests", ["after"])
        assert rc == 0, err
        assert sorted(kcat_all(k.bootstrap, "promptq.requests")) == ["after", "before"]


def test_control_lines():
    with harness.Stack("devkafka_control") as st:
        k = st.devkafka()
        assert k.control("ping") == "ok pong"
        assert k.control("frobnicate 1").startswith("error: unknown command")
        assert k.control("down 2").startswith("error:")  # one broker only
        assert k.control("down").startswith("error:")
        assert k.control("rtt 1 abc").startswith("error:")
        assert k.control("rtt 1 0") == "ok rtt 1 0"
        assert k.control("x" * 5000).startswith("error:")  # over-long line: answered, no crash
        assert k.control("topic promptq.retry.extra 3") == "ok topic promptq.retry.extra 3"
        assert k.control("topic bad/name").startswith("error:")

        # err: the next Produce requests fail with TOPIC_AUTHORIZATION_FAILED (29), a
        # permanent error, until cleared.
        assert k.control("err 0 1000 29") == "ok err 0 1000 29"
        rc, err = kcat_produce(k.bootstrap, "promptq.bulk", ["refused"],
                               "-X", "message.timeout.ms=3000")
        assert rc != 0, err
        assert k.control("clear 0") == "ok clear 0"
        rc, err = kcat_produce(k.bootstrap, "promptq.bulk", ["accepted"])
        assert rc == 0, err
        assert kcat_all(k.bootstrap, "promptq.bulk") == ["accepted"]

        md = metadata(k.bootstrap)
        assert len(topic_partitions(md, "promptq.retry.extra")) == 3
        assert k.proc.alive()


def test_stdin_eof_keeps_serving_and_sigterm_exits_zero():
    with harness.Stack("devkafka_eof") as st:
        bfile = os.path.join(st.dir, "bootstrap-eof")
        # Not through st.devkafka(): stdin is /dev/null here, so it sees EOF at once.
        p = st.spawn("promptq-devkafka", "--bootstrap-file", bfile, name="devkafka-eof",
                     line_reader=True)
        line = p.wait_line(lambda l: l.startswith("bootstrap="), T(20))
        wait_for(lambda: os.path.exists(bfile), T(10), "bootstrap file")
        with open(bfile) as f:
            bootstrap = f.read()
        assert bootstrap == line[len("bootstrap="):] + "\n", (bootstrap, line)
        bootstrap = bootstrap.strip()

        time.sleep(2)
        assert p.alive(), "exited after end of stdin: " + p.tail()
        rc, err = kcat_produce(bootstrap, "promptq.results", ["still-here"])
        assert rc == 0, err
        assert kcat_all(bootstrap, "promptq.results") == ["still-here"]

        t0 = time.monotonic()
        p.kill(signal.SIGTERM)
        assert p.wait(T(3)) == 0
        assert time.monotonic() - t0 < T(3)


def test_sigterm_while_reading_stdin():
    with harness.Stack("devkafka_sigterm") as st:
        k = st.devkafka()
        assert k.control("ping") == "ok pong"  # blocked waiting for the next control line
        t0 = time.monotonic()
        k.proc.kill(signal.SIGTERM)
        assert k.proc.wait(T(3)) == 0
        assert time.monotonic() - t0 < T(3)


def test_three_brokers_two_partitions():
    with harness.Stack("devkafka_three") as st:
        k = st.devkafka(brokers=3, partitions=2, extra_args=["--topic", "promptq.extra"])
        assert len(k.bootstrap.split(",")) == 3, k.bootstrap
        md = metadata(k.bootstrap)
        assert sorted(b["id"] for b in md["brokers"]) == [1, 2, 3], md["brokers"]
        for name in STD_TOPICS + ["promptq.extra"]:
            parts = topic_partitions(md, name)
            assert len(parts) == 2, (name, parts)
            for part in parts:
                assert len(part["replicas"]) == 3, (name, part)
        # A topic a client auto-creates (Metadata for an unknown topic) also gets 2.
        md = metadata(k.bootstrap, "promptq.retry.auto")
        assert len(topic_partitions(md, "promptq.retry.auto")) == 2

        # Broker 2 down: the cluster still answers through the others; then back up.
        assert k.control("down 2") == "ok down 2"
        assert k.control("up 2") == "ok up 2"
        values = ["m%d" % i for i in range(20)]
        st.produce("promptq.requests", values)
        assert sorted(m["value"] for m in st.consume("promptq.requests", 20)) == sorted(values)


def test_bad_flags():
    exe = harness.binary("promptq-devkafka")
    out = subprocess.run([exe, "--no-such-flag"], capture_output=True, timeout=T(10))
    assert out.returncode != 0
    assert b"--no-such-flag" in out.stderr
    out = subprocess.run([exe, "--brokers", "0"], capture_output=True, timeout=T(10))
    assert out.returncode != 0
    out = subprocess.run([exe, "--help"], capture_output=True, timeout=T(10))
    assert out.returncode == 0 and b"--partitions" in out.stdout


harness.run(globals())
