/* The live-streaming relay of a job (job_int.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "job_int.h"
#include "promptq/keys.h"
#include "promptq/log.h"

/* ---- live streaming: the relay into the job's Redis Stream ----
 *
 * A job whose request has "stream": true calls a target through its adapter's
 * build_stream_request and decodes the answer as it arrives (stream/stream.h). Each relayed
 * event is one entry of the Redis Stream pq_key_stream(prefix, tenant, id), XADD MAXLEN ~ 4096
 * with fields t and d:
 *   t=chunk    d = an OpenAI chat.completion.chunk (id = the job id, model = the target's):
 *              role, content deltas, the finish chunk, then the usage chunk (empty choices)
 *              when the client asked for stream_options.include_usage;
 *   t=restart  d = {"reason": "<error class>"}: an attempt failed after some of its chunks were
 *              relayed (the job itself fails over and completes durably); {"reason":
 *              "redelivered"} before the first chunk of a later delivery (the worker of an
 *              earlier one died or lost its lease, maybe mid-stream);
 *   t=end      d = "": the job's terminal write is done (the record holds the answer).
 * The first XADD also sets PEXPIRE 600000 on the key. Best effort: a failed XADD never fails
 * the job. The stored answer is the assembler's chat.completion, through the same success path
 * as a non-streamed call. */

#define STREAM_MAXLEN "4096"
#define STREAM_TTL_MS "600000"

void pq_jobstream_clear(pq_job_t *j)
{
    pq_stream_destroy(j->st);
    j->st = NULL;
    pq_stream_asm_destroy(j->sa);
    j->sa = NULL;
    j->continuing = 0;
}

/* XADD <stream_key> MAXLEN ~ 4096 * t <type> d <data> (and the key's TTL with the first). */
void pq_jobstream_xadd(pq_job_t *j, const char *type, const char *data, size_t len)
{
    const char *argv[10] = {"XADD", j->stream_key, "MAXLEN", "~", STREAM_MAXLEN,
                            "*",    "t",           type,     "d", data};
    size_t lens[10];

    if (!j->stream_key[0] && pq_key_stream(j->stream_key, sizeof(j->stream_key),
                                           j->w->conf->redis_prefix, tenant_of(j), id_of(j)) < 0) {
        j->stream_key[0] = '\0';
        return;
    }
    for (int i = 0; i < 9; i++)
        lens[i] = strlen(argv[i]);
    lens[9] = len;
    if (pq_redis_command(job_redis(j), 10, argv, lens, j->hooks->aux_reply, j) != 0)
        return; /* best effort: Redis is down, the relay loses this entry */
    j->nredis++;
    if (j->stream_xadds++ == 0) {
        const char *pv[3] = {"PEXPIRE", j->stream_key, STREAM_TTL_MS};
        size_t pl[3] = {7, strlen(j->stream_key), strlen(STREAM_TTL_MS)};
        if (pq_redis_command(job_redis(j), 3, pv, pl, j->hooks->aux_reply, j) == 0)
            j->nredis++;
    }
}

/* Relays chunk as a t=chunk entry, with the job's id and the target's model. */
static void stream_relay(pq_job_t *j, const pq_stream_chunk_t *chunk)
{
    const pq_target_t *t = &j->route->targets[j->target];
    pq_stream_chunk_t c = *chunk;
    size_t len = 0;
    char *d;

    c.id = id_of(j);
    c.model = t->model;
    if (!(d = pq_stream_chunk_render(&c, t->model, (int64_t)(pq_now_ms() / 1000), NULL, &len)))
        return;
    /* Delivered before (a worker died or lost its lease mid-call): the stream may hold a lost
     * attempt's chunks, so the first chunk of this delivery is preceded by a restart (the
     * broker ignores a restart that follows no chunk). */
    if (j->stream_xadds == 0 && j->deliveries > 1) {
        static const char d_redelivered[] = "{\"reason\":\"redelivered\"}";
        pq_jobstream_xadd(j, "restart", d_redelivered, sizeof(d_redelivered) - 1);
    }
    pq_jobstream_xadd(j, "chunk", d, len);
    j->stream_relayed++;
    free(d);
}

/* A chunk of the current attempt: into the assembler; deltas relayed at once (usage waits for
 * the end: the last count is the answer's; errors and [DONE] are not relayed). A continuation
 * says no role again (the client has it), and whitespace it repeats of what was left out of
 * the prefill is dropped, so the client's text and the stored one stay the same. */
static pq_err_t on_stream_chunk(const pq_stream_chunk_t *chunk, void *opaque)
{
    pq_job_t *j = opaque;
    pq_stream_chunk_t c;
    pq_err_t err;

    if (j->continuing && chunk->kind == PQ_STREAM_CHUNK_DELTA) {
        c = *chunk;
        c.role = NULL;
        while (j->prefill_skip && c.text && c.text_len && strchr(" \t\r\n", c.text[0])) {
            c.text++;
            c.text_len--;
            j->prefill_skip--;
        }
        if (c.text && c.text_len)
            j->prefill_skip = 0;
        if (c.text && !c.text_len)
            c.text = NULL;
        if (!c.text && !c.tool && !c.finish)
            return PQ_OK; /* nothing left to say */
        chunk = &c;
    }
    if ((err = pq_stream_asm_add(j->sa, chunk)) != PQ_OK)
        return err;
    if (chunk->kind == PQ_STREAM_CHUNK_DELTA)
        stream_relay(j, chunk);
    return PQ_OK;
}

pq_err_t pq_jobstream_on_data(void *opaque, const char *buf, size_t len)
{
    pq_job_t *j = opaque;

    return pq_stream_feed(j->st, buf, len, on_stream_chunk, j);
}

/* The usage chunk of a clean stream, from the assembled answer, when the client asked. */
void pq_jobstream_relay_usage(pq_job_t *j, const json_t *completion)
{
    json_t *u = json_object_get(completion, "usage");
    pq_stream_chunk_t c;

    if (!j->stream_usage || !json_is_object(u))
        return;
    memset(&c, 0, sizeof(c));
    c.kind = PQ_STREAM_CHUNK_USAGE;
    c.created = json_integer_value(json_object_get(completion, "created"));
    c.prompt_tokens = json_integer_value(json_object_get(u, "prompt_tokens"));
    c.completion_tokens = json_integer_value(json_object_get(u, "completion_tokens"));
    c.total_tokens = json_integer_value(json_object_get(u, "total_tokens"));
    stream_relay(j, &c);
}

/* A t=restart entry when something was relayed since the last one. */
static void restart(pq_job_t *j, pq_err_t err)
{
    char d[96];
    int n;

    if (j->stream_relayed == 0)
        return;
    n = snprintf(d, sizeof(d), "{\"reason\":\"%s\"}", pq_err_name(err));
    pq_jobstream_xadd(j, "restart", d, (size_t)n);
    j->stream_relayed = 0;
}

/* ---- assistant prefill ----
 *
 * A streamed attempt that fails after chunks reached the client would make it start over (a
 * restart entry: the broker ends the client's stream with an error event). When a target of
 * the route continues a trailing assistant message (supports_prefill), the text relayed so far
 * is kept instead and the next attempt that lands on such a target gets the request with that
 * text appended as an assistant message: its answer continues the client's, under the same
 * stream, and the stored answer is the whole text. Only a single-choice text answer is
 * continued (no tool calls). A target that cannot continue it gets a fresh call, after the
 * restart entry. */

void pq_jobstream_prefill_drop(pq_job_t *j)
{
    free(j->prefill);
    j->prefill = NULL;
    j->prefill_len = j->prefill_sent = j->prefill_skip = 0;
}

void pq_jobstream_flush(pq_job_t *j)
{
    if (!j->prefill)
        return;
    restart(j, j->prefill_err);
    pq_jobstream_prefill_drop(j);
}

static int route_continues(const pq_job_t *j)
{
    for (size_t i = 0; i < j->route->ntargets; i++)
        if (pq_target_prefill(&j->route->targets[i]))
            return 1;
    return 0;
}

/* What the client has of the failed attempt's answer (its assembler, seeded with any earlier
 * prefill), as the pending prefill. 0, or -1 when it cannot be continued. */
static int prefill_take(pq_job_t *j)
{
    json_t *c = j->sa ? pq_stream_asm_completion(j->sa, "", 0) : NULL;
    json_t *choices = json_object_get(c, "choices");
    json_t *msg = json_object_get(json_array_get(choices, 0), "message");
    const char *text = json_string_value(json_object_get(msg, "content"));
    size_t len = text ? json_string_length(json_object_get(msg, "content")) : 0, sent = len;
    char *copy;

    if (json_array_size(choices) != 1 || json_object_get(msg, "tool_calls") || !len ||
        memchr(text, '\0', len) || !(copy = malloc(len + 1))) {
        json_decref(c);
        return -1;
    }
    memcpy(copy, text, len + 1);
    json_decref(c);
    /* providers refuse a prefill that ends in whitespace (Anthropic does): leave it out */
    while (sent && strchr(" \t\r\n", copy[sent - 1]))
        sent--;
    if (!sent) {
        free(copy);
        return -1;
    }
    pq_jobstream_prefill_drop(j);
    j->prefill = copy;
    j->prefill_len = len;
    j->prefill_sent = sent;
    return 0;
}

void pq_jobstream_failed(pq_job_t *j, pq_err_t err)
{
    if (j->stream_relayed == 0)
        return;
    if (!route_continues(j) || prefill_take(j) != 0) {
        pq_jobstream_prefill_drop(j);
        restart(j, err);
        return;
    }
    j->prefill_err = err;
}

json_t *pq_jobstream_prefill_request(pq_job_t *j, const json_t *request)
{
    json_t *copy, *msgs, *m;

    if (!j->prefill)
        return NULL;
    copy = json_deep_copy(request);
    msgs = json_object_get(copy, "messages");
    m = json_pack("{s:s, s:s%}", "role", "assistant", "content", j->prefill, j->prefill_sent);
    if (!json_is_array(msgs) || !m || json_array_append_new(msgs, m)) {
        json_decref(copy);
        pq_jobstream_flush(j);
        return NULL;
    }
    return copy;
}

int pq_jobstream_prefill_seed(pq_job_t *j)
{
    pq_stream_chunk_t c;

    if (!j->prefill || !j->sa)
        return -1;
    memset(&c, 0, sizeof(c));
    c.kind = PQ_STREAM_CHUNK_DELTA;
    c.role = "assistant";
    c.text = j->prefill;
    c.text_len = j->prefill_len;
    if (pq_stream_asm_add(j->sa, &c) != PQ_OK)
        return -1; /* still pending: the next attempt tries again */
    j->prefill_skip = j->prefill_len - j->prefill_sent;
    j->continuing = 1;
    return 0;
}
