"""OpenAI Files and Batch API subset (/v1/files, /v1/batches) on the bulk lane.

  * end to end with a real worker and promptq-sim: a 500-line JSONL file, a batch, output
    lines matched by custom_id ("echo: <prompt>"), request_counts; invalid lines in the error
    file; files API (list, get, content, delete); list pagination; another tenant gets 404;
    Idempotency-Key on create; the max_batch_lines cap; the OpenAI Node SDK (batches.test.mjs);
  * without a worker: cancel (queued lines cancelled, batch cancelled, finalized without a GET
    by the timer) and expiry (expires_at moved into the past: lines expired, batch expired).
"""

import json
import os
import signal
import subprocess
import time
import uuid

import harness
from harness import T, wait_for

ROOT = harness.ROOT
NODE_DIR = os.path.join(ROOT, "tests", "node")
KEY, KEY2 = "batch-key", "other-key"
TENANT, TENANT2 = "acme", "globex"
AUTH = {"Authorization": "Bearer " + KEY}
AUTH2 = {"Authorization": "Bearer " + KEY2}
MODEL = "sim-model"


def ready(st):
    try:
        return harness.http("GET", st.broker_url + "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def stack(st, worker=True, extra_broker=None):
    red = st.redis()
    st.devkafka(brokers=1, partitions=4)
    sim = st.sim("a")
    providers = {"sim": {"type": "openai", "base_url": sim.api}}
    routes = {MODEL: [{"provider": "sim", "model": MODEL}]}
    broker = {"api_keys": {KEY: TENANT, KEY2: TENANT2}}
    broker.update(extra_broker or {})
    path, _ = st.config(providers=providers, routes=routes,
                        extra={"broker": broker, "worker": {"lease_ms": 3000}})
    if worker:
        st.spawn("promptq-worker", "--config", path, name="worker")
    p = st.spawn("promptq-broker", "--config", path, name="broker")
    wait_for(lambda: ready(st) or not p.alive(), T(20), "broker /readyz")
    assert p.alive(), "broker exited:\n" + p.tail()
    st.cfg_path = path
    return red


def metric(st, name, labels=""):
    status, _, raw = harness.http("GET", st.broker_url + "/metrics")
    assert status == 200
    want = name + ("{" + labels + "}" if labels else "")
    for ln in raw.decode().splitlines():
        if ln.startswith(want + " "):
            return float(ln.split()[-1])
    return 0.0


def line(cid, prompt, **kw):
    d = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}}
    d.update(kw)
    return json.dumps(d)


def upload(st, text, auth=AUTH, purpose="batch", filename="input.jsonl"):
    boundary = "----pq" + uuid.uuid4().hex
    body = ("--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n%s\r\n"
            "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%s\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n" % (boundary, purpose, boundary, filename)
            ).encode() + text.encode() + ("\r\n--%s--\r\n" % boundary).encode()
    h = dict(auth)
    h["Content-Type"] = "multipart/form-data; boundary=" + boundary
    return harness.http_json("POST", st.broker_url + "/v1/files", body, h)


def create(st, file_id, auth=AUTH, headers=None, **kw):
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}
    body.update(kw)
    h = dict(auth)
    h.update(headers or {})
    return harness.http_json("POST", st.broker_url + "/v1/batches", body, h)


def get(st, bid, auth=AUTH):
    return harness.http_json("GET", st.broker_url + "/v1/batches/" + bid, headers=auth)


def wait_status(st, bid, want, timeout=60):
    seen = {}

    def done():
        status, _, doc = get(st, bid)
        assert status == 200, doc
        seen["doc"] = doc
        return doc["status"] in want
    wait_for(done, T(timeout), "batch %s to reach %s" % (bid, want))
    return seen["doc"]


def content(st, fid, auth=AUTH):
    status, _, raw = harness.http("GET", st.broker_url + "/v1/files/%s/content" % fid,
                                  headers=auth)
    assert status == 200, raw
    return [json.loads(x) for x in raw.decode().splitlines() if x.strip()]


def warm(st):
    status, _, doc = harness.http_json("POST", st.broker_url + "/v1/jobs", {"request": {
        "model": MODEL, "messages": [{"role": "user", "content": "warm"}]}}, AUTH)
    assert status == 202, doc
    wait_for(lambda: harness.http_json("GET", st.broker_url + "/v1/jobs/" + doc["id"],
                                       headers=AUTH)[2].get("status") == "succeeded",
             T(30), "the warm-up job to succeed")


def test_batch_end_to_end():
    with harness.Stack("batches-e2e") as st:
        stack(st, extra_broker={"max_batch_lines": 600})
        warm(st)
        n = 500
        text = "\n".join(line("req-%d" % i, "prompt %d" % i) for i in range(n)) + "\n"
        status, _, f = upload(st, text)
        assert status == 200, f
        assert f["object"] == "file" and f["purpose"] == "batch" and f["id"].startswith("file-")
        assert f["bytes"] == len(text.encode()) and f["filename"] == "input.jsonl"

        # files API: get, content round trip, another tenant sees nothing
        status, _, g = harness.http_json("GET", st.broker_url + "/v1/files/" + f["id"],
                                         headers=AUTH)
        assert status == 200 and g["id"] == f["id"] and g["bytes"] == f["bytes"], g
        status, _, raw = harness.http("GET", st.broker_url + "/v1/files/%s/content" % f["id"],
                                      headers=AUTH)
        assert status == 200 and raw.decode() == text
        assert harness.http("GET", st.broker_url + "/v1/files/" + f["id"], headers=AUTH2)[0] == 404
        assert harness.http("GET", st.broker_url + "/v1/files/%s/content" % f["id"],
                            headers=AUTH2)[0] == 404

        t0 = time.time()
        status, _, b = create(st, f["id"], metadata={"job": "nightly"},
                              headers={"Idempotency-Key": "create-1"})
        assert status == 200, b
        assert b["object"] == "batch" and b["id"].startswith("batch_"), b
        assert b["status"] in ("validating", "in_progress"), b
        assert b["endpoint"] == "/v1/chat/completions" and b["completion_window"] == "24h"
        assert b["input_file_id"] == f["id"] and b["metadata"] == {"job": "nightly"}
        assert b["expires_at"] - b["created_at"] == 24 * 3600
        # idempotent create: same key and body -> the same batch; another body -> 422
        status, _, again = create(st, f["id"], metadata={"job": "nightly"},
                                  headers={"Idempotency-Key": "create-1"})
        assert status == 200 and again["id"] == b["id"], again
        status, _, other = create(st, f["id"], metadata={"job": "other"},
                                  headers={"Idempotency-Key": "create-1"})
        assert status == 422, other
        # another tenant: 404 for the batch and for the file
        assert get(st, b["id"], AUTH2)[0] == 404
        assert create(st, f["id"], AUTH2)[0] == 404

        done = wait_status(st, b["id"], ("completed", "failed", "expired", "cancelled"), 90)
        elapsed = time.time() - t0
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}, done
        assert done["completed_at"] and done["in_progress_at"] and done["finalizing_at"]
        assert done["output_file_id"] and done["error_file_id"] is None, done
        out = content(st, done["output_file_id"])
        assert len(out) == n
        by = {o["custom_id"]: o for o in out}
        assert len(by) == n
        for i in range(n):
            o = by["req-%d" % i]
            assert o["error"] is None and o["id"].startswith("batch_req_")
            assert o["response"]["status_code"] == 200
            body = o["response"]["body"]
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"] == "echo: prompt %d" % i, body
        print("500-line batch: completed in %.2f s" % elapsed)
        # the output file is a file of its own, listed
        status, _, of = harness.http_json("GET", st.broker_url + "/v1/files/" +
                                          done["output_file_id"], headers=AUTH)
        assert status == 200 and of["purpose"] == "batch_output", of
        status, _, lst = harness.http_json("GET", st.broker_url + "/v1/files", headers=AUTH)
        ids = [x["id"] for x in lst["data"]]
        assert f["id"] in ids and done["output_file_id"] in ids, lst
        assert "body" not in lst["data"][0]

        # invalid lines: bad JSON, wrong url, wrong method, missing and duplicate custom_id,
        # unknown model; blank lines are skipped
        bad = [line("ok-1", "one"), "{zq9secret json", line("x-url", "u", url="/v1/embeddings"),
               line("x-method", "m", method="GET"),
               json.dumps({"method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": MODEL, "messages": [{"role": "user",
                                                                  "content": "c"}]}}),
               line("ok-1", "dup"), "",
               json.dumps({"custom_id": "x-model", "method": "POST",
                           "url": "/v1/chat/completions",
                           "body": {"model": "nope", "messages": [{"role": "user",
                                                                   "content": "m"}]}}),
               line("ok-2", "two")]
        status, _, f2 = upload(st, "\n".join(bad))
        assert status == 200, f2
        status, _, b2 = create(st, f2["id"])
        assert status == 200, b2
        d2 = wait_status(st, b2["id"], ("completed",), 60)
        assert d2["request_counts"] == {"total": 8, "completed": 2, "failed": 6}, d2
        ok = {o["custom_id"]: o for o in content(st, d2["output_file_id"])}
        assert set(ok) == {"ok-1", "ok-2"}
        assert ok["ok-1"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: one"
        errs = content(st, d2["error_file_id"])
        assert len(errs) == 6, errs
        codes = sorted(e["error"]["code"] for e in errs)
        assert codes == sorted(["invalid_json_line", "invalid_url", "invalid_method",
                                "missing_custom_id", "duplicate_custom_id",
                                "model_not_found"]), codes
        assert all(e["response"] is None and e["error"]["message"] for e in errs)
        # an error text never quotes the line's bytes (jansson's own text would)
        assert not any("zq9secret" in e["error"]["message"] for e in errs), errs
        assert {e["custom_id"] for e in errs} >= {"x-url", "x-method", "x-model"}
        assert d2["errors"]["data"] and d2["errors"]["data"][0]["line"] == 2, d2["errors"]

        # list: newest first, after + limit + has_more
        ids = []
        for _ in range(3):
            status, _, bx = create(st, f2["id"])
            assert status == 200
            ids.append(bx["id"])
        newest = list(reversed(ids)) + [b2["id"], b["id"]]
        status, _, page = harness.http_json("GET", st.broker_url + "/v1/batches?limit=2",
                                            headers=AUTH)
        assert status == 200 and page["object"] == "list", page
        assert [x["id"] for x in page["data"]] == newest[:2] and page["has_more"] is True
        status, _, page2 = harness.http_json(
            "GET", st.broker_url + "/v1/batches?limit=2&after=" + page["last_id"], headers=AUTH)
        assert [x["id"] for x in page2["data"]] == newest[2:4] and page2["has_more"] is True
        status, _, page3 = harness.http_json(
            "GET", st.broker_url + "/v1/batches?limit=2&after=" + page2["last_id"], headers=AUTH)
        assert [x["id"] for x in page3["data"]] == newest[4:] and page3["has_more"] is False
        status, _, empty = harness.http_json("GET", st.broker_url + "/v1/batches", headers=AUTH2)
        assert status == 200 and empty["data"] == [] and empty["has_more"] is False

        for bid in ids:
            wait_status(st, bid, ("completed",), 30)
        assert metric(st, "promptq_broker_batch_lines_total", 'outcome="queued"') == 500 + 2 * 4
        assert metric(st, "promptq_broker_batch_lines_total", 'outcome="invalid"') == 6 * 4
        assert metric(st, "promptq_broker_batches_created_total") == 5
        assert metric(st, "promptq_broker_batches_finalized_total") == 5

        # caps and validation
        big = "\n".join(line("c%d" % i, "p") for i in range(601))
        status, _, f3 = upload(st, big)
        assert status == 200
        status, _, err = create(st, f3["id"])
        assert status == 400 and "600" in err["error"]["message"], err
        assert create(st, f3["id"], endpoint="/v1/embeddings")[0] == 400
        assert create(st, f3["id"], completion_window="1h")[0] == 400
        assert create(st, "file-nope")[0] == 404
        assert upload(st, "x", purpose="fine-tune")[0] == 400

        # delete a file
        assert harness.http("DELETE", st.broker_url + "/v1/files/" + f3["id"],
                            headers=AUTH2)[0] == 404
        status, _, dd = harness.http_json("DELETE", st.broker_url + "/v1/files/" + f3["id"],
                                          headers=AUTH)
        assert status == 200 and dd == {"id": f3["id"], "object": "file", "deleted": True}
        assert harness.http("GET", st.broker_url + "/v1/files/" + f3["id"], headers=AUTH)[0] == 404

        # the OpenAI Node SDK
        node = harness.node_ready()
        env = dict(os.environ, PQ_BASE_URL=st.broker_url + "/v1", PQ_API_KEY=KEY,
                   PQ_MODEL=MODEL)
        log = os.path.join(st.log_dir, "node-batches.log")
        with open(log, "wb") as fh:
            res = subprocess.run([node, "--test", "--test-reporter=spec",
                                  os.path.join(NODE_DIR, "batches.test.mjs")],
                                 cwd=NODE_DIR, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                 timeout=T(120))
        with open(log, "rb") as fh:
            out_text = fh.read().decode(errors="replace")
        assert res.returncode == 0, "node tests failed:\n" + out_text[-6000:]
        assert "fail 0" in out_text and "pass 1" in out_text, out_text[-3000:]


def test_batch_every_line_invalid_fails():
    """OpenAI's Batch object: status "failed" means the input file failed validation, with the
    reasons in errors. A batch none of whose lines is valid is failed (failed_at, errors per
    line, no output or error file), not "completed"; nothing is queued."""
    with harness.Stack("batch_all_invalid") as st:
        red = stack(st, worker=False)
        bad = ["{not json", line("x-url", "u", url="/v1/embeddings"),
               line("x-method", "m", method="GET")]
        status, _, f = upload(st, "\n".join(bad))
        assert status == 200, f
        status, _, b = create(st, f["id"])
        assert status == 200, b
        d = wait_status(st, b["id"], ("failed", "completed"), 30)
        assert d["status"] == "failed", d
        assert isinstance(d["failed_at"], int) and d["completed_at"] is None, d
        assert d["in_progress_at"] is None, d
        assert d["output_file_id"] is None and d["error_file_id"] is None, d
        assert d["request_counts"] == {"total": 3, "completed": 0, "failed": 3}, d
        assert d["errors"]["object"] == "list", d
        assert [e["line"] for e in d["errors"]["data"]] == [1, 2, 3], d["errors"]
        assert [e["code"] for e in d["errors"]["data"]] == ["invalid_json_line", "invalid_url",
                                                            "invalid_method"], d["errors"]
        time.sleep(1.5)  # the timer would finalize it by now if it still could
        d = get(st, b["id"])[2]
        assert d["status"] == "failed", d
        assert red.cli("SISMEMBER", "promptq:batches:active", "%s:%s" % (TENANT, b["id"])) == "0"
        assert red.cli("EXISTS", "promptq:batch:%s:%s:invalid" % (TENANT, b["id"])) == "0"


def upload_raw(st, filename_bytes, text=b'{"a":1}\n'):
    boundary = "----pq" + uuid.uuid4().hex
    body = ("--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
            % (boundary, boundary)).encode() + filename_bytes + (
            "\"\r\nContent-Type: application/jsonl\r\n\r\n").encode() + text + (
            "\r\n--%s--\r\n" % boundary).encode()
    h = dict(AUTH)
    h["Content-Type"] = "multipart/form-data; boundary=" + boundary
    return harness.http_json("POST", st.broker_url + "/v1/files", body, h)


def test_file_names_cut_at_a_character():
    """A file name longer than 255 bytes is cut at the last whole UTF-8 character within 255
    bytes (200 x "\u00e9" is 400 bytes: 127 characters are kept), and the file answers, lists and
    reads back; a name that is not UTF-8 is refused with 400 before anything is stored."""
    with harness.Stack("files_names") as st:
        red = stack(st, worker=False)
        skey = "promptq:files:" + TENANT
        status, _, f = upload(st, "{}\n", filename="\u00e9" * 200)
        assert status == 200, f
        assert f["filename"] == "\u00e9" * 127, f
        status, _, g = harness.http_json("GET", st.broker_url + "/v1/files/" + f["id"],
                                         headers=AUTH)
        assert status == 200 and g["filename"] == "\u00e9" * 127, g
        status, _, lst = harness.http_json("GET", st.broker_url + "/v1/files", headers=AUTH)
        assert status == 200 and [x["id"] for x in lst["data"]] == [f["id"]], lst
        assert red.cli("ZCARD", skey) == "1"

        for bad in (b"\xff\xfe.jsonl", b"a\xc3", b"\xed\xa0\x80.jsonl"):
            status, _, err = upload_raw(st, bad)
            assert status == 400 and "filename" in err["error"]["message"], (bad, status, err)
        assert red.cli("ZCARD", skey) == "1"
        assert red.cli("KEYS", "promptq:file:%s:*" % TENANT).split() == [
            "promptq:file:%s:%s" % (TENANT, f["id"])]


def test_batch_output_keeps_nul_content():
    """A line whose result carries U+0000 in its content (stored as "\\u0000", as json_dumps
    writes it) is an output line with that content, not an error line. The worker's terminal
    write is stood in for by writing the line's record and counting it."""
    with harness.Stack("batch_nul") as st:
        red = stack(st, worker=False)
        status, _, f = upload(st, line("nul-1", "nul please") + "\n")
        assert status == 200, f
        status, _, b = create(st, f["id"])
        assert status == 200, b
        wait_status(st, b["id"], ("in_progress",), 30)
        jid = b["id"] + "-1"
        result = {"id": jid, "tenant": TENANT, "status": "succeeded",
                  "response": {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                               "model": MODEL,
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant",
                                                        "content": "a\u0000b"}}]}}
        text = json.dumps(result, separators=(",", ":"))
        assert "\\u0000" in text
        red.cli("HSET", "promptq:job:%s:%s" % (TENANT, jid), "status", "succeeded", "result", text)
        red.cli("HINCRBY", "promptq:batch:%s:%s" % (TENANT, b["id"]), "completed", "1")
        d = wait_status(st, b["id"], ("completed",), 30)
        assert d["request_counts"] == {"total": 1, "completed": 1, "failed": 0}, d
        assert d["output_file_id"], d
        out = content(st, d["output_file_id"])
        assert len(out) == 1 and out[0]["custom_id"] == "nul-1", out
        body = out[0]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == "a\u0000b", out


def test_batch_cancel():
    """No worker: lines stay queued until cancelled (or expired)."""
    with harness.Stack("batches-cancel") as st:
        red = stack(st, worker=False)
        text = "\n".join(line("c-%d" % i, "p %d" % i) for i in range(20))
        status, _, f = upload(st, text)
        assert status == 200, f
        status, _, b = create(st, f["id"])
        assert status == 200, b
        doc = wait_status(st, b["id"], ("in_progress",), 30)
        assert doc["request_counts"] == {"total": 20, "completed": 0, "failed": 0}, doc
        # a line is a job of the tenant, queued, with the batch's metadata
        status, _, job = harness.http_json("GET", st.broker_url + "/v1/jobs/%s-1" % b["id"],
                                           headers=AUTH)
        assert status == 200 and job["status"] == "queued", job
        assert harness.http("POST", st.broker_url + "/v1/batches/%s/cancel" % b["id"],
                            headers=AUTH2)[0] == 404
        status, _, c = harness.http_json("POST", st.broker_url + "/v1/batches/%s/cancel" % b["id"],
                                         headers=AUTH)
        assert status == 200 and c["status"] in ("cancelling", "finalizing", "cancelled"), c
        # finalized by the timer (no GET needed): wait in Redis
        key = "promptq:batch:%s:%s" % (TENANT, b["id"])
        wait_for(lambda: red.cli("HGET", key, "status") == "cancelled", T(20),
                 "the timer to finalize the cancelled batch")
        done = wait_status(st, b["id"], ("cancelled",), 30)
        assert done["request_counts"] == {"total": 20, "completed": 0, "failed": 20}, done
        assert done["cancelling_at"] and done["cancelled_at"], done
        errs = content(st, done["error_file_id"])
        assert len(errs) == 20 and all(e["error"]["code"] == "cancelled" for e in errs), errs[:2]
        assert {e["custom_id"] for e in errs} == {"c-%d" % i for i in range(20)}
        status, _, job = harness.http_json("GET", st.broker_url + "/v1/jobs/%s-1" % b["id"],
                                           headers=AUTH)
        assert job["status"] == "cancelled", job
        # cancelling again answers the batch as it is
        status, _, c2 = harness.http_json("POST", st.broker_url + "/v1/batches/%s/cancel" %
                                          b["id"], headers=AUTH)
        assert status == 200 and c2["status"] == "cancelled", c2

        # cancelled while still validating: the create walk ends, then cancels every line
        n = 6000
        status, _, f2 = upload(st, "\n".join(line("v-%d" % i, "p") for i in range(n)))
        assert status == 200, f2
        status, _, b2 = create(st, f2["id"])
        assert status == 200 and b2["status"] == "validating", b2
        status, _, c3 = harness.http_json("POST", st.broker_url + "/v1/batches/%s/cancel" %
                                          b2["id"], headers=AUTH)
        assert status == 200 and c3["status"] == "cancelling", c3
        done = wait_status(st, b2["id"], ("cancelled", "completed"), 60)
        assert done["status"] == "cancelled", done
        assert done["request_counts"] == {"total": n, "completed": 0, "failed": n}, done
        assert len(content(st, done["error_file_id"])) == n


def test_batch_broker_killed_while_validating():
    """SIGKILL during the create walk: a new broker's timer takes the batch over once the dead
    task's lock expires, walks the file again (records exist, duplicates run once) and the
    batch completes with exact counts."""
    with harness.Stack("batches-kill") as st:
        red = st.redis()
        st.devkafka(brokers=1, partitions=4)
        sim = st.sim("a")
        path, _ = st.config(providers={"sim": {"type": "openai", "base_url": sim.api}},
                            routes={MODEL: [{"provider": "sim", "model": MODEL}]},
                            extra={"broker": {"api_keys": {KEY: TENANT}},
                                   "worker": {"lease_ms": 3000}})
        st.spawn("promptq-worker", "--config", path, name="worker")
        p = st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: ready(st) or not p.alive(), T(20), "broker /readyz")
        n = 8000
        status, _, f = upload(st, "\n".join(line("k-%d" % i, "kp %d" % i) for i in range(n)))
        assert status == 200, f
        status, _, b = create(st, f["id"])
        assert status == 200, b
        key = "promptq:batch:%s:%s" % (TENANT, b["id"])
        wait_for(lambda: red.cli("EXISTS", "promptq:job:%s:%s-1" % (TENANT, b["id"])) == "1",
                 T(10), "the first line's record")
        p.kill(signal.SIGKILL)
        p.wait(T(10))
        assert red.cli("HGET", key, "status") == "validating", "the walk finished before the kill"
        p2 = st.spawn("promptq-broker", "--config", path, name="broker2")
        wait_for(lambda: ready(st) or not p2.alive(), T(20), "second broker /readyz")
        done = wait_status(st, b["id"], ("completed", "failed", "cancelled", "expired"), 90)
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}, done
        out = content(st, done["output_file_id"])
        assert sorted(o["custom_id"] for o in out) == sorted("k-%d" % i for i in range(n))


def test_batch_lines_spooled_while_kafka_is_down():
    """Kafka down during the create walk: the lines go to the broker's spool (fsync'd), the
    batch moves to in_progress, and once Kafka is back the drainer produces them to the bulk
    lane and the worker completes the batch."""
    with harness.Stack("batches-spool") as st:
        red = stack(st, worker=False, extra_broker={"ack_timeout_ms": 300})
        status, _, f = upload(st, "\n".join(line("s-%d" % i, "spooled %d" % i)
                                             for i in range(300)))
        assert status == 200, f
        st.kafka_.control("down -1")
        status, _, b = create(st, f["id"])
        assert status == 200, b
        doc = wait_status(st, b["id"], ("in_progress",), 60)
        assert doc["request_counts"]["total"] == 300, doc
        assert metric(st, "promptq_broker_spool_committed_total") == 300
        st.kafka_.control("up -1")
        assert red.cli("HGET", "promptq:job:%s:%s-1" % (TENANT, b["id"]), "status") == "queued"
        st.spawn("promptq-worker", "--config", st.cfg_path, name="worker")
        done = wait_status(st, b["id"], ("completed",), 90)
        assert done["request_counts"] == {"total": 300, "completed": 300, "failed": 0}, done
        out = {o["custom_id"]: o for o in content(st, done["output_file_id"])}
        assert out["s-7"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: spooled 7"
        assert len(out) == 300


def test_batch_expiry_by_timer():
    with harness.Stack("batches-expiry") as st:
        red = st.redis()
        st.devkafka(brokers=1, partitions=4)
        sim = st.sim("a")
        path, _ = st.config(providers={"sim": {"type": "openai", "base_url": sim.api}},
                            routes={MODEL: [{"provider": "sim", "model": MODEL}]},
                            extra={"broker": {"api_keys": {KEY: TENANT}}})
        p = st.spawn("promptq-broker", "--config", path, name="broker")
        wait_for(lambda: ready(st) or not p.alive(), T(20), "broker /readyz")
        status, _, f = upload(st, "\n".join(line("e-%d" % i, "p") for i in range(5)))
        assert status == 200, f
        status, _, b = create(st, f["id"])
        assert status == 200, b
        wait_status(st, b["id"], ("in_progress",), 30)
        key = "promptq:batch:%s:%s" % (TENANT, b["id"])
        red.cli("HSET", key, "expires_at", "1")
        # the timer (thread 0) expires it and finalizes it without any GET
        wait_for(lambda: red.cli("HGET", key, "status") == "expired", T(20),
                 "the timer to expire the batch")
        status, _, done = get(st, b["id"])
        assert done["status"] == "expired" and done["expired_at"], done
        assert done["request_counts"] == {"total": 5, "completed": 0, "failed": 5}, done
        errs = content(st, done["error_file_id"])
        assert len(errs) == 5 and all(e["error"]["code"] == "expired" for e in errs), errs
        assert red.cli("SISMEMBER", "promptq:batches:active", "%s:%s" % (TENANT, b["id"])) == "0"


if __name__ == "__main__":
    harness.run(globals())
