/* Per-partition bookkeeping of the offsets in flight (G5): offsets are taken in order, finish in
 * any order, and the offset to store is always the lowest one still in flight (or one past the
 * last finished one when none is). */
#ifndef PQ_WORKER_OFFSETS_H
#define PQ_WORKER_OFFSETS_H

#include <stddef.h>
#include <stdint.h>

typedef struct pq_offsets_s {
    int64_t *off;
    uint8_t *done;
    size_t cap;
    size_t head;       /* index of the oldest entry */
    size_t count;      /* entries from head */
    uint64_t head_seq; /* sequence number of the entry at head */
    int64_t next;      /* offset to store: lowest in flight, or last finished + 1; -1 = none */
} pq_offsets_t;

void pq_offsets_init(pq_offsets_t *o);
void pq_offsets_clear(pq_offsets_t *o);

/* Appends an offset (must be larger than every offset taken before). Returns its sequence number
 * for pq_offsets_done, or UINT64_MAX when out of memory. */
uint64_t pq_offsets_push(pq_offsets_t *o, int64_t offset);

/* Marks an entry finished. Returns 1 when the offset to store (o->next) advanced. */
int pq_offsets_done(pq_offsets_t *o, uint64_t seq);

/* Entries not yet finished or not yet popped. */
size_t pq_offsets_count(const pq_offsets_t *o);

#endif
