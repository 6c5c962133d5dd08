/* POST /v1/jobs: authenticate, validate, record (best effort) and produce; answer 202 only
 * from the delivery report (G1), or once the job is fsync'd into the local spool when Kafka did
 * not confirm in time (or is known down); else 503 + Retry-After.
 *
 * The job id is written into the envelope before the first produce, so a job that is both
 * spooled (ack deadline passed) and then delivered late by the loop's producer reaches Kafka
 * twice with the same (tenant, id): the worker runs it once (G3). The loop's producer gets its
 * own copy of the payload (RD_KAFKA_MSG_F_COPY) so the slot still has it for the spool. */
#include "broker.h"
#include "bspool.h"
#include "http.h"
#include "idem.h"
#include "intake.h"
#include "ratelimit.h"
#include "rconn.h"
#include "slot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>

#include "promptq/callback.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

/* Retry-After when the spool is full: it empties only as fast as Kafka takes it back. */
#define RETRY_AFTER_FULL "5"

void pq_intake_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                           const char *why)
{
    pq_http_unavailable(t, req, path, "1", why);
}

pq_slot_t *pq_intake_slot_get(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                              const pq_envelope_t *env, const char *tenant,
                              const pq_slot_ops_t *ops)
{
    pq_slot_t *s = pq_slot_get(t, path, req, ops);

    if (!s) {
        pq_intake_unavailable(t, req, path, "too many requests in flight");
        return NULL;
    }
    pq_strlcpy(s->id, env->id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    pq_strlcpy(s->route, env->model, sizeof(s->route));
    memcpy(s->hash, env->request_hash, sizeof(s->hash));
    return s;
}

void pq_intake_start(pq_slot_t *s, const char *idem, const void *body, size_t len,
                     void (*durable)(pq_slot_t *s, int spooled),
                     void (*repeat)(pq_slot_t *s, int spooled))
{
    s->durable = durable;
    if (idem) {
        pq_sha256_hex(body, len, s->body_hash);
        pq_idem_start(s, idem, pq_intake_submit, repeat);
        return;
    }
    pq_intake_submit(s);
}

/* Drops the queued record this request created, so a job that was never accepted leaves no
 * trace (the script keeps it if a worker already saw the job). */
static void drop_record(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    char key[512];

    if (!s->created || !pq_rconn_usable(t))
        return;
    if (pq_key_job(key, sizeof(key), t->bc->conf->redis_prefix, s->tenant, s->id) < 0)
        return;
    pq_rconn_sendf(t, NULL, NULL, "EVALSHA %s 1 %s", pq_rconn_sha(pq_script_job_drop), key);
}

void pq_intake_not_durable(pq_slot_t *s, const char *why)
{
    pq_bthread_t *t = s->t;
    pq_err_t err;

    if (s->state == PQ_SLOT_SPOOLING)
        return; /* already on its way to disk */
    event_del(&s->timer);
    err = pq_bspool_append(s, pq_intake_spooled);
    if (err == PQ_OK) {
        PQ_DBG("job %s/%s spooled: %s", s->tenant, s->id, why);
        return;
    }
    PQ_DBG("job %s/%s not durable (%s) and not spooled: %s", s->tenant, s->id, why,
           pq_err2str(err));
    drop_record(s);
    if (err == PQ_ERR_TOO_LARGE) {
        pq_counter_add(t->b->m_spool_refused_error, 1);
        pq_http_error(t, s->req, s->path, 413, "too_large",
                      "job of %zu bytes exceeds the spool's record limit", s->payload_len);
    } else if (err == PQ_ERR_UNAVAILABLE) {
        pq_counter_add(t->b->m_spool_refused_full, 1);
        pq_http_unavailable(t, s->req, s->path, RETRY_AFTER_FULL,
                            "Kafka did not confirm it in time and the local spool is full");
    } else {
        pq_counter_add(t->b->m_spool_refused_error, 1);
        pq_intake_unavailable(t, s->req, s->path, why);
    }
    pq_slot_release(s);
}

void pq_intake_accepted(pq_slot_t *s, int spooled)
{
    pq_bthread_t *t = s->t;
    struct evkeyvalq *h = evhttp_request_get_output_headers(s->req);
    char body[64 + PQ_ID_MAX], loc[16 + PQ_ID_MAX];
    int n;

    /* ids match [A-Za-z0-9._:-]: nothing to escape in JSON or in the path */
    snprintf(loc, sizeof(loc), "/v1/jobs/%s", s->id);
    evhttp_add_header(h, "Location", loc);
    n = snprintf(body, sizeof(body), "{\"id\":\"%s\",\"status\":\"queued\",\"durability\":\"%s\"}",
                 s->id, spooled ? "spooled" : "kafka");
    pq_http_reply(t, s->req, PQ_PATH_JOBS, 202, body, (size_t)n);
    pq_slot_release(s);
}

/* The job is in Kafka or in the spool: it counts as accepted (G1), whoever answers. */
static void durable(pq_slot_t *s, int spooled)
{
    pq_bthread_t *t = s->t;

    pq_counter_add(spooled ? t->b->m_accepted_spooled : t->b->m_accepted, 1);
    pq_idem_durable(s, spooled);
    s->durable(s, spooled);
}

void pq_intake_spooled(pq_slot_t *s, pq_err_t err)
{
    pq_bthread_t *t = s->t;

    if (err == PQ_OK) {
        durable(s, 1);
        return;
    }
    /* Writing or syncing failed: nothing was acknowledged. */
    pq_counter_add(t->b->m_spool_refused_error, 1);
    drop_record(s);
    pq_intake_unavailable(t, s->req, s->path,
                          "Kafka did not confirm it in time and the local spool failed");
    pq_slot_release(s);
}

/* Hands the envelope to the producer; the answer comes from the delivery report. */
static void produce(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    rd_kafka_resp_err_t err;

    if (pq_bspool_kafka_down(t) || t->kafka_fatal || !t->rk) {
        pq_intake_not_durable(s, "Kafka is unreachable");
        return;
    }
    err = rd_kafka_producev(t->rk, RD_KAFKA_V_RKT(t->rkt), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                            RD_KAFKA_V_VALUE(s->payload, s->payload_len),
                            RD_KAFKA_V_KEY(s->id, strlen(s->id)),
                            RD_KAFKA_V_OPAQUE(pq_slot_handle(s)), RD_KAFKA_V_END);
    if (err) {
        pq_counter_add(t->b->m_produce_errors, 1);
        if (err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE) {
            drop_record(s);
            pq_http_error(t, s->req, s->path, 413, "too_large",
                          "job of %zu bytes exceeds Kafka's message.max.bytes", s->payload_len);
            pq_slot_release(s);
        } else {
            pq_intake_not_durable(s, rd_kafka_err2str(err));
        }
        return;
    }
    s->state = PQ_SLOT_PRODUCING;
    s->t_produce_us = pq_mono_us();
    event_del(&s->timer);
    event_add(&s->timer, t->tv_ack);
}

void pq_intake_redis_reply(pq_slot_t *s, long long result, int ok)
{
    pq_bthread_t *t = s->t;

    if (s->state == PQ_SLOT_PRODUCING || s->state == PQ_SLOT_SPOOLING) {
        /* The check timed out and the job went ahead; remember a record it created so a
         * failure can still drop it. */
        if (ok && result == 1)
            s->created = 1;
        return;
    }
    if (s->state != PQ_SLOT_REDIS_CREATE)
        return;
    if (!ok) {
        pq_counter_add(t->b->m_redis_errors, 1);
    } else if (result == -1) {
        pq_counter_add(t->b->m_conflicts, 1);
        pq_http_error(t, s->req, s->path, 409, "id_conflict",
                      "job id %s was already used with another request", s->id);
        pq_slot_release(s);
        return;
    } else if (result == 1) {
        s->created = 1;
    }
    produce(s);
}

void pq_intake_timeout(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;

    if (s->state == PQ_SLOT_REDIS_CREATE) {
        /* Redis is slow: skip the check (best effort; the worker detects conflicts too). */
        pq_counter_add(t->b->m_redis_errors, 1);
        produce(s);
    } else if (s->state == PQ_SLOT_PRODUCING) {
        pq_intake_not_durable(s, "Kafka did not confirm in time");
    }
}

void pq_intake_delivered(pq_bthread_t *t, const rd_kafka_message_t *m)
{
    pq_slot_t *s = pq_slot_from_handle(t, m->_private);

    if (!m->err && atomic_exchange(&t->kafka_up, 1) != 1)
        pq_bspool_kafka_changed(t->b);
    if (!s || s->state != PQ_SLOT_PRODUCING) {
        /* Already answered (spooled at the ack deadline): the spooled copy is produced again
         * by the drainer, with the same id (G3 makes the second one harmless). */
        if (m->err)
            PQ_DBG("late delivery failure: %s", rd_kafka_err2str(m->err));
        else
            pq_counter_add(t->b->m_late_delivered, 1);
        return;
    }
    if (!m->err) {
        pq_hist_observe(t->b->m_ack_latency, (double)(pq_mono_us() - s->t_produce_us) / 1e6);
        durable(s, 0);
        return;
    }
    pq_counter_add(t->b->m_produce_errors, 1);
    switch (m->err) {
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
        drop_record(s);
        pq_http_error(t, s->req, s->path, 413, "too_large",
                      "job exceeds the Kafka topic's message size limit");
        pq_slot_release(s);
        break;
    case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
        PQ_ERR("produce to %s failed permanently: %s", rd_kafka_topic_name(t->rkt),
               rd_kafka_err2str(m->err));
        drop_record(s);
        pq_http_error(t, s->req, s->path, 500, "internal", "Kafka refused the job: %s",
                      rd_kafka_err2name(m->err));
        pq_slot_release(s);
        break;
    default:
        pq_intake_not_durable(s, rd_kafka_err2str(m->err));
        break;
    }
}

static void intake_slot_timeout(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_IDEM)
        pq_idem_timeout(s);
    else
        pq_intake_timeout(s);
}

static void intake_slot_stop(pq_slot_t *s)
{
    if (s->state == PQ_SLOT_PRODUCING || s->state == PQ_SLOT_REDIS_CREATE)
        pq_intake_not_durable(s, "shutting down");
}

const pq_slot_ops_t pq_intake_ops = {intake_slot_timeout, intake_slot_stop, pq_idem_release};

int pq_job_create_argv(const pq_conf_t *conf, const char *tenant, const char *id, const char *hash,
                       const char *route, const char *callback_url, pq_job_create_buf_t *b,
                       const char **argv, size_t *lens)
{
    if (pq_key_job(b->key, sizeof(b->key), conf->redis_prefix, tenant, id) < 0 ||
        pq_key_jobs(b->ikey, sizeof(b->ikey), conf->redis_prefix, tenant) < 0)
        return -1;
    snprintf(b->now, sizeof(b->now), "%lld", (long long)pq_now_ms());
    snprintf(b->ttl, sizeof(b->ttl), "%lld", (long long)conf->result_ttl_s * 1000);
    argv[0] = "EVALSHA";
    argv[1] = pq_rconn_sha(pq_script_job_create);
    argv[2] = "2";
    argv[3] = b->key;
    argv[4] = b->ikey;
    argv[5] = hash;
    argv[6] = b->now;
    argv[7] = b->ttl;
    argv[8] = route;
    argv[9] = callback_url ? callback_url : "";
    argv[10] = tenant;
    argv[11] = id;
    for (int i = 0; i < PQ_JOB_CREATE_ARGC; i++)
        lens[i] = strlen(argv[i]);
    return 0;
}

/* ---- job_create, batched per loop iteration ----
 *
 * A new job's record check is queued on its loop; the first one queued in an iteration
 * activates create_ev, which runs after the other requests that iteration serves and sends
 * every queued create in one EVALSHA of job_create_many (at most PQ_BROKER_CREATE_BATCH_MAX
 * per command: a full batch goes out at once). Redis then runs one command and one Lua call
 * per batch instead of per job, and the loop formats, parses and dispatches one reply. Each
 * job keeps its own timer and its own answer (an element of the reply array). */

struct pq_create_batch_s {
    struct pq_create_batch_s *next; /* spare list */
    int n;
    void *handles[PQ_BROKER_CREATE_BATCH_MAX]; /* the slots, by handle */
};

/* The loop's scratch for building one command (allocated once per loop). */
struct pq_create_scratch_s {
    pq_job_create_buf_t b[PQ_BROKER_CREATE_BATCH_MAX];
    const char *argv[3 + 9 * PQ_BROKER_CREATE_BATCH_MAX];
    size_t lens[3 + 9 * PQ_BROKER_CREATE_BATCH_MAX];
    const char *jargv[PQ_BROKER_CREATE_BATCH_MAX][PQ_JOB_CREATE_ARGC - 5]; /* per job, in turn */
    size_t jlens[PQ_BROKER_CREATE_BATCH_MAX][PQ_JOB_CREATE_ARGC - 5];
    char nkeys[16];
};

static void batch_recycle(pq_bthread_t *t, pq_create_batch_t *q)
{
    q->n = 0;
    q->next = t->create_spare;
    t->create_spare = q;
}

static void create_many_cb(redisAsyncContext *ac, void *r, void *priv)
{
    const redisReply *reply = r;
    pq_create_batch_t *q = priv;
    pq_bthread_t *t = pq_rconn_replied(ac, r);

    for (int i = 0; i < q->n; i++) {
        pq_slot_t *s = pq_slot_from_handle(t, q->handles[i]);
        const redisReply *el =
            reply && reply->type == REDIS_REPLY_ARRAY && (size_t)i < reply->elements
                ? reply->element[i]
                : NULL;

        if (!s || (s->state != PQ_SLOT_REDIS_CREATE && s->state != PQ_SLOT_PRODUCING &&
                   s->state != PQ_SLOT_SPOOLING))
            continue;
        if (el && el->type == REDIS_REPLY_INTEGER) {
            pq_intake_redis_reply(s, el->integer, 1);
        } else {
            if (el && el->type == REDIS_REPLY_ERROR)
                PQ_WARN("thread %d: job_create %s/%s: %s", t->no, s->tenant, s->id, el->str);
            pq_intake_redis_reply(s, 0, 0);
        }
    }
    batch_recycle(t, q);
}

static void produce_queued(pq_bthread_t *t, pq_create_batch_t *q)
{
    for (int i = 0; i < q->n; i++) {
        pq_slot_t *s = pq_slot_from_handle(t, q->handles[i]);

        if (s && s->state == PQ_SLOT_REDIS_CREATE)
            produce(s); /* Redis unusable: best effort, produce anyway */
    }
    batch_recycle(t, q);
}

/* Sends the loop's queued creates (create_ev, or a full batch). */
static void create_flush(pq_bthread_t *t)
{
    pq_create_batch_t *q = t->create_q;
    struct pq_create_scratch_s *x = t->create_scratch;
    const char *sha = pq_rconn_sha(pq_rconn_create_many());
    int n = 0, argc;

    if (!q)
        return;
    t->create_q = NULL;
    if (!sha || !pq_rconn_usable(t)) {
        produce_queued(t, q);
        return;
    }
    for (int i = 0; i < q->n; i++) {
        pq_slot_t *s = pq_slot_from_handle(t, q->handles[i]);
        const char *argv[PQ_JOB_CREATE_ARGC];
        size_t lens[PQ_JOB_CREATE_ARGC];

        if (!s || s->state != PQ_SLOT_REDIS_CREATE)
            continue; /* answered meanwhile */
        if (pq_job_create_argv(t->bc->conf, s->tenant, s->id, s->hash, s->route, s->callback_url,
                               &x->b[n], argv, lens)) {
            produce(s); /* a key that does not fit: no check, as when Redis is unusable */
            continue;
        }
        /* KEYS: job key and index key of each job; then job_create's own 7 ARGV of each */
        x->argv[3 + 2 * n] = argv[3];
        x->lens[3 + 2 * n] = lens[3];
        x->argv[3 + 2 * n + 1] = argv[4];
        x->lens[3 + 2 * n + 1] = lens[4];
        memcpy(x->jargv[n], &argv[5], sizeof(x->jargv[n]));
        memcpy(x->jlens[n], &lens[5], sizeof(x->jlens[n]));
        q->handles[n++] = q->handles[i];
    }
    q->n = n;
    if (n == 0) {
        batch_recycle(t, q);
        return;
    }
    argc = 3 + 2 * n;
    for (int i = 0; i < n; i++, argc += 7) {
        memcpy(&x->argv[argc], x->jargv[i], sizeof(x->jargv[i]));
        memcpy(&x->lens[argc], x->jlens[i], sizeof(x->jlens[i]));
    }
    snprintf(x->nkeys, sizeof(x->nkeys), "%d", 2 * n);
    x->argv[0] = "EVALSHA";
    x->argv[1] = sha;
    x->argv[2] = x->nkeys;
    for (int i = 0; i < 3; i++)
        x->lens[i] = strlen(x->argv[i]);
    if (pq_rconn_send(t, create_many_cb, q, argc, x->argv, x->lens))
        produce_queued(t, q);
}

static void create_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    create_flush(arg);
}

int pq_intake_thread_init(pq_bthread_t *t)
{
    t->create_scratch = malloc(sizeof(*t->create_scratch));
    t->create_ev = event_new(t->base, -1, 0, create_ev_cb, t);
    return t->create_scratch && t->create_ev ? 0 : -1;
}

void pq_intake_thread_free(pq_bthread_t *t)
{
    pq_create_batch_t *q;

    if (t->create_ev)
        event_free(t->create_ev);
    t->create_ev = NULL;
    if (t->create_q)
        batch_recycle(t, t->create_q);
    t->create_q = NULL;
    while ((q = t->create_spare)) {
        t->create_spare = q->next;
        free(q);
    }
    free(t->create_scratch);
    t->create_scratch = NULL;
}

/* Checks that (tenant, id) is new or was used with the same request: job_create, which also
 * adds a new job to the tenant's listing index (GET /v1/jobs). Queued for this iteration's
 * batch; the answer comes through pq_intake_redis_reply. */
static int check_record(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;
    pq_create_batch_t *q = t->create_q;

    if (!t->create_ev || !pq_rconn_usable(t))
        return -1;
    if (!q) {
        q = t->create_spare;
        if (q)
            t->create_spare = q->next;
        else if (!(q = malloc(sizeof(*q))))
            return -1;
        q->n = 0;
        t->create_q = q;
        event_active(t->create_ev, EV_TIMEOUT, 0);
    }
    q->handles[q->n++] = pq_slot_handle(s);
    s->state = PQ_SLOT_REDIS_CREATE;
    event_add(&s->timer, t->tv_redis);
    if (q->n == PQ_BROKER_CREATE_BATCH_MAX)
        create_flush(t);
    return 0;
}

void pq_intake_submit(pq_slot_t *s)
{
    if (check_record(s) != 0) {
        /* Redis unusable: best effort, produce anyway. */
        produce(s);
    }
}

void pq_intake_post(pq_bthread_t *t, struct evhttp_request *req)
{
    const pq_bconf_t *bc = t->bc;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    pq_envelope_t env;
    const char *key_tenant, *tenant, *idem = NULL;
    const char *body;
    char errstr[256], idbuf[PQ_JOB_ID_LEN + 1];
    pq_slot_t *s;
    pq_err_t err;
    json_t *named;

    memset(&env, 0, sizeof(env));
    if (pq_http_auth(t, req, PQ_PATH_JOBS, &key_tenant))
        return;
    if (key_tenant && pq_http_ratelimit(t, req, PQ_PATH_JOBS, key_tenant))
        return;
    if (pq_idem_header(t, req, PQ_PATH_JOBS, &idem))
        return;
    if (len > bc->max_body) {
        pq_http_error(t, req, PQ_PATH_JOBS, 413, "too_large",
                      "job body of %zu bytes exceeds the limit of %zu bytes", len, bc->max_body);
        return;
    }
    body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    err = pq_envelope_parse(body, len, &bc->limits, &env, errstr, sizeof(errstr));
    if (err == PQ_ERR_TOO_LARGE) {
        pq_http_error(t, req, PQ_PATH_JOBS, 413, "too_large", "%s", errstr);
        return;
    }
    if (err != PQ_OK) {
        pq_http_error(t, req, PQ_PATH_JOBS, 400, "invalid_request", "%s", errstr);
        return;
    }
    /* reply_to names the Redis channel the worker publishes the finished id on: only the broker
     * sets it, for its own sync waiters; a client's would publish to any channel it names. */
    if (env.reply_to) {
        pq_http_error(t, req, PQ_PATH_JOBS, 400, "invalid_request",
                      "reply_to: set by the broker for its own waiters, not by clients");
        goto out;
    }

    named = json_object_get(env.root, "tenant");
    if (key_tenant) {
        if (named && strcmp(json_string_value(named), key_tenant) != 0) {
            pq_http_error(t, req, PQ_PATH_JOBS, 403, "forbidden",
                          "this API key may not submit jobs for tenant %s",
                          json_string_value(named));
            goto out;
        }
        if (!named && json_object_set_new(env.root, "tenant", json_string(key_tenant))) {
            pq_http_error(t, req, PQ_PATH_JOBS, 500, "internal", "out of memory");
            goto out;
        }
        tenant = key_tenant;
    } else {
        tenant = env.tenant ? env.tenant : "default";
        if (pq_http_ratelimit(t, req, PQ_PATH_JOBS, tenant))
            goto out;
    }

    if (!pq_conf_route(bc->conf, env.model)) {
        pq_http_error(t, req, PQ_PATH_JOBS, 404, "model_not_found",
                      "request.model: no route named %s is configured", env.model);
        goto out;
    }
    if (strlen(env.model) > PQ_BROKER_ROUTE_MAX) {
        pq_http_error(t, req, PQ_PATH_JOBS, 400, "invalid_request", "request.model: too long");
        goto out;
    }
    if (env.callback_url &&
        pq_callback_check(bc->conf, tenant, env.callback_url, errstr, sizeof(errstr))) {
        pq_http_error(t, req, PQ_PATH_JOBS, 400, "invalid_request", "%s", errstr);
        goto out;
    }
    if (!env.id) {
        pq_id_generate(idbuf);
        if (pq_envelope_set_id(&env, idbuf)) {
            pq_http_error(t, req, PQ_PATH_JOBS, 500, "internal", "cannot set the job id");
            goto out;
        }
    }

    s = pq_intake_slot_get(t, req, PQ_PATH_JOBS, &env, tenant, &pq_intake_ops);
    if (!s)
        goto out;
    s->payload = pq_envelope_dump(&env, &s->payload_len);
    if (env.callback_url && s->payload && !(s->callback_url = strdup(env.callback_url))) {
        free(s->payload);
        s->payload = NULL;
    }
    pq_envelope_clear(&env);
    if (!s->payload) {
        pq_http_error(t, req, PQ_PATH_JOBS, 500, "internal", "cannot serialise the job");
        pq_slot_release(s);
        return;
    }
    pq_intake_start(s, idem, body, len, pq_intake_accepted, pq_intake_accepted);
    return;

out:
    pq_envelope_clear(&env);
}
