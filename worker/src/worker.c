/* The worker's loop: Kafka consumer and producer queues (io-event pipes), partition bookkeeping
 * and offset storing (G5), flow control (pause when full or when Redis is down), signals and the
 * graceful stop. The per-job state machine lives in job.c. */
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
#include "promptq/log.h"
#include "promptq/util.h"
#include "worker_int.h"

#define DRAIN_BUDGET      512
#define SAFETY_MS         100
#define STATS_MS          10000
#define FINAL_WAIT_MS     1500
#define CLUSTERID_WAIT_MS 60000

/* ---- partitions ---- */

static int topic_index(const pq_worker_t *w, const char *name)
{
    if (strcmp(name, w->topics[PQ_T_REQUESTS]) == 0)
        return PQ_T_REQUESTS;
    if (strcmp(name, w->topics[PQ_T_BULK]) == 0)
        return PQ_T_BULK;
    return -1;
}

static pq_part_t *part_find(pq_worker_t *w, int topic, int32_t partition)
{
    pq_part_t *p;
    TAILQ_FOREACH(p, &w->parts, link)
    if (p->topic == topic && p->partition == partition)
        return p;
    return NULL;
}

void pq_part_unref(pq_part_t *part)
{
    if (!part || --part->refcnt > 0)
        return;
    pq_offsets_clear(&part->offsets);
    free(part);
}

static void part_assign(pq_worker_t *w, const char *topic_name, int32_t partition)
{
    int topic = topic_index(w, topic_name);
    pq_part_t *p;

    if (topic < 0 || part_find(w, topic, partition))
        return;
    p = calloc(1, sizeof(*p));
    if (!p) {
        PQ_ERR("out of memory assigning %s/%" PRId32, topic_name, partition);
        return;
    }
    p->topic = topic;
    p->partition = partition;
    p->refcnt = 1;
    p->next_taken = -1;
    pq_offsets_init(&p->offsets);
    TAILQ_INSERT_TAIL(&w->parts, p, link);
}

static void part_revoke(pq_worker_t *w, pq_part_t *p)
{
    TAILQ_REMOVE(&w->parts, p, link);
    p->revoked = 1;
    if (pq_offsets_count(&p->offsets) > 0)
        PQ_INFO("%s/%" PRId32 " revoked with %zu jobs in flight: they finish under their lease, "
                "the new owner redelivers them",
                w->topics[p->topic], p->partition, pq_offsets_count(&p->offsets));
    pq_part_unref(p);
}

/* Stores the offsets that advanced (offset + 1 semantics: the next one to read). */
static void flush_offsets(pq_worker_t *w)
{
    rd_kafka_topic_partition_list_t *list = NULL;
    rd_kafka_resp_err_t err;
    pq_part_t *p;

    if (w->no_store)
        return;
    TAILQ_FOREACH(p, &w->parts, link)
    {
        if (!p->dirty || p->revoked || p->offsets.next < 0)
            continue;
        p->dirty = 0;
        if (!list)
            list = rd_kafka_topic_partition_list_new(8);
        rd_kafka_topic_partition_list_add(list, w->topics[p->topic], p->partition)->offset =
            p->offsets.next;
    }
    if (!list)
        return;
    err = rd_kafka_offsets_store(w->consumer, list);
    if (err)
        PQ_WARN("offsets_store: %s", rd_kafka_err2str(err));
    for (int i = 0; i < list->cnt; i++)
        if (list->elems[i].err)
            PQ_DBG("offsets_store %s/%" PRId32 ": %s", list->elems[i].topic,
                   list->elems[i].partition, rd_kafka_err2str(list->elems[i].err));
    rd_kafka_topic_partition_list_destroy(list);
}

static void on_flush(evutil_socket_t fd, short what, void *arg)
{
    flush_offsets(arg);
}

void pq_worker_offset_done(pq_worker_t *w, pq_part_t *part, uint64_t seq)
{
    if (!part)
        return;
    if (pq_offsets_done(&part->offsets, seq) && !part->revoked && !w->no_store) {
        part->dirty = 1;
        event_active(w->ev_flush, 0, 0);
    }
}

/* ---- flow control ---- */

static void set_paused(pq_worker_t *w, int pause, const char *why)
{
    rd_kafka_topic_partition_list_t *a = NULL;

    if (rd_kafka_assignment(w->consumer, &a) == RD_KAFKA_RESP_ERR_NO_ERROR && a) {
        if (a->cnt > 0) {
            if (pause)
                rd_kafka_pause_partitions(w->consumer, a);
            else
                rd_kafka_resume_partitions(w->consumer, a);
        }
        rd_kafka_topic_partition_list_destroy(a);
    }
    w->paused = pause;
    if (pause)
        PQ_INFO("consumption paused: %s (%zu jobs in flight)", why, w->inflight);
    else
        PQ_INFO("consumption resumed (%zu jobs in flight)", w->inflight);
    if (!pause)
        event_active(w->ev_drain, 0, 0); /* the io event fires only once per non-empty queue */
}

static void update_flow(pq_worker_t *w)
{
    int redis_up = pq_redis_up(w->redis);

    if (!w->paused) {
        if (w->stopping)
            set_paused(w, 1, "stopping");
        else if (!redis_up)
            set_paused(w, 1, "redis unavailable");
        else if (w->inflight >= w->max_inflight)
            set_paused(w, 1, "max_inflight reached");
    } else if (!w->stopping && redis_up && w->inflight <= w->low_water) {
        set_paused(w, 0, NULL);
    }
}

void pq_worker_job_gone(pq_worker_t *w, pq_part_t *part)
{
    w->inflight--;
    pq_part_unref(part);
    if (w->stopping && w->inflight == 0) {
        PQ_INFO("every job in flight finished");
        event_base_loopbreak(w->base);
        return;
    }
    update_flow(w);
}

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
    /* The one "kafka" section feeds both clients: consumer-only keys on the producer (and the
     * other way round) are expected, not worth a warning. */
    if (strcmp(fac, "CONFWARN") == 0 && strstr(buf, "will be ignored by this"))
        level = LOG_DEBUG;
    if (level <= LOG_ERR)
        PQ_ERR("kafka %s: %s", fac, buf);
    else if (level == LOG_WARNING)
        PQ_WARN("kafka %s: %s", fac, buf);
    else if (level <= LOG_INFO)
        PQ_INFO("kafka %s: %s", fac, buf);
    else
        PQ_DBG("kafka %s: %s", fac, buf);
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

static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    pq_worker_t *w = opaque;
    int coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    rd_kafka_error_t *e = NULL;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        for (int i = 0; i < parts->cnt; i++)
            part_assign(w, parts->elems[i].topic, parts->elems[i].partition);
        if (coop)
            e = rd_kafka_incremental_assign(rk, parts);
        else
            rd_kafka_assign(rk, parts);
        /* librdkafka keeps a partition's pause flag across unassign/assign: a partition paused
         * while we owned it before would otherwise stay silent now. */
        if (parts->cnt > 0) {
            if (w->paused)
                rd_kafka_pause_partitions(rk, parts);
            else
                rd_kafka_resume_partitions(rk, parts);
        }
        PQ_INFO("assigned %d partitions", parts->cnt);
    } else {
        if (err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
            PQ_ERR("rebalance error: %s", rd_kafka_err2str(err));
        flush_offsets(w); /* still ours: the commit on revoke includes them */
        for (int i = 0; i < parts->cnt; i++) {
            int topic = topic_index(w, parts->elems[i].topic);
            pq_part_t *p = topic < 0 ? NULL : part_find(w, topic, parts->elems[i].partition);
            if (p)
                part_revoke(w, p);
        }
        if (coop)
            e = rd_kafka_incremental_unassign(rk, parts);
        else
            rd_kafka_assign(rk, NULL);
        PQ_INFO("revoked %d partitions", parts->cnt);
    }
    if (e) {
        PQ_ERR("incremental rebalance: %s", rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
}

/* ---- queues ---- */

static void on_message(pq_worker_t *w, const rd_kafka_message_t *m)
{
    int topic = topic_index(w, rd_kafka_topic_name(m->rkt));
    pq_part_t *part;

    if (topic < 0) {
        PQ_WARN("message from unexpected topic %s", rd_kafka_topic_name(m->rkt));
        return;
    }
    if (w->stopping) {
        /* Not taken in: its offset is never stored, the next owner reads it. */
        pq_counter_add(w->m.handed_back, 1);
        return;
    }
    part = part_find(w, topic, m->partition);
    if (part && part->next_taken >= 0 && m->offset < part->next_taken) {
        /* Fetched again after a pause/resume: this offset is already in flight or done. */
        pq_counter_add(w->m.duplicates, 1);
        return;
    }
    pq_job_intake(w, part, topic, m);
}

static void on_consumer_error(pq_worker_t *w, const rd_kafka_message_t *m)
{
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
        return;
    if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
        m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE) {
        pq_counter_add(w->m.offset_resets, 1);
        PQ_ERR("kafka offset reset on %s/%" PRId32 ": %s",
               m->rkt ? rd_kafka_topic_name(m->rkt) : "?", m->partition,
               rd_kafka_message_errstr(m));
        return;
    }
    PQ_WARN("consumer: %s%s%s", rd_kafka_err2name(m->err), m->rkt ? " on " : "",
            m->rkt ? rd_kafka_topic_name(m->rkt) : "");
}

static void drain_consumer(pq_worker_t *w)
{
    int n;

    for (n = 0; n < DRAIN_BUDGET; n++) {
        rd_kafka_message_t *m;
        /* Full: pause now, not after the batch, so librdkafka drops what it prefetched for
         * the paused partitions (fetched again on resume) instead of handing it all over.
         * Polling goes on while paused (max.poll.interval.ms); what still comes is taken. */
        if (!w->paused && w->inflight >= w->max_inflight)
            update_flow(w);
        m = rd_kafka_consumer_poll(w->consumer, 0);
        if (!m)
            break;
        if (m->err)
            on_consumer_error(w, m);
        else
            on_message(w, m);
        rd_kafka_message_destroy(m);
    }
    if (n == DRAIN_BUDGET && w->inflight < w->max_inflight)
        event_active(w->ev_drain, 0, 0); /* more waiting: let other events run first */
    update_flow(w);
}

static void drain_producer(pq_worker_t *w)
{
    for (int i = 0; i < 64 && rd_kafka_poll(w->producer, 0) > 0; i++)
        ;
}

static void drain_pipe(int fd)
{
    char buf[256];
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
}

static void on_cqueue(evutil_socket_t fd, short what, void *arg)
{
    drain_pipe(fd);
    drain_consumer(arg);
}

static void on_pqueue(evutil_socket_t fd, short what, void *arg)
{
    drain_pipe(fd);
    drain_producer(arg);
}

static void on_drain(evutil_socket_t fd, short what, void *arg)
{
    drain_consumer(arg);
}

static void on_safety(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    drain_consumer(w);
    drain_producer(w);
}

static void on_stats(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    pq_worker_metrics_t *m = &w->m;

    pq_gauge_set(m->inflight, (double)w->inflight);
    PQ_INFO("inflight=%zu paused=%d received=%" PRIu64 " succeeded=%" PRIu64 " failed=%" PRIu64
            " expired=%" PRIu64 " dlq=%" PRIu64 " republished=%" PRIu64 " calls=%" PRIu64
            " provider_errors=%" PRIu64 " http_active=%zu redis_pending=%zu offset_resets=%" PRIu64,
            w->inflight, w->paused, pq_counter_get(m->received), pq_counter_get(m->succeeded),
            pq_counter_get(m->failed), pq_counter_get(m->expired), pq_counter_get(m->dlq),
            pq_counter_get(m->republished), pq_counter_get(m->provider_calls),
            pq_counter_get(m->provider_errors), pq_http_active(w->http), pq_redis_pending(w->redis),
            pq_counter_get(m->offset_resets));
}

/* ---- Redis state ---- */

static void on_redis_state(void *opaque, int up)
{
    pq_worker_t *w = opaque;

    if (up)
        pq_job_redis_up(w);
    update_flow(w);
}

/* ---- producing ---- */

rd_kafka_resp_err_t pq_worker_produce(pq_worker_t *w, int topic, const char *key, const char *value,
                                      size_t len, void *msg_opaque)
{
    rd_kafka_topic_t *t = topic == PQ_T_RESULTS ? w->t_results : w->t_dlq;

    if (rd_kafka_produce(t, RD_KAFKA_PARTITION_UA, 0, (void *)value, len, key,
                         key ? strlen(key) : 0, msg_opaque) == -1)
        return rd_kafka_last_error();
    return RD_KAFKA_RESP_ERR_NO_ERROR;
}

/* ---- stopping ---- */

static void on_final(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;

    if (pq_redis_pending(w->redis) == 0 || pq_mono_ms() >= w->final_deadline_ms)
        event_base_loopbreak(w->base);
}

static void on_grace(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    struct timeval tv = {0, 50 * 1000};

    PQ_WARN("grace period over: handing back %zu jobs (leases released, offsets not stored)",
            w->inflight);
    flush_offsets(w);
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
    update_flow(w);
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
    rd_kafka_t *rk;

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
    rd_kafka_conf_set_opaque(kc, w);
    rd_kafka_conf_set_rebalance_cb(kc, on_rebalance);
    rd_kafka_conf_set_log_cb(kc, on_kafka_log);
    rd_kafka_conf_set_error_cb(kc, on_kafka_error);
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, errstr, errstr_size);
    if (!rk)
        rd_kafka_conf_destroy(kc);
    return rk;
}

static rd_kafka_t *producer_new(pq_worker_t *w, char *errstr, size_t errstr_size)
{
    rd_kafka_conf_t *kc = pq_kafka_conf_new(w->conf, PQ_KAFKA_PRODUCER, errstr, errstr_size);
    rd_kafka_t *rk;

    if (!kc)
        return NULL;
    rd_kafka_conf_set_opaque(kc, w);
    rd_kafka_conf_set_dr_msg_cb(kc, on_delivery);
    rd_kafka_conf_set_log_cb(kc, on_kafka_log);
    rd_kafka_conf_set_error_cb(kc, on_kafka_error);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, kc, errstr, errstr_size);
    if (!rk)
        rd_kafka_conf_destroy(kc);
    return rk;
}

pq_worker_t *pq_worker_new(const pq_conf_t *conf, char *errstr, size_t errstr_size)
{
    pq_worker_t *w = calloc(1, sizeof(*w));
    unsigned char nonce[8];
    rd_kafka_topic_partition_list_t *subs;
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
    TAILQ_INIT(&w->parts);
    TAILQ_INIT(&w->jobs);
    TAILQ_INIT(&w->redis_wait);
    pq_conf_topic(conf, "requests", w->topics[PQ_T_REQUESTS], sizeof(w->topics[0]));
    pq_conf_topic(conf, "bulk", w->topics[PQ_T_BULK], sizeof(w->topics[0]));
    pq_conf_topic(conf, "results", w->topics[PQ_T_RESULTS], sizeof(w->topics[0]));
    pq_conf_topic(conf, "dlq", w->topics[PQ_T_DLQ], sizeof(w->topics[0]));
    w->max_inflight = conf->max_inflight > 0 ? (size_t)conf->max_inflight : 4096;
    w->low_water = w->max_inflight * 3 / 4;
    w->ttl_ms = conf->result_ttl_s * 1000;
    w->limits = pq_envelope_limits_default;
    if (conf->max_prompt_bytes > 0)
        w->limits.max_prompt_bytes = (size_t)conf->max_prompt_bytes;
    if (conf->max_body_bytes > 0 && (size_t)conf->max_body_bytes > w->limits.max_bytes)
        w->limits.max_bytes = (size_t)conf->max_body_bytes;

    if (getrandom(nonce, sizeof(nonce), 0) != (ssize_t)sizeof(nonce)) {
        snprintf(errstr, errstr_size, "getrandom: %s", strerror(errno));
        goto out_fail;
    }
    srandom((unsigned)(nonce[0] | nonce[1] << 8 | nonce[2] << 16) ^ (unsigned)getpid());
    snprintf(w->owner, sizeof(w->owner), "%.150s-%02x%02x%02x%02x%02x%02x%02x%02x",
             conf->instance_id ? conf->instance_id : "worker", nonce[0], nonce[1], nonce[2],
             nonce[3], nonce[4], nonce[5], nonce[6], nonce[7]);
    while (tsize < w->max_inflight * 2)
        tsize *= 2;
    w->table = calloc(tsize, sizeof(*w->table));
    w->table_mask = tsize - 1;
    w->metrics = pq_metrics_new();
    w->base = event_base_new();
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
    w->provs = pq_provs_new(w->base, conf, w->http, w->metrics, errstr, errstr_size);
    if (!w->provs)
        goto out_fail;
    w->redis = pq_redis_new(w->base, conf->redis_host, conf->redis_port, conf->redis_password,
                            conf->redis_db, 5000, on_redis_state, w, errstr, errstr_size);
    if (!w->redis)
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
    subs = rd_kafka_topic_partition_list_new(2);
    rd_kafka_topic_partition_list_add(subs, w->topics[PQ_T_REQUESTS], RD_KAFKA_PARTITION_UA);
    rd_kafka_topic_partition_list_add(subs, w->topics[PQ_T_BULK], RD_KAFKA_PARTITION_UA);
    err = rd_kafka_subscribe(w->consumer, subs);
    rd_kafka_topic_partition_list_destroy(subs);
    if (err) {
        snprintf(errstr, errstr_size, "subscribe: %s", rd_kafka_err2str(err));
        goto out_fail;
    }

    w->ev_cqueue = event_new(w->base, w->cpipe[0], EV_READ | EV_PERSIST, on_cqueue, w);
    w->ev_pqueue = event_new(w->base, w->ppipe[0], EV_READ | EV_PERSIST, on_pqueue, w);
    w->ev_drain = event_new(w->base, -1, 0, on_drain, w);
    w->ev_flush = event_new(w->base, -1, 0, on_flush, w);
    w->ev_safety = event_new(w->base, -1, EV_PERSIST, on_safety, w);
    w->ev_stats = event_new(w->base, -1, EV_PERSIST, on_stats, w);
    w->ev_sigterm = evsignal_new(w->base, SIGTERM, on_signal, w);
    w->ev_sigint = evsignal_new(w->base, SIGINT, on_signal, w);
    w->ev_grace = evtimer_new(w->base, on_grace, w);
    w->ev_final = event_new(w->base, -1, EV_PERSIST, on_final, w);
    if (!w->ev_cqueue || !w->ev_pqueue || !w->ev_drain || !w->ev_flush || !w->ev_safety ||
        !w->ev_stats || !w->ev_sigterm || !w->ev_sigint || !w->ev_grace || !w->ev_final) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out_fail;
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
    rd_kafka_resp_err_t err;

    w->grace_ms = grace_ms;
    event_add(w->ev_cqueue, NULL);
    event_add(w->ev_pqueue, NULL);
    event_add(w->ev_safety, &safety);
    event_add(w->ev_stats, &stats);
    event_add(w->ev_sigterm, NULL);
    event_add(w->ev_sigint, NULL);
    update_flow(w);
    event_active(w->ev_drain, 0, 0);

    event_base_dispatch(w->base);

    flush_offsets(w);
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
    struct event **evs[] = {&w->ev_cqueue, &w->ev_pqueue, &w->ev_drain,   &w->ev_flush,
                            &w->ev_safety, &w->ev_stats,  &w->ev_sigterm, &w->ev_sigint,
                            &w->ev_grace,  &w->ev_final};

    if (!w)
        return;
    pq_job_free_all(w);
    while ((p = TAILQ_FIRST(&w->parts))) {
        TAILQ_REMOVE(&w->parts, p, link);
        pq_part_unref(p);
    }
    if (w->cqueue)
        rd_kafka_queue_destroy(w->cqueue);
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
    pq_provs_destroy(w->provs);
    pq_http_destroy(w->http);
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
        if (*evs[i])
            event_free(*evs[i]);
    for (int i = 0; i < 2; i++) {
        if (w->cpipe[i] >= 0)
            close(w->cpipe[i]);
        if (w->ppipe[i] >= 0)
            close(w->ppipe[i]);
    }
    if (w->base)
        event_base_free(w->base);
    pq_metrics_destroy(w->metrics);
    free(w->table);
    free(w);
}
