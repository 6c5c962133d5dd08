/* Provider runtime internals shared by prov.c (keys, slots, rate limits, tokens, construction)
 * and circuit.c (circuits, probes, status pages). Not for other files: they use prov.h. */
#ifndef PQ_WORKER_PROV_INT_H
#define PQ_WORKER_PROV_INT_H

#include <stdint.h>
#include <sys/queue.h>
#include "prov.h"
#include "promptq/metrics.h"
#include "providers/provider.h"

#define NOUTCOMES                                                                                  \
    (2 + (PQ_ERR__RETRYABLE_END - PQ_ERR__RETRYABLE_BEGIN) +                                       \
     (PQ_ERR__PERMANENT_END - PQ_ERR__PERMANENT_BEGIN))
#define PROBE_MAX_BYTES  (256 * 1024)
#define TOKEN_TIMEOUT_MS 10000 /* a token exchange, at most (and the provider's timeout) */
#define TOKEN_MAX_BYTES  (64 * 1024)
#define MIN_RATIO_CALLS  10
#define STATUS_POLL_MS   5000
#define STATUS_MAX_BYTES (64 * 1024)

enum { C_CLOSED, C_OPEN, C_HALF_OPEN };

typedef struct bucket_s {
    double level, rate, cap; /* rate: units per ms; rate 0 = unlimited */
    int64_t last;
} bucket_t;

typedef struct tok_s {
    char *token;
    uint64_t gen;       /* of the cached token (pq_prov_token_gen); 0: none */
    int64_t refresh_at; /* monotonic ms */
    pq_http_req_t *req;
    uint64_t round; /* exchanges answered so far; waiters of this one carry it */
    TAILQ_HEAD(, pq_token_wait_s) waiters;
} tok_t;

typedef struct pkey_s {
    pq_prov_t *pv;
    int idx;
    int64_t rest_until; /* monotonic ms */
    int rest_auth;
    bucket_t rpm, tpm;
    tok_t tok;
} pkey_t;

struct pq_circuit_s {
    pq_prov_t *pv;
    const pq_target_t *target;
    int state;
    int consecutive;
    uint8_t *ring; /* 1 = failure */
    /* 429 rests of this model, per key (monotonic ms), and 429s in a row per key (the backoff
     * of a 429 without Retry-After) */
    int64_t *rest_until;
    int *rate_hits;
    int ring_size, ring_pos, ring_count, ring_fail;
    int probe_inflight;
    int probe_own; /* the configured probe is ours (not a job's call) */
    pq_http_req_t *probe_req;
    pq_token_wait_t probe_tw;
    struct event *timer;
    int64_t probe_at;       /* wall ms of the last probe result, 0 = none */
    int probe_ok;           /* its outcome */
    char probe_what[96];    /* its summary ("ok (HTTP 200, 3 ms)", "connect (HTTP 0, 1 ms)") */
    uint64_t probes_failed; /* failed probes since the circuit last opened (summaries) */
    pq_counter_t *outcomes[NOUTCOMES];
    pq_circuit_t *next;
};

struct pq_prov_s {
    pq_provs_t *ps;
    const pq_provider_conf_t *conf;
    const pq_provider_ops_t *ops;
    pkey_t *keys;
    int nkeys; /* at least 1 (a virtual key for a keyless provider) */
    int rr;
    int inflight;
    /* slot waiters in FIFO order: the priority ones (the interactive lane) are served first;
     * two queues, so that a wait is queued and served in O(1) */
    TAILQ_HEAD(pq_slot_queue_s, pq_slot_wait_s) pqueue, queue;
    struct event *pump;
    pq_circuit_t *circuits;
    pq_hist_t *latency;
    uint64_t token_fetches;
    struct event *status_timer; /* status_url poll */
    pq_http_req_t *status_req;
    char indicator[16]; /* statuspage.io status.indicator ("none", "minor", "major", ...), "" */
};

struct pq_provs_s {
    struct event_base *base;
    const pq_conf_t *conf;
    pq_http_t *http;
    pq_metrics_t *metrics;
    pq_prov_t *provs;
    size_t nprovs;
    pq_circuit_cb *listener;
    void *listener_opaque;
    uint64_t token_gens; /* tokens stored so far, every key of every provider: tok_t.gen */
};

/* prov.c: s as a Prometheus label value in buf (backslash, quote and newline escaped). */
void prov_label_value(const char *s, char *buf, size_t size);

#endif
