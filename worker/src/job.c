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
#include "job_int.h"

static void job_begin(pq_job_t *j);
static void job_free(pq_job_t *j);

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

static void job_free(pq_job_t *j)
{
    pq_jobstream_clear(j);
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
        pq_jobstream_xadd(j, "end", "", 0);
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
        pq_attempt_run(j); /* an unreadable cache is a miss */
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
    pq_attempt_backoff(j, pq_attempt_backoff_ms(p0, j->rounds + p0->retries_per_target));
}

/* ---- cache (DESIGN §4) ---- */

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
    pq_attempt_run(j);
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
    pq_attempt_run(j);
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
        pq_attempt_run(j);
        break;
    case JS_QUEUED:
        /* the deadline passed while waiting for a slot */
        pq_prov_cancel(j->prov, &j->sw);
        pq_attempt_give_back_probe(j);
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

static const pq_job_hooks_t job_hooks = {
    .finish = job_finish,
    .all_targets_down = job_all_targets_down,
    .lane_leave = lane_leave,
    .cache_store = job_cache_store,
    .aux_reply = on_aux_reply,
};

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
    j->hooks = &job_hooks;
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
        pq_attempt_run(j);
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
    pq_jobstream_clear(j);
    if (j->prov) {
        pq_prov_cancel(j->prov, &j->sw);
        pq_prov_token_cancel(j->prov, &j->tw);
    }
    pq_attempt_release_slot(j, -1, 1);
    pq_attempt_give_back_probe(j);
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
