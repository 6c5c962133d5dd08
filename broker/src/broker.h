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
 * own producer re-produces spooled jobs once Kafka is back. */
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

typedef enum {
    PQ_SLOT_FREE = 0,
    PQ_SLOT_REDIS_CREATE, /* POST: waiting for pq_script_job_create */
    PQ_SLOT_PRODUCING,    /* POST: waiting for the delivery report */
    PQ_SLOT_GET,          /* GET /v1/jobs/{id}: waiting for HGETALL */
    PQ_SLOT_SPOOLING,     /* POST: handed to the spool, waiting for its fsync (no timer: the
                           * spool calls back exactly once; the slot is not reused before) */
    PQ_SLOT_IDEM,         /* POST with Idempotency-Key: claiming the key (or waiting for the
                           * first use to become durable) */
    PQ_SLOT_WAIT,         /* chat: durable, waiting for the terminal record (waiter table) */
    PQ_SLOT_CANCEL_READ,  /* DELETE: reading the record */
    PQ_SLOT_CANCEL_CAS,   /* DELETE: compare-and-set queued|parked -> cancelled */
    PQ_SLOT_CANCEL_PUB,   /* DELETE: producing the cancelled result to promptq.results */
    PQ_SLOT_API,          /* files/batches (files.c, batch.c): waiting for Redis; step and
                           * ctx say where */
} pq_slot_state_t;

typedef struct pq_slot_s pq_slot_t;

/* What a slot's endpoint does when the loop needs it (set by pq_slot_get; static storage). */
typedef struct pq_slot_ops_s {
    void (*timeout)(pq_slot_t *s); /* the slot's timer fired */
    void (*stop)(pq_slot_t *s);    /* the stop deadline passed (NULL: nothing to do) */
    void (*release)(pq_slot_t *s); /* the slot is being released (NULL: nothing to undo) */
} pq_slot_ops_t;

/* One request waiting for Redis or Kafka. Slots are pooled per thread. */
struct pq_slot_s {
    pq_bthread_t *t;
    uint32_t idx; /* position in the table, 1-based */
    uint32_t gen; /* bumped whenever the slot is released */
    pq_slot_state_t state;
    pq_path_t path;
    const pq_slot_ops_t *ops;
    struct evhttp_request *req; /* borrowed until we reply */
    struct event timer;         /* Redis timeout, then the ack deadline */
    int created;                /* this request created the Redis job record */
    int64_t t_produce_us;       /* monotonic, for the ack latency histogram */
    char *payload;              /* owned until handed to the producer */
    size_t payload_len;
    char *callback_url; /* owned: a job's callback_url, kept on its record, or NULL */
    uint32_t next_free;
    void (*spooled)(struct pq_slot_s *s, pq_err_t err); /* PQ_SLOT_SPOOLING: the spool's answer */
    /* chat */
    unsigned stream : 1;        /* answer server-sent events */
    unsigned include_usage : 1; /* stream_options.include_usage */
    unsigned in_table : 1;      /* linked into the thread's waiter table */
    unsigned need_read : 1;     /* the record must be read again (a read failed) */
    unsigned idem_owner : 1;    /* this request claimed idem_key (released unless durable) */
    unsigned idem_durable : 1;  /* ... and made its job durable */
    int64_t deadline_ms;        /* monotonic: chat wait deadline */
    uint32_t wait_hash;
    uint32_t wait_next; /* chain in the waiter table, 1-based slot index */
    /* idempotency */
    char *idem_key; /* owned: the Redis key promptq:idem:{tenant}:{key}, or NULL */
    int idem_tries;
    void (*idem_first)(struct pq_slot_s *s);               /* a first use: submit */
    void (*idem_repeat)(struct pq_slot_s *s, int spooled); /* a repeat of a durable job */
    void (*durable)(struct pq_slot_s *s, int spooled);     /* intake: the job is durable */
    int64_t idem_deadline_ms;
    char body_hash[PQ_SHA256_HEX_LEN + 1];
    char id[PQ_ID_MAX + 1];
    char tenant[PQ_TENANT_MAX + 1];
    char hash[PQ_SHA256_HEX_LEN + 1];
    char route[PQ_BROKER_ROUTE_MAX + 1];
    /* files/batches */
    int step;
    void *ctx; /* owned; freed with ctx_free on release */
    void (*ctx_free)(void *ctx);
    void (*api_fn)(struct pq_slot_s *s, const void *reply);
};

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

/* loop.c */
int pq_bthread_start(pq_bthread_t *t, char *errstr, size_t errstr_size);
void pq_bthread_free(pq_bthread_t *t);
/* Binds this thread's listener; port 0 binds any port and writes it to *port. */
int pq_bthread_listen(pq_bthread_t *t, int *port, char *errstr, size_t errstr_size);
int pq_bthread_init(pq_bthread_t *t, pq_broker_t *b, int no, char *errstr, size_t errstr_size);
/* Thread-safe: asks the loop to look at stop / next_bc. */
void pq_bthread_poke(pq_bthread_t *t);

/* slots (slot.c) */
/* The slot at a 1-based index (1 .. t->nslots). */
pq_slot_t *pq_slot_at(pq_bthread_t *t, uint32_t idx);
/* Frees the slot table (after the loop ran; what slots still hold is freed too). */
void pq_slots_free(pq_bthread_t *t);
/* A free slot for req, run by ops (borrowed, static), or NULL when the table is full. */
pq_slot_t *pq_slot_get(pq_bthread_t *t, pq_path_t path, struct evhttp_request *req,
                       const pq_slot_ops_t *ops);
void pq_slot_release(pq_slot_t *s);
void *pq_slot_handle(const pq_slot_t *s);
/* The slot behind a handle if it is still the same request, else NULL. */
pq_slot_t *pq_slot_from_handle(pq_bthread_t *t, void *handle);
/* For a Redis callback whose opaque is a slot handle: the reply's bookkeeping
 * (pq_rconn_replied), then the slot if it is still the same request, else NULL. */
pq_slot_t *pq_slot_replied(redisAsyncContext *ac, void *reply, void *handle);

/* http.c: replies. Every reply goes through pq_http_reply so it is counted. Errors on the
 * OpenAI-compatible paths (chat, models) also carry "param": null and "code" (= type). */
void pq_http_reply(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *body, size_t len);
/* Starts a chunked reply (headers now, the body in evhttp_send_reply_chunk calls, then
 * evhttp_send_reply_end), counted as pq_http_reply counts. */
void pq_http_reply_start(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code);
void pq_http_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *type, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Writes s JSON-escaped (without quotes) into out (size >= 1, always NUL-terminated); truncates at
 * a character boundary. Returns the length written. Shared by the error bodies of http.c and
 * chat.c. */
size_t pq_http_json_escape(char *out, size_t size, const char *s);
/* 503 "job not accepted: <why>; retry" with Retry-After (counted as unavailable). */
void pq_http_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                         const char *retry_after, const char *why);
/* Answers s's request with o as compact JSON (500 when it cannot be written); takes o (NULL:
 * out of memory). The slot stays the caller's. */
void pq_http_reply_json(pq_slot_t *s, int code, json_t *o);
/* Authenticates a request. Returns 0 and sets *tenant (borrowed from the config, NULL in open
 * mode), or -1 after answering 401. */
int pq_http_auth(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **tenant);

/* Refuses a request whose head RFC 9112 says to refuse and libevent lets through: a header
 * name with whitespace or another non-token character (also "Name : value"), Content-Length
 * given twice or not plain digits ("+5"), HTTP/1.1 without exactly one Host, and a NUL byte in
 * the request line or a header (libevent cuts the value there: an Idempotency-Key "a\0b" would
 * be "a"). Returns 0, or -1 after answering 400 (JSON error naming what is wrong) with
 * Connection: close, since the bytes after a head like that cannot be trusted to start the
 * next request. Called once per request, before any handler. */
int pq_http_check_head(pq_bthread_t *t, struct evhttp_request *req);

/* 405 with Allow. */
void pq_http_method_not_allowed(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                                const char *allow);

/* ops.c: GET /v1/health, GET /v1/parked (aggregated from the workers' health keys), POST
 * /v1/parked/{route}/replay and DELETE /v1/parked/{route} (requests the workers read from the
 * route's ops hash); POST /v1/dlq/redrive goes to redrive.c. path is the request's path. */
void pq_ops_serve(pq_bthread_t *t, struct evhttp_request *req, const char *path);

/* The EVALSHA of pq_script_job_create for a new job (tenant, id) with its request hash, route
 * and callback_url (NULL: none), the one layout of its KEYS and ARGV: fills argv/lens
 * (PQ_JOB_CREATE_ARGC entries), the keys and numbers kept in b, the strings borrowed. Returns
 * 0, or -1 when a key does not fit. (intake.c) */
#define PQ_JOB_CREATE_ARGC 12
typedef struct {
    char key[512], ikey[512], now[24], ttl[24];
} pq_job_create_buf_t;
int pq_job_create_argv(const pq_conf_t *conf, const char *tenant, const char *id, const char *hash,
                       const char *route, const char *callback_url, pq_job_create_buf_t *b,
                       const char **argv, size_t *lens);

/* redrive.c: POST /v1/dlq/redrive. The scan of promptq.dlq runs on the broker's redrive thread
 * (Kafka reads block); the answer comes back to the loop that owns the request. */
void pq_redrive_serve(pq_bthread_t *t, struct evhttp_request *req);
/* Starts the redrive thread with its own consumer, producer and Redis connection (main
 * thread, before the HTTP threads run). Returns 0, or -1 with errstr set. */
int pq_redrive_start(pq_broker_t *b, char *errstr, size_t errstr_size);
/* Stops the redrive thread: queued redrives are answered 503 through their loops, a running
 * scan ends after its delivery reports. Call it while the loops still run (before stopping
 * them) so those answers are served; later redrive requests get 503. NULL-safe, repeatable. */
void pq_redrive_stop(pq_broker_t *b);
/* Frees what pq_redrive_start made (stops first if needed); after the loops are joined. */
void pq_redrive_free(pq_broker_t *b);

/* intake.c: POST /v1/jobs */
void pq_intake_post(pq_bthread_t *t, struct evhttp_request *req);
/* Queues the job of a slot whose id, tenant, route, hash and payload are set (job_create, then
 * produce or spool). The answer comes through pq_intake_durable or an error reply. */
void pq_intake_submit(pq_slot_t *s);
/* A slot for the new job of env (id, model and request hash set) holding its id, tenant,
 * route and hash; the caller owns it. NULL after answering 503 (no slot free). Shared by
 * POST /v1/jobs and chat completions. */
pq_slot_t *pq_intake_slot_get(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                              const pq_envelope_t *env, const char *tenant,
                              const pq_slot_ops_t *ops);
/* Slot ops of POST /v1/jobs: the timeouts of the idempotency claim and of intake (Redis
 * create, ack deadline); at stop what still waits for Kafka goes to the spool; on release an
 * idempotency claim whose job never became durable is given up. */
extern const pq_slot_ops_t pq_intake_ops;
/* Takes over a slot whose job is ready (as for pq_intake_submit): with an Idempotency-Key
 * (idem, not NULL) it goes through pq_idem_start with the hash of the request body, else
 * straight to pq_intake_submit. */
/* Makes s's job durable (after claiming idem, when set); then durable(s, spooled) answers or
 * waits. An idempotent repeat of a durable job goes to repeat(s, spooled) instead. */
void pq_intake_start(pq_slot_t *s, const char *idem, const void *body, size_t len,
                     void (*durable)(pq_slot_t *s, int spooled),
                     void (*repeat)(pq_slot_t *s, int spooled));
/* 503 + Retry-After for a job that could not be accepted. */
void pq_intake_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                           const char *why);
/* 202 for POST /v1/jobs (releases the slot). */
void pq_intake_accepted(pq_slot_t *s, int spooled);
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
 * answer comes through done(s, err) on the slot's loop). Returns PQ_OK, PQ_ERR_UNAVAILABLE (full or
 * closing), PQ_ERR_TOO_LARGE or another error; on error the slot is untouched. */
pq_err_t pq_bspool_append(pq_slot_t *s, void (*done)(pq_slot_t *s, pq_err_t err));
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
/* GET /v1/jobs?status=&after=&limit=: the tenant's jobs, newest first (OpenAI list shape). */
void pq_jobs_list(pq_bthread_t *t, struct evhttp_request *req);
void pq_jobs_redis_reply(pq_slot_t *s, const void *reply);
void pq_jobs_timeout(pq_slot_t *s);
/* DELETE /v1/jobs/{id}: cancels a queued or parked job. */
void pq_jobs_delete(pq_bthread_t *t, struct evhttp_request *req, const char *id);
void pq_jobs_cancel_reply(pq_slot_t *s, const void *reply);
void pq_jobs_cancel_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
void pq_jobs_cancel_timeout(pq_slot_t *s);

/* chat.c: POST /v1/chat/completions, sync waiters, GET /v1/models */
void pq_chat_post(pq_bthread_t *t, struct evhttp_request *req);
/* The chat job of s is durable (Kafka or spool): wait for its result. Also used for an
 * idempotent repeat whose job exists. */
void pq_chat_wait(pq_slot_t *s);
void pq_chat_redis_reply(pq_slot_t *s, const void *reply);
void pq_chat_timeout(pq_slot_t *s);
/* A reply-channel message "<tenant>:<id>" (from the subscriber). */
void pq_chat_notify(pq_bthread_t *t, const char *msg, size_t len);
/* The subscription is (again) confirmed: reads every waiter's record (messages may have been
 * missed while it was down). */
void pq_chat_subscribed(pq_bthread_t *t);
/* Removes a slot from the waiter table if it is in it (slot release). */
void pq_chat_unlink(pq_slot_t *s);
int pq_chat_thread_init(pq_bthread_t *t);
void pq_chat_thread_free(pq_bthread_t *t);
/* Answers every waiter 504 (stop deadline). */
void pq_chat_stop_waiters(pq_bthread_t *t);
void pq_models_get(pq_bthread_t *t, struct evhttp_request *req, const char *id);
/* OpenAI-shaped error for the chat path: {"error":{"message","type","param":null,"code"}}. */
void pq_chat_error(pq_bthread_t *t, struct evhttp_request *req, int code, const char *type,
                   const char *errcode, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* rsub.c: the loop's subscriber connection */
/* Subscribes to the reply channel: each message goes to message(t, payload, len), each
 * (re)confirmed subscription to confirmed(t). */
int pq_rsub_start(pq_bthread_t *t, void (*message)(pq_bthread_t *t, const char *msg, size_t len),
                  void (*confirmed)(pq_bthread_t *t));
void pq_rsub_stop(pq_bthread_t *t);
/* Drops the subscriber connection and reconnects (not from a hiredis callback). */
void pq_rsub_reset(pq_bthread_t *t);

/* idem.c: Idempotency-Key (DESIGN.md §4 promptq:idem:{tenant}:{key}) */
/* Reads the request's Idempotency-Key. Returns 0 with *key NULL (none) or set (borrowed from
 * the request), or -1 after answering 400. */
int pq_idem_header(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **key);
/* Claims the key for the slot (its id, tenant and body_hash set). The outcome: the slot's job is
 * submitted (first use), or answered / waited for as the first use's job (repeat), or 422. */
/* first(s) submits the job of a first use; repeat(s, spooled) answers a repeat of a durable
 * one (s->id is then the first use's job). */
void pq_idem_start(pq_slot_t *s, const char *key, void (*first)(pq_slot_t *s),
                   void (*repeat)(pq_slot_t *s, int spooled));
void pq_idem_reply(pq_slot_t *s, const void *reply);
void pq_idem_timeout(pq_slot_t *s);
/* The slot's job is durable: the key now names it for good. */
void pq_idem_durable(pq_slot_t *s, int spooled);
/* On release: a claim whose job never became durable is given up. */
void pq_idem_release(pq_slot_t *s);

/* ratelimit.c: per-tenant token buckets, process-wide */
struct pq_ratelimit_s *pq_ratelimit_new(void);
void pq_ratelimit_destroy(struct pq_ratelimit_s *rl);
/* Takes one token for tenant. Returns 0, or the seconds to wait (>= 1) when limited. */
int pq_ratelimit_take(struct pq_ratelimit_s *rl, const char *tenant, double rps, int burst);
/* Answers 429 + Retry-After when tenant is over its rate; returns -1 then, else 0. */
int pq_http_ratelimit(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                      const char *tenant);

/* rconn.c: the thread's Redis connection */
int pq_rconn_start(pq_bthread_t *t);
void pq_rconn_stop(pq_bthread_t *t);
/* 1 if commands may be sent now. */
int pq_rconn_usable(const pq_bthread_t *t);
/* Resolves the configured Redis host without blocking the loop: a numeric host (127.0.0.1,
 * ::1) is handed to fn at once, a name is looked up with evdns (/etc/hosts, then DNS) and fn
 * runs on the loop with a numeric address (IPv4 preferred), or NULL when the lookup failed.
 * *pending (t->dns_rc or t->dns_sub) holds the lookup while it runs. Returns 0, or -1 when no
 * lookup could be started (fn did not run). */
int pq_rconn_resolve(pq_bthread_t *t, struct evdns_getaddrinfo_request **pending,
                     void (*fn)(pq_bthread_t *t, const char *addr));
/* Cancels the lookups still running and frees the loop's evdns base (before the base). */
void pq_rconn_dns_free(pq_bthread_t *t);

/* SHA1 of a script for EVALSHA; the scripts are loaded on every (re)connect. script is one of
 * pq_script_job_create, pq_script_job_drop, pq_bscript_idem_claim, pq_bscript_cancel,
 * pq_bscript_batch_status, pq_bscript_jobs_list. */
const char *pq_rconn_sha(const char *script);

/* Broker-only scripts (rconn.c).
 * idem_claim: KEYS[1] idem key; ARGV[1] value "<id> <body hash> p", ARGV[2] ttl ms. Returns nil
 * when this call set the key (first use), else the current value.
 * cancel: KEYS[1] job key, KEYS[2] the callbacks set; ARGV[1] result record JSON, ARGV[2] error
 * JSON, ARGV[3] now ms. Moves queued|parked to cancelled with the result (a batch line also
 * counts as failed in the batch named by its "batch" field; a job created with a callback_url
 * queues its callback); returns 1, or the status it found ("" when the record is absent). */
extern const char pq_bscript_idem_claim[];
extern const char pq_bscript_cancel[];
/* jobs_list (GET /v1/jobs): KEYS[1] the tenant's job index (pq_key_jobs); ARGV[1] job key
 * prefix "<prefix>job:<tenant>:", ARGV[2] after (a job id, "" from the newest), ARGV[3] limit,
 * ARGV[4] status wanted ("" any), ARGV[5] most index entries to scan. Walks the index newest
 * first from after, reads each record, drops entries whose record is gone, and stops after
 * limit + 1 matches or cap entries. Returns {0} if after is not in the index, else {1, more,
 * cursor, id1, status, route, created_at, updated_at, attempts, provider, model, id2, ...}
 * (absent fields ""): more is 1 if entries remain; cursor is "" unless the scan stopped at cap
 * with fewer than limit + 1 matches, then it is the last entry scanned (kept in the index): the
 * next page starts after it. */
extern const char pq_bscript_jobs_list[];

/* kprod.c: the thread's producer */
/* Creates the loop's producer; a message's delivery report goes to the member of dr for the
 * topic it was produced to (dr is copied). */
int pq_kprod_start(pq_bthread_t *t, const pq_kprod_dr_t *dr, char *errstr, size_t errstr_size);
/* Flushes for at most timeout_ms, then destroys the producer. */
void pq_kprod_stop(pq_bthread_t *t, int timeout_ms);
/* A producer configuration with the broker's defaults (statistics for up/down, reconnect
 * backoff, message timeout). Returns a new conf or NULL with errstr set. */
rd_kafka_conf_t *pq_kprod_conf(const pq_conf_t *conf, char *errstr, size_t errstr_size);
/* 1 if a statistics JSON shows a broker connection in state UP. */
int pq_kprod_stats_up(const char *json, size_t len);

/* Sends a command whose reply goes to cb(t's context, reply, priv), or nowhere when cb is NULL;
 * cb must first call pq_rconn_replied (or pq_slot_replied). Returns 0, or -1 if it could not be
 * sent. */
int pq_rconn_send(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                  int argc, const char **argv, const size_t *argvlen);
int pq_rconn_sendf(pq_bthread_t *t, void (*cb)(redisAsyncContext *, void *, void *), void *priv,
                   const char *fmt, ...);
/* Bookkeeping for a reply of pq_rconn_send: returns the loop. */
pq_bthread_t *pq_rconn_replied(redisAsyncContext *ac, const void *reply);

/* Broker script for batches (rconn.c). batch_status: KEYS[1] batch key; ARGV[1]
 * "|from1|from2|", ARGV[2] new status, ARGV[3] field for the time, ARGV[4] now seconds,
 * ARGV[5..] more field value pairs. Returns 1 if the status was one of from and is now the new
 * one (and the fields are set), else 0: the compare-and-set behind every batch state change,
 * e.g. the once-guard of finalization. */
extern const char pq_bscript_batch_status[];

/* files.c: /v1/files */
void pq_files_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest);
/* Stores a file (fields id, object..., body) for tenant: HSET + ZADD, no reply wanted. Returns
 * 0 if sent. */
int pq_files_store(pq_bthread_t *t, const char *tenant, const char *id, const char *filename,
                   const char *purpose, const char *body, size_t len, int64_t lines);
void pq_files_new_id(char *out, size_t size);
/* api.c: what the OpenAI-shaped endpoints share */
/* Tenant of a request: the API key's, or in open mode ?tenant= (default "default"). Returns 0,
 * or -1 after answering. */
int pq_api_tenant(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, char *out,
                  size_t size);
/* 503 "store (Redis) unavailable" with Retry-After: 1, for the files and batches paths. */
void pq_api_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path);
/* Slot ops of the files, batches, list and ops requests: a timeout in PQ_SLOT_API is
 * pq_api_timeout. */
extern const pq_slot_ops_t pq_api_ops;
/* 503 for a slot in PQ_SLOT_API whose Redis reply did not come. */
void pq_api_timeout(pq_slot_t *s);
/* Starts a list request: takes a slot (s->ctx = limit) and sends the list script for set skey
 * (members' hashes prefixed pfx), newest first after `after` ("" from the top), limit + 1
 * entries with up to 9 named fields each (nfields 0: every field); the reply goes to fn(s,
 * reply). Answers 503 itself when no slot is free or Redis is down. */
void pq_api_list(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                 void (*fn)(pq_slot_t *, const void *), const char *skey, const char *pfx,
                 const char *after, long limit, int nfields, const char **fields);
/* The id of a files or batches path, rest "/{id}" or "/{id}{sub}": copies it into id
 * (PQ_ID_MAX + 1 bytes; max_len <= PQ_ID_MAX) and returns 0 (no sub path) or 1 (sub). Returns
 * -1 after answering 404 for another sub path, an id longer than max_len or one ok rejects;
 * object names the kind in the message ("No such Batch object"). */
int pq_api_path_id(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char *rest,
                   const char *sub, size_t max_len, int (*ok)(const char *), const char *object,
                   char *id);
/* The limit and after query parameters of a list request: returns limit (dflt when absent) or
 * -1 when it is not 1 to max; after is set to the after parameter if after_ok accepts it, else
 * "". */
long pq_api_query_limit(struct evhttp_request *req, char *after, size_t after_size, long dflt,
                        long max, int (*after_ok)(const char *));
/* Sends a command for slot s in PQ_SLOT_API; the reply goes to the slot's step handler
 * fn(s, reply). Arms the Redis timer. Returns 0 or -1 (nothing sent). */
int pq_api_send(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv,
                const size_t *argvlen);
/* pq_api_send for NUL-terminated arguments (at most 16). */
int pq_api_sendv(pq_slot_t *s, void (*fn)(pq_slot_t *, const void *), int argc, const char **argv);

/* batch.c: /v1/batches */
void pq_batch_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest);
void pq_batch_delivered(pq_bthread_t *t, const rd_kafka_message_t *m);
int pq_batch_thread_init(pq_bthread_t *t);
void pq_batch_thread_free(pq_bthread_t *t);

/* bspool.c: appends a record for a caller that is not a slot; fn(arg, err) runs on t's loop. */
pq_err_t pq_bspool_append_fn(pq_bthread_t *t, const char *topic, const char *key,
                             const void *payload, size_t len, void (*fn)(void *, pq_err_t),
                             void *arg);

int64_t pq_mono_us(void);

/* The loop running on this thread (NULL on the main thread): for libevent callbacks whose
 * argument cannot name it. */
extern _Thread_local pq_bthread_t *pq_bthread_current;

#endif
