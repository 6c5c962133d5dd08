// An OpenAI-compatible provider over TLS for tests/bench/h2.py: answers every
// POST .../chat/completions after --latency-ms with a small chat.completion, speaking either
// HTTP/2 only (--proto h2, ALPN "h2") or HTTP/1.1 only (--proto h1). GET /stats on the plain
// --stats-port (127.0.0.1) returns {"requests", "connections"}: calls answered and TLS
// connections accepted. Node's built-in http2/https modules only; loopback only.
import fs from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import https from "node:https";

const arg = (name, def) => {
  const i = process.argv.indexOf("--" + name);
  return i > 0 ? process.argv[i + 1] : def;
};
const proto = arg("proto", "h2");
const latency = Number(arg("latency-ms", "1000"));
const tls = { cert: fs.readFileSync(arg("cert")), key: fs.readFileSync(arg("key")) };
const stats = { requests: 0, connections: 0 };

function answer(req, res) {
  const parts = [];
  req.on("data", (c) => parts.push(c));
  req.on("end", () => {
    let model = "m";
    try {
      model = JSON.parse(Buffer.concat(parts)).model || model;
    } catch {
      res.writeHead(400, { "content-type": "application/json" });
      res.end('{"error":{"message":"bad json","type":"invalid_request_error"}}');
      return;
    }
    setTimeout(() => {
      const body = JSON.stringify({
        id: "chatcmpl-h2", object: "chat.completion", created: 1, model,
        choices: [{ index: 0, finish_reason: "stop",
                    message: { role: "assistant", content: "ok" } }],
        usage: { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 },
      });
      stats.requests++;
      res.writeHead(200, { "content-type": "application/json",
                           "content-length": Buffer.byteLength(body) });
      res.end(body);
    }, latency);
  });
}

const srv = proto === "h2"
  ? http2.createSecureServer({ ...tls, allowHTTP1: false,
                               maxSessionMemory: 1024, // MB; past Node's default (10) a session refuses new streams
                               settings: { maxConcurrentStreams: 100000 } }, answer)
  : https.createServer({ ...tls, ALPNProtocols: ["http/1.1"], keepAlive: true }, answer);
srv.on("secureConnection", () => stats.connections++);
srv.keepAliveTimeout = 60000;
srv.listen(Number(arg("port")), "127.0.0.1");

http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify(stats));
}).listen(Number(arg("stats-port")), "127.0.0.1");
