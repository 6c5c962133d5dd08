/* The loop's request slots: a pooled table of requests waiting for Redis, Kafka or the spool,
 * found again through handles (index + generation); each slot's endpoint says what its timer,
 * the stop deadline and its release do (pq_slot_ops_t). */
#include "broker.h"
#include "rconn.h"
#include "slot.h"

#include <stdint.h>
#include <stdlib.h>

_Thread_local pq_bthread_t *pq_bthread_current;

pq_slot_t *pq_slot_at(pq_bthread_t *t, uint32_t idx)
{
    uint32_t i = idx - 1;

    return &t->chunks[i / PQ_BROKER_SLOT_CHUNK][i % PQ_BROKER_SLOT_CHUNK];
}

static void slot_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_slot_t *s = arg;

    if (s->state != PQ_SLOT_FREE && s->ops->timeout)
        s->ops->timeout(s);
}

static int slots_grow(pq_bthread_t *t)
{
    pq_slot_t *chunk;
    uint32_t first = t->nslots + 1;

    if (t->nslots >= PQ_BROKER_SLOTS_MAX)
        return -1;
    chunk = calloc(PQ_BROKER_SLOT_CHUNK, sizeof(*chunk));
    if (!chunk)
        return -1;
    t->chunks[t->nslots / PQ_BROKER_SLOT_CHUNK] = chunk;
    t->nslots += PQ_BROKER_SLOT_CHUNK;
    for (uint32_t i = 0; i < PQ_BROKER_SLOT_CHUNK; i++) {
        pq_slot_t *s = &chunk[i];

        s->t = t;
        s->idx = first + i;
        s->gen = 1;
        event_assign(&s->timer, t->base, -1, 0, slot_timer_cb, s);
        s->next_free = (i + 1 < PQ_BROKER_SLOT_CHUNK) ? first + i + 1 : t->free_head;
    }
    t->free_head = first;
    return 0;
}

pq_slot_t *pq_slot_get(pq_bthread_t *t, pq_path_t path, struct evhttp_request *req,
                       const pq_slot_ops_t *ops)
{
    pq_slot_t *s;

    if (!t->free_head && slots_grow(t))
        return NULL;
    s = pq_slot_at(t, t->free_head);
    t->free_head = s->next_free;
    s->next_free = 0;
    s->path = path;
    s->ops = ops;
    s->req = req;
    s->created = 0;
    s->payload = NULL;
    s->payload_len = 0;
    s->chat.stream = s->chat.include_usage = s->chat.in_table = s->need_read = 0;
    s->idem.owner = s->idem.durable = 0;
    s->chat.deadline_ms = 0;
    s->chat.wait_next = 0;
    s->idem.key = NULL;
    s->idem.tries = 0;
    s->id[0] = s->tenant[0] = s->hash[0] = s->route[0] = s->body_hash[0] = '\0';
    s->api.step = 0;
    s->ctx = NULL;
    s->ctx_free = NULL;
    s->api.fn = NULL;
    t->inflight++;
    pq_gauge_add(t->b->m_inflight, 1);
    return s;
}

void pq_slot_release(pq_slot_t *s)
{
    pq_bthread_t *t = s->t;

    event_del(&s->timer);
    if (s->ops->release)
        s->ops->release(s);
    free(s->payload);
    s->payload = NULL;
    free(s->callback_url);
    s->callback_url = NULL;
    if (s->ctx && s->ctx_free)
        s->ctx_free(s->ctx);
    s->ctx = NULL;
    s->req = NULL;
    s->state = PQ_SLOT_FREE;
    s->gen++;
    s->next_free = t->free_head;
    t->free_head = s->idx;
    t->inflight--;
    pq_gauge_add(t->b->m_inflight, -1);
}

void *pq_slot_handle(const pq_slot_t *s)
{
    return (void *)(uintptr_t)(((uint64_t)s->gen << 32) | s->idx);
}

pq_slot_t *pq_slot_from_handle(pq_bthread_t *t, void *handle)
{
    uint64_t h = (uint64_t)(uintptr_t)handle;
    uint32_t idx = (uint32_t)(h & 0xffffffffu), gen = (uint32_t)(h >> 32);
    pq_slot_t *s;

    if (idx == 0 || idx > t->nslots)
        return NULL;
    s = pq_slot_at(t, idx);
    if (s->gen != gen || s->state == PQ_SLOT_FREE)
        return NULL;
    return s;
}

pq_slot_t *pq_slot_replied(redisAsyncContext *ac, void *reply, void *handle)
{
    pq_bthread_t *t = pq_rconn_replied(ac, reply);

    return handle ? pq_slot_from_handle(t, handle) : NULL;
}

void pq_slots_free(pq_bthread_t *t)
{
    for (uint32_t i = 0; i < t->nslots / PQ_BROKER_SLOT_CHUNK; i++) {
        for (uint32_t j = 0; j < PQ_BROKER_SLOT_CHUNK; j++) {
            event_del(&t->chunks[i][j].timer);
            free(t->chunks[i][j].payload);
            free(t->chunks[i][j].idem.key);
            if (t->chunks[i][j].ctx && t->chunks[i][j].ctx_free)
                t->chunks[i][j].ctx_free(t->chunks[i][j].ctx);
        }
        free(t->chunks[i]);
    }
}
