/* The loop's idempotent producer. Delivery reports, errors and statistics are served on the
 * loop thread: the main queue signals a pipe when it turns non-empty (io event), and a safety
 * timer polls as well because the io event fires only once until the queue is polled again. */
#include "broker.h"
#include "bspool.h"
#include "kprod.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "promptq/kafka.h"
#include "promptq/log.h"

#define KPROD_POLL_MS            100
#define KPROD_STATS_MS           "500"
#define KPROD_RECONNECT_MAX_MS   "1000"
#define KPROD_MESSAGE_TIMEOUT_MS "30000"

static void poll_all(pq_bthread_t *t)
{
    /* rd_kafka_poll serves everything queued; loop in case callbacks queued more */
    for (int i = 0; i < 8 && t->rk && rd_kafka_poll(t->rk, 0) > 0; i++)
        ;
}

static void kafka_io_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    char buf[256];

    /* librdkafka writes one byte per wake-up and no more until the queue is served again
     * (rd_kafka_q_io_event's "sent" flag): a full read means more is there, anything less
     * drained it, so the usual wake-up costs one read, not a second one ending in EAGAIN. */
    while (read(fd, buf, sizeof(buf)) == (ssize_t)sizeof(buf))
        ;
    poll_all(t);
}

static void kafka_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    poll_all(arg);
}

/* Each topic handle carries its delivery callback as its opaque (pq_kprod_start). */
static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    pq_bthread_t *t = opaque;
    const pq_kprod_dr_fn *fn = m->rkt ? rd_kafka_topic_opaque(m->rkt) : &t->kdr.requests;

    if (fn && *fn)
        (*fn)(t, m);
}

static void recreate_cb(evutil_socket_t fd, short what, void *arg);

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    pq_bthread_t *t = opaque;

    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        if (atomic_exchange(&t->kafka_up, 0) != 0) {
            PQ_DBG("thread %d: all Kafka brokers are down: new jobs are spooled", t->no);
            pq_bspool_kafka_changed(t->b);
        }
        return;
    }
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[256];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));

        PQ_ERR("thread %d: fatal producer error %s: %s: recreating the producer", t->no,
               rd_kafka_err2name(ferr), fatal);
        if (!t->kafka_fatal) {
            t->kafka_fatal = 1;
            event_base_once(t->base, -1, EV_TIMEOUT, recreate_cb, t, NULL);
        }
        return;
    }
    PQ_DBG("thread %d: kafka: %s: %s", t->no, rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

/* Statistics tell whether a broker connection is up; this is how "Kafka is back" is noticed
 * while new jobs are refused (nothing is produced then, so no delivery report says so). */
static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    pq_bthread_t *t = opaque;

    if (pq_kprod_stats_up(json, len) && atomic_exchange(&t->kafka_up, 1) != 1) {
        PQ_DBG("thread %d: Kafka reachable", t->no);
        pq_bspool_kafka_changed(t->b);
    }
    return 0;
}

int pq_kprod_stats_up(const char *json, size_t len)
{
    (void)len; /* librdkafka NUL-terminates the statistics */
    return strstr(json, "\"state\":\"UP\"") != NULL;
}

static int set_default(rd_kafka_conf_t *kc, const pq_conf_t *conf, const char *key,
                       const char *value, char *errstr, size_t errstr_size)
{
    if (pq_conf_kafka_get(conf, key))
        return 0;
    if (rd_kafka_conf_set(kc, key, value, errstr, errstr_size) != RD_KAFKA_CONF_OK)
        return -1;
    return 0;
}

rd_kafka_conf_t *pq_kprod_conf(const pq_conf_t *conf, char *errstr, size_t errstr_size)
{
    rd_kafka_conf_t *kc = pq_kafka_conf_new(conf, PQ_KAFKA_PRODUCER, errstr, errstr_size);

    if (!kc)
        return NULL;
    if (set_default(kc, conf, "statistics.interval.ms", KPROD_STATS_MS, errstr, errstr_size) ||
        set_default(kc, conf, "reconnect.backoff.max.ms", KPROD_RECONNECT_MAX_MS, errstr,
                    errstr_size) ||
        (!pq_conf_kafka_get(conf, "delivery.timeout.ms") &&
         set_default(kc, conf, "message.timeout.ms", KPROD_MESSAGE_TIMEOUT_MS, errstr,
                     errstr_size))) {
        rd_kafka_conf_destroy(kc);
        return NULL;
    }
    return kc;
}

static rd_kafka_t *producer_new(pq_bthread_t *t, char *errstr, size_t errstr_size)
{
    pq_kafka_cbs_t cbs = {.opaque = t, .dr_msg = dr_cb, .error = error_cb, .stats = stats_cb};

    return pq_kafka_client_new(RD_KAFKA_PRODUCER, pq_kprod_conf(t->bc->conf, errstr, errstr_size),
                               &cbs, errstr, errstr_size);
}

/* A topic handle whose delivery reports go to *fn. */
static rd_kafka_topic_t *topic_new(rd_kafka_t *rk, const char *name, const pq_kprod_dr_fn *fn,
                                   char *errstr, size_t errstr_size)
{
    /* a copy of the producer's default topic conf, so topic properties set in the config
     * (acks, message.timeout.ms) still apply */
    rd_kafka_topic_conf_t *tc = rd_kafka_default_topic_conf_dup(rk);
    rd_kafka_topic_t *rkt;

    rd_kafka_topic_conf_set_opaque(tc, (void *)fn);
    rkt = rd_kafka_topic_new(rk, name, tc);
    if (!rkt)
        snprintf(errstr, errstr_size, "topic %s: %s", name,
                 rd_kafka_err2str(rd_kafka_last_error()));
    return rkt;
}

/* Attaches rk to the loop: topic handles and main-queue io event. */
static int producer_attach(pq_bthread_t *t, rd_kafka_t *rk, char *errstr, size_t errstr_size)
{
    rd_kafka_queue_t *q;

    t->rkt = topic_new(rk, t->bc->topic_requests, &t->kdr.requests, errstr, errstr_size);
    t->rkt_results =
        t->rkt ? topic_new(rk, t->bc->topic_results, &t->kdr.results, errstr, errstr_size) : NULL;
    t->rkt_bulk =
        t->rkt_results ? topic_new(rk, t->bc->topic_bulk, &t->kdr.bulk, errstr, errstr_size) : NULL;
    if (!t->rkt_bulk) {
        if (t->rkt)
            rd_kafka_topic_destroy(t->rkt);
        if (t->rkt_results)
            rd_kafka_topic_destroy(t->rkt_results);
        t->rkt = t->rkt_results = NULL;
        return -1;
    }
    q = rd_kafka_queue_get_main(rk);
    rd_kafka_queue_io_event_enable(q, t->kpipe[1], "1", 1);
    rd_kafka_queue_destroy(q);
    t->rk = rk;
    return 0;
}

/* Destroys the thread's producer t->rk (set) and its topic handles, and clears them: the
 * teardown of a recreate and of pq_kprod_stop. Waits for nothing (the caller flushed or
 * purged). */
static void producer_destroy(pq_bthread_t *t)
{
    if (t->rkt)
        rd_kafka_topic_destroy(t->rkt);
    t->rkt = NULL;
    if (t->rkt_results)
        rd_kafka_topic_destroy(t->rkt_results);
    t->rkt_results = NULL;
    if (t->rkt_bulk)
        rd_kafka_topic_destroy(t->rkt_bulk);
    t->rkt_bulk = NULL;
    rd_kafka_destroy(t->rk);
    t->rk = NULL;
}

static void recreate_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    char errstr[512];
    rd_kafka_t *rk;

    if (t->rk) {
        /* Fail what the old producer holds: each waiting request's delivery report fails and
         * its job goes to the spool (already answered ones are in the spool already). */
        rd_kafka_purge(t->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        poll_all(t);
        producer_destroy(t);
    }
    rk = producer_new(t, errstr, sizeof(errstr));
    if (!rk || producer_attach(t, rk, errstr, sizeof(errstr))) {
        struct timeval again = {1, 0};

        PQ_ERR("thread %d: cannot recreate the producer: %s", t->no, errstr);
        if (rk && !t->rk)
            rd_kafka_destroy(rk);
        event_base_once(t->base, -1, EV_TIMEOUT, recreate_cb, t, &again);
        return;
    }
    t->kafka_fatal = 0;
    pq_counter_add(t->b->m_producer_recreated, 1);
    PQ_INFO("thread %d: producer recreated", t->no);
}

int pq_kprod_start(pq_bthread_t *t, const pq_kprod_dr_t *dr, char *errstr, size_t errstr_size)
{
    struct timeval tick = {0, KPROD_POLL_MS * 1000};
    rd_kafka_t *rk;

    t->kdr = *dr;
    if (pipe2(t->kpipe, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(errstr, errstr_size, "pipe: %s", strerror(errno));
        return -1;
    }
    rk = producer_new(t, errstr, errstr_size);
    if (!rk)
        return -1;
    if (producer_attach(t, rk, errstr, errstr_size)) {
        rd_kafka_destroy(rk);
        return -1;
    }
    t->kafka_ev = event_new(t->base, t->kpipe[0], EV_READ | EV_PERSIST, kafka_io_cb, t);
    t->kafka_timer = event_new(t->base, -1, EV_PERSIST, kafka_timer_cb, t);
    if (!t->kafka_ev || !t->kafka_timer) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    event_add(t->kafka_ev, NULL);
    event_add(t->kafka_timer, &tick);
    return 0;
}

void pq_kprod_stop(pq_bthread_t *t, int timeout_ms)
{
    if (t->rk) {
        if (timeout_ms > 0 && rd_kafka_outq_len(t->rk) > 0) {
            rd_kafka_resp_err_t err = rd_kafka_flush(t->rk, timeout_ms);

            if (err)
                PQ_WARN("thread %d: %d messages not delivered at exit", t->no,
                        rd_kafka_outq_len(t->rk));
        }
        producer_destroy(t);
    }
    if (t->kafka_ev) {
        event_free(t->kafka_ev);
        t->kafka_ev = NULL;
    }
    if (t->kafka_timer) {
        event_free(t->kafka_timer);
        t->kafka_timer = NULL;
    }
    for (int i = 0; i < 2; i++) {
        if (t->kpipe[i] >= 0)
            close(t->kpipe[i]);
        t->kpipe[i] = -1;
    }
}
