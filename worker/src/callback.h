/* Callback dispatch: POSTs finished jobs' result records to their callback_url (DESIGN.md §3,
 * §5), signed with x-promptq-signature, retried with backoff.
 *
 * The queue lives in Redis, not in a worker: the terminal compare-and-set (or the broker's
 * cancel) puts the job key on the callbacks sorted set, due now, in the same script that ends the
 * job, so a callback is queued exactly once per job and survives any process. Every worker
 * polls the set every callbacks.poll_ms (and at once after queueing one itself), claims due
 * entries by pushing their score past the POST's timeout, sends, and records the outcome: the
 * record's callback field becomes delivered, failed (callbacks.max_attempts used, or the
 * receiver answered 410) or refused (host not allowed, no secret); otherwise the entry is
 * re-scored for the next try. A worker that dies mid-POST leaves a claim that expires, and
 * another worker sends again: receivers get each callback at least once (the body and job id
 * are the same each time; only t in the signature changes).
 *
 * A worker whose config has no callbacks.allow_hosts sends nothing and does not poll. */
#ifndef PQ_WORKER_CALLBACK_H
#define PQ_WORKER_CALLBACK_H

#include <stddef.h>
#include <event2/event.h>

#include "promptq/conf.h"
#include "promptq/metrics.h"
#include "redis.h"

typedef struct pq_callbacks_s pq_callbacks_t;

/* base, conf, metrics: borrowed, must outlive the dispatcher. It has its own Redis connection
 * and HTTP client (none when callbacks.allow_hosts is empty). Polling starts at once. Returns
 * NULL with errstr set. */
pq_callbacks_t *pq_callbacks_new(struct event_base *base, const pq_conf_t *conf,
                                 pq_metrics_t *metrics, char *errstr, size_t errstr_size);

/* A callback was queued by this process: look for due ones now rather than at the next poll. */
void pq_callbacks_kick(pq_callbacks_t *cb);

/* Stopping: claim nothing more (POSTs in flight run on until destroy). */
void pq_callbacks_stop(pq_callbacks_t *cb);

/* Drops its Redis connection, cancels POSTs in flight (their claims expire and another worker
 * sends them) and frees. NULL is a no-op. */
void pq_callbacks_destroy(pq_callbacks_t *cb);

#endif
