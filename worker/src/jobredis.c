/* A job's Redis steps (job_int.h): the begin script (lease, dedup, terminal re-publish), the
 * finish script (compare-and-set terminal write), release, the parked write, the cache, the
 * lease renewal. A job waiting on Redis while it is down sits on w->redis_wait and is
 * re-issued when Redis is back. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "job_int.h"
#include "park.h"
#include "promptq/callback.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/scripts.h"

static void on_cache_get(pq_job_t *j, redisReply *r);
static void on_redis_reply(void *opaque, redisReply *reply);

/* A Redis reply for j arrived: one command fewer in flight. Returns 1 when j is gone (then
 * freed with its last reply): the caller stops there. */
static int redis_replied(pq_job_t *j)
{
    j->nredis--;
    if (j->state != JS_GONE)
        return 0;
    if (j->nredis == 0)
        j->hooks->free(j);
    return 1;
}

void pq_jobredis_aux_reply(void *opaque, redisReply *reply)
{
    (void)reply;
    redis_replied(opaque);
}

/* PUBLISH <reply_to> "<tenant>:<id>" for a synchronous waiter; best effort. */
void pq_jobredis_reply(pq_job_t *j)
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
    if (pq_redis_command(job_redis(j), 3, argv, lens, pq_jobredis_aux_reply, j) == 0)
        j->nredis++;
}

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
void pq_jobredis_issue(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    const pq_conf_t *c = w->conf;
    pq_script_cmd_t cmd;
    char token[512], cbwhy[300], index_key[512];
    const char *resp = NULL; /* j's, borrowed */
    char *err = NULL;
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

        resp = pq_jobrec_response_text(j, &resp_len);
        pq_jobrec_doc(j, &d);
        if (!resp) {
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
    free(err);
}

/* The terminal record a script returned as its second element (the stored result, published
 * verbatim), when there is one: taken into j->result. Returns 1 when taken. */
static int stored_result(pq_job_t *j, const redisReply *r)
{
    if (r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING && r->element[1]->len > 0) {
        j->result = strndup(r->element[1]->str, r->element[1]->len);
        j->result_len = r->element[1]->len;
        return 1;
    }
    return 0;
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
            j->hooks->finish(j, "failed", PQ_ERR_NOT_FOUND, msg);
        } else if (deadline_passed(j, 0)) {
            j->hooks->finish(j, "expired", PQ_ERR_EXPIRED, "deadline passed before the job ran");
        } else if (park_expired(j)) {
            j->hooks->finish(j, "expired", PQ_ERR_EXPIRED, "parked longer than worker.park_ttl_s");
        } else if (j->env.park && j->retry_rs &&
                   pq_park_dropped(j->retry_rs, tenant_of(j), pq_jobdoc_park_since(j->env.park))) {
            j->hooks->finish(j, "cancelled", PQ_ERR_CANCELLED,
                             "dropped by an operator (DELETE /v1/parked/{route})");
        } else {
            if (j->retry_rs)
                j->retry_rs->replayed++;
            pq_jobredis_run(j);
        }
    } else if (strcmp(what, "terminal") == 0) {
        j->hooks->table_remove(j);
        if (stored_result(j, r)) {
            j->status = "republished";
            pq_counter_add(w->m.republished, 1);
            pq_jobredis_reply(j);
            j->hooks->publish(j);
        } else {
            PQ_WARN("job %s/%s is terminal without a stored result; nothing to re-publish",
                    tenant_of(j), id_of(j));
            j->status = "terminal";
            j->hooks->done(j);
        }
    } else if (strcmp(what, "parked") == 0) {
        /* its copy on the retry topic owns it: running this one too would call the provider
         * again and could outlive an operator's drop */
        j->hooks->table_remove(j);
        PQ_INFO("job %s/%s: redelivered from %s but parked: its retry-topic copy owns it",
                tenant_of(j), id_of(j), j->src_topic);
        j->status = "already_parked";
        j->hooks->done(j);
    } else if (strcmp(what, "conflict") == 0) {
        j->hooks->table_remove(j);
        j->err = PQ_ERR_CONFLICT;
        snprintf(j->errmsg, sizeof(j->errmsg), "id already used by another request in this tenant");
        j->status = "id_conflict";
        j->dlq = pq_jobrec_dlq(j, pq_jobrec_error(j), &j->dlq_len);
        pq_counter_add(w->m.conflicts, 1);
        pq_counter_add(w->m.dlq, 1);
        PQ_WARN("job %s/%s: id reused with another request: dlq id_conflict", tenant_of(j),
                id_of(j));
        j->hooks->publish(j);
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
        j->hooks->finish(j, "failed", PQ_ERR_POISON, msg);
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
    j->hooks->table_remove(j);
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
            j->dlq = pq_jobrec_dlq(j, pq_jobrec_error(j), &j->dlq_len);
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
        stored_result(j, r);
        j->status = "republished";
        pq_counter_add(w->m.republished, 1);
    }
    /* the stream's end: the record now holds the answer (or the error) */
    if (json_is_true(json_object_get(j->env.request, "stream")))
        pq_jobstream_xadd(j, "end", "", 0);
    pq_jobredis_reply(j);
    j->hooks->publish(j);
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
    j->hooks->table_remove(j);
    j->status = "parked";
    pq_counter_add(j->env.park && j->retry_rs ? w->m.reparked : w->m.parked, 1);
    if (j->rs) {
        if (j->retry_rs)
            j->rs->reparked++;
        else
            j->rs->parked++;
    }
    j->hooks->done(j);
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
        pq_jobredis_issue(j);
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
            pq_jobredis_issue(j);
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

    /* once each (a job whose connection is still down waits again); j->hooks->done takes a waiting
     * job off redis_wait, so the ones not yet issued stay on it until their turn */
    TAILQ_INIT(&l);
    while ((j = TAILQ_FIRST(&w->redis_wait))) {
        TAILQ_REMOVE(&w->redis_wait, j, wait_link);
        j->in_wait = 0;
        if (pq_redis_up(job_redis(j)))
            pq_jobredis_issue(j);
        else
            TAILQ_INSERT_TAIL(&l, j, wait_link);
    }
    while ((j = TAILQ_FIRST(&l))) {
        TAILQ_REMOVE(&l, j, wait_link);
        TAILQ_INSERT_TAIL(&w->redis_wait, j, wait_link);
        j->in_wait = 1;
    }
}

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
    j->hooks->stop_calls(j);
    pq_counter_add(w->m.handed_back, 1);
    if (!j->part || j->part->revoked) {
        j->handed_back = 1;
        j->status = "lease_lost";
        j->hooks->done(j);
        return;
    }
    j->state = JS_WAIT_LEASE;
    timer_in(j, w->conf->lease_ms);
}

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
        pq_jobredis_renew_send(j, 1);
    } else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 2) {
        PQ_WARN("job %s/%s: lease had expired; taken again", tenant_of(j), id_of(j));
    } else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 0) {
        lease_lost(j);
    }
}

void pq_jobredis_renew_send(pq_job_t *j, int eval)
{
    pq_worker_t *w = j->w;
    pq_script_cmd_t cmd;

    if (pq_script_lease_renew_cmd(&cmd, eval, j->lease_key, w->owner, w->conf->lease_ms) == 0 &&
        pq_redis_command(job_redis(j), cmd.argc, cmd.argv, cmd.lens, on_renew_reply, j) == 0)
        j->nredis++;
}

void pq_jobredis_on_renew_tick(evutil_socket_t fd, short what, void *arg)
{
    pq_job_t *j = arg;

    if (j->lease_held)
        pq_jobredis_renew_send(j, 0);
}

/* Stores a fresh answer under promptq:cache:{tenant}:{request hash}: {"provider","model",
 * "response"}; best effort. */
void pq_jobredis_cache_store(pq_job_t *j)
{
    pq_worker_t *w = j->w;
    char *val, ttl[24];
    const char *argv[6], *resp;
    size_t lens[6], len, resp_len;

    if (!j->cacheable || !j->last_target || !j->cache_key[0])
        return;
    if (!(resp = pq_jobrec_response_text(j, &resp_len)))
        return;
    val = pq_jobdoc_cache_entry(j->last_target->provider, j->last_target->model, resp, resp_len,
                                &len);
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
    if (pq_redis_command(job_redis(j), 5, argv, lens, pq_jobredis_aux_reply, j) == 0) {
        j->nredis++;
        pq_counter_add(w->m.cache_stores, 1);
    }
    free(val);
}

/* The job runs: look in the cache first when it is cacheable, else call providers. */
void pq_jobredis_run(pq_job_t *j)
{
    pq_worker_t *w = j->w;

    char hash[PQ_SHA256_HEX_LEN + 1];

    j->cacheable = job_cacheable(j);
    if (j->cacheable && pq_request_cache_hash(j->env.request, j->env.request_hash, hash) == 0 &&
        pq_key_cache(j->cache_key, sizeof(j->cache_key), w->conf->redis_prefix, tenant_of(j),
                     hash) >= 0) {
        j->state = JS_CACHE;
        j->rstep = RS_CACHE_GET;
        pq_jobredis_issue(j);
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
        pq_jobrec_set_response(j, json_incref(json_object_get(doc, "response")), NULL, 0);
        j->hooks->finish(j, "succeeded", PQ_OK, NULL);
        return;
    }
    pq_counter_add(w->m.cache_misses, 1);
    pq_attempt_run(j);
}
