/* The worker's top: construction and teardown, the loop and its queue events, stats, signals
 * (SIGHUP reload into a new generation, graceful stop). The modules below it, from the top:
 *   consumer.c   partitions, offsets storing (G5), backlogs and flow control, rebalances;
 *   job.c        the job state machine (jobredis.c: Redis steps and leases; attempt.c: provider
 *                calls, retries, failover; jobstream.c: streaming relay; jobrec.c: records);
 *   gen.c        generations, routes and retry topics;  health.c  health key, metrics endpoint;
 *   park.c       parking and replay per route (G4);
 *   parts.c, produce.c, jobdoc.c  shared bookkeeping, producing, pure job documents.
 * A lower module reaches a higher one only through a callback set at setup (w->job_gone,
 * j->hooks, the providers' circuit listener). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/random.h>
#include "promptq/kafka.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"
#include <event2/buffer.h>
#include <event2/http.h>
#include "consumer.h"
#include "gen.h"
#include "health.h"
#include "produce.h"
#include "park.h"
#include "parts.h"
#include "worker.h"
#include "worker_int.h"

#define SAFETY_MS         100
#define STATS_MS          10000
#define FINAL_WAIT_MS     1500
#define CLUSTERID_WAIT_MS 60000

/* ---- Kafka callbacks ---- */

static void on_kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    pq_worker_t *w = rd_kafka_opaque(rk);

    /* librdkafka 2.0.2 reports an offset reset caused by an error (a committed offset that fell
     * out of range) only as a LOG_WARNING with facility "OFFSET": "... offset reset (at offset
     * N ...) to BEGINNING ...: fetch failed due to requested offset not available ..." */
    if (level <= LOG_WARNING && strcmp(fac, "OFFSET") == 0 && strstr(buf, "offset reset")) {
        if (w)
            pq_counter_add(w->m.offset_resets, 1);
        PQ_ERR("kafka offset reset, messages were lost upstream (a committed offset fell out of "
               "range): %s",
               buf);
        return;
    }
    pq_kafka_log(rk, level, fac, buf);
}

static void on_kafka_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char why[512];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, why, sizeof(why));
        PQ_ERR("kafka fatal error (%s): %s: %s", rd_kafka_name(rk), rd_kafka_err2name(ferr), why);
        return;
    }
    PQ_WARN("kafka (%s): %s: %s", rd_kafka_name(rk), rd_kafka_err2name(err), reason);
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    pq_job_delivered(opaque, m);
}

static void drain_producer(pq_worker_t *w)
{
    for (int i = 0; i < 64 && rd_kafka_poll(w->producer, 0) > 0; i++)
        ;
}

static void on_lanes(evutil_socket_t fd, short what, void *arg)
{
    pq_job_lanes_release(arg);
}

static void on_pqueue(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_drain_pipe(fd);
    drain_producer(arg);
}

static void on_safety(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    pq_consumer_drain(w, 1);
    pq_consumer_drain(w, 0);
    drain_producer(w);
}

static void on_stats(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    pq_worker_metrics_t *m = &w->m;
    size_t down = 0, held = 0;

    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        down += rs->down && rs->active;
        held += (size_t)rs->nheld;
    }
    if (down > 0 || held > 0 || pq_counter_get(m->parked) > 0)
        PQ_INFO("parking: routes_down=%zu held_partitions=%zu open_circuits=%zu parked=%" PRIu64
                " reparked=%" PRIu64 " replay_inflight=%zu",
                down, held, pq_provs_open_circuits(w->gen->provs), pq_counter_get(m->parked),
                pq_counter_get(m->reparked), w->retry_inflight);

    pq_gauge_set(m->inflight, (double)w->inflight);
    PQ_INFO("inflight=%zu backlog=%zu paused=%d received=%" PRIu64 " succeeded=%" PRIu64
            " failed=%" PRIu64 " expired=%" PRIu64 " dlq=%" PRIu64 " republished=%" PRIu64
            " calls=%" PRIu64 " provider_errors=%" PRIu64
            " http_active=%zu redis_pending=%zu offset_resets=%" PRIu64,
            w->inflight, w->backlog[0].count + w->backlog[1].count, w->paused,
            pq_counter_get(m->received), pq_counter_get(m->succeeded), pq_counter_get(m->failed),
            pq_counter_get(m->expired), pq_counter_get(m->dlq), pq_counter_get(m->republished),
            pq_counter_get(m->provider_calls), pq_counter_get(m->provider_errors),
            pq_http_active(w->http) + pq_http_active(w->ihttp), pq_redis_pending(w->redis),
            pq_counter_get(m->offset_resets));
}

/* ---- Redis state ---- */

static void on_redis_state(void *opaque, int up)
{
    pq_worker_t *w = opaque;

    if (up) {
        pq_job_redis_up(w);
        if (w->ev_drain && w->ev_idrain) { /* the backlogs' jobs may start */
            event_active(w->ev_idrain, 0, 0);
            event_active(w->ev_drain, 0, 0);
        }
    }
    pq_consumer_update_flow(w);
}

/* ---- generations (SIGHUP) ---- */

/* Subscribes to <prefix>requests, <prefix>bulk and every active route's retry topic. */
static rd_kafka_resp_err_t subscribe_all(pq_worker_t *w)
{
    rd_kafka_topic_partition_list_t *subs = rd_kafka_topic_partition_list_new(8);
    rd_kafka_resp_err_t err;

    rd_kafka_topic_partition_list_add(subs, w->topics[PQ_T_REQUESTS], RD_KAFKA_PARTITION_UA);
    rd_kafka_topic_partition_list_add(subs, w->topics[PQ_T_BULK], RD_KAFKA_PARTITION_UA);
    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next)
        if (rs->active)
            rd_kafka_topic_partition_list_add(subs, rs->topic, RD_KAFKA_PARTITION_UA);
    err = rd_kafka_subscribe(w->consumer, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    return err;
}

/* SIGHUP: providers and routes from the file again (circuits start closed); new routes' retry
 * topics are created before the new subscription. Jobs in flight finish with the config they
 * started with. Everything else (kafka, redis, worker) takes effect on restart only. */
static void on_sighup(evutil_socket_t sig, short what, void *arg)
{
    pq_worker_t *w = arg;
    char errstr[512];
    pq_conf_t *nc;
    pq_gen_t *g, *old = w->gen;
    rd_kafka_resp_err_t err;

    if (!w->conf->path) {
        PQ_WARN("SIGHUP ignored: no config path to reload from");
        return;
    }
    nc = pq_conf_load(w->conf->path, errstr, sizeof(errstr));
    if (!nc) {
        PQ_ERR("SIGHUP: config not reloaded, keeping the old one: %s", errstr);
        return;
    }
    g = pq_gen_new(w, nc, 1, errstr, sizeof(errstr));
    if (!g) {
        PQ_ERR("SIGHUP: config not reloaded: %s", errstr);
        pq_conf_destroy(nc);
        return;
    }
    pq_provs_set_listener(old->provs, NULL, NULL);
    w->gen = g;
    old->next = w->retired;
    w->retired = old;
    pq_gen_unref(w, old);
    pq_gen_routes_refresh(w);
    pq_gen_retry_topics_create(w);
    err = subscribe_all(w);
    if (err)
        PQ_ERR("SIGHUP: subscribe: %s", rd_kafka_err2str(err));
    PQ_INFO("SIGHUP: %zu providers, %zu routes loaded (kafka, redis and worker settings take "
            "effect on restart)",
            nc->nproviders, nc->nroutes);
}

/* ---- stopping ---- */

static void on_final(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;

    if ((pq_redis_pending(w->redis) == 0 && pq_redis_pending(w->iredis) == 0) ||
        pq_mono_ms() >= w->final_deadline_ms)
        event_base_loopbreak(w->base);
}

static void on_grace(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    struct timeval tv = {0, 50 * 1000};

    PQ_WARN("grace period over: handing back %zu jobs (leases released, offsets not stored)",
            w->inflight);
    pq_consumer_flush_offsets(w);
    w->no_store = 1;
    pq_job_hand_back_all(w);
    w->final_deadline_ms = pq_mono_ms() + FINAL_WAIT_MS;
    event_add(w->ev_final, &tv);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    pq_worker_t *w = arg;
    struct timeval tv;

    if (w->stopping) {
        PQ_INFO("signal %d again: handing back now", (int)sig);
        if (!w->no_store)
            on_grace(-1, 0, w);
        return;
    }
    PQ_INFO("signal %d: stopping, %zu jobs in flight", (int)sig, w->inflight);
    w->stopping = 1;
    for (int lane = 0; lane < 2; lane++) /* never taken in: the next owner reads them */
        pq_counter_add(w->m.handed_back, pq_backlog_purge(&w->backlog[lane], NULL));
    pq_callbacks_stop(w->callbacks);
    pq_consumer_update_flow(w);
    if (w->inflight == 0) {
        event_base_loopbreak(w->base);
        return;
    }
    tv.tv_sec = w->grace_ms / 1000;
    tv.tv_usec = (w->grace_ms % 1000) * 1000;
    evtimer_add(w->ev_grace, &tv);
}

/* ---- construction ---- */

static int make_pipe(int fds[2])
{
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
        fds[0] = fds[1] = -1;
        return -1;
    }
    return 0;
}

static void metrics_init(pq_worker_t *w)
{
    pq_metrics_t *mm = w->metrics;
    pq_worker_metrics_t *m = &w->m;
    const char *jobs = "promptq_worker_jobs_total";
    const char *jobs_help = "jobs taken in and their outcomes";

#define OUTCOME(x) "outcome=\"" x "\""
    m->received = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("received"));
    m->succeeded = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("succeeded"));
    m->failed = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("failed"));
    m->expired = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("expired"));
    m->invalid = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("invalid"));
    m->republished = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("republished"));
    m->conflicts = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("id_conflict"));
    m->poison = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("poison"));
    m->handed_back = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("handed_back"));
    m->duplicates = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("duplicate_fetch"));
    m->parked = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("parked"));
    m->reparked = pq_metrics_counter(mm, jobs, jobs_help, OUTCOME("reparked"));
#undef OUTCOME
    m->dlq = pq_metrics_counter(mm, "promptq_worker_dlq_total", "messages put on the dlq", NULL);
    m->provider_calls =
        pq_metrics_counter(mm, "promptq_worker_provider_calls_total", "provider HTTP calls", NULL);
    m->provider_errors = pq_metrics_counter(mm, "promptq_worker_provider_errors_total",
                                            "provider calls that failed", NULL);
    m->retries =
        pq_metrics_counter(mm, "promptq_worker_retries_total", "retryable provider failures", NULL);
    m->offset_resets = pq_metrics_counter(mm, "promptq_worker_offset_resets_total",
                                          "consumer offset resets after an out-of-range offset "
                                          "(data lost upstream)",
                                          NULL);
    m->redis_waits = pq_metrics_counter(mm, "promptq_worker_redis_waits_total",
                                        "job steps that waited for Redis", NULL);
    m->produce_errors = pq_metrics_counter(mm, "promptq_worker_produce_errors_total",
                                           "result/dlq produce or delivery failures", NULL);
    m->skips = pq_metrics_counter(mm, "promptq_worker_target_skips_total",
                                  "targets skipped (open circuit, request not expressible)", NULL);
    m->cache_hits = pq_metrics_counter(mm, "promptq_worker_cache_total", "response cache lookups",
                                       "outcome=\"hit\"");
    m->cache_misses = pq_metrics_counter(mm, "promptq_worker_cache_total", "response cache lookups",
                                         "outcome=\"miss\"");
    m->cache_stores = pq_metrics_counter(mm, "promptq_worker_cache_total", "response cache lookups",
                                         "outcome=\"stored\"");
    m->inflight = pq_metrics_gauge(mm, "promptq_worker_inflight", "jobs in flight", NULL);
    m->latency = pq_metrics_histogram(mm, "promptq_worker_job_seconds",
                                      "job latency from produce to terminal write", NULL,
                                      pq_metrics_latency_bounds, pq_metrics_latency_nbounds);
}

static rd_kafka_t *consumer_new(pq_worker_t *w, char *errstr, size_t errstr_size)
{
    rd_kafka_conf_t *kc = pq_kafka_conf_new(w->conf, PQ_KAFKA_CONSUMER, errstr, errstr_size);
    pq_kafka_cbs_t cbs = {.opaque = w,
                          .error = on_kafka_error,
                          .log = on_kafka_log,
                          .rebalance = pq_consumer_on_rebalance};

    if (!kc)
        return NULL;
    /* Bound librdkafka's prefetch (default 100000 messages / 64 MB per partition) near
     * max_inflight, unless the kafka section sets it: in-flight stays near the cap and a pause
     * drops little. */
    if (!pq_conf_kafka_get(w->conf, "queued.min.messages")) {
        char v[24];
        snprintf(v, sizeof(v), "%zu", w->max_inflight < 100 ? (size_t)100 : w->max_inflight);
        rd_kafka_conf_set(kc, "queued.min.messages", v, NULL, 0);
    }
    if (!pq_conf_kafka_get(w->conf, "queued.max.messages.kbytes"))
        rd_kafka_conf_set(kc, "queued.max.messages.kbytes", "16384", NULL, 0);
    return pq_kafka_client_new(RD_KAFKA_CONSUMER, kc, &cbs, errstr, errstr_size);
}

static rd_kafka_t *producer_new(pq_worker_t *w, char *errstr, size_t errstr_size)
{
    pq_kafka_cbs_t cbs = {
        .opaque = w, .dr_msg = on_delivery, .error = on_kafka_error, .log = on_kafka_log};

    return pq_kafka_client_new(RD_KAFKA_PRODUCER,
                               pq_kafka_conf_new(w->conf, PQ_KAFKA_PRODUCER, errstr, errstr_size),
                               &cbs, errstr, errstr_size);
}

pq_worker_t *pq_worker_new(const pq_conf_t *conf, char *errstr, size_t errstr_size)
{
    pq_worker_t *w = calloc(1, sizeof(*w));
    unsigned char nonce[8];
    rd_kafka_resp_err_t err;
    long max_conns = 0;
    size_t tsize = 1024;
    int64_t waited = 0;

    if (!w) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    w->conf = conf;
    w->cpipe[0] = w->cpipe[1] = w->ppipe[0] = w->ppipe[1] = -1;
    w->ipipe[0] = w->ipipe[1] = -1;
    TAILQ_INIT(&w->parts);
    TAILQ_INIT(&w->jobs);
    TAILQ_INIT(&w->redis_wait);
    TAILQ_INIT(&w->lane_wait);
    pq_conf_topic(conf, "requests", w->topics[PQ_T_REQUESTS], sizeof(w->topics[0]));
    pq_conf_topic(conf, "bulk", w->topics[PQ_T_BULK], sizeof(w->topics[0]));
    pq_conf_topic(conf, "results", w->topics[PQ_T_RESULTS], sizeof(w->topics[0]));
    pq_conf_topic(conf, "dlq", w->topics[PQ_T_DLQ], sizeof(w->topics[0]));
    w->max_inflight = conf->max_inflight > 0 ? (size_t)conf->max_inflight : 4096;
#if defined(__SANITIZE_ADDRESS__)
    w->job_pool_max = 0; /* every job's memory back to malloc: ASan sees any use after free */
#else
    w->job_pool_max = w->max_inflight;
#endif
    pq_consumer_init(w);
    w->ttl_ms = conf->result_ttl_s * 1000;
    w->limits = pq_envelope_limits_default;
    snprintf(w->reply_prefix, sizeof(w->reply_prefix), "%sreply:", conf->redis_prefix);
    w->limits.reply_prefix = w->reply_prefix;
    if (conf->max_prompt_bytes > 0)
        w->limits.max_prompt_bytes = (size_t)conf->max_prompt_bytes;
    if (conf->max_body_bytes > 0 && (size_t)conf->max_body_bytes > w->limits.max_bytes)
        w->limits.max_bytes = (size_t)conf->max_body_bytes;
    {
        /* A result (or dlq record) over the producer's message.max.bytes can never be produced:
         * cap provider answers so their result record fits, with room for the record's own
         * fields (attempt log, metadata, source). */
        const char *mmb = pq_conf_kafka_get(conf, "message.max.bytes");
        long long max = mmb && atoll(mmb) > 0 ? atoll(mmb) : 1000000;
        if (max < 2 * MSG_KEY_HEADROOM)
            max = 2 * MSG_KEY_HEADROOM;
        w->max_msg = (size_t)max - MSG_KEY_HEADROOM;
        w->max_response = (size_t)conf->max_response_bytes;
        if (w->max_response + RESULT_HEADROOM > w->max_msg) {
            w->max_response =
                w->max_msg > 2 * RESULT_HEADROOM ? w->max_msg - RESULT_HEADROOM : w->max_msg / 2;
            PQ_INFO("worker.max_response_bytes %lld capped at %zu: results must fit Kafka's "
                    "message.max.bytes %lld",
                    (long long)conf->max_response_bytes, w->max_response, max);
        }
    }

    if (getrandom(nonce, sizeof(nonce), 0) != (ssize_t)sizeof(nonce)) {
        snprintf(errstr, errstr_size, "getrandom: %s", strerror(errno));
        goto out_fail;
    }
    srandom((unsigned)(nonce[0] | nonce[1] << 8 | nonce[2] << 16) ^ (unsigned)getpid());
    if (conf->instance_id) {
        pq_strlcpy(w->instance, conf->instance_id, sizeof(w->instance));
    } else {
        char host[100] = "worker";
        gethostname(host, sizeof(host) - 1);
        host[sizeof(host) - 1] = '\0';
        snprintf(w->instance, sizeof(w->instance), "%s-%d", host, (int)getpid());
    }
    if (pq_key_health(w->health_key, sizeof(w->health_key), conf->redis_prefix, w->instance) < 0) {
        snprintf(errstr, errstr_size, "instance id too long for the health key");
        goto out_fail;
    }
    snprintf(w->owner, sizeof(w->owner), "%.150s-%02x%02x%02x%02x%02x%02x%02x%02x",
             conf->instance_id ? conf->instance_id : "worker", nonce[0], nonce[1], nonce[2],
             nonce[3], nonce[4], nonce[5], nonce[6], nonce[7]);
    while (tsize < w->max_inflight * 2)
        tsize *= 2;
    w->table = calloc(tsize, sizeof(*w->table));
    w->table_mask = tsize - 1;
    w->metrics = pq_metrics_new();
    {
        /* two priorities: 0 the interactive lane's events, 1 (the default) everything else;
         * after 16 callbacks of priority 1 the loop looks for new events again */
        struct event_config *cfg = event_config_new();
        if (cfg)
            event_config_set_max_dispatch_interval(cfg, NULL, 16, 1);
        w->base = cfg ? event_base_new_with_config(cfg) : NULL;
        if (cfg)
            event_config_free(cfg);
        if (w->base && event_base_priority_init(w->base, 2) != 0) {
            event_base_free(w->base);
            w->base = NULL;
        }
    }
    if (!w->table || !w->metrics || !w->base) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out_fail;
    }
    metrics_init(w);

    for (size_t i = 0; i < conf->nproviders; i++) {
        if (conf->providers[i].max_concurrency <= 0) {
            max_conns = 0;
            break;
        }
        if (conf->providers[i].max_concurrency > max_conns)
            max_conns = conf->providers[i].max_concurrency;
    }
    w->http = pq_http_new(w->base, max_conns, errstr, errstr_size);
    if (!w->http)
        goto out_fail;
    w->ihttp = pq_http_new(w->base, max_conns, errstr, errstr_size);
    if (!w->ihttp)
        goto out_fail;
    pq_http_set_priority(w->ihttp, 0);
    for (size_t i = 0; i < conf->nproviders; i++) {
        const pq_provider_conf_t *p = &conf->providers[i];

        if (p->ca_file && (pq_http_trust(w->http, p->base_url, p->ca_file) ||
                           pq_http_trust(w->ihttp, p->base_url, p->ca_file))) {
            snprintf(errstr, errstr_size, "out of memory");
            goto out_fail;
        }
    }
    w->gen = pq_gen_new(w, (pq_conf_t *)conf, 0, errstr, errstr_size);
    if (!w->gen)
        goto out_fail;
    pq_gen_routes_refresh(w);
    w->redis = pq_redis_new(w->base, conf->redis_host, conf->redis_port, conf->redis_password,
                            conf->redis_db, 5000, on_redis_state, w, errstr, errstr_size);
    if (!w->redis)
        goto out_fail;
    w->iredis = pq_redis_new(w->base, conf->redis_host, conf->redis_port, conf->redis_password,
                             conf->redis_db, 5000, on_redis_state, w, errstr, errstr_size);
    if (!w->iredis)
        goto out_fail;
    pq_redis_set_priority(w->iredis, 0);
    if (pq_key_callbacks(w->callbacks_key, sizeof(w->callbacks_key), conf->redis_prefix) < 0) {
        snprintf(errstr, errstr_size, "redis.prefix: too long");
        goto out_fail;
    }
    w->callbacks = pq_callbacks_new(w->base, conf, w->metrics, errstr, errstr_size);
    if (!w->callbacks)
        goto out_fail;

    w->producer = producer_new(w, errstr, errstr_size);
    if (!w->producer)
        goto out_fail;
    w->t_results = rd_kafka_topic_new(w->producer, w->topics[PQ_T_RESULTS], NULL);
    w->t_dlq = rd_kafka_topic_new(w->producer, w->topics[PQ_T_DLQ], NULL);
    w->pqueue = rd_kafka_queue_get_main(w->producer);
    if (!w->t_results || !w->t_dlq || make_pipe(w->ppipe) != 0) {
        snprintf(errstr, errstr_size, "producer setup failed");
        goto out_fail;
    }
    rd_kafka_queue_io_event_enable(w->pqueue, w->ppipe[1], "1", 1);

    /* The cluster id is part of derived job ids: it must be known before the first message. */
    while (!(w->cluster_id = rd_kafka_clusterid(w->producer, 1000))) {
        waited += 1000;
        if (waited >= CLUSTERID_WAIT_MS) {
            snprintf(errstr, errstr_size, "kafka %s: no cluster id after %d s",
                     conf->bootstrap ? conf->bootstrap : "?", CLUSTERID_WAIT_MS / 1000);
            goto out_fail;
        }
        if (waited % 10000 == 0)
            PQ_WARN("waiting for kafka %s", conf->bootstrap ? conf->bootstrap : "?");
    }

    w->consumer = consumer_new(w, errstr, errstr_size);
    if (!w->consumer)
        goto out_fail;
    rd_kafka_poll_set_consumer(w->consumer);
    w->cqueue = rd_kafka_queue_get_consumer(w->consumer);
    if (!w->cqueue || make_pipe(w->cpipe) != 0) {
        snprintf(errstr, errstr_size, "consumer queue setup failed");
        goto out_fail;
    }
    rd_kafka_queue_io_event_enable(w->cqueue, w->cpipe[1], "1", 1);
    w->iqueue = rd_kafka_queue_new(w->consumer);
    if (!w->iqueue || make_pipe(w->ipipe) != 0) {
        snprintf(errstr, errstr_size, "interactive queue setup failed");
        goto out_fail;
    }
    rd_kafka_queue_io_event_enable(w->iqueue, w->ipipe[1], "1", 1);
    pq_gen_retry_topics_create(w);
    err = subscribe_all(w);
    if (err) {
        snprintf(errstr, errstr_size, "subscribe: %s", rd_kafka_err2str(err));
        goto out_fail;
    }

    w->ev_cqueue = event_new(w->base, w->cpipe[0], EV_READ | EV_PERSIST, pq_consumer_on_cqueue, w);
    w->ev_iqueue = event_new(w->base, w->ipipe[0], EV_READ | EV_PERSIST, pq_consumer_on_iqueue, w);
    w->ev_idrain = event_new(w->base, -1, 0, pq_consumer_on_idrain, w);
    w->ev_lanes = event_new(w->base, -1, 0, on_lanes, w);
    if (w->ev_iqueue)
        event_priority_set(w->ev_iqueue, 0);
    if (w->ev_idrain)
        event_priority_set(w->ev_idrain, 0);
    w->ev_pqueue = event_new(w->base, w->ppipe[0], EV_READ | EV_PERSIST, on_pqueue, w);
    w->ev_drain = event_new(w->base, -1, 0, pq_consumer_on_drain, w);
    w->ev_flush = event_new(w->base, -1, 0, pq_consumer_on_flush, w);
    w->ev_safety = event_new(w->base, -1, EV_PERSIST, on_safety, w);
    w->ev_stats = event_new(w->base, -1, EV_PERSIST, on_stats, w);
    w->ev_sigterm = evsignal_new(w->base, SIGTERM, on_signal, w);
    w->ev_sigint = evsignal_new(w->base, SIGINT, on_signal, w);
    w->ev_grace = evtimer_new(w->base, on_grace, w);
    w->ev_final = event_new(w->base, -1, EV_PERSIST, on_final, w);
    w->ev_routes = event_new(w->base, -1, EV_PERSIST, pq_park_on_routes, w);
    w->ev_replay = evtimer_new(w->base, pq_park_on_replay, w);
    w->ev_health = event_new(w->base, -1, EV_PERSIST, pq_health_on_tick, w);
    w->ev_sighup = evsignal_new(w->base, SIGHUP, on_sighup, w);
    if (!w->ev_cqueue || !w->ev_iqueue || !w->ev_idrain || !w->ev_lanes || !w->ev_pqueue ||
        !w->ev_drain || !w->ev_flush || !w->ev_safety || !w->ev_stats || !w->ev_sigterm ||
        !w->ev_sigint || !w->ev_grace || !w->ev_final || !w->ev_routes || !w->ev_replay ||
        !w->ev_health || !w->ev_sighup) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out_fail;
    }
    if (conf->metrics_listen && conf->metrics_listen[0] &&
        pq_health_metrics_listen(w, conf->metrics_listen, errstr, errstr_size) != 0) {
        /* the default port is one per machine: another worker here has it */
        if (strcmp(conf->metrics_listen, PQ_WORKER_METRICS_DEFAULT) != 0)
            goto out_fail;
        PQ_WARN("%s: no metrics for this worker (set worker.metrics_listen)", errstr);
        errstr[0] = '\0';
    }
    PQ_INFO("worker %s: group %s, topics %s %s, max_inflight %zu, cluster %s", w->owner,
            conf->group_id, w->topics[PQ_T_REQUESTS], w->topics[PQ_T_BULK], w->max_inflight,
            w->cluster_id);
    return w;

out_fail:
    pq_worker_destroy(w);
    return NULL;
}

int pq_worker_run(pq_worker_t *w, int grace_ms)
{
    struct timeval safety = {0, SAFETY_MS * 1000};
    struct timeval stats = {STATS_MS / 1000, 0};
    struct timeval routes = {PQ_PARK_TICK_MS / 1000, (PQ_PARK_TICK_MS % 1000) * 1000};
    struct timeval health = {PQ_HEALTH_MS / 1000, 0};
    rd_kafka_resp_err_t err;

    w->grace_ms = grace_ms;
    event_add(w->ev_routes, &routes);
    event_add(w->ev_health, &health);
    event_active(w->ev_health, EV_TIMEOUT, 0);
    event_add(w->ev_sighup, NULL);
    event_add(w->ev_cqueue, NULL);
    event_add(w->ev_iqueue, NULL);
    event_add(w->ev_pqueue, NULL);
    event_add(w->ev_safety, &safety);
    event_add(w->ev_stats, &stats);
    event_add(w->ev_sigterm, NULL);
    event_add(w->ev_sigint, NULL);
    pq_consumer_update_flow(w);
    event_active(w->ev_drain, 0, 0);
    event_active(w->ev_idrain, 0, 0);

    event_base_dispatch(w->base);

    for (int lane = 0; lane < 2; lane++) /* before the close: messages hold partition refs */
        pq_backlog_purge(&w->backlog[lane], NULL);
    pq_consumer_flush_offsets(w);
    err = rd_kafka_commit(w->consumer, NULL, 0);
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
        PQ_WARN("final commit: %s", rd_kafka_err2str(err));
    err = rd_kafka_consumer_close(w->consumer);
    if (err)
        PQ_WARN("consumer close: %s", rd_kafka_err2str(err));
    if (rd_kafka_flush(w->producer, 5000) != RD_KAFKA_RESP_ERR_NO_ERROR)
        PQ_WARN("%d results not confirmed at exit (they are re-published on redelivery)",
                rd_kafka_outq_len(w->producer));
    on_stats(-1, 0, w);
    PQ_INFO("stopped");
    return 0;
}

void pq_worker_destroy(pq_worker_t *w)
{
    pq_part_t *p;
    struct event **evs[] = {
        &w->ev_cqueue, &w->ev_iqueue, &w->ev_idrain, &w->ev_lanes,   &w->ev_pqueue, &w->ev_drain,
        &w->ev_flush,  &w->ev_safety, &w->ev_stats,  &w->ev_sigterm, &w->ev_sigint, &w->ev_grace,
        &w->ev_final,  &w->ev_routes, &w->ev_replay, &w->ev_health,  &w->ev_sighup};
    pq_gen_t *g;

    if (!w)
        return;
    if (w->mhttp)
        evhttp_free(w->mhttp);
    pq_job_free_all(w);
    for (int lane = 0; lane < 2; lane++) {
        pq_backlog_purge(&w->backlog[lane], NULL);
        free(w->backlog[lane].m);
    }
    while ((p = TAILQ_FIRST(&w->parts))) {
        TAILQ_REMOVE(&w->parts, p, link);
        pq_part_unref(p);
    }
    if (w->cqueue)
        rd_kafka_queue_destroy(w->cqueue);
    if (w->iqueue)
        rd_kafka_queue_destroy(w->iqueue);
    if (w->consumer)
        rd_kafka_destroy(w->consumer);
    if (w->pqueue)
        rd_kafka_queue_destroy(w->pqueue);
    if (w->t_results)
        rd_kafka_topic_destroy(w->t_results);
    if (w->t_dlq)
        rd_kafka_topic_destroy(w->t_dlq);
    if (w->producer)
        rd_kafka_destroy(w->producer);
    free(w->cluster_id);
    pq_redis_destroy(w->redis);
    pq_redis_destroy(w->iredis);
    pq_callbacks_destroy(w->callbacks);
    while ((g = w->retired)) {
        w->retired = g->next;
        pq_gen_free(g);
    }
    if (w->gen)
        pq_gen_free(w->gen);
    pq_park_free_all(w);
    pq_http_destroy(w->http);
    pq_http_destroy(w->ihttp);
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
        if (*evs[i])
            event_free(*evs[i]);
    for (int i = 0; i < 2; i++) {
        if (w->cpipe[i] >= 0)
            close(w->cpipe[i]);
        if (w->ipipe[i] >= 0)
            close(w->ipipe[i]);
        if (w->ppipe[i] >= 0)
            close(w->ppipe[i]);
    }
    if (w->base)
        event_base_free(w->base);
    pq_metrics_destroy(w->metrics);
    free(w->table);
    free(w);
}
