"""log.json: every line the programs write is one JSON object (docs/operations.md, "Logs"):
{"ts", "level", "prog", "pid", "at", "msg"}, also librdkafka's own lines, also lines about
bad input with invalid UTF-8 in it. A broker and a worker on one stack go through jobs that
succeed and fail, an envelope with invalid bytes produced straight into Kafka, a Kafka
outage (librdkafka logs the lost connections), then a graceful stop."""

import json
import re
import time

import harness
from harness import T, wait_for

ROUTE = "sim-model"
LEVELS = {"debug", "info", "warn", "error"}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def check_log(proc, prog):
    """Every line of proc's log (but the harness's own "=== start" lines) is a log object."""
    lines = 0
    with open(proc.log_path, "rb") as f:
        for raw in f:
            if raw.startswith(b"=== start "):
                continue
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise AssertionError("%s: not a JSON line (%s): %r" % (proc.name, e, raw[:300]))
            assert isinstance(doc, dict), raw
            assert set(doc) == {"ts", "level", "prog", "pid", "at", "msg"}, doc
            assert TS.match(doc["ts"]) and doc["level"] in LEVELS, doc
            assert doc["prog"] == prog and doc["pid"] == proc.pid, doc
            assert isinstance(doc["msg"], str) and isinstance(doc["at"], str), doc
            lines += 1
    return lines


def test_json_logs_are_one_object_per_line():
    with harness.Stack("json-logs") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=2)
        s = st.sim("a")
        path, _ = st.config(routes={ROUTE: [{"provider": "sim", "model": "m"}]},
                            extra={"log": {"json": True}, "worker": {"lease_ms": 3000}})
        b = st.broker(path)
        w = st.spawn("promptq-worker", "--config", path, name="worker")
        ids = []
        for i in range(3):
            status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", {
                "request": {"model": ROUTE, "messages": [{"role": "user", "content": "j%d" % i}]}})
            assert status == 202, doc
            ids.append(doc["id"])
        # unknown route: a failed job; invalid UTF-8 straight into Kafka: a dlq record and a
        # worker log line about it
        status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", {
            "request": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}})
        assert status in (202, 404), doc
        st.produce("promptq.requests", [b'{"id": "bad-\xff\xfe", "request": 5}'], keys=["bad"])

        def done():
            return all(harness.http_json("GET", st.broker_url + "/v1/jobs/" + i)[2].get("status")
                       == "succeeded" for i in ids)
        wait_for(done, T(30), "jobs succeeded", interval=0.3)
        st.kafka_.control("down -1")
        time.sleep(T(2))
        st.kafka_.control("up -1")
        time.sleep(T(2))
        assert w.stop(T(20)) == 0 and b.stop(T(20)) == 0
        assert check_log(b, "promptq-broker") > 3
        assert check_log(w, "promptq-worker") > 3


harness.run(globals())
