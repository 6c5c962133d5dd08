/* libFuzzer target for the spool's segment reader (common/src/spool.c, what recovery runs on
 * every segment after a crash): a segment's bytes as the disk returned them. Checks: the valid
 * prefix is inside the buffer and is exactly the records reported; each record's payload
 * decodes and, framed again, gives the same bytes (CRC included). With a first byte of 0 the
 * rest is first cut into (topic, key, value) pieces and framed, so the fuzzer also walks
 * segments of valid records followed by its own bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "promptq/spool.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FRAME_HEADER PQ_SPOOL_FRAME_HEADER

typedef struct {
    const uint8_t *buf;
    size_t len, next, records;
} walk_t;

static void on_record(void *opaque, size_t offset, size_t framed_len)
{
    walk_t *w = opaque;
    pq_spool_rec_t rec;
    uint8_t *again;
    size_t n;

    if (offset != w->next || framed_len < FRAME_HEADER || offset + framed_len > w->len)
        abort();
    memset(&rec, 0, sizeof(rec));
    if (pq_spool_payload_decode(w->buf + offset + FRAME_HEADER, framed_len - FRAME_HEADER, &rec) !=
        0)
        abort(); /* the scan called it valid */
    n = pq_spool_frame_size(rec.topic_len, rec.key_len, rec.value_len);
    if (n != framed_len || !(again = malloc(n)))
        abort();
    if (pq_spool_frame_encode(again, n, rec.topic, rec.topic_len, rec.key, rec.key_len, rec.value,
                              rec.value_len) != n ||
        memcmp(again, w->buf + offset, n) != 0)
        abort();
    free(again);
    w->next = offset + framed_len;
    w->records++;
}

static void scan(const uint8_t *buf, size_t len)
{
    walk_t w = {buf, len, 0, 0};
    pq_spool_scan_t res;

    memset(&res, 0, sizeof(res));
    pq_spool_scan(buf, len, &res, on_record, &w);
    if (res.valid_bytes > len || res.valid_bytes != w.next || res.records != w.records)
        abort();
    if ((res.status == PQ_SPOOL_SCAN_OK) != (res.valid_bytes == len))
        abort();
    if (res.status != PQ_SPOOL_SCAN_OK && !res.why)
        abort();
}

/* Frames pieces of the input: each piece is [topic_len][key_len][value_len] (one byte each)
 * followed by those bytes; what is left after the last whole piece is appended raw. */
static void framed(const uint8_t *data, size_t size)
{
    size_t cap = size * 8 + 64, used = 0, i = 0; /* a 4-byte piece frames to ~20 */
    uint8_t *buf = malloc(cap);

    if (!buf)
        abort();
    while (i + 3 <= size) {
        size_t tl = data[i] % 32 + 1, kl = data[i + 1] % 16, vl = data[i + 2];
        size_t n;
        if (i + 3 + tl + kl + vl > size)
            break;
        n = pq_spool_frame_encode(buf + used, cap - used, (const char *)data + i + 3, tl,
                                  data + i + 3 + tl, kl, data + i + 3 + tl + kl, vl);
        if (n == 0)
            abort();
        used += n;
        i += 3 + tl + kl + vl;
    }
    memcpy(buf + used, data + i, size - i);
    used += size - i;
    scan(buf, used);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 0 && data[0] == 0)
        framed(data + 1, size - 1);
    else
        scan(data, size);
    return 0;
}
