/* The broker's local spool (DESIGN.md G1, §9): jobs that Kafka did not confirm in time are
 * written here, fsync'd, and re-produced later by a drainer.
 *
 * On disk: a directory holding a lock file "LOCK" (flock LOCK_EX, the holder's pid as text) and
 * segment files "spool-<seq, 16 decimal digits>.log", oldest first. A segment is a sequence of
 * records, each framed as
 *     u32 LE payload length | u32 LE CRC32C(payload) | payload
 * and the payload (format version 1) is
 *     u8 version (1) | u16 LE topic length | topic | u32 LE key length | key | value (the rest)
 * The topic is 1..65535 bytes; key and value may be empty. Nothing else is stored: acks are kept
 * in memory only, so records handed to Kafka whose segment was not yet deleted are produced again
 * after a restart (at-least-once; the job id makes that harmless, G3).
 *
 * Recovery (pq_spool_open): every segment is read and every record checked. At the first record
 * that does not check out the segment is cut (ftruncate to the last good record, then fsync):
 *   - torn tail (PQ_WARN "spool-...: cut N bytes of torn tail at offset X (why)"): the file ends
 *     inside a header or a payload, the rest of the file is zero bytes (preallocated blocks after
 *     a crash), or the last record has a bad CRC and ends exactly at the end of the file;
 *   - corruption (PQ_ERR): a bad CRC, length or payload with more data behind it. Framing after a
 *     bad record cannot be trusted, so everything from it to the end of the file is cut; the cut
 *     bytes are first copied to "<segment>.cut-<offset>" (never read by the spool) so an operator
 *     can inspect them.
 * Segments left empty are deleted. Surviving records are all pending. New records always go to a
 * new segment (seq = highest seen + 1); old segments are never appended to.
 *
 * Threads: pq_spool_append may be called from any number of threads at once and never blocks
 * on I/O (it copies the record into the writer's queue under a short mutex). One writer thread,
 * started by pq_spool_open, takes everything queued, writes it with pwritev, fdatasyncs once per
 * batch (group commit; the directory is fsync'd when a segment is created or deleted), and then
 * calls each record's callback in append order. pq_spool_next/ack/nack (the drain side) are
 * thread-safe too; acks typically come from the Kafka delivery-report thread.
 *
 * Wiring into the broker (sketch):
 *   startup   opts.max_bytes = conf->broker.spool_max_bytes; opts.max_record_bytes = the largest
 *             produce (message.max.bytes + headroom); sp = pq_spool_open(spool_dir, &opts, ...)
 *             (fail to start on NULL: the error says who holds the lock).
 *   intake    no delivery report within ack_timeout_ms, or Kafka known down, and the error is
 *             retryable: pq_spool_append(sp, topic, id, idlen, payload, len, cb, slot). Permanent
 *             produce errors are never spooled. PQ_ERR_UNAVAILABLE -> 503 + Retry-After,
 *             PQ_ERR_TOO_LARGE -> 413. cb runs on the writer thread: hop to the slot's loop
 *             (e.g. event_active or a locked queue + evuser) and answer 202 "spooled" on PQ_OK,
 *             503 otherwise.
 *   drainer   one thread: while Kafka is up, pq_spool_next(sp, 1000, &rec) and produce
 *             rec->topic/key/value with the rec as message opaque; in the delivery report
 *             pq_spool_ack (delivered) or pq_spool_nack (failed: back off before the next
 *             pq_spool_next). Cap the records in flight. A restart drains what is left by
 *             itself (pq_spool_open loads it as pending).
 *   /readyz   unready when pq_spool_full(sp) (and Kafka is down); metrics from pq_spool_stats
 *             (pending_records, pending_bytes, appended / fsyncs = records per fsync).
 *   shutdown  stop the drainer (ack/nack what it holds), then pq_spool_close(sp).
 */
#ifndef PROMPTQ_SPOOL_H
#define PROMPTQ_SPOOL_H

#include <stddef.h>
#include <stdint.h>
#include "promptq/err.h"

typedef struct pq_spool_s pq_spool_t;

#define PQ_SPOOL_FRAME_HEADER     8u /* u32 length + u32 crc */
#define PQ_SPOOL_PAYLOAD_VERSION  1u
#define PQ_SPOOL_PAYLOAD_OVERHEAD 7u /* version + topic length + key length */

/* Test hook, called by the writer thread after a batch is written and before it is fsync'd, with
 * the number of records in the batch. Returning non-zero makes the writer behave as if fsync had
 * failed with EIO: the batch is cut from the file and every callback gets an error. */
typedef int (*pq_spool_hook_t)(void *opaque, size_t nrecords);

typedef struct {
    /* Cap on the bytes of all live segments plus the bytes queued for writing (frame headers
     * included). An append that would pass it is refused. 0: 1 GiB. */
    uint64_t max_bytes;
    /* A segment is closed and a new one started when the next record would take it past this
     * size (a record is never split; a segment holds at least one). 0: 16 MiB. */
    uint64_t segment_bytes;
    /* Cap on one framed record (header + payload). 0: 8 MiB. Only applies to appends: recovery
     * accepts any record whose CRC checks, so lowering the cap never loses spooled jobs. */
    uint32_t max_record_bytes;
    pq_spool_hook_t test_hook; /* NULL in production */
    void *test_hook_opaque;
} pq_spool_opts_t;

/* Called once per appended record, on the spool's writer thread, with no spool lock held:
 * PQ_OK once the record is fsync'd (the broker may answer 202 "spooled"), or
 * PQ_ERR_UNAVAILABLE if writing or syncing failed (nothing was acknowledged: answer 503). Keep
 * it short (hop back to the caller's own loop); it may call pq_spool_append, never
 * pq_spool_close. */
typedef void (*pq_spool_cb_t)(void *opaque, pq_err_t err);

/* A record handed out by pq_spool_next. The pointers stay valid until the record is given back
 * with pq_spool_ack or pq_spool_nack. topic is NUL-terminated. */
typedef struct pq_spool_rec_s {
    const char *topic;
    size_t topic_len;
    const void *key; /* NULL when key_len is 0 */
    size_t key_len;
    const void *value;
    size_t value_len;
    uint64_t seq;    /* segment the record lives in ... */
    uint64_t offset; /* ... and its byte offset there: for log lines */
} pq_spool_rec_t;

typedef struct {
    uint64_t pending_records; /* durable and not yet acked (handed out or not) */
    uint64_t pending_bytes;   /* their framed size */
    uint64_t inflight;        /* handed out by pq_spool_next, not yet acked or nacked */
    uint64_t disk_bytes;      /* size of all live segment files */
    uint64_t queued_bytes;    /* appended, not yet committed */
    uint64_t segments;        /* live segment files */
    uint64_t appended;        /* records committed by the writer (callback got PQ_OK) */
    uint64_t append_failed;   /* records whose callback got an error */
    uint64_t refused_full;    /* appends refused because max_bytes was reached */
    uint64_t refused_too_large;
    uint64_t batches; /* committed or failed write batches */
    uint64_t fsyncs;  /* data syncs of segment files (one per batch) */
    uint64_t acked;   /* records acked by the drainer */
    uint64_t nacked;
    uint64_t segments_deleted;
    uint64_t recovered_records; /* found valid by pq_spool_open */
    uint64_t cut_bytes;         /* bytes cut by pq_spool_open (torn and corrupt) */
    uint64_t cut_torn;          /* segments whose torn tail was cut */
    uint64_t cut_corrupt;       /* segments cut at a corrupt record */
} pq_spool_stats_t;

/* Fills opts with the defaults. */
void pq_spool_opts_init(pq_spool_opts_t *opts);

/* Opens (creating it and its parents if missing) and locks the spool directory, recovers and
 * validates the existing segments (see above) and starts the writer thread. opts: borrowed,
 * copied; NULL means defaults. Returns a new spool, or NULL with errstr set (e.g. the directory is
 * locked by another process or another pq_spool_t: "spool dir ./spool is locked by pid 123"). */
pq_spool_t *pq_spool_open(const char *dir, const pq_spool_opts_t *opts, char *errstr,
                          size_t errstr_size);

/* Flushes the queue (every queued record is written and its callback called), stops the writer,
 * closes the segments (files with pending records stay for the next open) and releases the lock.
 * Records still handed out are freed: stop the drainer first. NULL is a no-op. */
void pq_spool_close(pq_spool_t *spool);

/* Queues one record: topic (NUL-terminated, 1..65535 bytes), key and value are borrowed and
 * copied before returning. Never blocks on I/O. Returns PQ_OK (cb will be called exactly once,
 * later, on the writer thread), or at once, without calling cb:
 *   PQ_ERR_TOO_LARGE    the framed record is over max_record_bytes (permanent: do not retry);
 *   PQ_ERR_INVALID      empty or over-long topic;
 *   PQ_ERR_UNAVAILABLE  the spool is full (max_bytes) or closing (retryable: 503 + Retry-After);
 *   PQ_ERR_NOMEM. */
pq_err_t pq_spool_append(pq_spool_t *spool, const char *topic, const void *key, size_t key_len,
                         const void *value, size_t value_len, pq_spool_cb_t cb, void *opaque);

/* Hands out the oldest pending record that is not already out (nacked records come first, then
 * records in segment order, including ones appended since the drain started; only committed
 * records are handed out). Waits up to timeout_ms for one (0: do not wait, < 0: forever).
 * Returns PQ_OK with *rec set (owned by the spool until acked or nacked), PQ_ERR_TIMEOUT if
 * there is none, PQ_ERR_CANCELLED if the spool is closing, or PQ_ERR_INTERNAL if the record
 * could not be read back (I/O error or its CRC no longer checks; it stays pending and is logged).
 */
pq_err_t pq_spool_next(pq_spool_t *spool, int timeout_ms, pq_spool_rec_t **rec);

/* Marks a handed-out record as delivered and frees it (rec: taken). A segment that is no longer
 * written to and whose records are all acked is deleted (unlink + directory fsync, done by the
 * calling thread); a fully acked current segment is retired by the writer when it is idle. */
void pq_spool_ack(pq_spool_t *spool, pq_spool_rec_t *rec);

/* Gives a handed-out record back, pending again (rec: taken; the same record is handed out
 * again by a later pq_spool_next, before any newer one). */
void pq_spool_nack(pq_spool_t *spool, pq_spool_rec_t *rec);

/* Pending (durable, not yet acked) records and their framed bytes, for /readyz and metrics.
 * Either pointer may be NULL. */
void pq_spool_pending(pq_spool_t *spool, uint64_t *records, uint64_t *bytes);

/* 1 if the free room under max_bytes is below min(max_record_bytes, max_bytes / 8): /readyz
 * turns unready and the broker answers 503 + Retry-After (appends that still fit are accepted
 * until pq_spool_append refuses them). */
int pq_spool_full(pq_spool_t *spool);

/* A consistent snapshot of the counters. Average records per fsync = appended / fsyncs. */
void pq_spool_stats(pq_spool_t *spool, pq_spool_stats_t *stats);

/* Pure framing helpers (also used by tests and tools to craft or read segment files). */

/* Framed size of a record, or 0 if the topic is empty or longer than 65535 bytes or the total
 * does not fit in 32 bits. */
size_t pq_spool_frame_size(size_t topic_len, size_t key_len, size_t value_len);

/* Writes one framed record into buf (at least pq_spool_frame_size() bytes); returns the bytes
 * written, or 0 if the record cannot be framed or buf is too small. */
size_t pq_spool_frame_encode(void *buf, size_t size, const char *topic, size_t topic_len,
                             const void *key, size_t key_len, const void *value, size_t value_len);

typedef enum {
    PQ_SPOOL_SCAN_OK = 0,  /* the whole buffer is valid records */
    PQ_SPOOL_SCAN_TORN,    /* a torn tail follows the valid prefix */
    PQ_SPOOL_SCAN_CORRUPT, /* a corrupt record with data behind it follows the valid prefix */
} pq_spool_scan_status_t;

typedef struct {
    pq_spool_scan_status_t status;
    size_t valid_bytes; /* length of the valid prefix (the cut offset) */
    size_t records;     /* valid records in it */
    const char *why;    /* static text when status != OK, e.g. "bad crc" */
} pq_spool_scan_t;

/* Checks a segment's contents (buf: borrowed, len bytes) and classifies what follows the
 * longest valid prefix, as recovery does. Pure. If on_record is not NULL it is called for each
 * valid record with its offset and framed length. */
void pq_spool_scan(const void *buf, size_t len, pq_spool_scan_t *res,
                   void (*on_record)(void *opaque, size_t offset, size_t framed_len), void *opaque);

/* Decodes one record's payload (after the 8-byte header; buf borrowed). Returns 0 and points the
 * fields of rec into buf (topic is not NUL-terminated here; seq and offset are left 0), or -1
 * if the payload is malformed. Pure. */
int pq_spool_payload_decode(const void *buf, size_t len, pq_spool_rec_t *rec);

#endif
