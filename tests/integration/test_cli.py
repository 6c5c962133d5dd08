"""promptq, the command-line client, against a real stack (redis-server, promptq-devkafka,
promptq-sim, promptq-broker, promptq-worker): submit --wait, submit + get/watch, batch over many
connections, exit codes (0 ok, 1 failed, 2 usage, 3 unreachable), the broker's errors printed as
"promptq: <status> <type>: <message>", API keys never printed."""

import json
import os
import re
import subprocess
import tempfile
import time

import harness
from harness import T, wait_for

ROUTE = "sim-model"
ERR_LINE = re.compile(r"^promptq: (\d{3}) ([A-Za-z0-9_.-]+): (.+)$", re.M)


def cli(*args, stdin=None, env=None, timeout=None):
    """Runs promptq; returns (exit code, stdout, stderr). The caller's PROMPTQ_* are dropped."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    e.update(env or {})
    p = subprocess.run([harness.binary("promptq")] + [str(a) for a in args],
                       input=stdin.encode() if isinstance(stdin, str) else stdin,
                       capture_output=True, timeout=timeout or T(120), env=e)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def ready(url):
    try:
        return harness.http("GET", url + "/readyz", timeout=1)[0] == 200
    except OSError:
        return False


def stack_up(st, extra=None, worker=True):
    st.redis()
    st.devkafka(brokers=1, partitions=4)
    st.sim("a")
    ex = {"worker": {"lease_ms": 3000}}
    if extra:
        harness._merge(ex, extra)
    path, cfg = st.config(extra=ex)
    b = st.spawn("promptq-broker", "--config", path, name="broker")
    wait_for(lambda: ready(st.broker_url) or not b.alive(), T(20), "broker /readyz")
    assert b.alive(), "broker exited:\n" + b.tail()
    if worker:
        st.spawn("promptq-worker", "--config", path, name="worker")
    return path


def broker_error(stderr):
    m = ERR_LINE.search(stderr)
    assert m, "no 'promptq: <status> <type>: <message>' line in %r" % stderr
    return int(m.group(1)), m.group(2), m.group(3)


def test_usage_and_unreachable():
    # usage errors: exit 2, nothing sent
    assert cli()[0] == 2
    assert cli("frobnicate")[0] == 2
    assert cli("submit")[0] == 2                      # no prompt
    assert cli("submit", "hi")[0] == 2                # no route
    assert cli("submit", "--model", ROUTE, "--deadline", "tomorrow", "x")[0] == 2
    assert cli("submit", "--model", ROUTE, "--metadata", "[1]", "x")[0] == 2
    assert cli("--url", "ftp://x", "get", "a")[0] == 2
    assert cli("batch", "/nonexistent/file.jsonl", "--model", ROUTE)[0] == 2
    assert cli("parked", "drop", "r")[0] == 2         # needs --yes
    code, out, _ = cli("submit", "--help")
    assert code == 0 and "--wait" in out
    code, out, _ = cli("--help")
    assert code == 0 and "batch" in out and "exit codes" in out

    # nobody listens there: exit 3 for every kind of command
    url = "http://127.0.0.1:%d" % harness.free_port()
    code, out, err = cli("--url", url, "submit", "--model", ROUTE, "hello")
    assert code == 3 and out == "", (code, out, err)
    assert "cannot reach the broker" in err and url in err, err
    assert cli("--url", url, "get", "job_x")[0] == 3
    assert cli("get", "job_x", env={"PROMPTQ_URL": url})[0] == 3
    assert cli("--url", url, "health")[0] == 3
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.write("one\ntwo\n")
        f.flush()
        code, _, err = cli("--url", url, "batch", f.name, "--model", ROUTE)
    assert code == 3 and "cannot reach the broker" in err, (code, err)


def test_submit_get_watch_and_errors():
    with harness.Stack("cli-submit") as st:
        stack_up(st)
        url = st.broker_url

        # submit --wait prints the answer's content
        code, out, err = cli("--url", url, "submit", "--model", ROUTE, "--wait", "hello cli")
        assert code == 0, (code, out, err)
        assert out == "echo: hello cli\n", (out, err)

        # the prompt from stdin; global options after the command; --timeout bounds the wait
        code, out, err = cli("submit", "--wait", "-", "--model", ROUTE, "--url", url,
                             "--timeout", T(60), stdin="from stdin\n")
        assert code == 0 and out == "echo: from stdin\n", (code, out, err)

        # submit prints the id (stdout) and durability (stderr); get shows the record
        code, out, err = cli("--url", url, "submit", "--model", ROUTE, "second prompt")
        assert code == 0, (code, out, err)
        jid = out.strip()
        assert re.fullmatch(r"job_[0-9A-Za-z]{26}", jid), out
        assert "durability: kafka" in err, err

        def got_succeeded():
            c, o, e = cli("--url", url, "get", jid)
            return (c, o) if re.search(r"^status:\s+succeeded$", o, re.M) else None

        code, out = wait_for(got_succeeded, T(60), "get to show succeeded", interval=0.2)
        assert code == 0 and jid in out and "echo: second prompt" in out, out
        code, out, err = cli("--url", url, "--json", "get", jid)
        rec = json.loads(out)
        assert code == 0 and rec["id"] == jid and rec["status"] == "succeeded", out
        assert rec["response"]["choices"][0]["message"]["content"] == "echo: second prompt"

        # --id, --metadata, --json: the whole result record, metadata echoed
        code, out, err = cli("--url", url, "--json", "submit", "--model", ROUTE, "--id",
                             "cli-job-1", "--metadata", '{"k":"v"}', "--wait", "meta")
        assert code == 0, (code, out, err)
        rec = json.loads(out)
        assert rec["id"] == "cli-job-1" and rec["status"] == "succeeded", rec
        assert rec["metadata"] == {"k": "v"}, rec

        # --file sends an envelope as is
        env_path = os.path.join(st.dir, "env.json")
        with open(env_path, "w") as f:
            json.dump({"request": {"model": ROUTE,
                                   "messages": [{"role": "user", "content": "from file"}]}}, f)
        code, out, err = cli("--url", url, "submit", "--file", env_path, "--wait")
        assert code == 0 and out == "echo: from file\n", (code, out, err)

        # watch follows jobs to the end (two at once)
        ids = [cli("--url", url, "submit", "--model", ROUTE, "w%d" % i)[1].strip()
               for i in range(2)]
        code, out, err = cli("--url", url, "watch", *ids, timeout=T(60))
        assert code == 0, (code, out, err)
        for i in ids:
            assert re.search(r"\b%s succeeded$" % re.escape(i), out, re.M), out

        # a job for a model nobody configured: the broker's 404, exit 1
        code, out, err = cli("--url", url, "submit", "--model", "no-such-route", "--wait", "x")
        assert code == 1 and out == "", (code, out, err)
        status, etype, msg = broker_error(err)
        assert status == 404 and "no-such-route" in msg, err

        # an id nobody submitted: 404 from get and watch
        code, out, err = cli("--url", url, "get", "job_doesnotexist")
        assert code == 1 and broker_error(err)[0] == 404, (code, err)
        code, out, err = cli("--url", url, "watch", "job_doesnotexist")
        assert code == 1 and broker_error(err)[0] == 404, (code, err)

        # health: /v1/health (ok once the worker has written its first health key)
        wait_for(lambda: harness.http("GET", url + "/v1/health")[0] == 200, T(20),
                 "/v1/health ok")
        code, out, err = cli("--url", url, "health")
        assert code == 0 and out.strip(), (code, out, err)

        # ops endpoints answer, or their 404 is reported as the broker's error
        for args in (["parked"], ["models"]):
            code, out, err = cli("--url", url, *args)
            if code != 0:
                assert code == 1 and broker_error(err)[0] == 404, (args, code, err)

        # the provider refuses every call (400): the job fails, --wait exits 1 with the error
        st.sims[0].set_state({"mode": "error", "status": 400})
        code, out, err = cli("--url", url, "submit", "--model", ROUTE, "--wait", "doomed",
                             "--timeout", T(60))
        assert code == 1 and out == "", (code, out, err)
        assert re.search(r"^promptq: job \S+ failed: ", err, re.M), err


def test_batch():
    with harness.Stack("cli-batch") as st:
        stack_up(st)
        url = st.broker_url
        lines, prompts = [], []
        for i in range(200):
            p = "batch line %d" % i
            prompts.append(p)
            kind = i % 4
            if kind == 0:
                lines.append(json.dumps(p))                       # a JSON string prompt
            elif kind == 1:
                lines.append(p)                                   # plain text prompt
            elif kind == 2:                                       # a chat body, model from --model
                lines.append(json.dumps({"messages": [{"role": "user", "content": p}]}))
            else:                                                 # a full envelope
                lines.append(json.dumps({"request": {"model": ROUTE, "messages": [
                    {"role": "user", "content": p}]}, "metadata": {"line": i}}))
        path = os.path.join(st.dir, "jobs.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")

        code, out, err = cli("--url", url, "batch", path, "--model", ROUTE, "--concurrency", 8,
                             timeout=T(180))
        assert code == 0, (code, out, err)
        m = re.search(r"^batch: 200 jobs: 200 submitted, 200 succeeded, 0 failed", out, re.M)
        assert m, out

        # --json: one object per job on stdout, in line order; checked against promptq.results
        path2 = os.path.join(st.dir, "jobs2.jsonl")
        with open(path2, "w") as f:
            f.write("\n".join(json.dumps("json %d" % i) for i in range(50)) + "\n")
        code, out, err = cli("--url", url, "--json", "batch", path2, "--model", ROUTE,
                             "--concurrency", 4, timeout=T(180))
        assert code == 0, (code, out, err)
        docs = [json.loads(l) for l in out.splitlines()]
        assert len(docs) == 50 and [d["line"] for d in docs] == list(range(1, 51)), out
        assert all(d["status"] == "succeeded" for d in docs), docs
        ids = [d["id"] for d in docs]
        assert len(set(ids)) == 50
        assert re.search(r"50 succeeded", err), err
        want = set(ids)
        results = {}

        def scan():
            for msg in st.consume_all("promptq.results"):
                rec = json.loads(msg["value"])
                results[rec["id"]] = rec
            return want <= set(results)

        wait_for(scan, T(60), "batch ids on promptq.results", interval=1.0)
        for i, jid in enumerate(ids):
            content = results[jid]["response"]["choices"][0]["message"]["content"]
            assert content == "echo: json %d" % i, (jid, content)

        # a bad line is a usage error and nothing is submitted
        path3 = os.path.join(st.dir, "bad.jsonl")
        with open(path3, "w") as f:
            f.write('"ok"\n[1,2]\n')
        code, out, err = cli("--url", url, "batch", path3, "--model", ROUTE)
        assert code == 2 and ":2:" in err, (code, err)

        # a line for an unknown route is refused by the broker: counted, reported, exit 1
        path4 = os.path.join(st.dir, "mixed.jsonl")
        with open(path4, "w") as f:
            f.write('"fine"\n' + json.dumps({"request": {"model": "nope", "messages": [
                {"role": "user", "content": "x"}]}}) + "\n")
        code, out, err = cli("--url", url, "batch", path4, "--model", ROUTE, timeout=T(120))
        assert code == 1, (code, out, err)
        assert "1 succeeded" in out and "1 rejected" in out, out
        assert re.search(r"line 2.*404 ", err), err


def test_api_keys():
    with harness.Stack("cli-keys") as st:
        stack_up(st, extra={"broker": {"api_keys": {"cli-good-key": "acme"}}})
        url = st.broker_url

        code, out, err = cli("--url", url, "--key", "sekrit-wrong-key", "submit", "--model",
                             ROUTE, "hello")
        assert code == 1 and out == "", (code, out, err)
        assert broker_error(err)[0] == 401, err
        assert "sekrit-wrong-key" not in out + err

        code, out, err = cli("--url", url, "submit", "--model", ROUTE, "no key")
        assert code == 1 and broker_error(err)[0] == 401, (code, err)

        code, out, err = cli("--url", url, "--key", "cli-good-key", "submit", "--model", ROUTE,
                             "--wait", "with key")
        assert code == 0 and out == "echo: with key\n", (code, out, err)
        assert "cli-good-key" not in out + err

        # the key from the environment; get with the wrong key is refused too
        code, out, err = cli("--url", url, "submit", "--model", ROUTE, "env key",
                             env={"PROMPTQ_API_KEY": "cli-good-key"})
        assert code == 0, (code, out, err)
        jid = out.strip()
        code, out, err = cli("--url", url, "--key", "sekrit-wrong-key", "get", jid)
        assert code == 1 and broker_error(err)[0] == 401, (code, err)
        assert "sekrit-wrong-key" not in out + err
        code, out, err = cli("--url", url, "--key", "sekrit-wrong-key", "watch", jid)
        assert code == 1 and broker_error(err)[0] == 401, (code, err)
        path = os.path.join(st.dir, "k.jsonl")
        with open(path, "w") as f:
            f.write("a\nb\nc\n")
        code, out, err = cli("--url", url, "--key", "sekrit-wrong-key", "batch", path,
                             "--model", ROUTE)
        assert code == 1 and "401" in err and "sekrit-wrong-key" not in out + err, (code, err)


LIST_KEYS = {"cli-list-a": "tenant-a", "cli-list-b": "tenant-b"}


def test_list():
    """promptq list against a broker-only stack (no worker: jobs stay queued unless
    cancelled): one page, --after, --all, --status (scan cap pages), --json, usage errors and
    tenant isolation."""
    with harness.Stack("cli-list") as st:
        st.redis()
        st.devkafka(brokers=1, partitions=4)
        path, _ = st.config(
            providers={"sim": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            routes={ROUTE: [{"provider": "sim", "model": "x"}]},
            extra={"broker": {"api_keys": LIST_KEYS}})
        st.broker(path)
        url = st.broker_url
        auth = {"Authorization": "Bearer cli-list-a"}
        ids = []
        for i in range(25):
            status, _, doc = harness.http_json("POST", url + "/v1/jobs", {"request": {
                "model": ROUTE, "messages": [{"role": "user", "content": "list %d" % i}]}}, auth)
            assert status == 202, (status, doc)
            ids.append(doc["id"])
            time.sleep(0.003)  # a later millisecond each: a strict newest-first order
        newest = ids[::-1]
        cancelled = set(ids[3::5])  # 5 of them
        for jid in cancelled:
            status, _, doc = harness.http_json("DELETE", url + "/v1/jobs/" + jid, headers=auth)
            assert status // 100 == 2, (status, doc)
        wait_for(lambda: len(harness.http_json("GET", url + "/v1/jobs?limit=100",
                                               headers=auth)[2]["data"]) == 25,
                 T(10), "25 jobs listed")
        a = ("--url", url, "--key", "cli-list-a")

        def rows(out):
            lines = out.splitlines()
            cols = [l.split() for l in lines]
            assert all(len(c) == 5 for c in cols), out
            widths = {len(re.match(r"^\S+\s+", l).group(0)) for l in lines}
            assert len(widths) <= 1, "columns not aligned:\n" + out
            return cols

        # one page of 10, newest first; the next page's option on stderr
        code, out, err = cli(*a, "list", "--limit", 10)
        assert code == 0, (code, out, err)
        got = rows(out)
        assert [c[0] for c in got] == newest[:10], out
        for c in got:
            assert c[1] == ("cancelled" if c[0] in cancelled else "queued"), c
            assert c[2] == ROUTE and re.match(r"^\d{4}-\d\d-\d\dT", c[3]) and c[4] == "0", c
        assert "--after " + newest[9] in err, err

        # --after continues there (options after the command, key from the environment)
        code, out, err = cli("list", "--after", newest[9], "--limit=10", "--url", url,
                             env={"PROMPTQ_API_KEY": "cli-list-a"})
        assert code == 0 and [c[0] for c in rows(out)] == newest[10:20], (code, out, err)

        # --all: every job once, in order, over pages of 7
        code, out, err = cli(*a, "list", "--all", "--limit", 7)
        assert code == 0 and err == "", (code, err)
        assert [c[0] for c in rows(out)] == newest, out
        code, out, err = cli(*a, "list", "--all")
        assert code == 0 and [c[0] for c in rows(out)] == newest, (code, out, err)

        # --status filters; with --limit 1 the broker's scan cap gives pages with has_more
        # that --all must follow
        code, out, err = cli(*a, "list", "--status", "queued", "--all")
        assert code == 0, (code, err)
        assert [c[0] for c in rows(out)] == [i for i in newest if i not in cancelled], out
        code, out, err = cli(*a, "list", "--status=cancelled", "--limit", 1, "--all")
        assert code == 0, (code, err)
        assert [c[0] for c in rows(out)] == [i for i in newest if i in cancelled], out
        code, out, err = cli(*a, "list", "--status", "succeeded")
        assert code == 0 and out == "" and err == "", (code, out, err)

        # --json: each page's answer, one JSON document per line
        code, out, err = cli(*a, "--json", "list", "--all", "--limit", 10)
        assert code == 0, (code, err)
        pages = [json.loads(l) for l in out.splitlines()]
        assert [len(p["data"]) for p in pages] == [10, 10, 5], out
        assert [p["has_more"] for p in pages] == [True, True, False], out
        assert all(p["object"] == "list" for p in pages)
        assert [d["id"] for p in pages for d in p["data"]] == newest
        code, out, err = cli(*a, "list", "--json", "--limit", 3)
        assert code == 0 and len(out.splitlines()) == 1, (code, out, err)
        assert [d["id"] for d in json.loads(out)["data"]] == newest[:3], out

        # usage errors: exit 2, nothing asked
        code, out, err = cli(*a, "list", "--status", "bogus")
        assert code == 2 and out == "" and "bogus" in err and "--status" in err, (code, err)
        for bad in (["--limit", 0], ["--limit", 101], ["--limit", "x"], ["--limit"],
                    ["--frob"], ["extra"]):
            code, out, err = cli(*a, "list", *bad)
            assert code == 2 and out == "" and err.startswith("promptq: "), (bad, code, err)
        code, out, _ = cli("list", "--help")
        assert code == 0 and "--status" in out and "--all" in out, out

        # the broker's errors: an unknown --after cursor (400), no key (401); unreachable: 3
        code, out, err = cli(*a, "list", "--after", "job_notinthelisting")
        assert code == 1 and out == "" and broker_error(err)[0] == 400, (code, err)
        code, out, err = cli("--url", url, "list")
        assert code == 1 and broker_error(err)[0] == 401, (code, err)
        dead = "http://127.0.0.1:%d" % harness.free_port()
        assert cli("--url", dead, "list")[0] == 3

        # another tenant sees none of them
        code, out, err = cli("--url", url, "--key", "cli-list-b", "list", "--all")
        assert code == 0 and out == "" and err == "", (code, out, err)
        code, out, err = cli("--url", url, "--key", "cli-list-b", "--json", "list")
        assert code == 0 and json.loads(out)["data"] == [], (code, out, err)
        assert "cli-list-a" not in err and "cli-list-b" not in err


harness.run(globals())
