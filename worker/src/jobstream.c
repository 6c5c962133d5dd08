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
    j->stream_relayed = 0;
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
 * the end: the last count is the answer's; errors and [DONE] are not relayed). */
static pq_err_t on_stream_chunk(const pq_stream_chunk_t *chunk, void *opaque)
{
    pq_job_t *j = opaque;
    pq_err_t err = pq_stream_asm_add(j->sa, chunk);

    if (err != PQ_OK)
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

/* The current attempt failed: a t=restart entry when some of its chunks were relayed. */
void pq_jobstream_restart(pq_job_t *j, pq_err_t err)
{
    char d[96];
    int n;

    if (j->stream_relayed == 0)
        return;
    n = snprintf(d, sizeof(d), "{\"reason\":\"%s\"}", pq_err_name(err));
    pq_jobstream_xadd(j, "restart", d, (size_t)n);
    j->stream_relayed = 0;
}
