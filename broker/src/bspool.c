/* The broker's side of the local spool (DESIGN.md G1, §9).
 *
 * Intake: a job that Kafka did not confirm in time (or while Kafka is known down) is appended
 * to the spool; the spool's writer thread calls back once the record is fsync'd. The callback
 * only pushes (slot, result) onto the slot's loop's completion list under a short mutex and
 * activates that loop's event; the loop then answers the request (the slot's done callback). A slot
 * in PQ_SLOT_SPOOLING is never released or reused before its callback is served, so the slot
 * pointer is a safe opaque.
 *
 * Drainer: one thread with its own idempotent producer. It takes records with pq_spool_next,
 * produces them without copying (the record stays valid until acked or nacked), acks on a
 * successful delivery report and nacks on a failure, backing off before it takes more. While
 * Kafka is known down it keeps only a few records in flight, as probes: the producer then has
 * partitions to deliver to, so it reconnects by itself, and the first delivery says Kafka is
 * back. Leftovers of an earlier run are pending from the start (pq_spool_open loads them), so
 * a restart drains them with no special case. A fatal idempotent-producer error recreates the
 * producer; what it held is purged, nacked, and produced again by the new one. */
#include "broker.h"
#include "bspool.h"
#include "kprod.h"
#include "slot.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#include "promptq/kafka.h"
#include "promptq/log.h"
#include "promptq/util.h"

/* Records in flight from the drainer while Kafka is reachable, and while it is not (probes). */
#define DRAIN_INFLIGHT_MAX   1024
#define DRAIN_PROBE_INFLIGHT 8
#define DRAIN_BACKOFF_MIN_MS 100
#define DRAIN_BACKOFF_MAX_MS 5000
/* How long a drainer's message may wait for Kafka before it is nacked and taken again. */
#define DRAIN_MESSAGE_TIMEOUT_MS "15000"
#define DRAIN_STOP_FLUSH_MS      1000
#define DRAIN_PURGE_WAIT_MS      5000
/* A drain of fewer records this soon after the last one is not logged at info. */
#define DRAIN_QUIET_MS      10000
#define DRAIN_QUIET_RECORDS 100
/* Room above the largest body for what the broker adds (id, tenant), the topic and the key. */
#define SPOOL_RECORD_HEADROOM (2 * PQ_BROKER_ENVELOPE_HEADROOM + 512)

typedef struct pq_spool_done_s {
    pq_slot_t *slot; /* NULL: fn(arg, err) instead */
    pq_err_t err;
    void (*fn)(void *arg, pq_err_t err);
    void *arg;
} pq_spool_done_t;

/* The opaque of a record appended by pq_bspool_append_fn. */
typedef struct {
    pq_bthread_t *t;
    void (*fn)(void *arg, pq_err_t err);
    void *arg;
} pq_spool_fnrec_t;

struct pq_drain_s {
    pq_broker_t *b;
    pq_spool_t *spool;
    pq_bconf_t *bc; /* reference held for the producer's config */
    pthread_t thread;
    int started;
    atomic_int stop;
    rd_kafka_t *rk;
    atomic_int up; /* -1 unknown, 0 down, 1 up */
    int fatal;
    uint64_t inflight;
    int backoff_ms;
    int64_t resume_ms; /* monotonic: no new records before this */
    rd_kafka_resp_err_t last_err;
    /* the current drain, for the log */
    int draining;
    int quiet;            /* this drain follows the last one closely: no info lines */
    int64_t drain_end_ms; /* when the last one ended */
    uint64_t drained;
    uint64_t failed;
    int64_t drain_start_ms;
};

/* ---- intake: append and hop back to the loop ---- */

static void spool_push(pq_bthread_t *t, pq_slot_t *s, pq_err_t err, void (*fn)(void *, pq_err_t),
                       void *arg)
{
    int wake = 0;

    pthread_mutex_lock(&t->spool_mu);
    if (t->spool_ndone == t->spool_cap) {
        size_t cap = t->spool_cap ? t->spool_cap * 2 : 256;
        pq_spool_done_t *d = realloc(t->spool_done, cap * sizeof(*d));

        if (!d) {
            /* Cannot queue the answer: the request stays unanswered until its connection
             * times out. Not expected (the list is bounded by the slot table). */
            pthread_mutex_unlock(&t->spool_mu);
            PQ_ERR("thread %d: out of memory queueing a spool answer", t->no);
            return;
        }
        t->spool_done = d;
        t->spool_cap = cap;
    }
    t->spool_done[t->spool_ndone].slot = s;
    t->spool_done[t->spool_ndone].err = err;
    t->spool_done[t->spool_ndone].fn = fn;
    t->spool_done[t->spool_ndone].arg = arg;
    wake = t->spool_ndone++ == 0;
    pthread_mutex_unlock(&t->spool_mu);
    if (wake)
        event_active(t->spool_ev, EV_READ, 0);
}

static void spool_cb(void *opaque, pq_err_t err)
{
    pq_slot_t *s = opaque;

    spool_push(s->t, s, err, NULL, NULL);
}

static void spool_fn_cb(void *opaque, pq_err_t err)
{
    pq_spool_fnrec_t r = *(pq_spool_fnrec_t *)opaque;

    free(opaque);
    spool_push(r.t, NULL, err, r.fn, r.arg);
}

pq_err_t pq_bspool_append_fn(pq_bthread_t *t, const char *topic, const char *key,
                             const void *payload, size_t len, void (*fn)(void *, pq_err_t),
                             void *arg)
{
    pq_spool_t *sp = t->b->spool;
    pq_spool_fnrec_t *r;
    pq_err_t err;

    if (!sp || pq_spool_full(sp))
        return PQ_ERR_UNAVAILABLE;
    r = malloc(sizeof(*r));
    if (!r)
        return PQ_ERR_NOMEM;
    r->t = t;
    r->fn = fn;
    r->arg = arg;
    err = pq_spool_append(sp, topic, key, strlen(key), payload, len, spool_fn_cb, r);
    if (err != PQ_OK)
        free(r);
    return err;
}

static void spool_ev_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    pq_spool_done_t *work;
    size_t n, cap;

    /* Swap the lists so the writer thread never waits for the answers being sent. */
    pthread_mutex_lock(&t->spool_mu);
    work = t->spool_done;
    n = t->spool_ndone;
    cap = t->spool_cap;
    t->spool_done = t->spool_work;
    t->spool_cap = t->spool_work_cap;
    t->spool_ndone = 0;
    pthread_mutex_unlock(&t->spool_mu);
    t->spool_work = work;
    t->spool_work_cap = cap;
    for (size_t i = 0; i < n; i++) {
        pq_slot_t *s = work[i].slot;

        if (!s) {
            work[i].fn(work[i].arg, work[i].err);
            continue;
        }
        if (s->state == PQ_SLOT_SPOOLING && s->spooled)
            s->spooled(s, work[i].err);
    }
}

int pq_bspool_thread_init(pq_bthread_t *t)
{
    if (pthread_mutex_init(&t->spool_mu, NULL))
        return -1;
    t->spool_mu_ready = 1;
    t->spool_ev = event_new(t->base, -1, 0, spool_ev_cb, t);
    return t->spool_ev ? 0 : -1;
}

void pq_bspool_thread_free(pq_bthread_t *t)
{
    if (t->spool_ev)
        event_free(t->spool_ev);
    t->spool_ev = NULL;
    free(t->spool_done);
    free(t->spool_work);
    t->spool_done = t->spool_work = NULL;
    if (t->spool_mu_ready)
        pthread_mutex_destroy(&t->spool_mu);
    t->spool_mu_ready = 0;
}

pq_err_t pq_bspool_append(pq_slot_t *s, void (*done)(pq_slot_t *s, pq_err_t err))
{
    pq_bthread_t *t = s->t;
    pq_spool_t *sp = t->b->spool;
    pq_err_t err;

    if (!sp || !s->payload)
        return PQ_ERR_UNAVAILABLE;
    if (pq_spool_full(sp))
        return PQ_ERR_UNAVAILABLE;
    s->state = PQ_SLOT_SPOOLING;
    s->spooled = done;
    err = pq_spool_append(sp, t->bc->topic_requests, s->id, strlen(s->id), s->payload,
                          s->payload_len, spool_cb, s);
    if (err != PQ_OK)
        s->state = PQ_SLOT_PRODUCING; /* the caller answers; any live state but SPOOLING */
    return err;
}

int pq_bspool_full(pq_broker_t *b)
{
    return b->spool ? pq_spool_full(b->spool) : 1;
}

/* ---- Kafka state ---- */

int pq_bspool_kafka_up(pq_broker_t *b)
{
    for (int i = 0; i < b->nthreads; i++)
        if (b->threads[i] && atomic_load(&b->threads[i]->kafka_up) == 1)
            return 1;
    return b->drain && atomic_load(&b->drain->up) == 1;
}

int pq_bspool_kafka_down(pq_bthread_t *t)
{
    int up = atomic_load(&t->kafka_up);

    /* a loop that has not seen Kafka yet trusts the drainer's producer */
    return up == 0 || (up < 0 && t->b->drain && atomic_load(&t->b->drain->up) == 0);
}

void pq_bspool_kafka_changed(pq_broker_t *b)
{
    int up = pq_bspool_kafka_up(b);
    int known_down = b->drain && atomic_load(&b->drain->up) == 0;
    int state = up ? 1 : (known_down ? 0 : -1);
    uint64_t records = 0, bytes = 0;

    for (int i = 0; !up && i < b->nthreads; i++)
        if (b->threads[i] && atomic_load(&b->threads[i]->kafka_up) == 0)
            state = 0;
    if (state < 0 || atomic_exchange(&b->kafka_state, state) == state)
        return;
    if (b->spool)
        pq_spool_pending(b->spool, &records, &bytes);
    if (state)
        PQ_INFO("Kafka is reachable (%" PRIu64 " spooled jobs to drain)", records);
    else
        PQ_INFO("Kafka is unreachable: new jobs are spooled (%" PRIu64 " jobs, %" PRIu64
                " bytes in the spool)",
                records, bytes);
}

/* ---- drainer ---- */

static void drain_set_up(pq_drain_t *d, int up)
{
    pq_broker_t *b = d->b;
    int was = atomic_exchange(&d->up, up);

    if (was == up)
        return;
    if (up && was == 0) {
        /* Kafka is back after the drainer saw it gone. A loop whose producer has nothing to
         * send may not reconnect by itself (sparse connections): let it try producing again;
         * if Kafka is not there for it after all, its jobs are spooled at the ack deadline.
         * Not on the drainer's first contact (was -1): that says nothing about a down a loop
         * saw since, and its statistics may predate that down (test_spool saw the loops
         * marked up for good right after Kafka went away). */
        for (int i = 0; i < b->nthreads; i++) {
            int down = 0;

            atomic_compare_exchange_strong(&b->threads[i]->kafka_up, &down, 1);
        }
    }
    pq_bspool_kafka_changed(b);
}

static void drain_backoff(pq_drain_t *d)
{
    int64_t now = pq_mono_ms();

    if (now < d->resume_ms)
        return; /* failures of the same round count once */
    d->backoff_ms = d->backoff_ms ? d->backoff_ms * 2 : DRAIN_BACKOFF_MIN_MS;
    if (d->backoff_ms > DRAIN_BACKOFF_MAX_MS)
        d->backoff_ms = DRAIN_BACKOFF_MAX_MS;
    d->resume_ms = now + d->backoff_ms;
}

static int drain_permanent(rd_kafka_resp_err_t err)
{
    switch (err) {
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
        return 1;
    default:
        return 0;
    }
}

/* Writes a record Kafka refuses for good to <spool_dir>/rejected/<id>.json (fsync'd) for an
 * operator, since it was acknowledged. Returns 0, or -1 (it then stays in the spool). */
static int set_aside(pq_drain_t *d, const pq_spool_rec_t *rec, rd_kafka_resp_err_t err)
{
    const char *dir = d->bc->conf->spool_dir;
    char path[PATH_MAX], name[PQ_ID_MAX + 1];
    size_t n = rec->key_len < PQ_ID_MAX ? rec->key_len : PQ_ID_MAX;
    const char *key = rec->key ? (const char *)rec->key : "";
    int fd, rc = -1;

    for (size_t i = 0; i < n; i++) {
        char c = key[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || c == '_' || (c == '.' && i > 0);

        name[i] = ok ? c : '_';
    }
    name[n] = '\0';
    if (n == 0)
        snprintf(name, sizeof(name), "%016" PRIu64 "-%" PRIu64, rec->seq, rec->offset);
    snprintf(path, sizeof(path), "%s/rejected", dir);
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        goto out;
    snprintf(path, sizeof(path), "%s/rejected/%s.json", dir, name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        goto out;
    if (write(fd, rec->value, rec->value_len) == (ssize_t)rec->value_len && fsync(fd) == 0)
        rc = 0;
    close(fd);
out:
    if (rc == 0)
        PQ_ERR("spooled job %s: Kafka refuses it permanently (%s): set aside in %s", name,
               rd_kafka_err2str(err), path);
    else
        PQ_ERR("spooled job %s: Kafka refuses it permanently (%s) and it cannot be set aside "
               "(%s): it stays in the spool",
               name, rd_kafka_err2str(err), strerror(errno));
    return rc;
}

/* Gives one record a result: ack (delivered, or refused for good) or nack (try again). */
static void drain_done(pq_drain_t *d, pq_spool_rec_t *rec, rd_kafka_resp_err_t err)
{
    pq_broker_t *b = d->b;

    if (!err) {
        pq_spool_ack(d->spool, rec);
        pq_counter_add(b->m_drained, 1);
        d->drained++;
        d->backoff_ms = 0;
        return;
    }
    if (drain_permanent(err) && set_aside(d, rec, err) == 0) {
        /* Kafka will never take it, and keeping it would block the spool for good. */
        pq_spool_ack(d->spool, rec);
        pq_counter_add(b->m_drain_dropped, 1);
        return;
    }
    pq_spool_nack(d->spool, rec);
    pq_counter_add(b->m_drain_failed, 1);
    d->failed++;
    if (err != d->last_err)
        PQ_DBG("spool drain: delivery failed (%s): backing off", rd_kafka_err2str(err));
    d->last_err = err;
    /* Purged by a producer being recreated or stopped: nothing to wait for. */
    if (err != RD_KAFKA_RESP_ERR__PURGE_QUEUE && err != RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
        drain_backoff(d);
}

static void drain_note(pq_drain_t *d);

static void drain_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    pq_drain_t *d = opaque;
    pq_spool_rec_t *rec = m->_private;

    d->inflight--;
    if (!m->err) {
        drain_set_up(d, 1);
        if (!d->draining)
            drain_note(d); /* count this one in the drain it starts */
    }
    drain_done(d, rec, m->err);
}

static void drain_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    pq_drain_t *d = opaque;

    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        drain_set_up(d, 0);
    } else if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[256];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));

        PQ_ERR("spool drainer: fatal producer error %s: %s: recreating the producer",
               rd_kafka_err2name(ferr), fatal);
        d->fatal = 1;
    } else {
        PQ_DBG("spool drainer: kafka: %s: %s", rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
    }
}

static int drain_stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    if (pq_kprod_stats_up(json, len))
        drain_set_up(opaque, 1);
    return 0;
}

static rd_kafka_t *drain_producer_new(pq_drain_t *d, char *errstr, size_t errstr_size)
{
    const pq_conf_t *conf = d->bc->conf;
    rd_kafka_conf_t *kc = pq_kprod_conf(conf, errstr, errstr_size);
    pq_kafka_cbs_t cbs = {
        .opaque = d, .dr_msg = drain_dr_cb, .error = drain_error_cb, .stats = drain_stats_cb};

    if (!kc)
        return NULL;
    if (!pq_conf_kafka_get(conf, "delivery.timeout.ms") &&
        !pq_conf_kafka_get(conf, "message.timeout.ms") &&
        rd_kafka_conf_set(kc, "message.timeout.ms", DRAIN_MESSAGE_TIMEOUT_MS, errstr,
                          errstr_size) != RD_KAFKA_CONF_OK) {
        rd_kafka_conf_destroy(kc);
        return NULL;
    }
    return pq_kafka_client_new(RD_KAFKA_PRODUCER, kc, &cbs, errstr, errstr_size);
}

/* Fails everything the producer holds (each record is nacked by its delivery report) and
 * destroys it. */
static void drain_producer_drop(pq_drain_t *d, int flush_ms)
{
    int64_t deadline;

    if (!d->rk)
        return;
    if (flush_ms > 0 && d->inflight > 0)
        rd_kafka_flush(d->rk, flush_ms);
    rd_kafka_purge(d->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    deadline = pq_mono_ms() + DRAIN_PURGE_WAIT_MS;
    while (d->inflight > 0 && pq_mono_ms() < deadline)
        rd_kafka_poll(d->rk, 50);
    if (d->inflight > 0)
        PQ_ERR("spool drainer: %" PRIu64 " records without a delivery report; they are "
               "produced again after a restart",
               d->inflight);
    rd_kafka_destroy(d->rk);
    d->rk = NULL;
    d->inflight = 0;
}

static void drain_recreate(pq_drain_t *d)
{
    char errstr[512];

    drain_producer_drop(d, 0);
    d->rk = drain_producer_new(d, errstr, sizeof(errstr));
    if (!d->rk) {
        PQ_ERR("spool drainer: cannot recreate the producer: %s", errstr);
        drain_backoff(d);
        return;
    }
    d->fatal = 0;
    pq_counter_add(d->b->m_producer_recreated, 1);
    PQ_INFO("spool drainer: producer recreated");
}

/* Logs the start and the end of a drain. */
static void drain_note(pq_drain_t *d)
{
    uint64_t records = 0, bytes = 0;

    pq_spool_pending(d->spool, &records, &bytes);
    if (!d->draining && records > 0 && atomic_load(&d->up) == 1) {
        d->draining = 1;
        d->drained = d->failed = 0;
        d->drain_start_ms = pq_mono_ms();
        /* Kafka slower than the ack timeout spools and drains job by job: keep that quiet. */
        d->quiet = d->drain_end_ms && d->drain_start_ms - d->drain_end_ms < DRAIN_QUIET_MS &&
                   records < DRAIN_QUIET_RECORDS;
        if (!d->quiet)
            PQ_INFO("spool: draining %" PRIu64 " jobs (%" PRIu64 " bytes) to Kafka", records,
                    bytes);
    } else if (d->draining && records == 0 && d->inflight == 0) {
        d->draining = 0;
        d->drain_end_ms = pq_mono_ms();
        if (!d->quiet || d->drained >= DRAIN_QUIET_RECORDS)
            PQ_INFO("spool: drained %" PRIu64 " jobs in %.1f s (%" PRIu64 " deliveries retried)",
                    d->drained, (double)(d->drain_end_ms - d->drain_start_ms) / 1000.0, d->failed);
    }
}

static void drain_take(pq_drain_t *d)
{
    uint64_t cap = atomic_load(&d->up) == 1 ? DRAIN_INFLIGHT_MAX : DRAIN_PROBE_INFLIGHT;

    while (d->inflight < cap && !atomic_load(&d->stop)) {
        pq_spool_rec_t *rec = NULL;
        rd_kafka_resp_err_t err;
        pq_err_t perr = pq_spool_next(d->spool, 0, &rec);

        if (perr != PQ_OK) {
            if (perr == PQ_ERR_INTERNAL)
                drain_backoff(d); /* unreadable record: logged by the spool */
            return;
        }
        err = rd_kafka_producev(d->rk, RD_KAFKA_V_TOPIC(rec->topic),
                                RD_KAFKA_V_KEY(rec->key, rec->key_len),
                                RD_KAFKA_V_VALUE((void *)rec->value, rec->value_len),
                                RD_KAFKA_V_OPAQUE(rec), RD_KAFKA_V_END);
        if (err) {
            drain_done(d, rec, err);
            return;
        }
        d->inflight++;
    }
}

static void *drain_main(void *arg)
{
    pq_drain_t *d = arg;

    while (!atomic_load(&d->stop)) {
        if (d->fatal)
            drain_recreate(d);
        drain_note(d);
        if (d->rk && !d->fatal && pq_mono_ms() >= d->resume_ms)
            drain_take(d);
        if (d->rk)
            rd_kafka_poll(d->rk, d->inflight > 0 ? 5 : 50);
        else
            nanosleep(&(struct timespec){0, 50 * 1000000L}, NULL);
    }
    /* What is not delivered now stays in the spool for the next start. */
    drain_producer_drop(d, atomic_load(&d->up) == 1 ? DRAIN_STOP_FLUSH_MS : 0);
    return NULL;
}

static void drain_free(pq_drain_t *d)
{
    if (!d)
        return;
    if (d->rk)
        rd_kafka_destroy(d->rk);
    pq_bconf_unref(d->bc);
    free(d);
}

/* ---- open / close / metrics ---- */

int pq_bspool_open(pq_broker_t *b, char *errstr, size_t errstr_size)
{
    const pq_conf_t *conf = b->bconf->conf;
    pq_spool_opts_t opts;
    pq_spool_stats_t st;

    pq_spool_opts_init(&opts);
    opts.max_bytes = (uint64_t)conf->spool_max_bytes;
    opts.max_record_bytes = (uint32_t)(b->bconf->max_body + SPOOL_RECORD_HEADROOM);
    b->spool = pq_spool_open(conf->spool_dir, &opts, errstr, errstr_size);
    if (!b->spool)
        return -1;
    pq_spool_stats(b->spool, &st);
    b->spool_last = st;
    if (st.recovered_records > 0)
        PQ_INFO("spool %s: %" PRIu64 " jobs (%" PRIu64 " bytes) left by an earlier run, "
                "produced again once Kafka is reachable",
                conf->spool_dir, st.pending_records, st.pending_bytes);
    return 0;
}

int pq_bspool_start(pq_broker_t *b, char *errstr, size_t errstr_size)
{
    pq_drain_t *d;
    int rc;

    d = calloc(1, sizeof(*d));
    if (!d) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    d->b = b;
    d->spool = b->spool;
    pq_bconf_ref(b->bconf);
    d->bc = b->bconf;
    atomic_init(&d->up, -1);
    atomic_init(&d->stop, 0);
    d->rk = drain_producer_new(d, errstr, errstr_size);
    if (!d->rk) {
        drain_free(d);
        return -1;
    }
    b->drain = d; /* before the thread: its callbacks read it */
    rc = pthread_create(&d->thread, NULL, drain_main, d);
    if (rc) {
        snprintf(errstr, errstr_size, "pthread_create: %s", strerror(rc));
        b->drain = NULL;
        drain_free(d);
        return -1;
    }
    d->started = 1;
    return 0;
}

void pq_bspool_close(pq_broker_t *b)
{
    pq_drain_t *d = b->drain;

    if (d) {
        atomic_store(&d->stop, 1);
        if (d->started)
            pthread_join(d->thread, NULL);
        b->drain = NULL;
        drain_free(d);
    }
    if (b->spool) {
        uint64_t records = 0;

        pq_spool_pending(b->spool, &records, NULL);
        if (records > 0)
            PQ_INFO("spool: %" PRIu64 " jobs stay in the spool for the next start", records);
        pq_spool_close(b->spool);
        b->spool = NULL;
    }
}

static uint64_t delta(uint64_t now, uint64_t last)
{
    return now > last ? now - last : 0;
}

void pq_bspool_metrics(pq_broker_t *b)
{
    pq_spool_stats_t st;

    if (!b->spool)
        return;
    pq_spool_stats(b->spool, &st);
    pthread_mutex_lock(&b->spool_stats_mu);
    pq_counter_add(b->m_spool_committed, delta(st.appended, b->spool_last.appended));
    pq_counter_add(b->m_spool_fsyncs, delta(st.fsyncs, b->spool_last.fsyncs));
    pq_counter_add(b->m_spool_write_failed, delta(st.append_failed, b->spool_last.append_failed));
    b->spool_last = st;
    pthread_mutex_unlock(&b->spool_stats_mu);
    pq_gauge_set(b->m_spool_pending_records, (double)st.pending_records);
    pq_gauge_set(b->m_spool_pending_bytes, (double)st.pending_bytes);
    pq_gauge_set(b->m_spool_disk_bytes, (double)st.disk_bytes);
    pq_gauge_set(b->m_spool_per_fsync, st.fsyncs ? (double)st.appended / (double)st.fsyncs : 0.0);
}
