// promptq's OpenAI-compatible API through the official OpenAI Node SDK, unchanged: only the base
// URL and the key differ. Run by tests/integration/test_chat.py, which starts the stack
// (redis-server, promptq-devkafka, promptq-sim, promptq-worker, promptq-broker) and passes:
//   PQ_BASE_URL     http://127.0.0.1:PORT/v1
//   PQ_API_KEY      a broker API key
//   PQ_MODEL        a route answered by a fast sim ("echo: <prompt>")
//   PQ_SLOW_MODEL   a route whose sim answers later than broker.sync_timeout_ms
//   PQ_MODELS       comma-separated list of every configured route
// Uses node's built-in test runner: node --test chat.test.mjs (or node chat.test.mjs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const baseURL = process.env.PQ_BASE_URL;
const apiKey = process.env.PQ_API_KEY;
const MODEL = process.env.PQ_MODEL;
const SLOW = process.env.PQ_SLOW_MODEL;
const MODELS = (process.env.PQ_MODELS || '').split(',').filter(Boolean);
const root = baseURL.replace(/\/v1\/?$/, '');

const client = new OpenAI({ baseURL, apiKey, timeout: 60_000 });

async function metric(name, labels) {
  const text = await (await fetch(root + '/metrics')).text();
  const want = labels ? `${name}{${labels}} ` : `${name} `;
  const line = text.split('\n').find((l) => l.startsWith(want));
  return line ? Number(line.slice(want.length)) : 0;
}

async function getJob(id) {
  const r = await fetch(`${root}/v1/jobs/${id}`, { headers: { Authorization: `Bearer ${apiKey}` } });
  assert.equal(r.status, 200, `GET /v1/jobs/${id}`);
  return r.json();
}

test('chat completion through promptq-worker and promptq-sim', async () => {
  const { data, response } = await client.chat.completions
    .create({ model: MODEL, messages: [{ role: 'user', content: 'hello from node' }] })
    .withResponse();
  assert.equal(data.object, 'chat.completion');
  assert.equal(data.choices.length, 1);
  assert.equal(data.choices[0].message.role, 'assistant');
  assert.equal(data.choices[0].message.content, 'echo: hello from node');
  assert.equal(data.choices[0].finish_reason, 'stop');
  assert.ok(data.usage && data.usage.total_tokens > 0, 'usage');
  const jobId = response.headers.get('x-promptq-job-id');
  assert.match(jobId, /^job_[0-9A-Z]{26}$/);
  assert.equal(data.id, jobId, 'the completion id is the job id');
  const rec = await getJob(jobId);
  assert.equal(rec.status, 'succeeded');
  assert.equal(rec.response.choices[0].message.content, 'echo: hello from node');
});

test('streaming: role chunk, content chunk, finish chunk, usage, [DONE]', async () => {
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'stream me' }],
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const c of stream) chunks.push(c);
  assert.ok(chunks.length >= 3, `got ${chunks.length} chunks`);
  for (const c of chunks) {
    assert.equal(c.object, 'chat.completion.chunk');
    assert.equal(c.id, chunks[0].id);
    assert.equal(c.created, chunks[0].created);
    assert.equal(c.model, chunks[0].model);
  }
  assert.match(chunks[0].id, /^job_/);
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  const text = chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');
  assert.equal(text, 'echo: stream me');
  const finish = chunks.filter((c) => c.choices[0]?.finish_reason);
  assert.equal(finish.length, 1);
  assert.equal(finish[0].choices[0].finish_reason, 'stop');
  const last = chunks[chunks.length - 1];
  assert.deepEqual(last.choices, []);
  assert.ok(last.usage && last.usage.total_tokens > 0, 'usage in the last chunk');

  // The wire format itself: server-sent events ending with data: [DONE].
  const r = await fetch(baseURL + '/chat/completions', {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'raw' }], stream: true }),
  });
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/event-stream/);
  assert.match(r.headers.get('x-promptq-job-id'), /^job_/);
  const body = await r.text();
  // Relayed live chunks carry "id: <stream entry id>" (Last-Event-ID); keep-alives are comments.
  const events = body.split('\n\n').filter(Boolean).map((e) =>
    e.split('\n').filter((l) => !l.startsWith('id: ') && !l.startsWith(':')).join('\n')).filter(Boolean);
  assert.equal(events[events.length - 1], 'data: [DONE]');
  assert.ok(events.every((e) => e.startsWith('data: ')), events.join(' | '));
  const parsed = events.slice(0, -1).map((e) => JSON.parse(e.replace(/^data: /, '')));
  assert.ok(parsed.every((c) => c.usage == null), 'no usage chunk without include_usage');
  assert.equal(parsed[0].choices[0].delta.role, 'assistant');
  const rawText = parsed.map((c) => (c.choices[0] && c.choices[0].delta.content) || '').join('');
  assert.equal(rawText, 'echo: raw');
  assert.equal(parsed[parsed.length - 1].choices[0].finish_reason, 'stop');
});

test('models list and retrieve', async () => {
  const ids = [];
  for await (const m of client.models.list()) {
    assert.equal(m.object, 'model');
    assert.equal(m.owned_by, 'promptq');
    assert.equal(typeof m.created, 'number');
    ids.push(m.id);
  }
  assert.deepEqual(ids.sort(), [...MODELS].sort());
  const one = await client.models.retrieve(MODEL);
  assert.equal(one.id, MODEL);
  await assert.rejects(client.models.retrieve('no-such-model'), OpenAI.NotFoundError);
});

test('errors: unknown model is NotFoundError, bad key is AuthenticationError', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] }),
    (e) => {
      assert.ok(e instanceof OpenAI.NotFoundError, String(e));
      assert.equal(e.status, 404);
      assert.equal(e.code, 'model_not_found');
      return true;
    },
  );
  const bad = new OpenAI({ baseURL, apiKey: 'not-a-key', maxRetries: 0 });
  await assert.rejects(
    bad.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'x' }] }),
    OpenAI.AuthenticationError,
  );
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: 'not a list' }),
    OpenAI.BadRequestError,
  );
});

test('wait timeout: 504 with x-should-retry false, no SDK retry, the job still completes', async () => {
  const label = 'path="/v1/chat/completions",code="504"';
  const before = await metric('promptq_broker_http_requests_total', label);
  const retrying = new OpenAI({ baseURL, apiKey, maxRetries: 2, timeout: 60_000 });
  let err;
  try {
    await retrying.chat.completions.create({ model: SLOW, messages: [{ role: 'user', content: 'slow one' }] });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof OpenAI.APIError, `expected an API error, got ${err}`);
  assert.equal(err.status, 504);
  assert.equal(err.code, 'timeout');
  assert.equal(err.headers.get('x-should-retry'), 'false');
  const jobId = err.headers.get('x-promptq-job-id');
  assert.match(jobId, /^job_/);
  assert.equal(await metric('promptq_broker_http_requests_total', label), before + 1,
    'exactly one POST answered 504: the SDK did not retry');
  // The job was durable and completes after the caller gave up waiting.
  const deadline = Date.now() + 30_000;
  let rec;
  for (;;) {
    rec = await getJob(jobId);
    if (rec.status === 'succeeded' || Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.equal(rec.status, 'succeeded');
  assert.equal(rec.response.choices[0].message.content, 'echo: slow one');
});
