// promptq's Files and Batch API driven by the official OpenAI Node SDK (openai@6).
// Run from tests/integration/test_batches.py with PQ_BASE_URL, PQ_API_KEY, PQ_MODEL set.
import { test } from "node:test";
import assert from "node:assert/strict";
import OpenAI, { toFile } from "openai";

const client = new OpenAI({
  baseURL: process.env.PQ_BASE_URL,
  apiKey: process.env.PQ_API_KEY,
  maxRetries: 0,
  timeout: 30000,
});
const model = process.env.PQ_MODEL;

test("files.create, batches.create, retrieve until completed, files.content", async () => {
  const n = 50;
  const lines = [];
  for (let i = 0; i < n; i++) {
    lines.push(JSON.stringify({
      custom_id: `sdk-${i}`, method: "POST", url: "/v1/chat/completions",
      body: { model, messages: [{ role: "user", content: `sdk prompt ${i}` }] },
    }));
  }
  const file = await client.files.create({
    file: await toFile(Buffer.from(lines.join("\n") + "\n"), "sdk.jsonl"),
    purpose: "batch",
  });
  assert.equal(file.object, "file");
  assert.equal(file.purpose, "batch");
  assert.match(file.id, /^file-/);

  let batch = await client.batches.create({
    input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h",
    metadata: { suite: "node" },
  });
  assert.equal(batch.object, "batch");
  assert.deepEqual(batch.metadata, { suite: "node" });
  const deadline = Date.now() + 60000;
  while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
    assert.ok(Date.now() < deadline, `batch still ${batch.status}`);
    await new Promise((r) => setTimeout(r, 200));
    batch = await client.batches.retrieve(batch.id);
  }
  assert.equal(batch.status, "completed");
  assert.deepEqual(batch.request_counts, { total: n, completed: n, failed: 0 });

  const res = await client.files.content(batch.output_file_id);
  const text = await res.text();
  const out = text.trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(out.length, n);
  const byId = new Map(out.map((o) => [o.custom_id, o]));
  for (let i = 0; i < n; i++) {
    const o = byId.get(`sdk-${i}`);
    assert.ok(o, `sdk-${i} missing`);
    assert.equal(o.error, null);
    assert.equal(o.response.status_code, 200);
    assert.equal(o.response.body.choices[0].message.content, `echo: sdk prompt ${i}`);
  }

  const page = await client.batches.list({ limit: 1 });
  assert.equal(page.data[0].id, batch.id);
  const got = await client.files.retrieve(file.id);
  assert.equal(got.id, file.id);
});
