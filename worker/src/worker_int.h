/* Internals shared by the worker's modules: worker.c (setup, signals, generations), the consumer
 * (partitions, offsets, flow control), park.c (parking and replay), parts.c and job.c. */
#ifndef PQ_WORKER_INT_H
#define PQ_WORKER_INT_H

#include <stdint.h>
#include <sys/queue.h>
#include <event2/event.h>
#include <event2/event_struct.h>
#include <event2/http.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include "promptq/conf.h"
#include "promptq/envelope.h"
#include "promptq/metrics.h"
#include "callback.h"
#include "http.h"
#include "offsets.h"
#include "prov.h"
#include "redis.h"

/* worker.h names it too; not included here, so the modules below worker.c never reach up. */
typedef struct pq_worker_s pq_worker_t;

enum { PQ_T_REQUESTS = 0, PQ_T_BULK, PQ_T_RESULTS, PQ_T_DLQ, PQ_T_COUNT };
#define PQ_T_RETRY       PQ_T_COUNT
#define MSG_KEY_HEADROOM 1024 /* message.max.bytes counts the key too */
#define RESULT_HEADROOM                                                                            \
    (64 * 1024) /* a result record's fields around the response */ /* a route's retry topic        \
                                                                      (pq_part_t.rs names it) */

/* The providers and routes of one config (SIGHUP loads a new one). Jobs hold a reference: a
 * retired generation lives until its last job ends. */
typedef struct pq_gen_s {
    pq_conf_t *conf; /* owned, except the first one (main's) */
    int owned;
    pq_provs_t *provs;
    int refs;              /* 1 while current + 1 per job */
    struct pq_gen_s *next; /* retired list */
} pq_gen_t;

/* Parking and replay state of one route, by name (kept for the worker's life, so pointers to
 * it stay valid across reloads). */
typedef struct pq_route_state_s {
    char *name;
    char topic[256];    /* its retry topic */
    int active;         /* in the current config */
    int down;           /* a job parked: replay waits for a probe (or the recheck) */
    int64_t recheck_ms; /* monotonic: replay again (ramped) even without a probe, when some
                           target's circuit is not open */
    int64_t held_wake;  /* wall ms: the held head expires (deadline or park TTL); 0 none */
    /* replay ramp: 20 jobs/s, doubling every second, then unlimited */
    int64_t ramp_start; /* monotonic ms */
    double next_slot;   /* monotonic ms: start of the next replayed job */
    int nheld;          /* retry partitions held (sought back and paused) */
    size_t inflight;    /* jobs of this route's retry topic in flight */
    uint64_t parked, replayed, reparked, expired; /* since start */
    /* operator requests (pq_key_route_ops), read every second */
    struct pq_worker_s *w; /* its worker (set at creation), for the ops read's reply */
    char ops_key[320];
    int ops_pending;     /* the read is in flight */
    int ops_loaded;      /* read once: until then its retry partitions are held */
    int64_t replay_seen; /* wall ms of the last replay request acted on */
    struct pq_drop_s {   /* tenants' drops: parked before `before` = dropped */
        char *tenant;
        int64_t before;
    } * drops;
    size_t ndrops;
    int64_t *hi; /* per partition: one past the highest offset this worker parked there */
    struct pq_route_state_s *next;
} pq_route_state_t;

/* One assigned partition. Jobs keep a reference, so it outlives its revocation until they end. */
typedef struct pq_part_s {
    int topic;            /* PQ_T_REQUESTS, PQ_T_BULK or PQ_T_RETRY */
    pq_route_state_t *rs; /* PQ_T_RETRY: its route */
    const char *name;     /* topic name (borrowed from the worker or rs) */
    int held;             /* retry partition sought back to held_offset and paused by us */
    int64_t held_offset;
    int32_t partition;
    int revoked;         /* offsets now belong to the new owner: never store them */
    int dirty;           /* offsets.next advanced since the last store */
    int refcnt;          /* 1 for the assignment + 1 per job */
    int64_t next_taken;  /* one past the highest offset taken in; -1 none */
    int64_t next_polled; /* one past the highest offset polled (backlog or taken in), or where
                            a hold sought back to: the position a resume seeks to; -1 unknown */
    pq_offsets_t offsets;
    TAILQ_ENTRY(pq_part_s) link;
} pq_part_t;

/* Messages polled but not yet taken in (one per lane), oldest first: consumption goes on while
 * every slot is busy, and a freed slot starts the next job at once. Bounded by count and bytes;
 * the lane's consumer pauses when it is full. Messages are owned (rd_kafka_message_destroy). */
typedef struct pq_backlog_s {
    rd_kafka_message_t **m;
    size_t cap;  /* ring size (a power of two) */
    size_t head; /* index of the oldest */
    size_t count;
    size_t bytes;     /* payload bytes held */
    size_t max;       /* pause at this many messages */
    size_t max_bytes; /* or at this many bytes */
} pq_backlog_t;

typedef struct pq_job_s pq_job_t;
TAILQ_HEAD(pq_job_list, pq_job_s);
TAILQ_HEAD(pq_part_list, pq_part_s);

typedef struct pq_worker_metrics_s {
    pq_counter_t *received, *succeeded, *failed, *expired, *dlq, *invalid, *republished, *conflicts,
        *poison, *provider_calls, *provider_errors, *retries, *duplicates, *offset_resets,
        *handed_back, *redis_waits, *produce_errors, *skips, *cache_hits, *cache_misses,
        *cache_stores, *parked, *reparked, *replayed;
    pq_gauge_t *inflight;
    pq_hist_t *latency;
} pq_worker_metrics_t;

struct pq_worker_s {
    const pq_conf_t *conf;
    struct event_base *base;

    /* One group member per process: two members of one process join every rebalance at the same
     * instant, and librdkafka 2.0.2's mock cluster (promptq-devkafka) then fails the follower's
     * SyncGroup and rebalances again, sometimes for minutes. The lanes are two queues instead:
     * cqueue (the consumer queue: bulk and retry topics, rebalances, errors) and iqueue, to which
     * each <prefix>requests partition's queue is forwarded on assignment, so a full bulk backlog
     * never delays an interactive message. */
    rd_kafka_t *consumer;
    rd_kafka_t *producer;
    rd_kafka_queue_t *cqueue, *iqueue, *pqueue;
    int cpipe[2], ipipe[2], ppipe[2];
    rd_kafka_topic_t *t_results, *t_dlq;
    char topics[PQ_T_COUNT][256];
    char *cluster_id;

    pq_http_t *http;
    pq_http_t *ihttp;          /* the interactive lane's provider calls: their own connections and
                                  libevent priority 0, so bulk transfers never delay them */
    pq_callbacks_t *callbacks; /* callback_url POSTs (callback.h) */
    char callbacks_key[256];   /* the callbacks sorted set */
    pq_gen_t *gen;     /* current providers and routes (keys, slots, rate limits, circuits) */
    pq_gen_t *retired; /* older ones still used by jobs */
    pq_route_state_t *routes;
    size_t retry_inflight; /* jobs from retry topics in flight (replay takes at most half) */
    int64_t last_summary_ms;
    char instance[160];
    char reply_prefix[192]; /* "<redis prefix>reply:": the only channels reply_to may name */
    char health_key[320];
    int health_pending;
    int no_admin; /* CreateTopics timed out once: use metadata auto-creation */
    pq_redis_t *redis;
    pq_redis_t *iredis; /* the interactive lane's jobs (its own connection) */
    char owner[192];    /* lease owner: instance id + per-process nonce */
    pq_envelope_limits_t limits;
    int64_t ttl_ms;
    size_t max_msg;      /* the producer's message.max.bytes minus a key/record headroom */
    size_t max_response; /* max_response_bytes, capped so a result record fits in max_msg */

    struct event *ev_cqueue, *ev_iqueue, *ev_idrain, *ev_lanes, *ev_pqueue, *ev_drain, *ev_safety,
        *ev_stats, *ev_flush;
    struct event *ev_routes, *ev_replay, *ev_health, *ev_sighup;
    struct event *ev_sigterm, *ev_sigint, *ev_grace, *ev_final;

    struct pq_part_list parts; /* current assignment */
    struct pq_job_list jobs;   /* every job in flight */
    struct pq_job_list redis_wait;
    struct pq_job_list lane_wait; /* bulk jobs waiting for interactive work to end */
    pq_job_t **table;             /* (tenant, id) -> job holding it in this process */
    /* finished jobs' memory, kept for the next ones (job.c): a job is ~5 KB, above malloc's
     * small bins, and allocating one per message cost 8 % of the worker at 10,000 in flight;
     * at most job_pool_max (max_inflight; 0 once the worker is torn down) */
    pq_job_t *job_pool;
    size_t njob_pool, job_pool_max;
    size_t table_mask;

    size_t inflight;
    size_t max_inflight;
    pq_backlog_t backlog[2]; /* [0] bulk lane, [1] interactive */
    /* lanes: interactive jobs in flight; bulk jobs start only while every job in flight stays
     * below max_inflight - reserve (a share kept for the interactive lane) */
    size_t iinflight, reserve;
    int paused;  /* the bulk lane's partitions (bulk and retry topics): backlog full, Redis down
                    or stopping */
    int ipaused; /* the interactive lane's (<prefix>requests) */
    const char *pause_why[2]; /* why each lane paused (static strings) */
    int stopping;             /* SIGTERM: take no new work */
    int no_store;             /* grace over: store no more offsets */
    int64_t final_deadline_ms;
    int grace_ms;

    /* A job left (job.c calls it): drops the partition reference, frees its slot and re-checks
     * flow control. Set by the consumer (pq_consumer_init). */
    void (*job_gone)(struct pq_worker_s *w, pq_part_t *part);

    pq_metrics_t *metrics;
    pq_worker_metrics_t m;
    struct evhttp *mhttp; /* worker.metrics_listen: GET /metrics, /healthz; NULL when off */
};

/* worker.c, for job.c */

/* job.c, for worker.c */

/* Takes in one message (never drops it): parses, leases, runs it; delay_ms > 0 postpones its
 * begin (a replay's ramp slot). */
void pq_job_intake(pq_worker_t *w, pq_part_t *part, int topic, const rd_kafka_message_t *m,
                   int64_t delay_ms);

/* Redis is back: re-issue the steps of jobs that waited for it. */
void pq_job_redis_up(pq_worker_t *w);

/* A delivery report for a message produced by a job. */
void pq_job_delivered(pq_worker_t *w, const rd_kafka_message_t *m);

/* Grace period over: stop every job still in flight and release its lease if held. */
void pq_job_hand_back_all(pq_worker_t *w);

/* No interactive job in flight any more: bulk jobs waiting for the lane go on. */
void pq_job_lanes_release(pq_worker_t *w);

/* Frees every job (at exit). */
void pq_job_free_all(pq_worker_t *w);

#endif
