"""Integration test harness: real processes on loopback, stopped even when a test fails.

    import harness
    from harness import T, wait_for

    with harness.Stack("name") as st:
        r = st.redis()                 # redis-server on a random 127.0.0.1 port
        k = st.devkafka(brokers=1)     # promptq-devkafka; k.bootstrap, k.control("down -1")
        s = st.sim("a")                # promptq-sim; s.url, s.api, s.set_state({...}), s.stats()
        path, cfg = st.config()        # a promptq config wired to the above
        w = st.spawn("promptq-worker", "--config", path, name="worker")

    harness.run(globals())             # runs test_* functions, prints "N passed, M failed"

Environment: PQ_BIN_DIR (programs), PQ_LOG_DIR (process logs), PQ_TIMEOUT_MULT (scales T()).
"""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN_DIR = os.environ.get("PQ_BIN_DIR", os.path.join(ROOT, "build", "bin"))
LOG_DIR = os.environ.get("PQ_LOG_DIR", os.path.join(ROOT, "build", "test-logs"))
MULT = float(os.environ.get("PQ_TIMEOUT_MULT", "1") or "1")

_current_stacks = []


def T(seconds):
    """Scales a timeout by PQ_TIMEOUT_MULT (slow or sanitizer builds)."""
    return seconds * MULT


def wait_for(pred, timeout, what, interval=0.05):
    """Polls pred() until it is truthy; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


_ports_given = set()


def free_port():
    """A loopback port nobody listens on now, never one this process handed out before: the
    kernel may give the same ephemeral port to two binds in a row (seen in CI: a sim's listen
    and control ports came out equal, and the second bind failed)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise AssertionError("no fresh loopback port in 100 tries")


def binary(prog):
    path = os.path.join(BIN_DIR, prog)
    if not os.path.exists(path):
        found = shutil.which(prog)
        if not found:
            raise FileNotFoundError("%s not found in %s or PATH" % (prog, BIN_DIR))
        path = found
    return path


def make_test_ca(d):
    """A CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI in d;
    returns (ca_pem, cert_pem, key_pem) paths."""
    ca_key, ca_crt = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    key, csr, crt = (os.path.join(d, n) for n in ("srv.key", "srv.csr", "srv.pem"))
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")

    def run(*a):
        subprocess.run(a, check=True, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
        ca_crt, "-days", "2", "-subj", "/CN=promptq test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj",
        "/CN=127.0.0.1")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
        "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


def http(method, url, body=None, headers=None, timeout=None):
    """One HTTP request. body: dict/list (sent as JSON), bytes, str or None.
    Returns (status, headers with lowercase names, body bytes). Connection errors raise."""
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout or T(30)) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_json(method, url, body=None, headers=None, timeout=None):
    """Like http() but decodes the body as JSON (None when empty or not JSON)."""
    status, hdrs, raw = http(method, url, body, headers, timeout)
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    return status, hdrs, doc


NODE_DIR = os.path.join(ROOT, "tests", "node")


def node_ready():
    """Path of node, after `npm ci` in tests/node when its node_modules lack the openai SDK."""
    node = shutil.which("node")
    assert node, "node not found (deploy/dev/install-deps.sh installs nodejs)"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
        npm = shutil.which("npm")
        assert npm, "npm not found (deploy/dev/install-deps.sh installs nodejs and npm)"
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                             capture_output=True, timeout=T(300))
        assert out.returncode == 0, ("npm ci failed:\n" + out.stdout.decode() +
                                     out.stderr.decode())
    return node


def post_many(url, bodies, concurrency=16, headers=None, timeout=None):
    """POSTs every body (dict -> JSON) to url over `concurrency` keep-alive connections.
    Returns [(status, headers, json-or-None)] in the order of bodies."""
    import http.client
    import queue
    from urllib.parse import urlsplit

    u = urlsplit(url)
    path = u.path or "/"
    work = queue.Queue()
    for i, b in enumerate(bodies):
        work.put(i)
    out = [None] * len(bodies)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})

    def worker():
        conn = None
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                break
            b = bodies[i]
            data = json.dumps(b).encode() if isinstance(b, (dict, list)) else b
            # One attempt only: a blind resend could submit the same prompt twice.
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout or T(60))
                conn.request("POST", path, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
                try:
                    doc = json.loads(raw) if raw else None
                except ValueError:
                    doc = None
                out[i] = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc)
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                out[i] = (0, {}, {"exception": repr(e)})
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class Proc:
    """A process started by a Stack, in its own process group, output in a log file."""

    def __init__(self, stack, name, argv, env=None, stdin_pipe=False, line_reader=False):
        self.stack = stack
        self.name = name
        self.argv = argv
        self.env = env
        self.stdin_pipe = stdin_pipe
        self.line_reader = line_reader
        self.log_path = os.path.join(stack.log_dir, name + ".log")
        self.lines = []
        self._cv = threading.Condition()
        self.popen = None
        self.starts = 0
        self.start()

    def start(self):
        self.starts += 1
        logf = open(self.log_path, "ab")
        logf.write(("=== start %d: %s\n" % (self.starts, " ".join(self.argv))).encode())
        logf.flush()
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.line_reader else logf,
            stderr=logf,
            env=env,
            start_new_session=True,
        )
        self._logf = logf
        if self.line_reader:
            t = threading.Thread(target=self._read_lines, args=(self.popen, logf), daemon=True)
            t.start()
        return self

    def _read_lines(self, popen, logf):
        for raw in popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                logf.write(("[stdout] " + line + "\n").encode())
                logf.flush()
            except ValueError:
                pass
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()

    def wait_line(self, pred, timeout, start=0):
        """Waits for a stdout line (index >= start) matching pred; returns it."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines[start:]:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self.line_reader):
                    raise AssertionError("%s: no matching output line in %.1fs" % (self.name, timeout))
                self._cv.wait(min(left, 0.2))

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig=signal.SIGTERM):
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout=None):
        """Waits for exit; returns the exit code (raises subprocess.TimeoutExpired)."""
        return self.popen.wait(timeout=timeout if timeout is not None else T(30))

    def stop(self, timeout=None):
        """SIGTERM, then SIGKILL after timeout; returns the exit code."""
        if not self.alive():
            return self.popen.returncode
        self.kill(signal.SIGTERM)
        try:
            return self.wait(timeout if timeout is not None else T(10))
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.wait(T(10))

    def restart(self):
        if self.alive():
            self.stop()
        return self.start()

    def close(self):
        if self.popen is not None:
            if self.alive():
                self.kill(signal.SIGKILL)
                try:
                    self.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if self.popen.stdin:
                try:
                    self.popen.stdin.close()
                except OSError:
                    pass
        try:
            self._logf.close()
        except Exception:
            pass

    def tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


class Redis:
    def __init__(self, stack, persist=False):
        """persist: append-only file fsync'd on every write, so a restart keeps the data (what
        a production Redis for promptq runs with)."""
        self.stack = stack
        self.port = free_port()
        self.dir = os.path.join(stack.dir, "redis-%d" % self.port)
        os.makedirs(self.dir, exist_ok=True)
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.proc = stack.spawn(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if persist else "no", "--appendfsync", "always",
            "--dir", self.dir, "--protected-mode", "no",
            name="redis-%d" % self.port)
        self.wait_ready()

    def wait_ready(self):
        wait_for(lambda: self.ping(), T(10), "redis-server to answer PING")

    def ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args):
        """Runs redis-cli against this server; returns its stdout without the final newline."""
        out = subprocess.run(["redis-cli", "-p", str(self.port)] + [str(a) for a in args],
                             capture_output=True, timeout=T(30))
        return out.stdout.decode(errors="replace").rstrip("\n")

    def kill(self, sig=signal.SIGKILL):
        self.proc.kill(sig)
        try:
            self.proc.wait(T(10))
        except subprocess.TimeoutExpired:
            pass

    def restart(self):
        """Starts redis-server again on the same port (data survives only with persist=True)."""
        if self.proc.alive():
            self.kill()
        self.proc.start()
        self.wait_ready()


class DevKafka:
    def __init__(self, stack, brokers=1, partitions=4, extra_args=()):
        self.stack = stack
        self.bootstrap_file = os.path.join(stack.dir, "bootstrap-%d" % len(stack.procs))
        argv = ["--brokers", str(brokers), "--partitions", str(partitions),
                "--bootstrap-file", self.bootstrap_file] + list(extra_args)
        self.proc = stack.spawn("promptq-devkafka", *argv, name="devkafka", stdin_pipe=True,
                                line_reader=True)
        wait_for(lambda: os.path.exists(self.bootstrap_file) or not self.proc.alive(), T(20),
                 "promptq-devkafka bootstrap file")
        if not self.proc.alive():
            raise AssertionError("promptq-devkafka exited: " + self.proc.tail())
        with open(self.bootstrap_file) as f:
            self.bootstrap = f.read().strip()

    def control(self, line, timeout=None):
        """Sends one control line; returns devkafka's answer line ("ok ..." / "error: ...")."""
        start = len(self.proc.lines)
        self.proc.popen.stdin.write((line + "\n").encode())
        self.proc.popen.stdin.flush()
        return self.proc.wait_line(lambda l: l.startswith("ok") or l.startswith("error"),
                                   timeout or T(10), start)


class Sim:
    def __init__(self, stack, name, args=()):
        self.name = name
        self.port = free_port()
        self.control_port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.api = self.url + "/v1"
        self.control_url = "http://127.0.0.1:%d" % self.control_port
        self.proc = stack.spawn("promptq-sim", "--listen", "127.0.0.1:%d" % self.port,
                                "--control", "127.0.0.1:%d" % self.control_port, "--name", name,
                                *args, name="sim-" + name)
        wait_for(self._up, T(10), "promptq-sim %s control API" % name)

    def _up(self):
        try:
            return http("GET", self.control_url + "/_sim/state", timeout=1)[0] == 200
        except OSError:
            return False

    def set_state(self, state):
        status, _, body = http("POST", self.control_url + "/_sim/state", state)
        if status != 200:
            raise AssertionError("sim %s refused state %r: %s" % (self.name, state, body))
        return json.loads(body)

    def stats(self):
        status, _, body = http("GET", self.control_url + "/_sim/stats")
        assert status == 200, body
        return json.loads(body)

    def reset(self):
        http("POST", self.control_url + "/_sim/reset", {})


class StatusPage:
    """A statuspage.io /api/v2/status.json on loopback whose indicator the test sets
    (none, minor, major, critical). close() when done."""

    def __init__(self, indicator="none"):
        import http.server as hs
        self.indicator = indicator
        outer = self

        class Page(hs.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"status": {"indicator": outer.indicator,
                                              "description": "x"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = hs.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/api/v2/status.json" % self.srv.server_address[1]

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


class Stack:
    """Owns the processes and files of one test; everything stops on exit."""

    def __init__(self, name):
        self.name = name
        self.log_dir = os.path.join(LOG_DIR, name)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="pq-%s-" % name)
        self.procs = []
        self.redis_ = None
        self.kafka_ = None
        self.sims = []
        self.broker_port = None
        self.failed = False

    def __enter__(self):
        _current_stacks.append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.failed = True
            # the reason first: a CI log clipped in the middle still shows it
            sys.stderr.write("----- %s failed: %s\n" % (self.name, "".join(
                traceback.format_exception_only(exc_type, exc)).strip()[:2000]))
            self.print_tails()
        self.close()
        _current_stacks.remove(self)
        return False

    def print_tails(self, n=30):
        for p in self.procs:
            sys.stderr.write("----- %s (%s) last lines -----\n%s\n" % (p.name, p.log_path, p.tail(n)))

    def close(self):
        for p in reversed(self.procs):
            if p.alive() and p.name.startswith(("promptq-broker", "broker", "worker")):
                p.stop(T(5))
        for p in reversed(self.procs):
            p.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(self, prog, *args, name=None, env=None, stdin_pipe=False, line_reader=False):
        path = binary(prog)
        p = Proc(self, name or prog, [path] + [str(a) for a in args], env=env,
                 stdin_pipe=stdin_pipe, line_reader=line_reader)
        self.procs.append(p)
        return p

    def redis(self, persist=False):
        self.redis_ = Redis(self, persist)
        return self.redis_

    def devkafka(self, brokers=1, partitions=4, extra_args=()):
        self.kafka_ = DevKafka(self, brokers, partitions, extra_args)
        return self.kafka_

    def sim(self, name, args=()):
        s = Sim(self, name, args)
        self.sims.append(s)
        return s

    @property
    def broker_url(self):
        return "http://127.0.0.1:%d" % self.broker_port

    def broker_ready(self):
        """GET /readyz answers 200 (durable intake possible)."""
        try:
            return http("GET", self.broker_url + "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def broker(self, path, name="broker", env=None):
        """Starts promptq-broker with config path and waits for /readyz; returns its Proc."""
        p = self.spawn("promptq-broker", "--config", path, name=name, env=env)
        wait_for(lambda: self.broker_ready() or not p.alive(), T(20), "%s /readyz" % name)
        assert p.alive(), p.tail()
        return p

    def config(self, providers=None, routes=None, extra=None, name="config.json"):
        """Writes a config wired to this stack's redis/devkafka/sims; returns (path, dict).
        Default: one provider "sim" per started sim (the first is "sim"), route "sim-model"."""
        if self.broker_port is None:
            self.broker_port = free_port()
        if providers is None:
            providers = {}
            for i, s in enumerate(self.sims):
                providers["sim" if i == 0 else "sim%d" % i] = {"type": "openai", "base_url": s.api}
        if routes is None:
            routes = {"sim-model": [{"provider": "sim", "model": "sim-model"}]} if providers else {}
        cfg = {
            "kafka": {},
            "redis": {},
            "broker": {"listen": "127.0.0.1:%d" % self.broker_port,
                       "spool_dir": os.path.join(self.dir, "spool")},
            "providers": providers,
            "routes": routes,
        }
        if self.kafka_:
            cfg["kafka"].update({"bootstrap.servers": self.kafka_.bootstrap,
                                 "session.timeout.ms": "6000",
                                 "heartbeat.interval.ms": "1000",
                                 "fetch.wait.max.ms": "5",
                                 "topic.metadata.refresh.interval.ms": "1000"})
            if os.environ.get("PQ_KDEBUG"):  # e.g. PQ_KDEBUG=cgrp: librdkafka's debug contexts
                cfg["kafka"]["debug"] = os.environ["PQ_KDEBUG"]
                cfg["log"] = {"level": "debug"}
        if self.redis_:
            cfg["redis"]["url"] = self.redis_.url
        if extra:
            _merge(cfg, extra)
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        return path, cfg

    def _kcat_base(self):
        return ["kcat", "-b", self.kafka_.bootstrap, "-X", "fetch.wait.max.ms=5",
                "-X", "topic.metadata.refresh.interval.ms=1000"]

    def produce(self, topic, values, keys=None, timeout=None):
        """Produces values (str, bytes (sent as they are, valid UTF-8 or not) or dict ->
        compact JSON) with kcat; keys optional."""
        lines = []
        for i, v in enumerate(values):
            if isinstance(v, (dict, list)):
                v = json.dumps(v, separators=(",", ":"))
            if isinstance(v, str):
                v = v.encode()
            if b"\n" in v or (keys is not None and "\t" in str(keys[i])):
                raise ValueError("kcat lines cannot hold newlines")
            lines.append((str(keys[i]).encode() + b"\t" + v) if keys is not None else v)
        argv = ["kcat", "-P", "-b", self.kafka_.bootstrap, "-t", topic]
        if keys is not None:
            argv += ["-K", "\t"]
        data = b"\n".join(lines) + b"\n"
        out = subprocess.run(argv, input=data, capture_output=True, timeout=timeout or T(60))
        if out.returncode != 0:
            raise AssertionError("kcat produce to %s failed: %s" % (topic, out.stderr.decode()))

    def consume(self, topic, count, timeout=None, until=None):
        """Consumes from the beginning of topic until count messages arrived (or timeout);
        returns [{"key","value","partition","offset"}] (fewer than count on timeout)."""
        argv = self._kcat_base() + ["-C", "-t", topic, "-o", "beginning", "-J", "-u"]
        if count is not None:
            argv += ["-c", str(count)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        msgs = []
        deadline = time.monotonic() + (timeout or T(30))
        done = threading.Event()

        def reader():
            for raw in proc.stdout:
                try:
                    m = json.loads(raw)
                except ValueError:
                    continue
                msgs.append({"key": m.get("key"), "value": m.get("payload"),
                             "partition": m.get("partition"), "offset": m.get("offset")})
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        while not done.is_set() and time.monotonic() < deadline:
            done.wait(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        t.join(5)
        return msgs

    def consume_all(self, topic, timeout=None):
        """Everything currently in topic (reads to the end of each partition)."""
        argv = self._kcat_base() + ["-C", "-t", topic, "-o", "beginning", "-e", "-J", "-u"]
        out = subprocess.run(argv, capture_output=True, timeout=timeout or T(60))
        msgs = []
        for raw in out.stdout.splitlines():
            try:
                m = json.loads(raw)
            except ValueError:
                continue
            msgs.append({"key": m.get("key"), "value": m.get("payload"),
                         "partition": m.get("partition"), "offset": m.get("offset")})
        return msgs


def run(namespace):
    """Runs every test_* function of a module in definition order; exits non-zero on failure."""
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    only = os.environ.get("PQ_TEST_ONLY")
    passed = failed = 0
    for name, fn in tests:
        if only and only not in name:
            continue
        t0 = time.monotonic()
        try:
            fn()
        except Exception:
            failed += 1
            sys.stderr.write("FAIL %s (%.1fs)\n%s\n" % (name, time.monotonic() - t0,
                                                         traceback.format_exc()))
        else:
            passed += 1
            print("ok   %s (%.1fs)" % (name, time.monotonic() - t0), flush=True)
    print("%d passed, %d failed" % (passed, failed), flush=True)
    sys.exit(1 if failed or not passed else 0)
