#include "offsets.h"

#include <stdlib.h>
#include <string.h>

void pq_offsets_init(pq_offsets_t *o)
{
    memset(o, 0, sizeof(*o));
    o->next = -1;
}

void pq_offsets_clear(pq_offsets_t *o)
{
    free(o->off);
    free(o->done);
    pq_offsets_init(o);
}

static int grow(pq_offsets_t *o)
{
    size_t cap = o->cap ? o->cap * 2 : 64;
    int64_t *off = malloc(cap * sizeof(*off));
    uint8_t *done = malloc(cap);

    if (!off || !done) {
        free(off);
        free(done);
        return -1;
    }
    for (size_t i = 0; i < o->count; i++) {
        size_t j = (o->head + i) % o->cap;
        off[i] = o->off[j];
        done[i] = o->done[j];
    }
    free(o->off);
    free(o->done);
    o->off = off;
    o->done = done;
    o->cap = cap;
    o->head = 0;
    return 0;
}

uint64_t pq_offsets_push(pq_offsets_t *o, int64_t offset)
{
    size_t i;

    if (o->count == o->cap && grow(o) != 0)
        return UINT64_MAX;
    i = (o->head + o->count) % o->cap;
    o->off[i] = offset;
    o->done[i] = 0;
    o->count++;
    return o->head_seq + o->count - 1;
}

int pq_offsets_done(pq_offsets_t *o, uint64_t seq)
{
    int64_t before = o->next;

    if (seq < o->head_seq || seq >= o->head_seq + o->count)
        return 0;
    o->done[(o->head + (size_t)(seq - o->head_seq)) % o->cap] = 1;
    while (o->count > 0 && o->done[o->head]) {
        o->next = o->off[o->head] + 1;
        o->head = (o->head + 1) % o->cap;
        o->count--;
        o->head_seq++;
    }
    if (o->count > 0)
        o->next = o->off[o->head];
    return o->next != before;
}

size_t pq_offsets_count(const pq_offsets_t *o)
{
    return o->count;
}
