/* promptq-broker internals: process state, per-thread loops, request slots.
 *
 * Each of broker.threads threads runs its own event_base with an evhttp server bound to a
 * SO_REUSEPORT listener, its own idempotent producer (delivery reports are served on that loop
 * through the main queue's io-event fd) and its own hiredis async connection. A request that
 * waits for Redis or Kafka lives in a slot of its thread's slot table; callbacks find it again
 * through a handle (index + generation), never through a raw pointer, so a late reply for a
 * request already answered is ignored.
 *
 * Each loop also holds a second hiredis connection in SUBSCRIBE mode on the process's reply
 * channel (rsub.c) and a table of the chat requests waiting for their job's result (chat.c).
 *
 * A job Kafka does not confirm within broker.ack_timeout_ms (or at once while Kafka is known
 * down) goes to the process's spool (bspool.c): its writer thread fsyncs it and hands the
 * answer back to the request's loop, which replies 202 "spooled". One drainer thread with its
 * own producer re-produces spooled jobs once Kafka is back.
 *
 * This header holds what every part shares (config, process and loop state); each module's
 * functions are declared in its own header (slot.h, intake.h, chat.h, ...). */
#ifndef PQ_BROKER_H
#define PQ_BROKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/dns.h>
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
/* Live chat streams per process (broker.max_streams, a constant until the config has it): each
 * holds its own Redis connection blocked in XREAD; beyond it stream requests get 429. */
#define PQ_BROKER_MAX_STREAMS 1000
/* Outstanding Redis commands per thread before Redis is treated as unavailable. */
#define PQ_BROKER_REDIS_PENDING_MAX 8192
/* New jobs' record creates that one loop iteration sends in one command (intake.c); a full
 * batch goes out at once. */
#define PQ_BROKER_CREATE_BATCH_MAX 64

/* Paths, for metrics labels and replies. */
typedef enum {
    PQ_PATH_JOBS = 0, /* /v1/jobs */
    PQ_PATH_JOB,      /* /v1/jobs/{id} */
    PQ_PATH_HEALTHZ,
    PQ_PATH_READYZ,
    PQ_PATH_METRICS,
    PQ_PATH_CHAT,    /* /v1/chat/completions */
    PQ_PATH_MODELS,  /* /v1/models */
    PQ_PATH_MODEL,   /* /v1/models/{id} */
    PQ_PATH_FILES,   /* /v1/files */
    PQ_PATH_FILE,    /* /v1/files/{id}[/content] */
    PQ_PATH_BATCHES, /* /v1/batches */
    PQ_PATH_BATCH,   /* /v1/batches/{id}[/cancel] */
    PQ_PATH_HEALTH,  /* /v1/health */
    PQ_PATH_PARKED,  /* /v1/parked[/{route}[/replay]] */
    PQ_PATH_DLQ,     /* /v1/dlq/redrive */
    PQ_PATH_OTHER,
    PQ_PATH__COUNT,
} pq_path_t;

/* Status codes counted per path; anything else is counted as "other". */
#define PQ_BROKER_NCODES 19

/* Idempotency-Key: printable ASCII without spaces, at most this long. */
#define PQ_IDEM_KEY_MAX 255

/* A loaded config plus what the broker derives from it. Reference counted: each thread holds
 * one reference to the config it serves with; SIGHUP swaps in a new one. */
typedef struct pq_bconf_s {
    pq_conf_t *conf; /* owned */
    atomic_int refs;
    size_t max_body; /* largest POST /v1/jobs body accepted */
    pq_envelope_limits_t limits;
    char topic_requests[256];
    char topic_results[256];
    char topic_bulk[256]; /* batch lines */
} pq_bconf_t;

pq_bconf_t *pq_bconf_new(pq_conf_t *conf); /* takes conf; NULL on failure (conf destroyed) */
void pq_bconf_ref(pq_bconf_t *bc);
void pq_bconf_unref(pq_bconf_t *bc);

typedef struct pq_bthread_s pq_bthread_t;
typedef struct pq_drain_s pq_drain_t;

/* A delivery report for a message produced by a loop (runs on that loop); the message's opaque
 * is what the producer passed. */
typedef void (*pq_kprod_dr_fn)(pq_bthread_t *t, const rd_kafka_message_t *m);
/* Who hears the delivery reports of each of the loop's topics. */
typedef struct pq_kprod_dr_s {
    pq_kprod_dr_fn requests; /* topic_requests (jobs) */
    pq_kprod_dr_fn results;  /* topic_results (cancelled results) */
    pq_kprod_dr_fn bulk;     /* topic_bulk (batch lines) */
} pq_kprod_dr_t;

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

    struct pq_redrive_s *redrive; /* redrive.c */

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

    /* sync waiters (chat.c), idempotency (idem.c), rate limits (ratelimit.c), cancel */
    char reply_channel[512]; /* <redis prefix>reply:<instance_id>, fixed at start */
    int64_t started_s;       /* unix seconds, "created" of /v1/models entries */
    struct pq_ratelimit_s *rl;
    pq_gauge_t *m_chat_waiting;
    /* chat streams with a live reader (chat.c), at most PQ_BROKER_MAX_STREAMS */
    atomic_int nstreams;
    pq_counter_t *m_chat_timeouts;
    pq_counter_t *m_chat_abandoned;
    pq_counter_t *m_chat_notified;
    pq_counter_t *m_sub_subscribed;
    pq_counter_t *m_idem_replayed;
    pq_counter_t *m_idem_reused;
    pq_counter_t *m_rate_limited;
    pq_counter_t *m_cancelled;
    /* files and batches */
    pq_counter_t *m_batches_created;
    pq_counter_t *m_batches_finalized;
    pq_counter_t *m_batch_lines;   /* outcome="queued" */
    pq_counter_t *m_batch_invalid; /* outcome="invalid" */
    pq_counter_t *m_files_uploaded;
} pq_broker_t;

typedef struct pq_slot_s pq_slot_t;
typedef struct pq_create_batch_s pq_create_batch_t;

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
    rd_kafka_topic_t *rkt_results; /* cancelled results (DELETE) */
    rd_kafka_topic_t *rkt_bulk;    /* batch lines (batch.c) */
    pq_kprod_dr_t kdr;             /* each topic handle's opaque points at its member */
    int kpipe[2];
    struct event *kafka_ev;
    struct event *kafka_timer;
    atomic_int kafka_up; /* -1 unknown, 0 all brokers down, 1 a broker is up */
    int kafka_fatal;

    /* redis subscriber (rsub.c): SUBSCRIBE b->reply_channel */
    redisAsyncContext *sub;
    int sub_ready; /* subscription confirmed */
    void (*sub_message)(pq_bthread_t *t, const char *msg, size_t len);
    void (*sub_confirmed)(pq_bthread_t *t);
    int sub_retry_ms;
    struct event *sub_retry_ev;
    /* chat waiters by (tenant, id): chains of slot indexes */
    uint32_t *wbuckets;
    uint32_t nwbuckets;
    uint32_t nwaiters;
    struct event *reread_ev; /* retries reads that failed, while any need one */

    /* redis host resolution on the loop (hiredis 0.14 resolves synchronously): one evdns base
     * per loop, one pending lookup per connection */
    struct evdns_base *dns;
    struct evdns_getaddrinfo_request *dns_rc;
    struct evdns_getaddrinfo_request *dns_sub;

    /* redis */
    redisAsyncContext *rc;
    int redis_connected;
    int redis_pending;
    int64_t redis_last_reply_ms; /* monotonic */
    int64_t redis_oldest_sent_ms;
    int redis_retry_ms;
    struct event *redis_retry_ev;
    struct event *redis_watch_ev;
    /* job record creates queued in this iteration, sent together by create_ev (intake.c) */
    pq_create_batch_t *create_q;
    pq_create_batch_t *create_spare; /* sent batches, for reuse */
    struct pq_create_scratch_s *create_scratch;
    struct event *create_ev;

    /* spool completions, pushed by the spool's writer thread, served on this loop */
    pthread_mutex_t spool_mu;
    int spool_mu_ready;
    struct pq_spool_done_s *spool_done; /* guarded by spool_mu */
    size_t spool_ndone, spool_cap;
    struct pq_spool_done_s *spool_work; /* the loop's swapped-out batch */
    size_t spool_work_cap;
    struct event *spool_ev;

    /* batches (batch.c): background tasks (create, finalize, cancel) and thread 0's timer */
    struct pq_btask_s *btasks;
    struct event *batch_timer;

    /* metrics: counters by path and status code, registered on first use */
    pq_counter_t *m_requests[PQ_PATH__COUNT][PQ_BROKER_NCODES];
};

int64_t pq_mono_us(void);

/* The loop running on this thread (NULL on the main thread): for libevent callbacks whose
 * argument cannot name it. */
extern _Thread_local pq_bthread_t *pq_bthread_current;

#endif
