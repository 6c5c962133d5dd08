/* Partitions and backlogs (parts.h). */
#include "parts.h"
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include "promptq/log.h"

pq_route_state_t *pq_parts_route_by_topic(const pq_worker_t *w, const char *name)
{
    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next)
        if (strcmp(rs->topic, name) == 0)
            return rs;
    return NULL;
}

/* PQ_T_REQUESTS, PQ_T_BULK, PQ_T_RETRY (*rs set) or -1. */
int pq_parts_topic_index(const pq_worker_t *w, const char *name, pq_route_state_t **rs)
{
    *rs = NULL;
    if (strcmp(name, w->topics[PQ_T_REQUESTS]) == 0)
        return PQ_T_REQUESTS;
    if (strcmp(name, w->topics[PQ_T_BULK]) == 0)
        return PQ_T_BULK;
    if ((*rs = pq_parts_route_by_topic(w, name)))
        return PQ_T_RETRY;
    return -1;
}

pq_part_t *pq_parts_find(pq_worker_t *w, int topic, pq_route_state_t *rs, int32_t partition)
{
    pq_part_t *p;
    TAILQ_FOREACH(p, &w->parts, link)
    if (p->topic == topic && p->rs == rs && p->partition == partition)
        return p;
    return NULL;
}

void pq_part_unref(pq_part_t *part)
{
    if (!part || --part->refcnt > 0)
        return;
    pq_offsets_clear(&part->offsets);
    free(part);
}

int pq_backlog_push(pq_backlog_t *b, rd_kafka_message_t *m)
{
    if (b->count == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        rd_kafka_message_t **n = malloc(cap * sizeof(*n));
        if (!n)
            return -1;
        for (size_t i = 0; i < b->count; i++)
            n[i] = b->m[(b->head + i) & (b->cap - 1)];
        free(b->m);
        b->m = n;
        b->cap = cap;
        b->head = 0;
    }
    b->m[(b->head + b->count) & (b->cap - 1)] = m;
    b->count++;
    b->bytes += m->len;
    return 0;
}

rd_kafka_message_t *pq_backlog_pop(pq_backlog_t *b)
{
    rd_kafka_message_t *m;

    if (b->count == 0)
        return NULL;
    m = b->m[b->head];
    b->head = (b->head + 1) & (b->cap - 1);
    b->count--;
    b->bytes -= m->len;
    return m;
}

int pq_backlog_full(const pq_backlog_t *b)
{
    return b->count >= b->max || b->bytes >= b->max_bytes;
}

/* Drops the messages of partition p (p NULL: every message); returns how many. They were
 * never taken in: nothing past them was stored, they are fetched again (or by the new owner). */
size_t pq_backlog_purge(pq_backlog_t *b, const pq_part_t *p)
{
    size_t kept = 0, n = b->count, dropped = 0;

    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = b->m[(b->head + i) & (b->cap - 1)];
        if (!p ||
            (m->partition == p->partition && strcmp(rd_kafka_topic_name(m->rkt), p->name) == 0)) {
            b->bytes -= m->len;
            rd_kafka_message_destroy(m);
            dropped++;
        } else {
            b->m[(b->head + kept++) & (b->cap - 1)] = m;
        }
    }
    b->count = kept;
    return dropped;
}

/* Wakes the fetcher of resumed partitions. librdkafka 2.0.2 serves a resume on its main thread
 * and never wakes the partition's broker thread, which goes on sleeping until something else
 * wakes it (a metadata refresh, a heartbeat, the end of a fetch.wait.max.ms wait): with debug
 * "fetch", "fetch decide: updating to version N" came 200-800 ms after the resume. A seek wakes
 * it ("seek done"), and is served after the resume (same partition op queue), so each resumed
 * partition whose position is known is sought to that same position. l: the resumed partitions;
 * offsets are set here. */
void pq_parts_wake_fetch(pq_worker_t *w, rd_kafka_t *rk, rd_kafka_topic_partition_list_t *l)
{
    rd_kafka_topic_partition_list_t *s = rd_kafka_topic_partition_list_new(l->cnt);
    rd_kafka_error_t *e;

    for (int i = 0; i < l->cnt; i++) {
        pq_route_state_t *rs;
        int topic = pq_parts_topic_index(w, l->elems[i].topic, &rs);
        pq_part_t *p = topic < 0 ? NULL : pq_parts_find(w, topic, rs, l->elems[i].partition);
        if (p && p->next_polled >= 0)
            rd_kafka_topic_partition_list_add(s, p->name, p->partition)->offset = p->next_polled;
    }
    if (s->cnt > 0 && (e = rd_kafka_seek_partitions(rk, s, 0))) {
        PQ_WARN("seek after resume: %s", rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_topic_partition_list_destroy(s);
}

void pq_worker_offset_done(pq_worker_t *w, pq_part_t *part, uint64_t seq)
{
    if (!part)
        return;
    if (pq_offsets_done(&part->offsets, seq) && !part->revoked && !w->no_store) {
        part->dirty = 1;
        event_active(w->ev_flush, 0, 0);
    }
}
