/* One job's life in the worker:
 *
 *   intake -> parse (invalid: dlq) -> BEGIN (Redis lease script)
 *     run      -> CALL provider target <-> BACKOFF (retryable) -> next target ... -> FINISH
 *     terminal -> PUBLISH the stored result verbatim
 *     conflict -> PUBLISH to dlq (id_conflict)
 *     leased   -> WAIT_LEASE, then BEGIN again
 *     poison   -> FINISH failed (poison)
 *   FINISH (compare-and-set terminal write) -> PUBLISH results (+ dlq when failed/expired)
 *   -> all delivery reports OK -> offset done -> freed.
 *   every target down (retryable failures or open circuits) -> PARK: the envelope + "park"
 *   {reason, attempts, parked_at, deliveries} produced to the route's retry topic, on its
 *   delivery report the record becomes parked (lease released, deliveries reset), then the
 *   offset is done (G4). A parked job read back from the retry topic runs the same way; its
 *   deadline or park TTL passed: FINISH expired.
 * After the terminal write (or when re-publishing a terminal result) a job whose envelope has
 * reply_to gets PUBLISH <reply_to> "<tenant>:<id>" (best effort; waiters re-read the record).
 *
 * A job waiting on Redis while it is down sits on the worker's redis_wait list and is re-issued
 * when Redis is back. A second copy of an id already in flight in this process waits for the
 * first (WAIT_LOCAL): the lease owner is per process, so the lease cannot tell them apart. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "promptq/callback.h"
#include "promptq/err.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"
#include "prov.h"
#include "providers/common.h"
#include "providers/provider.h"
#include "stream/stream.h"
#include "jobdoc.h"
#include "gen.h"
#include "park.h"
#include "parts.h"
#include "produce.h"
#include "worker_int.h"

#define KEY_MAX              320
#define LOCAL_WAIT_MS        100
#define LANE_MAX_WAIT_MS     1000 /* bulk: longest wait for the interactive lane */
#define REDIS_ERROR_RETRY_MS 1000
#define PRODUCE_RETRY_MS     100
#define DELIVERY_RETRY_MS    500

typedef enum {
    JS_BEGIN,
    JS_WAIT_LOCAL,
    JS_WAIT_LEASE,
    JS_CACHE,  /* cache lookup */
    JS_QUEUED, /* waiting for a provider slot (concurrency, rpm/tpm) */
    JS_TOKEN,  /* waiting for a watsonx IAM token */
    JS_CALL,
    JS_BACKOFF,
    JS_FINISH,
    JS_PUBLISH,
    JS_PARK, /* produced to the retry topic, then the parked write */
    JS_GONE,
} job_state_t;

typedef enum {
    RS_NONE,
    RS_BEGIN,
    RS_FINISH,
    RS_RELEASE,
    RS_CACHE_GET,
    RS_PARK,
} redis_step_t;

typedef struct pub_s {
    pq_job_t *job;
    int topic;
    int pending; /* produced, report not yet in */
    int done;
} pub_t;

struct pq_job_s {
    pq_worker_t *w;
    pq_gen_t *gen;              /* the providers and routes it runs with */
    pq_route_state_t *rs;       /* its route's parking state, NULL for an unknown route */
    pq_route_state_t *retry_rs; /* read from this route's retry topic */
    const char *src_topic;
    pq_part_t *part;
    uint64_t seq;
    int topic;
    int32_t partition;
    int64_t offset;
    char *msg_key; /* invalid jobs only */

    pq_envelope_t env;
    const pq_route_t *route;
    char job_key[KEY_MAX];
    char lease_key[KEY_MAX];

    job_state_t state;
    redis_step_t rstep;
    int in_lane;   /* bulk: on w->lane_wait (state JS_BACKOFF) while interactive work runs */
    int lane_pass; /* bulk: waited LANE_MAX_WAIT_MS, the next attempt goes ahead anyway */
    int in_wait, in_table, lease_held, handed_back, nredis;
    int eval_text; /* the next script step goes as EVAL with the text (after a NOSCRIPT) */
    int slim;      /* result record without attempt log and metadata (too large otherwise) */
    int dlq_small; /* the dlq record is the small stand-in (the full one was too large) */
    struct event timer, renew;

    pq_http_req_t *http;
    /* live streaming (the request has "stream": true): each attempt's decoder and assembler,
     * the relay into the job's Redis Stream (stream_key) */
    int stream_usage;    /* ... and for the usage chunk (stream_options.include_usage) */
    int stream_xadds;    /* XADDs sent to stream_key (the first one sets its TTL) */
    int stream_relayed;  /* chunks of the current attempt relayed */
    pq_stream_t *st;     /* the current attempt's decoder, NULL when it does not stream */
    pq_stream_asm_t *sa; /* its assembler */
    char stream_key[KEY_MAX + 80];
    size_t target;
    int tries;  /* retryable failures on the current target */
    int rounds; /* passes over all targets */
    int any_retryable;
    int attempts;      /* provider calls */
    int pass_attempts; /* provider calls in this pass over the route (worker.max_attempts) */
    pq_prov_t *prov;   /* the current target's provider state */
    pq_circuit_t *circ;
    pq_slot_wait_t sw;
    pq_token_wait_t tw;
    int key;           /* key index of the slot held */
    int slot_held;     /* a provider slot is ours (released when the call ends) */
    int probe;         /* this call is the half-open probe of circ */
    int refreshed;     /* watsonx: token refreshed after a 401 on this target */
    uint64_t excluded; /* keys of the current target that refused this job */
    double cost;       /* estimated tokens (tpm) */
    char token_used[2048];
    json_t *alog; /* attempt log */
    int cacheable;
    char cache_key[KEY_MAX + 80];
    json_t *cached; /* the cache entry that answered, or NULL */
    int64_t deliveries;
    const pq_target_t *last_target;
    pq_err_t err;
    char errmsg[256];
    long http_status;
    pq_provider_fault_t fault; /* the provider's code and reason of the error in err */
    int64_t budget_end_ms;     /* wall ms: a waiting client gives up then; 0 = no budget */
    int64_t ctx_floor;         /* after a context_length_exceeded: only targets with a larger
                                  max_context_tokens; -1 = any */
    const pq_provider_conf_t *refused[8]; /* providers that refused the request (400/422) */
    int nrefused;
    json_t *response;
    int64_t created_ms;
    int64_t start_mono;
    const char *status;

    char *result; /* value for promptq.results, or NULL */
    size_t result_len;
    char *dlq; /* value for promptq.dlq, or NULL */
    size_t dlq_len;
    pub_t pubs[2];
    pub_t park_pub;
    char *parked; /* value for the retry topic, or NULL */
    size_t parked_len;

    pq_job_t *hnext;
    TAILQ_ENTRY(pq_job_s) link;
    TAILQ_ENTRY(pq_job_s) wait_link;
    TAILQ_ENTRY(pq_job_s) lane_link;
};

static void job_begin(pq_job_t *j);
static void job_free(pq_job_t *j);
static void job_attempt(pq_job_t *j);

/* Interactive jobs talk to Redis over their own connection: the server serves connections in
 * turn, so a bulk job's burst of commands never queues in front of theirs. */
static pq_redis_t *job_redis(const pq_job_t *j)
{
    return j->topic == PQ_T_REQUESTS && j->w->iredis ? j->w->iredis : j->w->redis;
}

/* The interactive lane's calls go through their own HTTP client (priority 0 events). */
static pq_http_t *job_http(const pq_job_t *j)
{
    return j->topic == PQ_T_REQUESTS && j->w->ihttp ? j->w->ihttp : j->w->http;
}

static void lane_leave(pq_job_t *j);
static void job_finish(pq_job_t *j, const char *status, pq_err_t err, const char *msg);
static void job_publish(pq_job_t *j);
static void job_redis_issue(pq_job_t *j);
static void job_run(pq_job_t *j);
static void job_cache_store(pq_job_t *j);
static void on_cache_get(pq_job_t *j, redisReply *r);

/* ---- (tenant, id) table of jobs in flight in this process ---- */

static size_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return (size_t)h;
}

static pq_job_t *table_find(pq_worker_t *w, const char *key)
{
    for (pq_job_t *j = w->table[hash_str(key) & w->table_mask]; j; j = j->hnext)
        if (strcmp(j->job_key, key) == 0)
            return j;
    return NULL;
}

static void table_add(pq_job_t *j)
{
    pq_job_t **b = &j->w->table[hash_str(j->job_key) & j->w->table_mask];
    j->hnext = *b;
    *b = j;
    j->in_table = 1;
}

static void table_remove(pq_job_t *j)
{
    pq_job_t **p;

    if (!j->in_table)
        return;
    for (p = &j->w->table[hash_str(j->job_key) & j->w->table_mask]; *p; p = &(*p)->hnext) {
        if (*p == j) {
            *p = j->hnext;
            break;
        }
    }
    j->in_table = 0;
    j->hnext = NULL;
}

/* ---- helpers ---- */

static void timer_in(pq_job_t *j, int64_t ms)
{
    struct timeval tv;
    if (ms < 0)
        ms = 0;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    evtimer_add(&j->timer, &tv);
}

static const char *tenant_of(const pq_job_t *j)
{
    return j->env.tenant ? j->env.tenant : "default";
}

static const char *id_of(const pq_job_t *j)
{
    return j->env.id ? j->env.id : "-";
}

static int deadline_passed(const pq_job_t *j, int64_t extra_ms)
{
    return j->env.deadline_ms > 0 && pq_now_ms() + extra_ms >= j->env.deadline_ms;
}

static int park_expired(const pq_job_t *j)
{
    int64_t at = pq_jobdoc_park_since(j->env.park);
    return at > 0 && pq_now_ms() - at >= j->w->conf->park_ttl_s * 1000;
}

/* A Redis reply for j arrived: one command fewer in flight. Returns 1 when j is gone (then
 * freed with its last reply): the caller stops there. */
static int redis_replied(pq_job_t *j)
{
    j->nredis--;
    if (j->state != JS_GONE)
        return 0;
    if (j->nredis == 0)
        job_free(j);
    return 1;
}

static void on_aux_reply(void *opaque, redisReply *reply)
{
    (void)reply;
    redis_replied(opaque);
}

/* PUBLISH <reply_to> "<tenant>:<id>" for a synchronous waiter; best effort. */
static void job_reply(pq_job_t *j)
{
    char msg[PQ_TENANT_MAX + PQ_ID_MAX + 2];
    const char *argv[3];
    size_t lens[3];

    if (!j->env.reply_to || !j->env.reply_to[0] || !j->env.id)
        return;
    snprintf(msg, sizeof(msg), "%s:%s", tenant_of(j), id_of(j));
    argv[0] = "PUBLISH";
    argv[1] = j->env.reply_to;
    argv[2] = msg;
    for (int i = 0; i < 3; i++)
        lens[i] = strlen(argv[i]);
    if (pq_redis_command(job_redis(j), 3, argv, lens, on_aux_reply, j) == 0)
        j->nredis++;
}

static void stream_attempt_clear(pq_job_t *j);
static void stream_xadd(pq_job_t *j, const char *type, const char *data, size_t len);

static void job_free(pq_job_t *j)
{
    stream_attempt_clear(j);
    evtimer_del(&j->timer);
    event_del(&j->renew);
    pq_envelope_clear(&j->env);
    json_decref(j->response);
    json_decref(j->alog);
    json_decref(j->cached);
    explicit_bzero(j->token_used, sizeof(j->token_used));
    free(j->result);
    free(j->dlq);
    free(j->parked);
    free(j->msg_key);
    free(j);
}

/* The job is over: its offset counts as done unless it was handed back. */
static void job_done(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    pq_part_t *part = j->part;

    if (j->state == JS_GONE)
        return;
    j->state = JS_GONE;
    evtimer_del(&j->timer);
    event_del(&j->renew);
    table_remove(j);
    if (j->in_wait) {
        TAILQ_REMOVE(&w->redis_wait, j, wait_link);
        j->in_wait = 0;
    }
    lane_leave(j);
    PQ_DBG("job %s/%s %s attempts=%d deliveries=%" PRId64 " source=%s/%" PRId32 "/%" PRId64
           " %" PRId64 "ms",
           tenant_of(j), id_of(j), j->status ? j->status : "handled", j->attempts, j->deliveries,
           j->src_topic, j->partition, j->offset, pq_mono_ms() - j->start_mono);
    if (!j->handed_back && part)
        pq_worker_offset_done(w, part, j->seq);
    TAILQ_REMOVE(&w->jobs, j, link);
    j->part = NULL;
    if (j->retry_rs) {
        j->retry_rs->inflight--;
        w->retry_inflight--;
        j->retry_rs = NULL;
    }
    pq_gen_unref(w, j->gen);
    j->gen = NULL;
    w->job_gone(w, part);
    if (j->nredis == 0)
        job_free(j);
}

/* ---- JSON documents ---- */

/* The job's record inputs (jobdoc.h), borrowed from j; the time is now. */
static void job_doc(const pq_job_t *j, pq_jobdoc_t *d)
{
    memset(d, 0, sizeof(*d));
    d->env = &j->env;
    d->status = j->status;
    d->provider = j->last_target ? j->last_target->provider : NULL;
    d->model = j->last_target ? j->last_target->model : NULL;
    d->attempts = j->attempts;
    d->alog = j->alog;
    d->slim = j->slim;
    d->cached = j->cached;
    d->response = j->response;
    d->err = j->err;
    d->errmsg = j->errmsg;
    d->http_status = j->http_status;
    d->fault_code = j->fault.code;
    d->fault_reason = j->fault.reason;
    d->created_ms = j->created_ms;
    d->now_ms = pq_now_ms();
    d->src_topic = j->src_topic;
    d->partition = j->partition;
    d->offset = j->offset;
}

static json_t *error_object(const pq_job_t *j)
{
    pq_jobdoc_t d;

    job_doc(j, &d);
    return pq_jobdoc_error(&d);
}

static char *build_result(const pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;

    job_doc(j, &d);
    return pq_jobdoc_result(&d, len);
}

static char *build_dlq_small(pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;

    job_doc(j, &d);
    j->dlq_small = 1;
    return pq_jobdoc_dlq_small(&d, len);
}

/* Envelope + "error" (taken) for promptq.dlq (the small stand-in when that is over max_msg). */
static char *build_dlq(pq_job_t *j, json_t *error, size_t *len)
{
    pq_jobdoc_t d;

    job_doc(j, &d);
    return pq_jobdoc_dlq(&d, error, j->w->max_msg, &j->dlq_small, len);
}

/* Produce errors that no retry can fix. */
static int produce_err_permanent(rd_kafka_resp_err_t e)
{
    switch (e) {
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
    case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR__INVALID_ARG:
        return 1;
    default:
        return 0;
    }
}

/* A permanent produce error on p: the dlq record is replaced by its small stand-in once (and
 * produced again); otherwise the record is given up (logged and counted) so the job ends and
 * its offset moves on. */
static void pub_permanent(pq_job_t *j, pub_t *p, rd_kafka_resp_err_t err)
{

    if (p == &j->pubs[1] && !j->dlq_small) {
        free(j->dlq);
        j->dlq = build_dlq_small(j, &j->dlq_len);
        if (j->dlq)
            return;
    }
    PQ_ERR("job %s/%s: %s record of %zu bytes cannot be produced (%s): given up", tenant_of(j),
           id_of(j), p == &j->pubs[0] ? "result" : "dlq",
           p == &j->pubs[0] ? j->result_len : j->dlq_len, rd_kafka_err2str(err));
    p->done = 1;
}

/* ---- publishing ---- */

static void job_publish(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    const char *key = j->env.id ? j->env.id : j->msg_key;
    int waiting = 0;

    j->state = JS_PUBLISH;
    for (int i = 0; i < 2; i++) {
        pub_t *p = &j->pubs[i];
        const char *buf = i == 0 ? j->result : j->dlq;
        size_t len = i == 0 ? j->result_len : j->dlq_len;
        rd_kafka_resp_err_t err;

        if (!buf || p->done)
            continue;
        if (p->pending) {
            waiting = 1;
            continue;
        }
        p->job = j;
        p->topic = i == 0 ? PQ_T_RESULTS : PQ_T_DLQ;
        err = len > w->max_msg ? RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE
                               : pq_worker_produce(w, p->topic, key, buf, len, p);
        if (err && produce_err_permanent(err)) {
            pq_counter_add(w->m.produce_errors, 1);
            pub_permanent(j, p, err);
            i--; /* the same record again: its stand-in, or done */
            continue;
        }
        if (err) {
            PQ_WARN("job %s/%s: produce to %s: %s", tenant_of(j), id_of(j), w->topics[p->topic],
                    rd_kafka_err2str(err));
            pq_counter_add(w->m.produce_errors, 1);
            timer_in(j,
                     err == RD_KAFKA_RESP_ERR__QUEUE_FULL ? PRODUCE_RETRY_MS : DELIVERY_RETRY_MS);
            return;
        }
        p->pending = 1;
        waiting = 1;
    }
    if (!waiting)
        job_done(j);
}

static void job_park_produce(pq_job_t *j);

void pq_job_delivered(pq_worker_t *w, const rd_kafka_message_t *m)
{
    pub_t *p = m->_private;
    pq_job_t *j = p ? p->job : NULL;

    if (!j)
        return;
    p->pending = 0;
    if (m->err && p != &j->park_pub && produce_err_permanent(m->err)) {
        pq_counter_add(w->m.produce_errors, 1);
        pub_permanent(j, p, m->err);
        if (j->state == JS_PUBLISH && !evtimer_pending(&j->timer, NULL))
            job_publish(j);
        return;
    }
    if (m->err) {
        PQ_ERR("job %s/%s: delivery to %s failed: %s; producing again", tenant_of(j), id_of(j),
               p->topic == PQ_T_RETRY ? j->rs->topic : w->topics[p->topic],
               rd_kafka_err2str(m->err));
        pq_counter_add(w->m.produce_errors, 1);
        if ((j->state == JS_PUBLISH || j->state == JS_PARK) && !evtimer_pending(&j->timer, NULL))
            timer_in(j, DELIVERY_RETRY_MS);
        return;
    }
    p->done = 1;
    if (p == &j->park_pub) {
        /* durable on the retry topic: now the record says parked, then the offset is done */
        pq_park_parked_at(w, j->rs->topic, m->partition, m->offset);
        if (j->state == JS_PARK) {
            j->lease_held = 0; /* the park script releases it */
            event_del(&j->renew);
            j->rstep = RS_PARK;
            job_redis_issue(j);
        }
        return;
    }
    if (j->state == JS_PUBLISH && !evtimer_pending(&j->timer, NULL))
        job_publish(j);
}

/* ---- Redis steps ---- */

static void on_redis_reply(void *opaque, redisReply *reply);

static void redis_wait(pq_job_t *j)
{
    if (!j->in_wait) {
        TAILQ_INSERT_TAIL(&j->w->redis_wait, j, wait_link);
        j->in_wait = 1;
        pq_counter_add(j->w->m.redis_waits, 1);
    }
}

/* Sends j's Redis step (j->rstep): a script by its SHA1 (EVALSHA), or as EVAL with its text
 * once after Redis answered NOSCRIPT; or the cache GET. */
static void job_redis_issue(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    const pq_conf_t *c = w->conf;
    pq_script_cmd_t cmd;
    char token[512], cbwhy[300], index_key[512];
    char *resp = NULL, *err = NULL;
    size_t resp_len = 0, err_len = 0;
    int64_t now = pq_now_ms();
    int eval = j->eval_text, rc = -1;

    switch (j->rstep) {
    case RS_BEGIN: {
        pq_job_begin_args_t a = {0};
        /* KEYS[3]: the tenant's listing index, for a record created here (straight from
         * Kafka); without room for its name the job is simply not listed */
        if (pq_key_jobs(index_key, sizeof(index_key), c->redis_prefix, tenant_of(j)) < 0)
            index_key[0] = '\0';
        /* this delivery: the same message in this process is the same delivery */
        snprintf(token, sizeof(token), "%s/%s/%" PRId32 "/%" PRId64, w->owner, j->src_topic,
                 j->partition, j->offset);
        a.job_key = j->job_key;
        a.lease_key = j->lease_key;
        a.index_key = index_key[0] ? index_key : NULL;
        a.request_hash = j->env.request_hash;
        a.route = j->env.model;
        a.owner = w->owner;
        a.delivery = token;
        a.id = id_of(j);
        a.now_ms = now;
        a.ttl_ms = w->ttl_ms;
        a.lease_ms = c->lease_ms;
        a.max_deliveries = c->max_deliveries;
        a.from_source = j->retry_rs == NULL;
        rc = pq_script_job_begin_cmd(&cmd, eval, &a);
        break;
    }
    case RS_FINISH: {
        pq_job_finish_args_t a = {0};
        pq_jobdoc_t d;

        job_doc(j, &d);
        if (j->response) {
            resp = pq_jobdoc_dump(j->response, &resp_len);
        } else {
            json_t *e = pq_jobdoc_error(&d);
            err = pq_jobdoc_dump(e, &err_len);
            json_decref(e);
        }
        a.job_key = j->job_key;
        a.lease_key = j->lease_key;
        a.callbacks_key = w->callbacks_key;
        a.status = j->status;
        a.result = j->result;
        a.result_len = j->result ? j->result_len : 0;
        a.response = resp;
        a.response_len = resp_len;
        a.error = err;
        a.error_len = err_len;
        a.provider = pq_jobdoc_result_provider(&d);
        a.model = pq_jobdoc_result_model(&d);
        a.attempts = j->attempts;
        a.now_ms = now;
        a.ttl_ms = w->ttl_ms;
        a.route = j->env.model;
        a.request_hash = j->env.request_hash;
        a.tenant = tenant_of(j);
        /* callback_url: queued by the winner when allowed here, else recorded as refused */
        cbwhy[0] = '\0';
        if (j->env.callback_url &&
            pq_callback_check(c, tenant_of(j), j->env.callback_url, cbwhy, sizeof(cbwhy)) == 0) {
            a.callback_url = j->env.callback_url;
        } else {
            a.callback_refused = cbwhy;
            if (cbwhy[0])
                PQ_WARN("job %s/%s: no callback: %s", tenant_of(j), id_of(j), cbwhy);
        }
        rc = pq_script_job_finish_cmd(&cmd, eval, &a);
        break;
    }
    case RS_CACHE_GET:
        pq_script_cmd_clear(&cmd);
        pq_script_cmd_str(&cmd, "GET");
        rc = pq_script_cmd_str(&cmd, j->cache_key);
        break;
    case RS_PARK:
        rc = pq_script_job_park_cmd(&cmd, eval, j->job_key, j->lease_key, now, w->owner, w->ttl_ms,
                                    j->attempts);
        break;
    case RS_RELEASE:
        rc = pq_script_job_release_cmd(&cmd, eval, j->lease_key, j->job_key, w->owner, now);
        break;
    default:
        return;
    }
    if (rc != 0) {
        /* a builder's fixed arity outgrew its bound: a bug, never sent half-built */
        PQ_ERR("job %s/%s: redis command does not fit (step %d)", tenant_of(j), id_of(j),
               (int)j->rstep);
        if (j->rstep != RS_RELEASE)
            timer_in(j, REDIS_ERROR_RETRY_MS);
    } else if (pq_redis_command(job_redis(j), cmd.argc, cmd.argv, cmd.lens, on_redis_reply, j) ==
               0) {
        j->nredis++;
        j->eval_text = 0;
    } else if (j->rstep != RS_RELEASE) {
        redis_wait(j);
    }
    free(resp);
    free(err);
}

static void on_begin(pq_job_t *j, redisReply *r)
{
    pq_worker_t *w = j->w;
    const char *what;
    int64_t n = 0;

    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_STRING) {
        PQ_ERR("job %s/%s: unexpected reply from the begin script", tenant_of(j), id_of(j));
        timer_in(j, REDIS_ERROR_RETRY_MS);
        return;
    }
    what = r->element[0]->str;
    if (r->elements > 1 && r->element[1]->type == REDIS_REPLY_INTEGER)
        n = r->element[1]->integer;

    if (strcmp(what, "run") == 0) {
        struct timeval tv;
        int period = w->conf->lease_ms / 3;
        j->deliveries = n;
        j->lease_held = 1;
        tv.tv_sec = period / 1000;
        tv.tv_usec = (period % 1000) * 1000;
        event_add(&j->renew, &tv);
        if (j->env.park) {
            /* replayed: attempts count every provider call since the job first ran */
            json_t *a = json_object_get(j->env.park, "attempts");
            if (json_is_integer(a) && json_integer_value(a) > 0 && json_integer_value(a) < 1000000)
                j->attempts = (int)json_integer_value(a);
        }
        if (!j->route || j->route->ntargets == 0) {
            char msg[200];
            snprintf(msg, sizeof(msg), "unknown route \"%.120s\"", j->env.model);
            job_finish(j, "failed", PQ_ERR_NOT_FOUND, msg);
        } else if (deadline_passed(j, 0)) {
            job_finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed before the job ran");
        } else if (park_expired(j)) {
            job_finish(j, "expired", PQ_ERR_EXPIRED, "parked longer than worker.park_ttl_s");
        } else if (j->env.park && j->retry_rs &&
                   pq_park_dropped(j->retry_rs, tenant_of(j), pq_jobdoc_park_since(j->env.park))) {
            job_finish(j, "cancelled", PQ_ERR_CANCELLED,
                       "dropped by an operator (DELETE /v1/parked/{route})");
        } else {
            if (j->retry_rs)
                j->retry_rs->replayed++;
            job_run(j);
        }
    } else if (strcmp(what, "terminal") == 0) {
        table_remove(j);
        if (r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING &&
            r->element[1]->len > 0) {
            j->result = strndup(r->element[1]->str, r->element[1]->len);
            j->result_len = r->element[1]->len;
            j->status = "republished";
            pq_counter_add(w->m.republished, 1);
            job_reply(j);
            job_publish(j);
        } else {
            PQ_WARN("job %s/%s is terminal without a stored result; nothing to re-publish",
                    tenant_of(j), id_of(j));
            j->status = "terminal";
            job_done(j);
        }
    } else if (strcmp(what, "parked") == 0) {
        /* its copy on the retry topic owns it: running this one too would call the provider
         * again and could outlive an operator's drop */
        table_remove(j);
        PQ_INFO("job %s/%s: redelivered from %s but parked: its retry-topic copy owns it",
                tenant_of(j), id_of(j), j->src_topic);
        j->status = "already_parked";
        job_done(j);
    } else if (strcmp(what, "conflict") == 0) {
        table_remove(j);
        j->err = PQ_ERR_CONFLICT;
        snprintf(j->errmsg, sizeof(j->errmsg), "id already used by another request in this tenant");
        j->status = "id_conflict";
        j->dlq = build_dlq(j, error_object(j), &j->dlq_len);
        pq_counter_add(w->m.conflicts, 1);
        pq_counter_add(w->m.dlq, 1);
        PQ_WARN("job %s/%s: id reused with another request: dlq id_conflict", tenant_of(j),
                id_of(j));
        job_publish(j);
    } else if (strcmp(what, "leased") == 0) {
        int64_t wait = n;
        if (wait < 100)
            wait = 100;
        if (wait > w->conf->lease_ms)
            wait = w->conf->lease_ms;
        j->state = JS_WAIT_LEASE;
        timer_in(j, wait);
    } else if (strcmp(what, "poison") == 0) {
        char msg[160];
        j->deliveries = n;
        snprintf(msg, sizeof(msg), "delivered %" PRId64 " times without finishing", n);
        pq_counter_add(w->m.poison, 1);
        job_finish(j, "failed", PQ_ERR_POISON, msg);
    } else {
        PQ_ERR("job %s/%s: unknown begin outcome", tenant_of(j), id_of(j));
        timer_in(j, REDIS_ERROR_RETRY_MS);
    }
}

static void on_finish(pq_job_t *j, redisReply *r)
{
    pq_worker_t *w = j->w;

    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_INTEGER) {
        PQ_ERR("job %s/%s: unexpected reply from the finish script", tenant_of(j), id_of(j));
        timer_in(j, REDIS_ERROR_RETRY_MS);
        return;
    }
    j->lease_held = 0;
    table_remove(j);
    /* {0, result, status} with our own result byte for byte: our earlier call won and its
     * reply was lost (a reconnect re-issued it). It is still our win: publish, and dlq. */
    if (r->element[0]->integer == 1 ||
        (r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING && j->result &&
         r->element[1]->len == j->result_len &&
         memcmp(r->element[1]->str, j->result, j->result_len) == 0)) {
        if (strcmp(j->status, "succeeded") == 0) {
            pq_counter_add(w->m.succeeded, 1);
        } else {
            if (strcmp(j->status, "expired") == 0)
                pq_counter_add(w->m.expired, 1);
            else
                pq_counter_add(w->m.failed, 1);
            j->dlq = build_dlq(j, error_object(j), &j->dlq_len);
            pq_counter_add(w->m.dlq, 1);
        }
        pq_hist_observe(w->m.latency, (double)(pq_now_ms() - j->created_ms) / 1000.0);
        if (strcmp(j->status, "succeeded") == 0 && !j->cached && j->rs)
            pq_park_route_up(w, j->rs, "a job succeeded");
        if (j->env.callback_url)
            pq_callbacks_kick(w->callbacks);
    } else {
        /* Someone else wrote the terminal record first: publish theirs, never ours. */
        free(j->result);
        j->result = NULL;
        j->result_len = 0;
        if (r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING &&
            r->element[1]->len > 0) {
            j->result = strndup(r->element[1]->str, r->element[1]->len);
            j->result_len = r->element[1]->len;
        }
        j->status = "republished";
        pq_counter_add(w->m.republished, 1);
    }
    /* the stream's end: the record now holds the answer (or the error) */
    if (json_is_true(json_object_get(j->env.request, "stream")))
        stream_xadd(j, "end", "", 0);
    job_reply(j);
    job_publish(j);
}

static void on_park(pq_job_t *j, redisReply *r)
{
    pq_worker_t *w = j->w;

    if (r->type != REDIS_REPLY_INTEGER) {
        PQ_ERR("job %s/%s: unexpected reply from the park script", tenant_of(j), id_of(j));
        timer_in(j, REDIS_ERROR_RETRY_MS);
        return;
    }
    /* 0: the record turned terminal meanwhile (e.g. cancelled); the copy on the retry topic
     * re-publishes it when replayed */
    table_remove(j);
    j->status = "parked";
    pq_counter_add(j->env.park && j->retry_rs ? w->m.reparked : w->m.parked, 1);
    if (j->rs) {
        if (j->retry_rs)
            j->rs->reparked++;
        else
            j->rs->parked++;
    }
    job_done(j);
}

/* A NOSCRIPT answer: logged at most once a second per thread (after a SCRIPT FLUSH every job in
 * flight gets one). */
static void noscript_note(const pq_job_t *j)
{
    static _Thread_local int64_t last_ms;
    int64_t now = pq_mono_ms();

    if (now - last_ms >= 1000) {
        last_ms = now;
        PQ_WARN("redis answered NOSCRIPT (script cache flushed or Redis restarted): sending "
                "the scripts' text again (job %s/%s)",
                tenant_of(j), id_of(j));
    }
}

static void on_redis_reply(void *opaque, redisReply *reply)
{
    pq_job_t *j = opaque;
    redis_step_t step = j->rstep;

    if (redis_replied(j))
        return;
    if (reply && reply->type == REDIS_REPLY_ERROR && step != RS_CACHE_GET && step != RS_NONE &&
        pq_script_noscript(reply->str, reply->len)) {
        /* Redis lost its script cache (SCRIPT FLUSH, restarted): the script did not run, so
         * this same step goes again, once as EVAL with the text (which caches it again) */
        noscript_note(j);
        if (j->handed_back && step == RS_BEGIN) {
            j->rstep = RS_NONE; /* it took no lease: nothing to release */
            return;
        }
        j->eval_text = 1;
        job_redis_issue(j);
        return;
    }
    if (step == RS_RELEASE) {
        j->rstep = RS_NONE;
        return;
    }
    if (j->handed_back && (step == RS_BEGIN || step == RS_CACHE_GET)) {
        /* handed back while this step was in flight: start nothing; a begin may have taken
         * the lease (and set running) after the hand-back, so release it */
        j->rstep = RS_NONE;
        if (step == RS_BEGIN && reply) {
            j->rstep = RS_RELEASE;
            job_redis_issue(j);
        }
        return;
    }
    if (!reply) {
        redis_wait(j); /* connection lost: the step runs again when Redis is back */
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR && step == RS_CACHE_GET) {
        j->rstep = RS_NONE;
        job_attempt(j); /* an unreadable cache is a miss */
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        PQ_ERR("job %s/%s: redis: %.200s", tenant_of(j), id_of(j), reply->str);
        timer_in(j, REDIS_ERROR_RETRY_MS);
        return;
    }
    j->rstep = RS_NONE;
    if (step == RS_BEGIN)
        on_begin(j, reply);
    else if (step == RS_FINISH)
        on_finish(j, reply);
    else if (step == RS_CACHE_GET)
        on_cache_get(j, reply);
    else if (step == RS_PARK)
        on_park(j, reply);
}

void pq_job_redis_up(pq_worker_t *w)
{
    struct pq_job_list l;
    pq_job_t *j;

    /* once each (a job whose connection is still down waits again); job_done takes a waiting
     * job off redis_wait, so the ones not yet issued stay on it until their turn */
    TAILQ_INIT(&l);
    while ((j = TAILQ_FIRST(&w->redis_wait))) {
        TAILQ_REMOVE(&w->redis_wait, j, wait_link);
        j->in_wait = 0;
        if (pq_redis_up(job_redis(j)))
            job_redis_issue(j);
        else
            TAILQ_INSERT_TAIL(&l, j, wait_link);
    }
    while ((j = TAILQ_FIRST(&l))) {
        TAILQ_REMOVE(&l, j, wait_link);
        TAILQ_INSERT_TAIL(&w->redis_wait, j, wait_link);
        j->in_wait = 1;
    }
}

static void job_stop_calls(pq_job_t *j);

/* Another owner holds the lease we lost: make no further provider call. A partition that is no
 * longer ours ends the job like a hand-back (no offset, no finish); otherwise the job begins
 * again after a lease period (then: terminal -> re-publish, leased -> wait, free -> run), so
 * its offset still moves on. */
static void lease_lost(pq_job_t *j)
{
    pq_worker_t *w = j->w;

    if (j->state != JS_QUEUED && j->state != JS_TOKEN && j->state != JS_CALL &&
        j->state != JS_BACKOFF)
        return; /* finishing or parking (compare-and-set), or between steps: the next renew */
    PQ_WARN("job %s/%s: lease lost to another owner while running: no further provider calls",
            tenant_of(j), id_of(j));
    j->lease_held = 0;
    event_del(&j->renew);
    evtimer_del(&j->timer);
    job_stop_calls(j);
    pq_counter_add(w->m.handed_back, 1);
    if (!j->part || j->part->revoked) {
        j->handed_back = 1;
        j->status = "lease_lost";
        job_done(j);
        return;
    }
    j->state = JS_WAIT_LEASE;
    timer_in(j, w->conf->lease_ms);
}

static void lease_renew_send(pq_job_t *j, int eval);

/* The renewal's answer: 1 renewed, 2 it had expired and was free, so it is ours again, 0
 * another owner holds it; NOSCRIPT: the same renewal as EVAL. */
static void on_renew_reply(void *opaque, redisReply *reply)
{
    pq_job_t *j = opaque;

    if (redis_replied(j))
        return;
    if (!reply || !j->lease_held)
        return; /* connection lost: the next renew tries again */
    if (reply->type == REDIS_REPLY_ERROR && pq_script_noscript(reply->str, reply->len)) {
        noscript_note(j);
        lease_renew_send(j, 1);
    } else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 2) {
        PQ_WARN("job %s/%s: lease had expired; taken again", tenant_of(j), id_of(j));
    } else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 0) {
        lease_lost(j);
    }
}

static void lease_renew_send(pq_job_t *j, int eval)
{
    pq_worker_t *w = j->w;
    pq_script_cmd_t cmd;

    if (pq_script_lease_renew_cmd(&cmd, eval, j->lease_key, w->owner, w->conf->lease_ms) == 0 &&
        pq_redis_command(job_redis(j), cmd.argc, cmd.argv, cmd.lens, on_renew_reply, j) == 0)
        j->nredis++;
}

static void on_renew_tick(evutil_socket_t fd, short what, void *arg)
{
    pq_job_t *j = arg;

    if (j->lease_held)
        lease_renew_send(j, 0);
}

/* ---- provider calls ----
 *
 * Per target: eligibility -> circuit check -> slot (key, concurrency, rpm/tpm) -> [watsonx
 * token] -> build -> HTTP (connect, first byte, idle and total timeouts) -> classify. What a
 * failed attempt does next is its error class (act_of, README "Failover"): retry the same
 * target (backoff with full jitter), try the provider's next key, fail over to the next
 * eligible target, or end the job. A 429 rests that key for that model only. Interactive calls
 * a client waits for run inside the route's budget: no attempt is started or waited for that
 * cannot end before the client gives up. Every attempt and skip lands in the attempt log. */

#define ATTEMPT_LOG_MAX 64
#define MIN_ATTEMPT_MS  500 /* a budget with less left than this is spent */

typedef enum { ACT_RETRY, ACT_NEXT_KEY, ACT_FAILOVER, ACT_END } act_t;

static const char *act_name(act_t a)
{
    static const char *const names[] = {"retry", "next_key", "failover", "end"};
    return names[a];
}

static int is_watsonx(const pq_target_t *t)
{
    return strcmp(t->p->type, "watsonx") == 0;
}

/* Exponential backoff with full jitter: uniform in [0, min(retry_max_ms, base * 2^(n-1))]. */
static int64_t backoff_ms(const pq_provider_conf_t *p, int n)
{
    int64_t d = pq_backoff_step_ms(p->retry_base_ms > 0 ? p->retry_base_ms : 200,
                                   p->retry_max_ms > 0 ? p->retry_max_ms : 5000, n);

    return (int64_t)(random() % (d + 1));
}

/* ms of the budget left; INT64_MAX without one. A budget with less than MIN_ATTEMPT_MS left is
 * spent: the client has its 504 (and the job id), the job goes on under the ordinary rules. */
static int64_t budget_left(pq_job_t *j)
{
    int64_t left;

    if (j->budget_end_ms == 0)
        return INT64_MAX;
    left = j->budget_end_ms - pq_now_ms();
    if (left >= MIN_ATTEMPT_MS)
        return left;
    PQ_INFO("job %s/%s: the budget of route %s is spent (its client was answered 504): the job "
            "goes on without it",
            tenant_of(j), id_of(j), j->route->name);
    j->budget_end_ms = 0;
    return INT64_MAX;
}

/* A wait of delay ms before trying the same target again fits the budget. */
static int budget_allows_wait(pq_job_t *j, int64_t delay)
{
    int64_t left = budget_left(j);

    return left == INT64_MAX || delay + MIN_ATTEMPT_MS <= left;
}

static void job_backoff(pq_job_t *j, int64_t delay)
{
    if (deadline_passed(j, delay)) {
        job_finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed while retrying");
        return;
    }
    j->state = JS_BACKOFF;
    timer_in(j, delay);
}

/* Tokens a call may use, for tpm: prompt bytes / 4 + max_tokens. */
static double job_cost(pq_job_t *j)
{
    const json_t *msgs, *m, *mt;
    size_t i, bytes = 0;

    if (j->cost > 0)
        return j->cost;
    msgs = json_object_get(j->env.request, "messages");
    json_array_foreach(msgs, i, m)
    {
        const json_t *c = json_object_get(m, "content"), *part;
        size_t k;
        if (json_is_string(c))
            bytes += json_string_length(c);
        else
            json_array_foreach(c, k, part) bytes +=
                json_string_length(json_object_get(part, "text"));
    }
    mt = json_object_get(j->env.request, "max_completion_tokens");
    if (!json_is_integer(mt))
        mt = json_object_get(j->env.request, "max_tokens");
    j->cost =
        (double)(bytes + 3) / 4.0 +
        (json_is_integer(mt) && json_integer_value(mt) > 0 ? (double)json_integer_value(mt) : 0.0);
    if (j->cost < 1.0)
        j->cost = 1.0;
    return j->cost;
}

/* One line of the attempt log, the attempt metric and the attempt's log line. status: HTTP
 * status or 0; latency_ms < 0 for a skip (no call made); act: what the job did next (NULL for
 * a success or a skip); timeout: which timeout class ended the call ("" for none). */
static void attempt_note(pq_job_t *j, const pq_target_t *t, pq_err_t outcome, long status,
                         int64_t latency_ms, const char *msg, const char *act, const char *timeout)
{
    json_t *e;

    if (j->circ)
        pq_circuit_count(j->circ, outcome, latency_ms);
    if (outcome == PQ_OK)
        PQ_DBG("job %s/%s: %s/%s HTTP %ld ok in %" PRId64 " ms", tenant_of(j), id_of(j),
               t->provider, t->model, status, latency_ms);
    else if (latency_ms >= 0)
        PQ_INFO("job %s/%s: attempt %d on %s/%s: HTTP %ld %s in %" PRId64 " ms (%s): %s",
                tenant_of(j), id_of(j), j->attempts, t->provider, t->model, status,
                pq_err_name(outcome), latency_ms, act ? act : "", msg ? msg : "");
    else if (outcome == PQ_ERR_CIRCUIT_OPEN)
        PQ_DBG("job %s/%s: %s/%s skipped: %s", tenant_of(j), id_of(j), t->provider, t->model,
               msg ? msg : "");
    else
        PQ_INFO("job %s/%s: %s/%s skipped: %s: %s", tenant_of(j), id_of(j), t->provider, t->model,
                pq_err_name(outcome), msg ? msg : "");
    if (!j->alog)
        j->alog = json_array();
    if (!j->alog || json_array_size(j->alog) >= ATTEMPT_LOG_MAX)
        return;
    e = json_pack("{s:s, s:s, s:o, s:s, s:o, s:s}", "provider", t->provider, "model", t->model,
                  "status", status > 0 ? json_integer(status) : json_null(), "outcome",
                  outcome == PQ_OK ? "ok" : pq_err_name(outcome), "latency_ms",
                  latency_ms >= 0 ? json_integer(latency_ms) : json_null(), "class",
                  outcome == PQ_OK ? "ok"
                  : latency_ms < 0 ? "skip"
                  : act            ? act
                                   : "failover");
    if (e && timeout && timeout[0])
        json_object_set_new(e, "timeout", json_string(timeout));
    if (e)
        json_array_append_new(j->alog, e);
}

/* Records why the current target did not serve the job. fault: the provider's code and
 * reason, or NULL. */
static void note_error(pq_job_t *j, const pq_target_t *t, pq_err_t err, long status,
                       const char *msg, const pq_provider_fault_t *fault)
{
    j->err = err;
    j->http_status = status;
    j->last_target = t;
    pq_strlcpy(j->errmsg, msg, sizeof(j->errmsg));
    if (fault)
        j->fault = *fault;
    else
        memset(&j->fault, 0, sizeof(j->fault));
    if (pq_err_is_retryable(err))
        j->any_retryable = 1;
}

/* The error classes: what a failed call on t does next. */
static act_t act_of(const pq_job_t *j, const pq_target_t *t, pq_err_t err, long status,
                    pq_http_timeout_t timeout)
{
    switch (err) {
    case PQ_ERR_TIMEOUT:
        /* a provider's 408 is worth a retry; our own timeouts move on unless asked not to */
        if (status == 408 || timeout == PQ_HTTP_TIMEOUT_NONE)
            return ACT_RETRY;
        return t->p->retry_on_timeout ? ACT_RETRY : ACT_FAILOVER;
    case PQ_ERR_CONNECT:
    case PQ_ERR_SERVER:
    case PQ_ERR_OVERLOADED:
    case PQ_ERR_MALFORMED:
    case PQ_ERR_RATE_LIMITED: /* the key+model rests; another key, a wait, or the next target */
        return ACT_RETRY;
    case PQ_ERR_AUTH:
        return ACT_NEXT_KEY;
    case PQ_ERR_REFUSED:
        return j->route->on_bad_request == PQ_BAD_REQUEST_END ? ACT_END : ACT_FAILOVER;
    case PQ_ERR_CONTENT_FILTER:
    case PQ_ERR_TOO_LARGE: /* the answer is over max_response_bytes */
        return ACT_END;
    default: /* NOT_FOUND, CONTEXT_LENGTH (to a larger target only), UNSUPPORTED, ... */
        return ACT_FAILOVER;
    }
}

/* Whether target t may still serve this job: after a context_length_exceeded only targets
 * with a larger max_context_tokens; after a 400/422 refusal never a target of the provider
 * that refused. Sets why when not. */
static int target_eligible(const pq_job_t *j, const pq_target_t *t, pq_err_t *why)
{
    if (j->ctx_floor >= 0 && t->max_context_tokens <= j->ctx_floor) {
        *why = PQ_ERR_CONTEXT_LENGTH;
        return 0;
    }
    for (int i = 0; i < j->nrefused; i++)
        if (j->refused[i] == t->p) {
            *why = PQ_ERR_REFUSED;
            return 0;
        }
    return 1;
}

/* Some target after the current one may still serve this job. */
static int later_target(const pq_job_t *j)
{
    pq_err_t why;

    for (size_t i = j->target + 1; i < j->route->ntargets; i++)
        if (target_eligible(j, &j->route->targets[i], &why))
            return 1;
    return 0;
}

/* Some later eligible target may take a call now (circuit, keys). */
static int later_target_ready(const pq_job_t *j)
{
    pq_err_t why;

    for (size_t i = j->target + 1; i < j->route->ntargets; i++) {
        const pq_target_t *t = &j->route->targets[i];
        if (target_eligible(j, t, &why) && pq_provs_target_available(j->gen->provs, t))
            return 1;
    }
    return 0;
}

static void give_back_probe(pq_job_t *j)
{
    if (j->probe && j->circ)
        pq_circuit_probe_abort(j->circ);
    j->probe = 0;
}

static void release_slot(pq_job_t *j, int64_t tokens, int refund)
{
    if (!j->slot_held)
        return;
    j->slot_held = 0;
    pq_prov_release(j->prov, j->key, j->cost, tokens, refund);
}

static void next_target(pq_job_t *j)
{
    give_back_probe(j);
    j->target++;
    j->tries = 0;
    j->excluded = 0;
    j->refreshed = 0;
    job_attempt(j);
}

/* Produces the parked envelope to the route's retry topic (again after a failed delivery). */
static void job_park_produce(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    rd_kafka_resp_err_t err;

    j->state = JS_PARK;
    if (j->park_pub.pending || j->park_pub.done)
        return;
    j->park_pub.job = j;
    j->park_pub.topic = PQ_T_RETRY;
    err = pq_worker_produce_to(w, j->rs->topic, id_of(j), j->parked, j->parked_len, &j->park_pub);
    if (err) {
        PQ_WARN("job %s/%s: produce to %s: %s", tenant_of(j), id_of(j), j->rs->topic,
                rd_kafka_err2str(err));
        pq_counter_add(w->m.produce_errors, 1);
        timer_in(j, err == RD_KAFKA_RESP_ERR__QUEUE_FULL ? PRODUCE_RETRY_MS : DELIVERY_RETRY_MS);
        return;
    }
    j->park_pub.pending = 1;
}

/* Parks the job (G4): envelope + "park" {reason, attempts, parked_at (the first parking,
 * kept), deliveries (summed over parkings)} to the route's retry topic, keyed by id. */
static int job_park(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    int64_t since = pq_jobdoc_park_since(j->env.park), prev = 0;
    char at[40], reason[sizeof(j->errmsg) + 40];
    json_t *park;

    if (since <= 0)
        since = pq_now_ms();
    prev = json_integer_value(json_object_get(j->env.park, "deliveries"));
    pq_time_format(since, at, sizeof(at));
    snprintf(reason, sizeof(reason), "%s: %s", pq_err_name(j->err ? j->err : PQ_ERR_CONNECT),
             j->errmsg[0] ? j->errmsg : "every target is down");
    park = json_pack("{s:s, s:i, s:s, s:I}", "reason", reason, "attempts", j->attempts, "parked_at",
                     at, "deliveries", (json_int_t)(prev + j->deliveries));
    /* the attempts so far travel with the job, so its final record shows every pass */
    if (park && j->alog && json_object_set(park, "attempt_log", j->alog) != 0) {
        json_decref(park);
        park = NULL;
    }
    if (!park || pq_envelope_set_object(&j->env, "park", park) != 0)
        return -1;
    free(j->parked);
    j->parked = pq_envelope_dump(&j->env, &j->parked_len);
    if (j->parked && j->parked_len > w->max_msg && json_object_get(park, "attempt_log")) {
        json_object_del(park, "attempt_log"); /* the job itself must fit, its history need not */
        free(j->parked);
        j->parked = pq_envelope_dump(&j->env, &j->parked_len);
    }
    if (!j->parked)
        return -1;
    event_del(&j->timer);
    PQ_DBG("job %s/%s: every target of route %s is down: parked on %s (%s)", tenant_of(j), id_of(j),
           j->route->name, j->rs->topic, reason);
    pq_park_route_parked(w, j->rs);
    job_park_produce(j);
    return 0;
}

/* The single place where "every target of the route failed, some of them retryably (or their
 * circuits are open)" is decided (G4): the job parks on its route's retry topic, or expires
 * when its deadline or park TTL passed. */
static void job_all_targets_down(pq_job_t *j)
{
    const pq_provider_conf_t *p0 = j->route->targets[0].p;

    if (park_expired(j)) {
        job_finish(j, "expired", PQ_ERR_EXPIRED, "parked longer than worker.park_ttl_s");
        return;
    }
    if (j->rs && job_park(j) == 0)
        return;
    PQ_WARN("job %s/%s: all %zu targets of route %s are down and it cannot be parked (last: %s)",
            tenant_of(j), id_of(j), j->route->ntargets, j->route->name, j->errmsg);
    j->rounds++;
    j->target = 0;
    j->tries = 0;
    j->excluded = 0;
    j->refreshed = 0;
    j->any_retryable = 0;
    j->pass_attempts = 0;
    j->ctx_floor = -1;
    j->nrefused = 0;
    job_backoff(j, backoff_ms(p0, j->rounds + p0->retries_per_target));
}

/* The job ends with the error noted last (a refusal the provider explained). */
static void job_end(pq_job_t *j)
{
    give_back_probe(j);
    job_finish(j, "failed", j->err ? j->err : PQ_ERR_REFUSED, NULL);
}

/* Every target was tried (or the attempt budget of this pass is spent). */
static void job_exhausted(pq_job_t *j)
{
    char msg[sizeof(j->errmsg)];

    give_back_probe(j);
    if (j->any_retryable) {
        job_all_targets_down(j);
        return;
    }
    /* every target refused (or could not express the request) */
    if (j->errmsg[0])
        snprintf(msg, sizeof(msg), "every target refused the request; last: %.200s", j->errmsg);
    else
        snprintf(msg, sizeof(msg), "no target could serve the request");
    job_finish(j, "failed", j->err ? j->err : PQ_ERR_UNSUPPORTED, msg);
}

/* A 429 on the current target: rest that key for that model (or the whole key for a quota
 * error about it), then try again at once (another key may be free; job_no_key waits or moves
 * on when none is). A Retry-After beyond max_rest_ms moves on now. */
static void rate_limited(pq_job_t *j, const pq_target_t *t, int64_t retry_after,
                         const pq_provider_fault_t *fault)
{
    const pq_provider_conf_t *p = t->p;

    if (fault && fault->key_wide)
        pq_prov_key_rest(j->prov, j->key,
                         retry_after >= 0 && retry_after < p->max_rest_ms ? retry_after
                         : retry_after >= 0                               ? p->max_rest_ms
                                                                          : p->key_rest_ms,
                         0);
    else if (j->circ)
        pq_circuit_rate_limited(j->circ, j->key, retry_after);
    if (retry_after > p->max_rest_ms) {
        next_target(j);
        return;
    }
    job_attempt(j);
}

/* A failed call or a failed step before it, on the current target. */
static void attempt_failed(pq_job_t *j, act_t act, pq_err_t err, long status, int64_t retry_after,
                           const char *msg, const pq_provider_fault_t *fault)
{
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    int64_t delay;

    note_error(j, t, err, status, msg, fault);
    switch (act) {
    case ACT_END:
        job_end(j);
        return;
    case ACT_NEXT_KEY:
        /* watsonx: a 401 may be an expired token; refresh it once before moving on */
        if (is_watsonx(t) && status == 401 && !j->refreshed) {
            j->refreshed = 1;
            j->state = JS_BACKOFF;
            timer_in(j, 0);
            return;
        }
        if (status == 401 || status == 0)
            pq_prov_key_rest(j->prov, j->key, t->p->key_rest_ms, 1);
        if (j->key < 64)
            j->excluded |= 1ULL << j->key;
        j->refreshed = 0;
        job_attempt(j); /* the next key, or the next target when none is left */
        return;
    case ACT_FAILOVER:
        if (err == PQ_ERR_CONTEXT_LENGTH)
            j->ctx_floor =
                t->max_context_tokens > j->ctx_floor ? t->max_context_tokens : j->ctx_floor;
        else if (err == PQ_ERR_REFUSED &&
                 j->nrefused < (int)(sizeof(j->refused) / sizeof(j->refused[0])))
            j->refused[j->nrefused++] = t->p;
        next_target(j);
        return;
    case ACT_RETRY:
        break;
    }
    pq_counter_add(w->m.retries, 1);
    if (err == PQ_ERR_RATE_LIMITED && (status == 429 || fault)) {
        rate_limited(j, t, retry_after, fault);
        return;
    }
    j->tries++;
    if (j->tries > t->p->retries_per_target) {
        next_target(j);
        return;
    }
    delay = backoff_ms(t->p, j->tries);
    if (!budget_allows_wait(j, delay) && later_target(j)) {
        next_target(j); /* the client would give up before the retry ends: the next target now */
        return;
    }
    job_backoff(j, delay);
}

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
 *              relayed (the job itself fails over and completes durably);
 *   t=end      d = "": the job's terminal write is done (the record holds the answer).
 * The first XADD also sets PEXPIRE 600000 on the key. Best effort: a failed XADD never fails
 * the job. The stored answer is the assembler's chat.completion, through the same success path
 * as a non-streamed call. */

#define STREAM_MAXLEN "4096"
#define STREAM_TTL_MS "600000"

static void stream_attempt_clear(pq_job_t *j)
{
    pq_stream_destroy(j->st);
    j->st = NULL;
    pq_stream_asm_destroy(j->sa);
    j->sa = NULL;
    j->stream_relayed = 0;
}

/* XADD <stream_key> MAXLEN ~ 4096 * t <type> d <data> (and the key's TTL with the first). */
static void stream_xadd(pq_job_t *j, const char *type, const char *data, size_t len)
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
    if (pq_redis_command(job_redis(j), 10, argv, lens, on_aux_reply, j) != 0)
        return; /* best effort: Redis is down, the relay loses this entry */
    j->nredis++;
    if (j->stream_xadds++ == 0) {
        const char *pv[3] = {"PEXPIRE", j->stream_key, STREAM_TTL_MS};
        size_t pl[3] = {7, strlen(j->stream_key), strlen(STREAM_TTL_MS)};
        if (pq_redis_command(job_redis(j), 3, pv, pl, on_aux_reply, j) == 0)
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
    stream_xadd(j, "chunk", d, len);
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

static pq_err_t on_stream_data(void *opaque, const char *buf, size_t len)
{
    pq_job_t *j = opaque;

    return pq_stream_feed(j->st, buf, len, on_stream_chunk, j);
}

/* The usage chunk of a clean stream, from the assembled answer, when the client asked. */
static void stream_relay_usage(pq_job_t *j, const json_t *completion)
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
static void stream_restart(pq_job_t *j, pq_err_t err)
{
    char d[96];
    int n;

    if (j->stream_relayed == 0)
        return;
    n = snprintf(d, sizeof(d), "{\"reason\":\"%s\"}", pq_err_name(err));
    stream_xadd(j, "restart", d, (size_t)n);
    j->stream_relayed = 0;
}

/* How a streamed 2xx answer ended: PQ_OK with *completion (new) for a clean stream, else the
 * class (a cut stream is PQ_ERR_CONNECT; a provider error event its own) with msg and fault. */
static pq_err_t stream_outcome(pq_job_t *j, const pq_target_t *t, json_t **completion,
                               pq_provider_fault_t *fault, char *msg, size_t msg_size)
{
    const char *code = "", *text = "";
    pq_err_t err;
    json_t *v;

    pq_stream_finish(j->st);
    switch (pq_stream_asm_end(j->sa)) {
    case PQ_STREAM_END_CLEAN:
        *completion = pq_stream_asm_completion(j->sa, t->model, (int64_t)(pq_now_ms() / 1000));
        if (!*completion) {
            snprintf(msg, msg_size, "out of memory assembling the stream");
            return PQ_ERR_NOMEM;
        }
        return PQ_OK;
    case PQ_STREAM_END_ERROR:
        err = pq_stream_asm_error(j->sa, &code, &text);
        v = json_string(code);
        pq_provider_safe_token(v, fault->code, sizeof(fault->code));
        json_decref(v);
        if (err == PQ_ERR_CONTEXT_LENGTH || err == PQ_ERR_CONTENT_FILTER || err == PQ_ERR_REFUSED)
            pq_provider_reason_sanitize(text, strlen(text), t->p, fault->reason,
                                        sizeof(fault->reason));
        snprintf(msg, msg_size, "%s: error event in the stream (%s%s%s)", t->provider,
                 pq_err_name(err), fault->code[0] ? ": " : "", fault->code);
        return err == PQ_OK ? PQ_ERR_SERVER : err;
    default:
        snprintf(msg, msg_size, "%s: the stream ended before the answer did", t->provider);
        return PQ_ERR_CONNECT;
    }
}

static void on_http_done(void *opaque, const pq_http_result_t *res)
{
    pq_job_t *j = opaque;
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    const pq_provider_ops_t *ops = pq_provider_find(t->p->type);
    json_t *completion = NULL, *total;
    pq_provider_fault_t fault;
    char msg[256];
    pq_err_t err;
    act_t act;
    int64_t tokens = -1;
    int probe = j->probe, failure;

    memset(&fault, 0, sizeof(fault));
    j->http = NULL;
    msg[0] = '\0';
    if (res->err == PQ_OK && res->streamed && j->st) {
        err = stream_outcome(j, t, &completion, &fault, msg, sizeof(msg));
    } else if (res->err == PQ_OK) {
        err = ops->parse_response(t, res->status, res->body, res->body_len, &completion, &fault,
                                  msg, sizeof(msg));
    } else if (res->streamed && j->st && res->err != PQ_ERR_TIMEOUT && res->err != PQ_ERR_CONNECT &&
               pq_stream_errstr(j->st)[0]) {
        err = res->err; /* the decoder stopped the transfer: malformed, too large */
        snprintf(msg, sizeof(msg), "%s: stream: %s", t->provider, pq_stream_errstr(j->st));
    } else {
        err = res->err;
        if (err == PQ_ERR_TOO_LARGE)
            snprintf(msg, sizeof(msg), "%s answered more than max_response_bytes", t->provider);
        else
            snprintf(msg, sizeof(msg), "%s: %s", t->provider, res->detail);
    }
    if (is_watsonx(t) && err == PQ_ERR_AUTH)
        pq_prov_token_invalidate(j->prov, j->key, j->token_used);
    if (completion) {
        total = json_object_get(json_object_get(completion, "usage"), "total_tokens");
        if (json_is_integer(total))
            tokens = json_integer_value(total);
    }
    release_slot(j, tokens, 0);
    j->probe = 0;
    /* health: connect, timeouts, 5xx, malformed and 429s without Retry-After fail the circuit;
     * a 429 with Retry-After and refusals prove the provider answers */
    failure = pq_err_is_retryable(err) && !(err == PQ_ERR_RATE_LIMITED && res->retry_after_ms >= 0);
    if (j->circ)
        pq_circuit_record(j->circ, failure, probe);
    if (err == PQ_OK) {
        attempt_note(j, t, err, res->status, res->elapsed_ms, msg, NULL, NULL);
        if (j->circ)
            pq_circuit_key_ok(j->circ, j->key);
        j->response = completion;
        j->err = PQ_OK;
        j->http_status = res->status;
        j->last_target = t;
        if (j->st)
            stream_relay_usage(j, completion);
        stream_attempt_clear(j);
        job_cache_store(j);
        job_finish(j, "succeeded", PQ_OK, NULL);
        return;
    }
    stream_restart(j, err);
    stream_attempt_clear(j);
    pq_counter_add(w->m.provider_errors, 1);
    act = act_of(j, t, err, res->status, res->timeout);
    attempt_note(j, t, err, res->status, res->elapsed_ms, msg, act_name(act),
                 err == PQ_ERR_TIMEOUT ? pq_http_timeout_name(res->timeout) : NULL);
    attempt_failed(j, act, err, res->status, res->retry_after_ms, msg,
                   fault.code[0] || fault.reason[0] || fault.key_wide ? &fault : NULL);
}

/* The timeouts of the next call on t: the target's, the total cut to the budget left (less
 * reserve_ms while later targets remain, but at least half of what is left). Returns 0, or -1
 * when the budget cannot hold an attempt on t (then the next target gets the rest). */
static int attempt_timeouts(pq_job_t *j, const pq_target_t *t, pq_timeouts_t *to)
{
    int64_t left = budget_left(j), cap;

    *to = t->timeouts;
    if (left == INT64_MAX)
        return 0;
    cap = left;
    if (later_target(j)) {
        cap = left - j->route->reserve_ms;
        if (cap < left / 2)
            cap = left / 2;
    }
    if (cap < MIN_ATTEMPT_MS)
        return -1;
    if (cap < to->total_ms)
        to->total_ms = (int)cap;
    return 0;
}

/* Builds and sends the call with key (an API key, a watsonx token, or NULL). */
static void job_send(pq_job_t *j, const char *key)
{
    pq_worker_t *w = j->w;
    const pq_target_t *t = &j->route->targets[j->target];
    const pq_provider_ops_t *ops = pq_provider_find(t->p->type);
    pq_provider_req_t req;
    pq_timeouts_t to;
    char msg[256] = "";
    pq_err_t err;

    if (attempt_timeouts(j, t, &to) != 0) {
        release_slot(j, -1, 1);
        give_back_probe(j);
        snprintf(msg, sizeof(msg), "the route's budget left is kept for its later targets");
        attempt_note(j, t, PQ_ERR_TIMEOUT, 0, -1, msg, NULL, NULL);
        next_target(j);
        return;
    }
    memset(&req, 0, sizeof(req));
    stream_attempt_clear(j);
    j->stream_usage = json_is_true(
        json_object_get(json_object_get(j->env.request, "stream_options"), "include_usage"));
    if (json_is_true(json_object_get(j->env.request, "stream")) && ops->build_stream_request) {
        err = ops->build_stream_request(t, j->env.request, key, &req, msg, sizeof(msg));
        if (err == PQ_OK &&
            (!(j->st = pq_stream_new(pq_stream_format_for(t->p->type), 0, msg, sizeof(msg))) ||
             !(j->sa = pq_stream_asm_new(w->max_response)))) {
            pq_provider_req_clear(&req);
            stream_attempt_clear(j);
            snprintf(msg, sizeof(msg), "out of memory for the stream decoder");
            err = PQ_ERR_NOMEM;
        }
    } else {
        err = ops->build_request(t, j->env.request, key, &req, msg, sizeof(msg));
    }
    if (err != PQ_OK) {
        /* the target cannot express the request (or its config is unusable): skip it */
        release_slot(j, -1, 1);
        give_back_probe(j);
        if (err == PQ_ERR_UNSUPPORTED)
            pq_counter_add(w->m.skips, 1);
        attempt_note(j, t, err, 0, -1, msg, NULL, NULL);
        note_error(j, t, err, 0, msg, NULL);
        next_target(j);
        return;
    }
    if (is_watsonx(t))
        pq_strlcpy(j->token_used, key ? key : "", sizeof(j->token_used));
    j->attempts++;
    j->pass_attempts++;
    pq_counter_add(w->m.provider_calls, 1);
    if (j->st)
        j->http = pq_http_post_stream(job_http(j), req.url, req.headers, req.body, req.body_len,
                                      &to, w->max_response, on_stream_data, on_http_done, j);
    else
        j->http = pq_http_post_timed(job_http(j), req.url, req.headers, req.body, req.body_len, &to,
                                     w->max_response, on_http_done, j);
    req.headers = NULL;
    req.body = NULL;
    pq_provider_req_clear(&req);
    if (!j->http) {
        stream_attempt_clear(j);
        release_slot(j, -1, 1);
        give_back_probe(j);
        note_error(j, t, PQ_ERR_INTERNAL, 0, "could not start the HTTP request", NULL);
        j->any_retryable = 1;
        job_backoff(j, backoff_ms(t->p, ++j->tries));
        return;
    }
    j->state = JS_CALL;
}

static void on_token(void *opaque, const char *token, pq_err_t err)
{
    pq_job_t *j = opaque;
    const pq_target_t *t = &j->route->targets[j->target];
    char msg[160];
    act_t act;

    if (token) {
        job_send(j, token);
        return;
    }
    release_slot(j, -1, 1);
    give_back_probe(j);
    snprintf(msg, sizeof(msg), "%s: IAM token exchange failed (%s)", t->provider, pq_err_name(err));
    act = act_of(j, t, err, 0, PQ_HTTP_TIMEOUT_NONE);
    attempt_note(j, t, err, 0, -1, msg, act_name(act), NULL);
    j->refreshed = 1; /* a fresh token was just asked for */
    attempt_failed(j, act, err, 0, -1, msg, NULL);
}

/* A slot (and key) is ours. */
static void job_granted(pq_job_t *j, int key)
{
    const pq_target_t *t = &j->route->targets[j->target];
    const char *token = NULL;
    pq_err_t err = PQ_OK;

    j->slot_held = 1;
    j->key = key;
    if (!is_watsonx(t)) {
        job_send(j, pq_prov_key(j->prov, key));
        return;
    }
    j->tw.cb = on_token;
    j->tw.opaque = j;
    switch (pq_prov_token(j->prov, key, &j->tw, &token, &err)) {
    case 0:
        job_send(j, token);
        break;
    case 1:
        j->state = JS_TOKEN;
        break;
    default:
        on_token(j, NULL, err);
        break;
    }
}

/* No key of the target is usable for this job right now. */
static void job_no_key(pq_job_t *j, pq_err_t err, int64_t wake)
{
    const pq_target_t *t = &j->route->targets[j->target];
    int64_t wait = wake - pq_mono_ms();
    char msg[200];

    give_back_probe(j);
    if (err == PQ_ERR_RATE_LIMITED) {
        if (wait < 0)
            wait = 0;
        /* wait for the key only when no later target can take the call now */
        if (wait <= t->p->max_retry_wait_ms && j->tries < t->p->retries_per_target &&
            !deadline_passed(j, wait) && budget_allows_wait(j, wait) && !later_target_ready(j)) {
            j->tries++;
            job_backoff(j, wait);
            return;
        }
        snprintf(msg, sizeof(msg), "every key of %s is resting after rate limits for %s",
                 t->provider, t->model);
    } else {
        snprintf(msg, sizeof(msg), "every key of %s was refused", t->provider);
    }
    attempt_note(j, t, err, 0, -1, msg, NULL, NULL);
    if (err == PQ_ERR_RATE_LIMITED || j->err == PQ_OK || j->last_target != t)
        note_error(j, t, err, 0, msg, NULL); /* else keep the refusal this target answered */
    next_target(j);
}

static void on_slot(void *opaque, int key, pq_err_t err, int64_t wake_ms)
{
    pq_job_t *j = opaque;

    evtimer_del(&j->timer); /* the deadline watch */
    if (key < 0)
        job_no_key(j, err, wake_ms);
    else
        job_granted(j, key);
}

/* The current target t cannot take this job (no call made): recorded in the attempt log and,
 * when noted, as the job's last error; the walk goes on with the next target. */
static void skip_target(pq_job_t *j, const pq_target_t *t, pq_err_t why, const char *msg, int noted)
{
    if (why != PQ_ERR_CONTEXT_LENGTH && why != PQ_ERR_REFUSED)
        pq_counter_add(j->w->m.skips, 1);
    attempt_note(j, t, why, 0, -1, msg, NULL, NULL);
    if (noted)
        note_error(j, t, why, 0, msg, NULL);
    j->target++;
    j->tries = 0;
    j->excluded = 0;
}

static void job_attempt(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    char msg[256];

    /* Lanes: a bulk job asks for a provider slot only while no interactive job is in flight
     * (they share the provider's slots, the sim/provider and this loop); it waits at most
     * LANE_MAX_WAIT_MS, so steady interactive traffic cannot starve the bulk lane. */
    lane_leave(j); /* its wait timer fired, or the lane was released */
    if (j->topic == PQ_T_BULK && w->iinflight > 0 && !j->lane_pass && !w->stopping) {
        j->state = JS_BACKOFF; /* the timer (or pq_job_lanes_release) attempts again */
        TAILQ_INSERT_TAIL(&w->lane_wait, j, lane_link);
        j->in_lane = 1;
        j->lane_pass = 1;
        timer_in(j, LANE_MAX_WAIT_MS);
        return;
    }
    j->lane_pass = 0;

    for (;;) {
        const pq_target_t *t;
        int a, key = -1, rc;
        int64_t wake = 0;
        pq_err_t err = PQ_OK;

        if (deadline_passed(j, 0)) {
            job_finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed while retrying");
            return;
        }
        if (j->target >= j->route->ntargets || j->pass_attempts >= w->conf->max_attempts) {
            job_exhausted(j);
            return;
        }
        t = &j->route->targets[j->target];
        j->prov = pq_provs_get(j->gen->provs, t->p);
        j->circ = j->prov ? pq_prov_circuit(j->prov, t) : NULL;
        if (!pq_provider_find(t->p->type) || !j->prov) {
            snprintf(msg, sizeof(msg), "provider type \"%s\" (%s) is not supported", t->p->type,
                     t->provider);
            skip_target(j, t, PQ_ERR_UNSUPPORTED, msg, 1);
            continue;
        }
        if (!j->probe && !target_eligible(j, t, &err)) {
            /* not an error of its own: the refusal that made it ineligible stays the job's */
            skip_target(j, t, err,
                        err == PQ_ERR_CONTEXT_LENGTH
                            ? "its max_context_tokens is not larger than the target that refused "
                              "the prompt's length"
                            : "its provider refused the request already",
                        0);
            continue;
        }
        if (!j->probe) {
            a = j->circ ? pq_circuit_allow(j->circ) : 1;
            if (a == 0) {
                snprintf(msg, sizeof(msg), "circuit of %s/%s is open", t->provider, t->model);
                skip_target(j, t, PQ_ERR_CIRCUIT_OPEN, msg, 1);
                continue;
            }
            j->probe = a == 2;
        }
        j->sw.cost = j->prov && pq_prov_conf(j->prov)->tpm > 0 ? job_cost(j) : 1.0;
        j->cost = j->sw.cost;
        j->sw.excluded = j->excluded;
        j->sw.circ = j->circ;
        j->sw.cb = on_slot;
        j->sw.opaque = j;
        j->sw.priority = j->topic == PQ_T_REQUESTS; /* the interactive lane goes first */
        rc = pq_prov_acquire(j->prov, &j->sw, &key, &err, &wake);
        if (rc == 0) {
            job_granted(j, key);
        } else if (rc == 1) {
            j->state = JS_QUEUED;
            if (j->env.deadline_ms > 0)
                timer_in(j, j->env.deadline_ms - pq_now_ms());
        } else {
            job_no_key(j, err, wake);
        }
        return;
    }
}

/* ---- cache (DESIGN §4) ---- */

static int job_cacheable(const pq_job_t *j)
{
    const json_t *temp;

    if (j->env.cache == 1)
        return 1;
    if (j->env.cache == 0 || !j->w->conf->cache_temperature_zero)
        return 0;
    temp = json_object_get(j->env.request, "temperature");
    return json_is_number(temp) && json_number_value(temp) == 0.0;
}

/* Stores a fresh answer under promptq:cache:{tenant}:{request hash}: {"provider","model",
 * "response"}; best effort. */
static void job_cache_store(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    char *val, ttl[24];
    const char *argv[6];
    size_t lens[6], len;

    if (!j->cacheable || !j->last_target || !j->cache_key[0])
        return;
    val = pq_jobdoc_cache_entry(j->last_target->provider, j->last_target->model, j->response, &len);
    if (!val)
        return;
    snprintf(ttl, sizeof(ttl), "%" PRId64, w->conf->cache_ttl_s * 1000);
    argv[0] = "SET";
    argv[1] = j->cache_key;
    argv[2] = val;
    argv[3] = "PX";
    argv[4] = ttl;
    for (int i = 0; i < 5; i++)
        lens[i] = strlen(argv[i]);
    lens[2] = len;
    if (pq_redis_command(job_redis(j), 5, argv, lens, on_aux_reply, j) == 0) {
        j->nredis++;
        pq_counter_add(w->m.cache_stores, 1);
    }
    free(val);
}

/* The job runs: look in the cache first when it is cacheable, else call providers. */
static void job_run(pq_job_t *j)
{
    pq_worker_t *w = j->w;

    j->cacheable = job_cacheable(j);
    if (j->cacheable && pq_key_cache(j->cache_key, sizeof(j->cache_key), w->conf->redis_prefix,
                                     tenant_of(j), j->env.request_hash) >= 0) {
        j->state = JS_CACHE;
        j->rstep = RS_CACHE_GET;
        job_redis_issue(j);
        return;
    }
    j->cache_key[0] = '\0';
    job_attempt(j);
}

static void on_cache_get(pq_job_t *j, redisReply *r)
{
    pq_worker_t *w = j->w;
    json_t *doc = NULL;

    if (r->type == REDIS_REPLY_STRING)
        doc = pq_jobdoc_cache_parse(r->str, r->len);
    if (doc) {
        pq_counter_add(w->m.cache_hits, 1);
        PQ_DBG("job %s/%s: cache hit", tenant_of(j), id_of(j));
        j->cached = doc;
        j->response = json_incref(json_object_get(doc, "response"));
        job_finish(j, "succeeded", PQ_OK, NULL);
        return;
    }
    pq_counter_add(w->m.cache_misses, 1);
    job_attempt(j);
}

/* ---- terminal write ---- */

static void job_finish(pq_job_t *j, const char *status, pq_err_t err, const char *msg)
{
    j->status = status;
    j->err = err;
    if (msg)
        pq_strlcpy(j->errmsg, msg, sizeof(j->errmsg));
    event_del(&j->renew);
    free(j->result);
    j->result = build_result(j, &j->result_len);
    if (j->result && j->result_len > j->w->max_msg) {
        /* never produceable: fail it as too_large with a small record, before the terminal
         * write (G3: the stored result is what every redelivery re-publishes) */
        char why[200];
        snprintf(why, sizeof(why),
                 "result record of %zu bytes exceeds the producer's message.max.bytes",
                 j->result_len);
        PQ_WARN("job %s/%s: %s: failed too_large", tenant_of(j), id_of(j), why);
        json_decref(j->response);
        j->response = NULL;
        j->slim = 1;
        j->status = "failed";
        j->err = PQ_ERR_TOO_LARGE;
        pq_strlcpy(j->errmsg, why, sizeof(j->errmsg));
        free(j->result);
        j->result = build_result(j, &j->result_len);
    }
    if (!j->result) {
        PQ_ERR("job %s/%s: cannot build the result record", tenant_of(j), id_of(j));
        timer_in(j, REDIS_ERROR_RETRY_MS);
        j->state = JS_FINISH;
        j->rstep = RS_FINISH;
        return;
    }
    j->state = JS_FINISH;
    j->rstep = RS_FINISH;
    job_redis_issue(j);
}

static void job_begin(pq_job_t *j)
{
    pq_job_t *holder = table_find(j->w, j->job_key);

    if (holder && holder != j) {
        j->state = JS_WAIT_LOCAL;
        timer_in(j, LOCAL_WAIT_MS);
        return;
    }
    if (!holder)
        table_add(j);
    j->state = JS_BEGIN;
    j->rstep = RS_BEGIN;
    job_redis_issue(j);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    pq_job_t *j = arg;

    switch (j->state) {
    case JS_WAIT_LOCAL:
    case JS_WAIT_LEASE:
        job_begin(j);
        break;
    case JS_BACKOFF:
        job_attempt(j);
        break;
    case JS_QUEUED:
        /* the deadline passed while waiting for a slot */
        pq_prov_cancel(j->prov, &j->sw);
        give_back_probe(j);
        job_finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed while waiting for a provider");
        break;
    case JS_CACHE:
    case JS_BEGIN:
    case JS_FINISH:
        if (!j->result && j->state == JS_FINISH)
            job_finish(j, j->status, j->err, NULL);
        else
            job_redis_issue(j);
        break;
    case JS_PUBLISH:
        job_publish(j);
        break;
    case JS_PARK:
        if (j->rstep == RS_PARK)
            job_redis_issue(j);
        else
            job_park_produce(j);
        break;
    default:
        break;
    }
}

/* ---- intake ---- */

static void job_invalid(pq_job_t *j, const rd_kafka_message_t *m, pq_err_t err, const char *why)
{
    pq_worker_t *w = j->w;
    const char *buf = m->payload ? (const char *)m->payload : "";

    j->dlq = pq_jobdoc_invalid(buf, m->len, why, &j->dlq_len);
    if (j->dlq && j->dlq_len > w->max_msg) {
        free(j->dlq);
        j->err = err;
        pq_strlcpy(j->errmsg, why, sizeof(j->errmsg));
        j->dlq = build_dlq_small(j, &j->dlq_len);
    }
    if (m->key && m->key_len > 0)
        j->msg_key = strndup(m->key, m->key_len);
    j->status = "invalid";
    pq_counter_add(w->m.invalid, 1);
    pq_counter_add(w->m.dlq, 1);
    PQ_WARN("invalid job at %s/%" PRId32 "/%" PRId64 ": %s (%s): dlq", w->topics[j->topic],
            j->partition, j->offset, why, pq_err_name(err));
    job_publish(j);
}

void pq_job_intake(pq_worker_t *w, pq_part_t *part, int topic, const rd_kafka_message_t *m,
                   int64_t delay_ms)
{
    pq_job_t *j = calloc(1, sizeof(*j));
    char errbuf[256];
    rd_kafka_timestamp_type_t tstype;
    int64_t ts;
    pq_err_t err;

    if (!j) {
        /* Not taken in: its offset is never stored, so it comes back after a restart. */
        PQ_ERR("out of memory taking in %s/%" PRId32 "/%" PRId64, w->topics[topic], m->partition,
               m->offset);
        return;
    }
    j->w = w;
    j->gen = w->gen;
    j->gen->refs++;
    j->src_topic = part ? part->name : topic < PQ_T_COUNT ? w->topics[topic] : "?";
    if (topic == PQ_T_RETRY && part && part->rs) {
        j->retry_rs = part->rs;
        j->retry_rs->inflight++;
        w->retry_inflight++;
    }
    j->topic = topic;
    j->partition = m->partition;
    j->offset = m->offset;
    j->start_mono = pq_mono_ms();
    evtimer_assign(&j->timer, w->base, on_timer, j);
    event_assign(&j->renew, w->base, -1, EV_PERSIST, on_renew_tick, j);
    if (topic == PQ_T_REQUESTS) /* the interactive lane's events run first */
        event_priority_set(&j->timer, 0);
    TAILQ_INSERT_TAIL(&w->jobs, j, link);
    w->inflight++;
    pq_counter_add(w->m.received, 1);
    if (part) {
        j->seq = pq_offsets_push(&part->offsets, m->offset);
        if (j->seq != UINT64_MAX) {
            j->part = part;
            part->refcnt++;
        }
        part->next_taken = m->offset + 1;
    }
    ts = rd_kafka_message_timestamp(m, &tstype);
    j->created_ms = ts > 0 ? ts : pq_now_ms();

    err = pq_envelope_parse(m->payload ? (const char *)m->payload : "", m->len, &w->limits, &j->env,
                            errbuf, sizeof(errbuf));
    if (err != PQ_OK) {
        job_invalid(j, m, err, errbuf);
        return;
    }
    if (!j->env.id) {
        char id[PQ_KAFKA_ID_LEN + 1];
        pq_id_derive_kafka(w->cluster_id, w->topics[topic], m->partition, m->offset,
                           ts > 0 ? ts : 0, id);
        if (pq_envelope_set_id(&j->env, id) != 0) {
            job_invalid(j, m, PQ_ERR_INTERNAL, "cannot set the derived id");
            return;
        }
    }
    if (pq_key_job(j->job_key, sizeof(j->job_key), w->conf->redis_prefix, j->env.tenant,
                   j->env.id) < 0 ||
        pq_key_lease(j->lease_key, sizeof(j->lease_key), w->conf->redis_prefix, j->env.tenant,
                     j->env.id) < 0) {
        job_invalid(j, m, PQ_ERR_INVALID, "tenant or id too long for a key");
        return;
    }
    j->route = pq_conf_route(j->gen->conf, j->env.model);
    if (j->route)
        j->rs = pq_park_route(w, j->route->name);
    j->ctx_floor = -1;
    if (j->env.park && json_is_array(json_object_get(j->env.park, "attempt_log")))
        j->alog = json_copy(json_object_get(j->env.park, "attempt_log")); /* earlier passes */
    if (j->route && topic == PQ_T_REQUESTS && j->env.reply_to)
        j->budget_end_ms = j->created_ms + pq_conf_route_budget_ms(j->gen->conf, j->route);
    if (delay_ms > 0) {
        j->state = JS_WAIT_LOCAL; /* its timer begins it */
        timer_in(j, delay_ms);
        return;
    }
    job_begin(j);
}

/* ---- lanes ---- */

static void lane_leave(pq_job_t *j)
{
    if (!j->in_lane)
        return;
    TAILQ_REMOVE(&j->w->lane_wait, j, lane_link);
    j->in_lane = 0;
}

void pq_job_lanes_release(pq_worker_t *w)
{
    pq_job_t *j;

    while (w->iinflight == 0 && (j = TAILQ_FIRST(&w->lane_wait))) {
        lane_leave(j);
        evtimer_del(&j->timer);
        j->lane_pass = 0;
        job_attempt(j);
    }
}

/* ---- shutdown ---- */

/* Cancels the job's call or wait, gives its slot and probe role back. */
static void job_stop_calls(pq_job_t *j)
{
    if (j->http) {
        pq_http_cancel(job_http(j), j->http);
        j->http = NULL;
    }
    stream_attempt_clear(j);
    if (j->prov) {
        pq_prov_cancel(j->prov, &j->sw);
        pq_prov_token_cancel(j->prov, &j->tw);
    }
    release_slot(j, -1, 1);
    give_back_probe(j);
}

void pq_job_hand_back_all(pq_worker_t *w)
{
    pq_job_t *j;

    TAILQ_FOREACH(j, &w->jobs, link)
    {
        j->handed_back = 1;
        pq_counter_add(w->m.handed_back, 1);
        if (j->state == JS_FINISH || j->state == JS_PUBLISH || j->state == JS_PARK)
            continue; /* their offsets are not stored any more; redelivery re-publishes */
        evtimer_del(&j->timer);
        event_del(&j->renew);
        job_stop_calls(j);
        if (j->in_wait) {
            TAILQ_REMOVE(&w->redis_wait, j, wait_link);
            j->in_wait = 0;
        }
        lane_leave(j);
        if (j->lease_held) {
            j->lease_held = 0;
            j->rstep = RS_RELEASE;
            job_redis_issue(j);
        }
        j->state = JS_WAIT_LOCAL; /* parked: nothing re-arms it */
    }
}

void pq_job_free_all(pq_worker_t *w)
{
    pq_job_t *j;

    while ((j = TAILQ_FIRST(&w->jobs))) {
        TAILQ_REMOVE(&w->jobs, j, link);
        lane_leave(j);
        job_stop_calls(j);
        pq_part_unref(j->part);
        j->part = NULL;
        j->state = JS_GONE;
        if (j->nredis == 0)
            job_free(j);
        /* else: freed by its Redis callback when the connection is torn down */
    }
}
