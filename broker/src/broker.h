/* promptq-broker internals: process state, per-thread loops, request slots.
 *
 * Each of broker.threads threads runs its own event_base with an evhttp server bound to a
 * SO_REUSEPORT listener, its own idempotent producer (delivery reports are served on that loop
 * through the main queue's io-event fd) and its own hiredis async connection. A request that
 * waits for Redis or Kafka lives in a slot of its thread's slot table; callbacks find it again
 * through a handle (index + generation), never through a raw pointer, so a late reply for a
 * request already answered is ignored.
 *
 * A job Kafka does not confirm within broker.ack_timeout_ms (or at once while Kafka is known
 * down) goes to the process's spool (bspool.c): its writer thread fsyncs it and hands the
 * answer back to the request's loop, which replies 202 "spooled". One drainer thread with its
 * own producer re-produces spooled jobs once Kafka is back. */
#ifndef PQ_BROKER_H
#define PQ_BROKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/event_struct.h>
#include <event2/http.h>
#include <hiredis/async.h>
#include <librdkafka/rdkafka.h>

#include "promptq/conf.h"
#include "promptq/envelope.h"
#include "promptq/metrics.h"
#include "promptq/spool.h"

/* Room the broker keeps below message.max.bytes for what it adds to a client's envelope (id,
 * tenant, reply_to) and for the Kafka record overhead. */
#define PQ_BROKER_ENVELOPE_HEADROOM 1024
#define PQ_BROKER_ROUTE_MAX         255
#define PQ_BROKER_REDIS_TIMEOUT_MS  200
#define PQ_BROKER_SHUTDOWN_MS       10000
/* In-flight requests per thread; beyond this new jobs get 503. */
#define PQ_BROKER_SLOTS_MAX  65536
#define PQ_BROKER_SLOT_CHUNK 256
/* Outstanding Redis commands per thread before Redis is treated as unavailable. */
#define PQ_BROKER_REDIS_PENDING_MAX 8192

/* Paths, for metrics labels and replies. */
typedef enum {
    PQ_PATH_JOBS = 0, /* /v1/jobs */
    PQ_PATH_JOB,      /* /v1/jobs/{id} */
    PQ_PATH_HEALTHZ,
    PQ_PATH_READYZ,
    PQ_PATH_METRICS,
    PQ_PATH_OTHER,
    PQ_PATH__COUNT,
} pq_path_t;

/* Status codes counted per path; anything else is counted as "other". */
#define PQ_BROKER_NCODES 16

/* A loaded config plus what the broker derives from it. Reference counted: each thread holds
 * one reference to the config it serves with; SIGHUP swaps in a new one. */
typedef struct pq_bconf_s {
    pq_conf_t *conf; /* owned */
    atomic_int refs;
    size_t max_body; /* largest POST /v1/jobs body accepted */
    pq_envelope_limits_t limits;
    char topic_requests[256];
} pq_bconf_t;

pq_bconf_t *pq_bconf_new(pq_conf_t *conf); /* takes conf; NULL on failure (conf destroyed) */
void pq_bconf_ref(pq_bconf_t *bc);
void pq_bconf_unref(pq_bconf_t *bc);

typedef struct pq_bthread_s pq_bthread_t;
typedef struct pq_drain_s pq_drain_t;

/* Process-wide state. */
typedef struct pq_broker_s {
    const char *conf_path; /* borrowed from argv/environment */
    pq_bconf_t *bconf;     /* main thread's reference to the current config */
    int nthreads;
    pq_bthread_t **threads;
    int port; /* the port actually bound (listen port 0 = any) */

    /* The local spool (G1): jobs Kafka did not confirm in time; drained by one thread. */
    pq_spool_t *spool;
    pq_drain_t *drain;
    atomic_int kafka_state; /* process-wide view for logs: -1 unknown, 0 down, 1 up */

    pq_metrics_t *metrics;
    pq_counter_t *m_accepted;
    pq_counter_t *m_accepted_spooled;
    pq_counter_t *m_spool_refused_full;
    pq_counter_t *m_spool_refused_error;
    pq_counter_t *m_drained;
    pq_counter_t *m_drain_failed;
    pq_counter_t *m_drain_dropped;
    pq_counter_t *m_producer_recreated;
    pq_counter_t *m_late_delivered;
    /* from pq_spool_stats when /metrics is rendered */
    pthread_mutex_t spool_stats_mu;
    pq_spool_stats_t spool_last;
    pq_gauge_t *m_spool_pending_records;
    pq_gauge_t *m_spool_pending_bytes;
    pq_gauge_t *m_spool_disk_bytes;
    pq_gauge_t *m_spool_per_fsync;
    pq_counter_t *m_spool_committed;
    pq_counter_t *m_spool_fsyncs;
    pq_counter_t *m_spool_write_failed;
    pq_counter_t *m_unavailable;
    pq_counter_t *m_redis_errors;
    pq_counter_t *m_conflicts;
    pq_counter_t *m_produce_errors;
    pq_hist_t *m_ack_latency;
    pq_gauge_t *m_inflight;
} pq_broker_t;

typedef enum {
    PQ_SLOT_FREE = 0,
    PQ_SLOT_REDIS_CREATE, /* POST: waiting for pq_script_job_create */
    PQ_SLOT_PRODUCING,    /* POST: waiting for the delivery report */
    PQ_SLOT_GET,          /* GET /v1/jobs/{id}: waiting for HGETALL */
    PQ_SLOT_SPOOLING,     /* POST: handed to the spool, waiting for its fsync (no timer: the
                           * spool calls back exactly once; the slot is not reused before) */
} pq_slot_state_t;

/* One request waiting for Redis or Kafka. Slots are pooled per thread. */
typedef struct pq_slot_s {
    pq_bthread_t *t;
    uint32_t idx; /* position in the table, 1-based */
    uint32_t gen; /* bumped whenever the slot is released */
    pq_slot_state_t state;
    pq_path_t path;
    struct evhttp_request *req; /* borrowed until we reply */
    struct event timer;         /* Redis timeout, then the ack deadline */
    int created;                /* this request created the Redis job record */
    int64_t t_produce_us;       /* monotonic, for the ack latency histogram */
    char *payload;              /* owned until handed to the producer */
    size_t payload_len;
    uint32_t next_free;
    char id[PQ_ID_MAX + 1];
    char tenant[PQ_TENANT_MAX + 1];
    char hash[PQ_SHA256_HEX_LEN + 1];
    char route[PQ_BROKER_ROUTE_MAX + 1];
} pq_slot_t;

struct pq_bthread_s {
    pq_broker_t *b;
    int no;
    pthread_t thread;
    struct event_base *base;
    struct evhttp *http;
    struct evhttp_bound_socket *bound;
    pq_bconf_t *bc;                /* this thread's config reference */
    _Atomic(pq_bconf_t *) next_bc; /* handed over by SIGHUP */
    atomic_int stop;               /* set by the main thread */
    struct event *ctl_ev;          /* activated by the main thread */
    struct event *shutdown_ev;     /* periodic while stopping */
    int stopping;
    int64_t stop_deadline_ms;       /* monotonic */
    const struct timeval *tv_ack;   /* common timeout for ack_timeout_ms */
    const struct timeval *tv_redis; /* common timeout for Redis commands */

    /* slots */
    pq_slot_t *chunks[PQ_BROKER_SLOTS_MAX / PQ_BROKER_SLOT_CHUNK];
    uint32_t nslots;    /* allocated */
    uint32_t free_head; /* 1-based, 0 = none */
    uint32_t inflight;

    /* kafka */
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt;
    int kpipe[2];
    struct event *kafka_ev;
    struct event *kafka_timer;
    atomic_int kafka_up; /* -1 unknown, 0 all brokers down, 1 a broker is up */
    int kafka_fatal;

    /* redis */
    redisAsyncContext *rc;
    int redis_connected;
    int redis_pending;
    int64_t redis_last_reply_ms; /* monotonic */
    int64_t redis_oldest_sent_ms;
    int redis_retry_ms;
    struct event *redis_retry_ev;
    struct event *redis_watch_ev;

    /* spool completions, pushed by the spool's writer thread, served on this loop */
    pthread_mutex_t spool_mu;
    int spool_mu_ready;
    struct pq_spool_done_s *spool_done; /* guarded by spool_mu */
    size_t spool_ndone, spool_cap;
    struct pq_spool_done_s *spool_work; /* the loop's swapped-out batch */
    size_t spool_work_cap;
    struct event *spool_ev;

    /* metrics: counters by path and status code, registered on first use */
    pq_counter_t *m_requests[PQ_PATH__COUNT][PQ_BROKER_NCODES];
};

/* loop.c */
int pq_bthread_start(pq_bthread_t *t, char *errstr, size_t errstr_size);
void pq_bthread_free(pq_bthread_t *t);
/* Binds this thread's listener; port 0 binds any port and writes it to *port. */
int pq_bthread_listen(pq_bthread_t *t, int *port, char *errstr, size_t errstr_size);
int pq_bthread_init(pq_bthread_t *t, pq_broker_t *b, int no, char *errstr, size_t errstr_size);
/* Thread-safe: asks the loop to look at stop / next_bc. */
void pq_bthread_poke(pq_bthread_t *t);

/* slots (loop.c) */
pq_slot_t *pq_slot_get(pq_bthread_t *t, pq_path_t path, struct evhttp_request *req);
void pq_slot_release(pq_slot_t *s);
void *pq_slot_handle(const pq_slot_t *s);
/* The slot behind a handle if it is still the same request, else NULL. */
pq_slot_t *pq_slot_from_handle(pq_bthread_t *t, void *handle);

/* http.c: replies. Every reply goes through pq_http_reply so it is counted. */
void pq_http_reply(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *body, size_t len);
void pq_http_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *type, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Authenticates a request. Returns 0 and sets *tenant (borrowed from the config, NULL in open
 * mode), or -1 after answering 401. */
int pq_http_auth(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **tenant);

/* intake.c: POST /v1/jobs */
void pq_intake_post(pq_bthread_t *t, struct evhttp_request *req);
void pq_intake_redis_reply(pq_slot_t *s, long long result, int ok);
void pq_intake_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
void pq_intake_timeout(pq_slot_t *s);
/* Every job that could not be made durable in time ends here (ack deadline passed, Kafka known
 * down, delivery failed retryably, producer recreated, shutting down): the job goes to the
 * spool and is answered 202 "spooled" once it is fsync'd, or 503 + Retry-After if the spool
 * cannot take it. */
void pq_intake_not_durable(pq_slot_t *s, const char *why);
/* The spool's answer for a slot in PQ_SLOT_SPOOLING (on the slot's loop). */
void pq_intake_spooled(pq_slot_t *s, pq_err_t err);

/* bspool.c: the broker's side of the spool */
/* Opens the spool (conf->spool_dir; fails if another process holds it). Returns 0, or -1 with
 * errstr set. */
int pq_bspool_open(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Starts the drainer thread (after the loops are initialised, before they run). */
int pq_bspool_start(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Stops the drainer (what it holds goes back to the spool), then closes the spool. Every
 * pending callback has run when this returns. NULL-safe on a broker without a spool. */
void pq_bspool_close(pq_broker_t *b);
/* Per-loop completion queue: set up before the loop runs, freed after pq_bspool_close. */
int pq_bspool_thread_init(pq_bthread_t *t);
void pq_bspool_thread_free(pq_bthread_t *t);
/* Hands the slot's payload to the spool (slot state becomes PQ_SLOT_SPOOLING on PQ_OK; the
 * answer comes through pq_intake_spooled). Returns PQ_OK, PQ_ERR_UNAVAILABLE (full or
 * closing), PQ_ERR_TOO_LARGE or another error; on error the slot is untouched. */
pq_err_t pq_bspool_append(pq_slot_t *s);
/* 1 if the spool has no room for more jobs (readiness). */
int pq_bspool_full(pq_broker_t *b);
/* 1 if any producer of the process (a loop's or the drainer's) reaches Kafka. */
int pq_bspool_kafka_up(pq_broker_t *b);
/* 1 if Kafka is known to be unreachable for this loop: its jobs are spooled at once. */
int pq_bspool_kafka_down(pq_bthread_t *t);
/* Recomputes the process-wide Kafka state and logs a change (any thread). */
void pq_bspool_kafka_changed(pq_broker_t *b);
/* Refreshes the spool gauges and counters before /metrics is rendered. */
void pq_bspool_metrics(pq_broker_t *b);

/* jobs.c: GET /v1/jobs/{id} */
void pq_jobs_get(pq_bthread_t *t, struct evhttp_request *req, const char *id);
void pq_jobs_redis_reply(pq_slot_t *s, const void *reply);
void pq_jobs_timeout(pq_slot_t *s);

/* rconn.c: the thread's Redis connection */
int pq_rconn_start(pq_bthread_t *t);
void pq_rconn_stop(pq_bthread_t *t);
/* 1 if commands may be sent now. */
int pq_rconn_usable(const pq_bthread_t *t);
/* Sends a command whose reply goes to the slot behind handle (or nowhere when handle is NULL).
 * Returns 0, or -1 if it could not be sent. */
int pq_rconn_command(pq_bthread_t *t, void *handle, const char *fmt, ...);
int pq_rconn_commandargv(pq_bthread_t *t, void *handle, int argc, const char **argv,
                         const size_t *argvlen);

/* SHA1 of a script for EVALSHA; the scripts are loaded on every (re)connect. script is one of
 * pq_script_job_create, pq_script_job_drop. */
const char *pq_rconn_sha(const char *script);

/* kprod.c: the thread's producer */
int pq_kprod_start(pq_bthread_t *t, char *errstr, size_t errstr_size);
/* Flushes for at most timeout_ms, then destroys the producer. */
void pq_kprod_stop(pq_bthread_t *t, int timeout_ms);
/* A producer configuration with the broker's defaults (statistics for up/down, reconnect
 * backoff, message timeout). Returns a new conf or NULL with errstr set. */
rd_kafka_conf_t *pq_kprod_conf(const pq_conf_t *conf, char *errstr, size_t errstr_size);
/* 1 if a statistics JSON shows a broker connection in state UP. */
int pq_kprod_stats_up(const char *json, size_t len);

int64_t pq_mono_us(void);

#endif
