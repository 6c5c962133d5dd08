/* Request slots (slot.c): a request waiting for Redis, Kafka or the spool, and what its
 * endpoint does on a timeout, at stop and on release. */
#ifndef PQ_BROKER_SLOT_H
#define PQ_BROKER_SLOT_H

#include "broker.h"

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
    unsigned need_read : 1; /* chat: the record must be read again (a read failed); idem:
                             * waiting to claim again */
    /* chat.c: a sync waiter */
    struct pq_slot_chat_s {
        unsigned stream : 1;        /* answer server-sent events */
        unsigned include_usage : 1; /* stream_options.include_usage */
        unsigned in_table : 1;      /* linked into the thread's waiter table */
        int64_t deadline_ms;        /* monotonic: chat wait deadline */
        uint32_t wait_hash;
        uint32_t wait_next; /* chain in the waiter table, 1-based slot index */
    } chat;
    /* idem.c: an Idempotency-Key claim */
    struct pq_slot_idem_s {
        char *key;            /* owned: the Redis key promptq:idem:{tenant}:{key}, or NULL */
        unsigned owner : 1;   /* this request claimed key (released unless durable) */
        unsigned durable : 1; /* ... and made its job durable */
        int tries;
        int64_t deadline_ms;
        void (*first)(struct pq_slot_s *s);               /* a first use: submit */
        void (*repeat)(struct pq_slot_s *s, int spooled); /* a repeat of a durable job */
    } idem;
    void (*durable)(struct pq_slot_s *s, int spooled); /* intake: the job is durable */
    char body_hash[PQ_SHA256_HEX_LEN + 1];
    char id[PQ_ID_MAX + 1];
    char tenant[PQ_TENANT_MAX + 1];
    char hash[PQ_SHA256_HEX_LEN + 1];
    char route[PQ_BROKER_ROUTE_MAX + 1];
    /* the endpoint's own context (files, batches, ops, chat streams) */
    void *ctx; /* owned; freed with ctx_free on release */
    void (*ctx_free)(void *ctx);
    /* api.c: a PQ_SLOT_API request */
    struct pq_slot_api_s {
        int step;
        void (*fn)(struct pq_slot_s *s, const void *reply); /* the step's reply handler */
    } api;
};

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

#endif
