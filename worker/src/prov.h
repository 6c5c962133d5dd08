/* Runtime state of the configured providers, shared by every job on a worker loop (DESIGN.md §8):
 *
 *   - API keys rotated round-robin among rested ones. A 429 rests what it is about: that key
 *     for that model (the circuit of (provider, model) holds the rests), for its Retry-After
 *     capped at max_rest_ms, or without one for a jittered backoff (1 s doubling up to
 *     max_rest_ms) over the 429s in a row; other models and other keys are untouched. A key
 *     that answered 401 (or a quota error for the whole key) rests key_rest_ms for every
 *     model;
 *   - calls in flight capped by max_concurrency, the rest wait in a FIFO on the loop (no busy
 *     waiting: a timer or a released slot wakes the queue);
 *   - rpm and tpm token buckets per key (one second of burst; tpm may go into debt by one
 *     request, so large requests pass and the average rate holds), applying to all traffic;
 *   - a circuit breaker per (provider, model): opens on circuit_failures consecutive failures or
 *     a failure ratio >= circuit_ratio over the last circuit_window calls (at least
 *     min(circuit_window, 10) calls), stays open circuit_cooldown_ms, then half-opens for ONE
 *     probe (the configured probe, or a job's call when no probe is in flight; with half_open
 *     "call" always the next job's call); while it stays open it is probed every
 *     min(circuit_cooldown_ms, probe_interval_ms);
 *   - exchanged tokens per (provider, key), for providers whose adapter has token hooks
 *     (providers/provider.h; watsonx: IBM Cloud IAM): one exchange in flight per key, waiters
 *     queue, the token cached until the refresh time its token_parse gives;
 *   - metrics: promptq_worker_attempts_total{provider,model,outcome} and
 *     promptq_worker_provider_seconds{provider}.
 * Everything runs on the loop's thread. */
#ifndef PQ_WORKER_PROV_H
#define PQ_WORKER_PROV_H

#include <stdint.h>
#include <sys/queue.h>
#include <event2/event.h>
#include <jansson.h>
#include "promptq/conf.h"
#include "promptq/err.h"
#include "promptq/metrics.h"
#include "http.h"

typedef struct pq_provs_s pq_provs_t;
typedef struct pq_prov_s pq_prov_t;
typedef struct pq_circuit_s pq_circuit_t;

/* Slot granted: key >= 0 is the key index (0 for a provider without keys) and err PQ_OK; the
 * slot is held until pq_prov_release. No usable key: key -1 and err PQ_ERR_AUTH (every key
 * this waiter may use was refused) or PQ_ERR_RATE_LIMITED (they all rest; wake_ms is the
 * monotonic time the first one wakes). */
typedef void(pq_slot_cb)(void *opaque, int key, pq_err_t err, int64_t wake_ms);

/* A call waiting for a slot; embedded in its owner, which fills cost, excluded, cb, opaque. */
typedef struct pq_slot_wait_s {
    TAILQ_ENTRY(pq_slot_wait_s) link;
    int queued;
    int priority;       /* interactive lane: queued ahead of every waiter without it */
    double cost;        /* estimated tokens of the call (tpm) */
    pq_circuit_t *circ; /* the model's circuit: its keys' 429 rests apply; NULL = none */
    uint64_t excluded;  /* bit i: key i (i < 64) refused this waiter, do not use it */
    pq_slot_cb *cb;
    void *opaque;
} pq_slot_wait_t;

/* token: borrowed for the callback only; NULL with err set on failure (PQ_ERR_AUTH when the
 * exchange refused the key). */
typedef void(pq_token_cb)(void *opaque, const char *token, pq_err_t err);

typedef struct pq_token_wait_s {
    TAILQ_ENTRY(pq_token_wait_s) link;
    int queued;
    int key;
    uint64_t round; /* the exchange it waits for */
    pq_token_cb *cb;
    void *opaque;
} pq_token_wait_t;

/* base, conf, http, metrics: borrowed, must outlive the result. NULL + errstr on failure. */
pq_provs_t *pq_provs_new(struct event_base *base, const pq_conf_t *conf, pq_http_t *http,
                         pq_metrics_t *metrics, char *errstr, size_t errstr_size);

/* Cancels probes and token exchanges and frees. Waiters must be gone. NULL is a no-op. */
void pq_provs_destroy(pq_provs_t *ps);

/* The state of a configured provider (p points into conf->providers). Borrowed. */
pq_prov_t *pq_provs_get(pq_provs_t *ps, const pq_provider_conf_t *p);

/* Provider config of a state. Borrowed. */
const pq_provider_conf_t *pq_prov_conf(const pq_prov_t *pv);

/* The key string of index key, NULL for a provider without keys. Borrowed. */
const char *pq_prov_key(const pq_prov_t *pv, int key);

/* Asks for a call slot. Returns 0 when granted now (*key set; the callback does not run), 1
 * when queued (the callback runs later, from the loop), -1 when no key is usable (*err and
 * *wake_ms as in pq_slot_cb). */
int pq_prov_acquire(pq_prov_t *pv, pq_slot_wait_t *w, int *key, pq_err_t *err, int64_t *wake_ms);

/* Leaves the queue (no callback). No-op when not queued. */
void pq_prov_cancel(pq_prov_t *pv, pq_slot_wait_t *w);

/* Gives a slot back. cost: what acquire charged; tokens: tokens the provider reported using
 * (corrects the tpm bucket), or -1 when unknown (or when the call never happened: refund
 * with refund = 1). */
void pq_prov_release(pq_prov_t *pv, int key, double cost, int64_t tokens, int refund);

/* A key rests ms milliseconds for every model: it answered 401 (auth = 1) or a quota error
 * about the whole key (auth = 0). A 429 about one model is pq_circuit_rate_limited. */
void pq_prov_key_rest(pq_prov_t *pv, int key, int64_t ms, int auth);

/* 1 when calls to the provider carry an exchanged token instead of the API key (its adapter
 * has token hooks). */
int pq_prov_uses_tokens(const pq_prov_t *pv);

/* The exchanged token of key: returns 0 with *token set (borrowed: use it before returning to
 * the loop), 1 when the exchange is in flight (the callback runs later), -1 on a local failure
 * (*err set). */
int pq_prov_token(pq_prov_t *pv, int key, pq_token_wait_t *w, const char **token, pq_err_t *err);

/* Which token of key is cached now (a number that changes with every token stored; 0: none):
 * what a call remembers of the token it sent, for pq_prov_token_invalidate. */
uint64_t pq_prov_token_gen(const pq_prov_t *pv, int key);

/* Leaves the token queue (no callback). No-op when not queued. */
void pq_prov_token_cancel(pq_prov_t *pv, pq_token_wait_t *w);

/* The chat endpoint refused the token of generation gen: drop it from the cache if it is still
 * the cached one. */
void pq_prov_token_invalidate(pq_prov_t *pv, int key, uint64_t gen);

/* Token exchanges started (tests, stats). */
uint64_t pq_prov_token_fetches(const pq_prov_t *pv);

/* The circuit of (provider, model) of target (created on first use). Borrowed. */
pq_circuit_t *pq_prov_circuit(pq_prov_t *pv, const pq_target_t *target);

/* 1: call allowed; 2: allowed as the half-open probe (report it with probe = 1, or give the
 * role back with pq_circuit_probe_abort); 0: open, skip the target. When the circuit half-opens
 * the worker's own configured probe takes the role at once, so 2 is only seen when that probe
 * could not be started (then a job's call probes instead). */
int pq_circuit_allow(pq_circuit_t *c);

/* Outcome of a call: failure = 1 for a health failure (connect, timeout, 5xx, malformed).
 * probe: the call was the half-open probe. */
void pq_circuit_record(pq_circuit_t *c, int failure, int probe);

/* Closes the circuit whatever the probes say (an operator's replay); why is logged. A probe in
 * flight still reports: a failed one opens it again. No-op when closed. */
void pq_circuit_force_close(pq_circuit_t *c, const char *why);

/* The probe role given by pq_circuit_allow was not used. */
void pq_circuit_probe_abort(pq_circuit_t *c);

/* Counts one attempt of (provider, model) with its outcome (PQ_OK or an error code) and, when
 * latency_ms >= 0, its latency. */
void pq_circuit_count(pq_circuit_t *c, pq_err_t outcome, int64_t latency_ms);

/* key answered 429 for this (provider, model): it rests for this model only, for
 * retry_after_ms (>= 0) capped at the provider's max_rest_ms, or without one (-1) for a
 * jittered backoff over the 429s in a row. Returns the rest in ms. */
int64_t pq_circuit_rate_limited(pq_circuit_t *c, int key, int64_t retry_after_ms);

/* key answered this model: its 429 backoff starts over. */
void pq_circuit_key_ok(pq_circuit_t *c, int key);

/* 1 when some key may call this model now (no 401 rest, no 429 rest for the model); else 0
 * with *wake_ms (may be NULL) the monotonic time the first one wakes. Buckets (rpm/tpm) are
 * not looked at: they wait, they do not refuse. */
int pq_circuit_keys_ready(const pq_circuit_t *c, int64_t *wake_ms);

/* "closed", "open" or "half_open". */
const char *pq_circuit_state(const pq_circuit_t *c);

/* 1 when a job's call may go to the circuit now: closed, or half-open with the probe role
 * free. */
int pq_circuit_available(const pq_circuit_t *c);

/* Circuit state changes of any (provider, model): available = 1 when a circuit closed (a probe
 * succeeded), 0 when it opened. p, model: borrowed for the call. */
typedef void(pq_circuit_cb)(void *opaque, const pq_provider_conf_t *p, const char *model,
                            int available);

/* Sets the listener (one; NULL to clear). */
void pq_provs_set_listener(pq_provs_t *ps, pq_circuit_cb *cb, void *opaque);

/* 1 when target may take a call now: its circuit lets it through (pq_circuit_available) and
 * some key is not resting for its model (pq_circuit_keys_ready). */
int pq_provs_target_available(pq_provs_t *ps, const pq_target_t *t);

/* Circuits not closed (summaries). */
size_t pq_provs_open_circuits(const pq_provs_t *ps);

/* Health of every circuit: a new JSON array of {"provider", "model", "circuit" (closed | open |
 * half_open), "last_probe": null | {"ok", "at" (ms since the epoch), "detail"},
 * "status_page": null | statuspage.io indicator (none, minor, major, critical)}.
 * A provider with status_url polls it every 5 s; "major" or "critical" makes probes fail. */
json_t *pq_provs_health(const pq_provs_t *ps);

#endif
