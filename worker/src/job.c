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
#include "gen.h"
#include "job_int.h"
#include "park.h"
#include "parts.h"
#include "produce.h"
#include "promptq/err.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

static void job_begin(pq_job_t *j);
static void job_free(pq_job_t *j);

static void lane_leave(pq_job_t *j);
static void job_finish(pq_job_t *j, const char *status, pq_err_t err, const char *msg);

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

/* A zeroed job, from the pool when it has one. */
static pq_job_t *job_alloc(pq_worker_t *w)
{
    pq_job_t *j = w->job_pool;

    if (!j)
        return calloc(1, sizeof(*j));
    w->job_pool = j->pool_next;
    w->njob_pool--;
    memset(j, 0, sizeof(*j));
    return j;
}

static void job_free(pq_job_t *j)
{
    pq_worker_t *w = j->w;

    pq_jobstream_clear(j);
    pq_jobstream_prefill_drop(j);
    evtimer_del(&j->timer);
    event_del(&j->renew);
    pq_envelope_clear(&j->env);
    pq_jobrec_clear_response(j);
    json_decref(j->alog);
    json_decref(j->cached);
    free(j->result);
    free(j->dlq);
    free(j->parked);
    free(j->msg_key);
    if (w && w->njob_pool < w->job_pool_max) {
        j->pool_next = w->job_pool;
        w->job_pool = j;
        w->njob_pool++;
        return;
    }
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
        j->dlq = pq_jobrec_dlq_small(j, &j->dlq_len);
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
            pq_jobredis_issue(j);
        }
        return;
    }
    if (j->state == JS_PUBLISH && !evtimer_pending(&j->timer, NULL))
        job_publish(j);
}

static void job_stop_calls(pq_job_t *j);

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

    pq_jobstream_flush(j); /* parked: the client's stream must not wait for a continuation */
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

/* ---- terminal write ---- */

static void job_finish(pq_job_t *j, const char *status, pq_err_t err, const char *msg)
{
    pq_jobstream_flush(j); /* a cut stream not continued: its restart before the end */
    j->status = status;
    j->err = err;
    if (msg)
        pq_strlcpy(j->errmsg, msg, sizeof(j->errmsg));
    event_del(&j->renew);
    free(j->result);
    j->result = pq_jobrec_result(j, &j->result_len);
    if (j->result && j->result_len > j->w->max_msg) {
        /* never produceable: fail it as too_large with a small record, before the terminal
         * write (G3: the stored result is what every redelivery re-publishes) */
        char why[200];
        snprintf(why, sizeof(why),
                 "result record of %zu bytes exceeds the producer's message.max.bytes",
                 j->result_len);
        PQ_WARN("job %s/%s: %s: failed too_large", tenant_of(j), id_of(j), why);
        pq_jobrec_clear_response(j);
        j->slim = 1;
        j->status = "failed";
        j->err = PQ_ERR_TOO_LARGE;
        pq_strlcpy(j->errmsg, why, sizeof(j->errmsg));
        free(j->result);
        j->result = pq_jobrec_result(j, &j->result_len);
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
    pq_jobredis_issue(j);
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
    pq_jobredis_issue(j);
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
            pq_jobredis_issue(j);
        break;
    case JS_PUBLISH:
        job_publish(j);
        break;
    case JS_PARK:
        if (j->rstep == RS_PARK)
            pq_jobredis_issue(j);
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
        j->dlq = pq_jobrec_dlq_small(j, &j->dlq_len);
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
    .cache_store = pq_jobredis_cache_store,
    .aux_reply = pq_jobredis_aux_reply,
    .publish = job_publish,
    .done = job_done,
    .free = job_free,
    .stop_calls = job_stop_calls,
    .table_remove = table_remove,
};

void pq_job_intake(pq_worker_t *w, pq_part_t *part, int topic, const rd_kafka_message_t *m,
                   int64_t delay_ms)
{
    pq_job_t *j = job_alloc(w);
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
    event_assign(&j->renew, w->base, -1, EV_PERSIST, pq_jobredis_on_renew_tick, j);
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
            pq_jobredis_issue(j);
        }
        j->state = JS_WAIT_LOCAL; /* parked: nothing re-arms it */
    }
}

void pq_job_free_all(pq_worker_t *w)
{
    pq_job_t *j;

    /* from here on a job's memory goes straight back to malloc (some are freed later, by
     * their Redis callbacks as the connection is torn down) */
    w->job_pool_max = 0;
    while ((j = w->job_pool)) {
        w->job_pool = j->pool_next;
        free(j);
    }
    w->njob_pool = 0;

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
