/* Idempotency-Key (idem.c). */
#ifndef PQ_BROKER_IDEM_H
#define PQ_BROKER_IDEM_H

#include "slot.h"

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

#endif
