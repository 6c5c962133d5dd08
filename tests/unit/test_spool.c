/* The broker's spool: framing, recovery of crafted segment files, group commit, the
 * write-before-fsync fault point, caps, the lock and the drain side. Each test works in its own
 * mkdtemp directory. Set PQ_SPOOL_BENCH=1 to also run a throughput micro-benchmark. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <dirent.h>
#include <inttypes.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "promptq/crc32c.h"
#include "promptq/log.h"
#include "promptq/spool.h"
#include "promptq/util.h"

#define TOPIC "promptq.jobs"

/* ---- helpers ---- */

typedef struct {
    char dir[64];
} tdir_t;

static void tdir_make(tdir_t *t)
{
    strcpy(t->dir, "/tmp/pq-spool-test-XXXXXX");
    assert_non_null(mkdtemp(t->dir));
}

static void tdir_remove(tdir_t *t)
{
    DIR *d = opendir(t->dir);
    struct dirent *de;
    char path[512];

    if (!d)
        return;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", t->dir, de->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(t->dir);
}

/* Number of files in dir whose name starts with prefix. */
static int count_files(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    int n = 0;

    assert_non_null(d);
    while ((de = readdir(d)))
        if (strncmp(de->d_name, prefix, strlen(prefix)) == 0)
            n++;
    closedir(d);
    return n;
}

static off_t file_size(const char *dir, const char *name)
{
    char path[512];
    struct stat st;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    if (stat(path, &st) != 0)
        return -1;
    return st.st_size;
}

static void write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Deterministic record contents: key "k<t>-<i>", value of (i % 700) + 1 bytes. */
static size_t make_value(int t, int i, unsigned char *buf)
{
    size_t n = (size_t)(i % 700) + 1;

    for (size_t j = 0; j < n; j++)
        buf[j] = (unsigned char)(t * 31 + i * 7 + (int)j);
    return n;
}

static size_t frame(unsigned char *buf, size_t size, int t, int i)
{
    char key[32];
    unsigned char val[1024];
    size_t vl = make_value(t, i, val);

    snprintf(key, sizeof(key), "k%d-%d", t, i);
    return pq_spool_frame_encode(buf, size, TOPIC, strlen(TOPIC), key, strlen(key), val, vl);
}

/* Callback bookkeeping. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ok, failed;
} cbs_t;

static cbs_t cbs = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

static void cbs_reset(void)
{
    pthread_mutex_lock(&cbs.mu);
    cbs.ok = cbs.failed = 0;
    pthread_mutex_unlock(&cbs.mu);
}

static void on_done(void *opaque, pq_err_t err)
{
    (void)opaque;
    pthread_mutex_lock(&cbs.mu);
    if (err == PQ_OK)
        cbs.ok++;
    else
        cbs.failed++;
    pthread_cond_broadcast(&cbs.cv);
    pthread_mutex_unlock(&cbs.mu);
}

static int cbs_total(void)
{
    int n;

    pthread_mutex_lock(&cbs.mu);
    n = cbs.ok + cbs.failed;
    pthread_mutex_unlock(&cbs.mu);
    return n;
}

/* Waits until n callbacks have arrived (at most 20 s). */
static void cbs_wait(int n)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 20;
    pthread_mutex_lock(&cbs.mu);
    while (cbs.ok + cbs.failed < n)
        if (pthread_cond_timedwait(&cbs.cv, &cbs.mu, &ts) != 0)
            break;
    pthread_mutex_unlock(&cbs.mu);
    assert_true(cbs_total() >= n);
}

static pq_err_t append_ti(pq_spool_t *sp, int t, int i)
{
    char key[32];
    unsigned char val[1024];
    size_t vl = make_value(t, i, val);

    snprintf(key, sizeof(key), "k%d-%d", t, i);
    return pq_spool_append(sp, TOPIC, key, strlen(key), val, vl, on_done, NULL);
}

/* Checks a drained record against its deterministic contents; returns (t << 20) | i. */
static int check_rec(const pq_spool_rec_t *rec)
{
    int t, i, end = 0;
    char key[32];
    unsigned char val[1024];
    size_t vl;

    assert_string_equal(rec->topic, TOPIC);
    assert_int_equal(rec->topic_len, strlen(TOPIC));
    assert_true(rec->key_len < sizeof(key));
    memcpy(key, rec->key, rec->key_len);
    key[rec->key_len] = '\0';
    assert_int_equal(sscanf(key, "k%d-%d%n", &t, &i, &end), 2);
    assert_int_equal((size_t)end, rec->key_len);
    vl = make_value(t, i, val);
    assert_int_equal(rec->value_len, vl);
    assert_memory_equal(rec->value, val, vl);
    return t << 20 | i;
}

static pq_spool_t *open_dir(const char *dir, const pq_spool_opts_t *opts)
{
    char errstr[256] = "";
    pq_spool_t *sp = pq_spool_open(dir, opts, errstr, sizeof(errstr));

    if (!sp)
        fail_msg("pq_spool_open: %s", errstr);
    return sp;
}

/* Drains everything pending; checks each record; acks all (or nacks none). Returns count. */
static int drain_all(pq_spool_t *sp, int *ids, int max)
{
    pq_spool_rec_t *rec;
    int n = 0;

    while (pq_spool_next(sp, 0, &rec) == PQ_OK) {
        int id = check_rec(rec);
        if (ids && n < max)
            ids[n] = id;
        n++;
        pq_spool_ack(sp, rec);
    }
    return n;
}

/* ---- pure parts ---- */

static void test_crc32c(void **state)
{
    const char *v = "123456789";
    unsigned char buf[1000];
    uint32_t whole, parts;

    assert_int_equal(pq_crc32c(0, v, 9), 0xE3069283u);
    assert_int_equal(pq_crc32c(0, NULL, 0), 0);
    /* 32 zero bytes: RFC 3720 B.4 */
    memset(buf, 0, 32);
    assert_int_equal(pq_crc32c(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xff, 32);
    assert_int_equal(pq_crc32c(0, buf, 32), 0x62A8AB43u);
    /* pieces at odd alignments give the same result as the whole */
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (unsigned char)(i * 13 + 5);
    whole = pq_crc32c(0, buf, sizeof(buf));
    parts = pq_crc32c(pq_crc32c(pq_crc32c(0, buf, 3), buf + 3, 500), buf + 503, 497);
    assert_int_equal(whole, parts);
    parts = pq_crc32c(pq_crc32c(0, buf + 0, 1), buf + 1, 999);
    assert_int_equal(whole, parts);
}

static void test_frame_roundtrip(void **state)
{
    unsigned char buf[256];
    pq_spool_rec_t rec;
    pq_spool_scan_t res;
    size_t n = pq_spool_frame_encode(buf, sizeof(buf), "t", 1, "key", 3, "value", 5);

    assert_int_equal(n, 8 + 7 + 1 + 3 + 5);
    assert_int_equal(n, pq_spool_frame_size(1, 3, 5));
    assert_int_equal(buf[0], n - 8); /* little-endian length */
    assert_int_equal(buf[1] | buf[2] | buf[3], 0);
    assert_int_equal(pq_spool_payload_decode(buf + 8, n - 8, &rec), 0);
    assert_memory_equal(rec.topic, "t", 1);
    assert_int_equal(rec.key_len, 3);
    assert_memory_equal(rec.key, "key", 3);
    assert_int_equal(rec.value_len, 5);
    assert_memory_equal(rec.value, "value", 5);
    /* empty key and value */
    n = pq_spool_frame_encode(buf, sizeof(buf), "t", 1, NULL, 0, NULL, 0);
    assert_int_equal(n, 16);
    assert_int_equal(pq_spool_payload_decode(buf + 8, n - 8, &rec), 0);
    assert_null(rec.key);
    assert_int_equal(rec.value_len, 0);
    /* no topic, too small a buffer */
    assert_int_equal(pq_spool_frame_size(0, 1, 1), 0);
    assert_int_equal(pq_spool_frame_size(70000, 1, 1), 0);
    assert_int_equal(pq_spool_frame_encode(buf, 10, "t", 1, NULL, 0, NULL, 0), 0);
    /* malformed payloads */
    assert_int_equal(pq_spool_payload_decode("\x02\x01\x00t\x00\x00\x00\x00", 8, &rec), -1);
    assert_int_equal(pq_spool_payload_decode("\x01\x09\x00t\x00\x00\x00\x00", 8, &rec), -1);
    assert_int_equal(pq_spool_payload_decode("\x01\x01\x00t\x09\x00\x00\x00", 8, &rec), -1);
    assert_int_equal(pq_spool_payload_decode("\x01\x00\x00\x00\x00\x00\x00", 7, &rec), -1);
    /* scan of one good record */
    n = pq_spool_frame_encode(buf, sizeof(buf), "t", 1, "key", 3, "value", 5);
    pq_spool_scan(buf, n, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_OK);
    assert_int_equal(res.records, 1);
    assert_int_equal(res.valid_bytes, n);
    pq_spool_scan(buf, 0, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_OK);
    assert_int_equal(res.valid_bytes, 0);
}

/* Scan classification of every damage kind, on buffers. */
static void test_scan_classify(void **state)
{
    unsigned char buf[8192];
    size_t a, b, c, len;
    pq_spool_scan_t res;

    a = frame(buf, sizeof(buf), 1, 10);
    b = frame(buf + a, sizeof(buf) - a, 1, 11);
    c = frame(buf + a + b, sizeof(buf) - a - b, 1, 12);
    len = a + b + c;

    pq_spool_scan(buf, len - 1, &res, NULL, NULL); /* torn payload */
    assert_int_equal(res.status, PQ_SPOOL_SCAN_TORN);
    assert_int_equal(res.valid_bytes, a + b);
    assert_int_equal(res.records, 2);
    pq_spool_scan(buf, a + b + 5, &res, NULL, NULL); /* torn header */
    assert_int_equal(res.status, PQ_SPOOL_SCAN_TORN);
    assert_int_equal(res.valid_bytes, a + b);

    buf[len - 1] ^= 0x40; /* bad crc in the last record */
    pq_spool_scan(buf, len, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_TORN);
    assert_string_equal(res.why, "bad crc in the last record");
    assert_int_equal(res.valid_bytes, a + b);
    buf[len - 1] ^= 0x40;

    buf[a + 20] ^= 1; /* bad crc in the middle: corrupt */
    pq_spool_scan(buf, len, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_CORRUPT);
    assert_int_equal(res.valid_bytes, a);
    assert_int_equal(res.records, 1);
    buf[a + 20] ^= 1;

    memset(buf + len, 0, 4096); /* zero-filled tail */
    pq_spool_scan(buf, len + 4096, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_TORN);
    assert_string_equal(res.why, "zero-filled tail");
    assert_int_equal(res.valid_bytes, len);
    assert_int_equal(res.records, 3);

    buf[a] = buf[a + 1] = buf[a + 2] = buf[a + 3] = 0; /* zero length with data behind */
    pq_spool_scan(buf, len, &res, NULL, NULL);
    assert_int_equal(res.status, PQ_SPOOL_SCAN_CORRUPT);
    assert_int_equal(res.valid_bytes, a);
}

/* ---- the spool ---- */

typedef struct {
    pq_spool_t *sp;
    int t, n;
    int refused;
} appender_t;

static void *appender_main(void *arg)
{
    appender_t *a = arg;

    for (int i = 0; i < a->n; i++)
        if (append_ti(a->sp, a->t, i) != PQ_OK)
            a->refused++;
    return NULL;
}

/* 4 threads append; every callback is OK; a reopen finds every record intact, across several
 * segments; acking them all deletes every segment. */
static void test_concurrent_append_reopen(void **state)
{
    enum { THREADS = 4, PER = 1500 };
    tdir_t td;
    pq_spool_opts_t opts;
    pq_spool_t *sp;
    pthread_t th[THREADS];
    appender_t ap[THREADS];
    pq_spool_stats_t st;
    static int ids[THREADS * PER];
    static char seen[THREADS][PER];
    uint64_t pend = 0;
    int n, last[THREADS];

    tdir_make(&td);
    cbs_reset();
    pq_spool_opts_init(&opts);
    opts.segment_bytes = 64 * 1024;
    sp = open_dir(td.dir, &opts);
    for (int t = 0; t < THREADS; t++) {
        ap[t] = (appender_t){sp, t, PER, 0};
        assert_int_equal(pthread_create(&th[t], NULL, appender_main, &ap[t]), 0);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(ap[t].refused, 0);
    }
    cbs_wait(THREADS * PER);
    assert_int_equal(cbs.ok, THREADS * PER);
    assert_int_equal(cbs.failed, 0);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.appended, THREADS * PER);
    assert_true(st.fsyncs <= st.batches);
    assert_true(st.segments > 3); /* ~1.1 MB in 64 KiB segments */
    pq_spool_close(sp);

    sp = open_dir(td.dir, &opts);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.recovered_records, THREADS * PER);
    assert_int_equal(st.cut_bytes, 0);
    assert_true(st.segments > 3);
    pq_spool_pending(sp, &pend, NULL);
    assert_int_equal(pend, THREADS * PER);
    n = drain_all(sp, ids, THREADS * PER);
    assert_int_equal(n, THREADS * PER);
    /* each record exactly once, and each thread's records in its append order */
    for (int t = 0; t < THREADS; t++)
        last[t] = -1;
    for (int k = 0; k < n; k++) {
        int t = ids[k] >> 20, i = ids[k] & 0xfffff;
        assert_true(t >= 0 && t < THREADS && i < PER);
        assert_int_equal(seen[t][i], 0);
        seen[t][i] = 1;
        assert_true(i > last[t]);
        last[t] = i;
    }
    pq_spool_pending(sp, &pend, NULL);
    assert_int_equal(pend, 0);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.segments, 0);
    assert_int_equal(count_files(td.dir, "spool-"), 0);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* Records appended while a drain is going on are drained too; nack hands the same record out
 * again first; a fully acked current segment is retired once the writer is idle. */
static void test_drain_live(void **state)
{
    tdir_t td;
    pq_spool_t *sp;
    pq_spool_rec_t *r1, *r2;
    pq_spool_stats_t st;

    tdir_make(&td);
    cbs_reset();
    sp = open_dir(td.dir, NULL);
    assert_int_equal(pq_spool_next(sp, 0, &r1), PQ_ERR_TIMEOUT);
    assert_null(r1);
    assert_int_equal(pq_spool_next(sp, 50, &r1), PQ_ERR_TIMEOUT);
    assert_int_equal(append_ti(sp, 0, 1), PQ_OK);
    assert_int_equal(append_ti(sp, 0, 2), PQ_OK);
    /* waits for the commit */
    assert_int_equal(pq_spool_next(sp, 5000, &r1), PQ_OK);
    assert_int_equal(check_rec(r1), 1);
    assert_int_equal(r1->seq, 1);
    assert_int_equal(r1->offset, 0);
    assert_int_equal(pq_spool_next(sp, 5000, &r2), PQ_OK);
    assert_int_equal(check_rec(r2), 2);
    pq_spool_nack(sp, r1);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.inflight, 1);
    assert_int_equal(st.pending_records, 2);
    assert_int_equal(pq_spool_next(sp, 0, &r1), PQ_OK);
    assert_int_equal(check_rec(r1), 1); /* the nacked one again */
    pq_spool_ack(sp, r2);
    assert_int_equal(pq_spool_next(sp, 0, &r2), PQ_ERR_TIMEOUT);
    assert_int_equal(append_ti(sp, 0, 3), PQ_OK);
    assert_int_equal(pq_spool_next(sp, 5000, &r2), PQ_OK);
    assert_int_equal(check_rec(r2), 3);
    pq_spool_ack(sp, r2);
    assert_int_equal(count_files(td.dir, "spool-"), 1);
    pq_spool_ack(sp, r1);
    for (int i = 0; i < 500 && count_files(td.dir, "spool-") > 0; i++)
        usleep(10000);
    assert_int_equal(count_files(td.dir, "spool-"), 0);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.disk_bytes, 0);
    assert_int_equal(st.acked, 3);
    assert_int_equal(st.nacked, 1);
    /* the next append starts a new segment */
    assert_int_equal(append_ti(sp, 0, 4), PQ_OK);
    cbs_wait(4);
    assert_int_equal(cbs.ok, 4);
    assert_int_equal(count_files(td.dir, "spool-0000000000000002.log"), 1);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* Topics longer than 255 bytes (the read-back buffer grows for them) and empty keys/values. */
static void test_long_topic(void **state)
{
    tdir_t td;
    pq_spool_t *sp;
    pq_spool_rec_t *rec;
    char topic[1001];

    tdir_make(&td);
    cbs_reset();
    memset(topic, 't', 1000);
    topic[1000] = '\0';
    sp = open_dir(td.dir, NULL);
    assert_int_equal(pq_spool_append(sp, topic, NULL, 0, "v", 1, on_done, NULL), PQ_OK);
    assert_int_equal(pq_spool_append(sp, "x", "k", 1, NULL, 0, on_done, NULL), PQ_OK);
    cbs_wait(2);
    pq_spool_close(sp);
    sp = open_dir(td.dir, NULL);
    assert_int_equal(pq_spool_next(sp, 0, &rec), PQ_OK);
    assert_string_equal(rec->topic, topic);
    assert_int_equal(rec->topic_len, 1000);
    assert_null(rec->key);
    assert_int_equal(rec->key_len, 0);
    assert_int_equal(rec->value_len, 1);
    assert_memory_equal(rec->value, "v", 1);
    pq_spool_ack(sp, rec);
    assert_int_equal(pq_spool_next(sp, 0, &rec), PQ_OK);
    assert_string_equal(rec->topic, "x");
    assert_int_equal(rec->key_len, 1);
    assert_int_equal(rec->value_len, 0);
    pq_spool_ack(sp, rec);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* A crafted segment: `good` framed records followed by `tail`. Opens the spool over it and
 * checks that exactly the good records survive and the file was cut back to them. */
static void check_recovery(const unsigned char *tail, size_t tail_len, int good, int corrupt)
{
    static unsigned char buf[65536];
    size_t len = 0;
    tdir_t td;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    int ids[16];
    const char *name = "spool-0000000000000007.log";

    tdir_make(&td);
    for (int i = 0; i < good; i++)
        len += frame(buf + len, sizeof(buf) - len, 2, i);
    memcpy(buf + len, tail, tail_len);
    write_file(td.dir, name, buf, len + tail_len);
    sp = open_dir(td.dir, NULL);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.recovered_records, good);
    assert_int_equal(st.pending_records, good);
    assert_int_equal(st.cut_bytes, tail_len);
    assert_int_equal(st.cut_torn, tail_len && !corrupt ? 1 : 0);
    assert_int_equal(st.cut_corrupt, corrupt ? 1 : 0);
    if (good) {
        assert_int_equal(file_size(td.dir, name), (off_t)len);
        assert_int_equal(st.disk_bytes, len);
    } else {
        assert_int_equal(file_size(td.dir, name), -1); /* nothing left: removed */
    }
    if (corrupt) {
        char qname[64];
        snprintf(qname, sizeof(qname), "%s.cut-%zu", name, len);
        assert_int_equal(file_size(td.dir, qname), (off_t)tail_len);
    }
    assert_int_equal(drain_all(sp, ids, 16), good);
    for (int i = 0; i < good; i++)
        assert_int_equal(ids[i], 2 << 20 | i);
    /* new records go to a new segment after the highest one seen */
    cbs_reset();
    assert_int_equal(append_ti(sp, 0, 1), PQ_OK);
    cbs_wait(1);
    assert_int_equal(cbs.ok, 1);
    assert_true(file_size(td.dir, "spool-0000000000000008.log") > 0);
    pq_spool_close(sp);
    tdir_remove(&td);
}

static void test_recover_torn_length(void **state)
{
    unsigned char rec[2048];
    size_t n = frame(rec, sizeof(rec), 9, 9);

    assert_true(n > 8);
    check_recovery(rec, 5, 3, 0); /* the file ends inside the 8-byte header */
    check_recovery(rec, 1, 1, 0);
}

static void test_recover_torn_payload(void **state)
{
    unsigned char rec[2048];
    size_t n = frame(rec, sizeof(rec), 9, 99);

    check_recovery(rec, n - 1, 3, 0);
    check_recovery(rec, 9, 2, 0);
    check_recovery(rec, n / 2, 0, 0);
}

static void test_recover_bad_crc_last(void **state)
{
    unsigned char rec[2048];
    size_t n = frame(rec, sizeof(rec), 9, 99);

    rec[4] ^= 0xff; /* the stored crc */
    check_recovery(rec, n, 3, 0);
    rec[4] ^= 0xff;
    rec[n - 1] ^= 0x01; /* a payload bit */
    check_recovery(rec, n, 4, 0);
}

static void test_recover_zero_tail(void **state)
{
    static unsigned char zeros[4096];

    check_recovery(zeros, sizeof(zeros), 3, 0);
    check_recovery(zeros, 3, 3, 0);
    check_recovery(zeros, sizeof(zeros), 0, 0);
}

static void test_recover_corrupt_middle(void **state)
{
    unsigned char tail[4096];
    size_t a = frame(tail, sizeof(tail), 9, 1);
    size_t b = frame(tail + a, sizeof(tail) - a, 9, 2);

    tail[20] ^= 0x10; /* a payload byte of the first record after the good prefix */
    check_recovery(tail, a + b, 3, 1);
    tail[20] ^= 0x10;
    tail[2] = 0x7f; /* a length that runs past the end: looks torn, cut as such */
    check_recovery(tail, a + b, 3, 0);
}

static void test_recover_empty_and_many(void **state)
{
    tdir_t td;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    unsigned char buf[8192];
    size_t len = 0;
    int ids[16];

    tdir_make(&td);
    write_file(td.dir, "spool-0000000000000003.log", NULL, 0);
    for (int i = 0; i < 2; i++)
        len += frame(buf + len, sizeof(buf) - len, 5, i);
    write_file(td.dir, "spool-0000000000000004.log", buf, len);
    len = frame(buf, sizeof(buf), 5, 2);
    memset(buf + len, 0, 100);
    write_file(td.dir, "spool-0000000000000010.log", buf, len + 100);
    write_file(td.dir, "spool-12.log", "junk", 4); /* not a segment name: ignored */
    write_file(td.dir, "notes.txt", "hello", 5);
    sp = open_dir(td.dir, NULL);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.recovered_records, 3);
    assert_int_equal(st.segments, 2);
    assert_int_equal(st.cut_bytes, 100);
    assert_int_equal(file_size(td.dir, "spool-0000000000000003.log"), -1);
    assert_int_equal(file_size(td.dir, "spool-12.log"), 4);
    assert_int_equal(drain_all(sp, ids, 16), 3); /* oldest segment first */
    assert_int_equal(ids[0], 5 << 20 | 0);
    assert_int_equal(ids[1], 5 << 20 | 1);
    assert_int_equal(ids[2], 5 << 20 | 2);
    assert_int_equal(count_files(td.dir, "spool-00"), 0);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* The fault point between write and fsync. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int entered, release, fail;
    size_t nrecords;
    const char *dir;
    off_t size_in_hook;
} hook_t;

static int blocking_hook(void *opaque, size_t nrecords)
{
    hook_t *h = opaque;
    int fail;

    pthread_mutex_lock(&h->mu);
    h->entered++;
    h->nrecords = nrecords;
    h->size_in_hook = file_size(h->dir, "spool-0000000000000001.log");
    pthread_cond_broadcast(&h->cv);
    while (!h->release)
        pthread_cond_wait(&h->cv, &h->mu);
    fail = h->fail;
    pthread_mutex_unlock(&h->mu);
    return fail;
}

static void hook_wait_entered(hook_t *h, int n)
{
    pthread_mutex_lock(&h->mu);
    while (h->entered < n)
        pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
}

static void hook_release(hook_t *h, int fail)
{
    pthread_mutex_lock(&h->mu);
    h->release = 1;
    h->fail = fail;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

static void test_no_ack_before_fsync(void **state)
{
    tdir_t td;
    pq_spool_opts_t opts;
    pq_spool_t *sp;
    hook_t h = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, 0};
    pq_spool_rec_t *rec;

    tdir_make(&td);
    cbs_reset();
    h.dir = td.dir;
    pq_spool_opts_init(&opts);
    opts.test_hook = blocking_hook;
    opts.test_hook_opaque = &h;
    sp = open_dir(td.dir, &opts);
    assert_int_equal(append_ti(sp, 3, 1), PQ_OK);
    hook_wait_entered(&h, 1);
    /* written, not yet synced: no callback, nothing to drain */
    assert_true(h.size_in_hook > 0);
    usleep(50000);
    assert_int_equal(cbs_total(), 0);
    assert_int_equal(pq_spool_next(sp, 0, &rec), PQ_ERR_TIMEOUT);
    hook_release(&h, 0);
    cbs_wait(1);
    assert_int_equal(cbs.ok, 1);
    assert_int_equal(pq_spool_next(sp, 1000, &rec), PQ_OK);
    assert_int_equal(check_rec(rec), 3 << 20 | 1);
    pq_spool_ack(sp, rec);
    pq_spool_close(sp);
    tdir_remove(&td);
}

static int failing_hook(void *opaque, size_t nrecords)
{
    int *fail = opaque;
    return *fail;
}

static void test_fsync_failure(void **state)
{
    tdir_t td;
    pq_spool_opts_t opts;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    pq_spool_rec_t *rec;
    int fail = 1;

    tdir_make(&td);
    cbs_reset();
    pq_spool_opts_init(&opts);
    opts.test_hook = failing_hook;
    opts.test_hook_opaque = &fail;
    sp = open_dir(td.dir, &opts);
    assert_int_equal(append_ti(sp, 4, 1), PQ_OK);
    cbs_wait(1);
    assert_int_equal(cbs.failed, 1);
    assert_int_equal(cbs.ok, 0);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.append_failed, 1);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.disk_bytes, 0);
    assert_int_equal(pq_spool_next(sp, 0, &rec), PQ_ERR_TIMEOUT);
    /* the failed segment is cut and dropped; the next batch starts a new one */
    assert_int_equal(count_files(td.dir, "spool-"), 0);
    fail = 0;
    assert_int_equal(append_ti(sp, 4, 2), PQ_OK);
    cbs_wait(2);
    assert_int_equal(cbs.ok, 1);
    assert_int_equal(file_size(td.dir, "spool-0000000000000001.log"), -1);
    assert_true(file_size(td.dir, "spool-0000000000000002.log") > 0);
    pq_spool_close(sp);
    /* nothing of the failed record survives a restart */
    sp = open_dir(td.dir, &opts);
    assert_int_equal(drain_all(sp, NULL, 0), 1);
    pq_spool_close(sp);
    tdir_remove(&td);
}

static void test_caps(void **state)
{
    tdir_t td;
    pq_spool_opts_t opts;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    unsigned char big[2000];
    int accepted = 0, n;

    tdir_make(&td);
    cbs_reset();
    memset(big, 'x', sizeof(big));
    pq_spool_opts_init(&opts);
    opts.max_bytes = 8000;
    opts.max_record_bytes = 1500;
    sp = open_dir(td.dir, &opts);
    assert_int_equal(pq_spool_append(sp, TOPIC, NULL, 0, big, sizeof(big), on_done, NULL),
                     PQ_ERR_TOO_LARGE);
    assert_int_equal(pq_spool_append(sp, "", NULL, 0, big, 10, on_done, NULL), PQ_ERR_INVALID);
    assert_int_equal(pq_spool_full(sp), 0);
    for (int i = 0; i < 20; i++) {
        pq_err_t err = pq_spool_append(sp, TOPIC, NULL, 0, big, 1000, on_done, NULL);
        if (err == PQ_OK)
            accepted++;
        else
            assert_int_equal(err, PQ_ERR_UNAVAILABLE);
    }
    n = pq_spool_frame_size(strlen(TOPIC), 0, 1000);
    assert_int_equal(accepted, 8000 / n);
    assert_int_equal(pq_spool_full(sp), 1);
    cbs_wait(accepted);
    assert_int_equal(cbs.ok, accepted);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.refused_full, 20 - accepted);
    assert_int_equal(st.refused_too_large, 1);
    assert_int_equal(st.disk_bytes, (uint64_t)accepted * n);
    /* draining frees the space again (the idle writer retires the acked segment) */
    {
        pq_spool_rec_t *rec;
        while (pq_spool_next(sp, 0, &rec) == PQ_OK)
            pq_spool_ack(sp, rec);
    }
    for (int i = 0; i < 500 && pq_spool_full(sp); i++)
        usleep(10000);
    assert_int_equal(pq_spool_full(sp), 0);
    assert_int_equal(pq_spool_append(sp, TOPIC, NULL, 0, big, 1000, on_done, NULL), PQ_OK);
    cbs_wait(accepted + 1);
    pq_spool_close(sp);
    /* a cap below the default record cap (8 MiB) does not make the spool look full at once */
    pq_spool_opts_init(&opts);
    opts.max_bytes = 1 << 20;
    sp = open_dir(td.dir, &opts);
    assert_int_equal(pq_spool_full(sp), 0);
    pq_spool_close(sp);
    tdir_remove(&td);
}

static void test_lock(void **state)
{
    tdir_t td;
    char sub[128], errstr[256] = "";
    pq_spool_t *sp, *sp2;

    tdir_make(&td);
    snprintf(sub, sizeof(sub), "%s/a/b/spool", td.dir); /* created with its parents */
    sp = open_dir(sub, NULL);
    sp2 = pq_spool_open(sub, NULL, errstr, sizeof(errstr));
    assert_null(sp2);
    assert_non_null(strstr(errstr, "is locked by pid"));
    pq_spool_close(sp);
    sp2 = open_dir(sub, NULL);
    pq_spool_close(sp2);
    snprintf(errstr, sizeof(errstr), "%s/a/b/spool/LOCK", td.dir);
    unlink(errstr);
    rmdir(sub);
    snprintf(sub, sizeof(sub), "%s/a/b", td.dir);
    rmdir(sub);
    snprintf(sub, sizeof(sub), "%s/a", td.dir);
    rmdir(sub);
    tdir_remove(&td);
}

/* The spool holds prompts in clear text: the directory (and parents it creates) is 0750, its
 * files 0640, whatever the umask lets through (SECURITY.md "Local disk"). */
static void test_modes(void **state)
{
    tdir_t td;
    char sub[128], path[512];
    struct stat st;
    pq_spool_t *sp;
    mode_t old = umask(022);
    DIR *d;
    struct dirent *de;
    int files = 0;

    tdir_make(&td);
    snprintf(sub, sizeof(sub), "%s/a/spool", td.dir);
    sp = open_dir(sub, NULL);
    cbs_reset();
    assert_int_equal(append_ti(sp, 0, 1), PQ_OK);
    cbs_wait(1);
    assert_int_equal(stat(sub, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0750);
    snprintf(path, sizeof(path), "%s/a", td.dir);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0750);
    assert_non_null(d = opendir(sub));
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", sub, de->d_name);
        assert_int_equal(stat(path, &st), 0);
        if ((st.st_mode & 07777) != 0640)
            fail_msg("%s: mode %o, want 640", de->d_name, (unsigned)(st.st_mode & 07777));
        files++;
    }
    closedir(d);
    assert_true(files >= 2); /* LOCK and a segment */
    pq_spool_close(sp);
    umask(old);
    d = opendir(sub);
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", sub, de->d_name);
        unlink(path);
    }
    if (d)
        closedir(d);
    rmdir(sub);
    snprintf(path, sizeof(path), "%s/a", td.dir);
    rmdir(path);
    tdir_remove(&td);
}

/* 1000 appends queued while the writer is held in its first batch are committed with far
 * fewer than 1000 fsyncs. */
static void test_group_commit(void **state)
{
    tdir_t td;
    pq_spool_opts_t opts;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    hook_t h = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, 0};

    tdir_make(&td);
    cbs_reset();
    h.dir = td.dir;
    pq_spool_opts_init(&opts);
    opts.test_hook = blocking_hook;
    opts.test_hook_opaque = &h;
    sp = open_dir(td.dir, &opts);
    assert_int_equal(append_ti(sp, 0, 0), PQ_OK);
    hook_wait_entered(&h, 1);
    for (int i = 1; i <= 1000; i++)
        assert_int_equal(append_ti(sp, 0, i), PQ_OK);
    assert_int_equal(cbs_total(), 0);
    hook_release(&h, 0);
    cbs_wait(1001);
    assert_int_equal(cbs.ok, 1001);
    pq_spool_stats(sp, &st);
    assert_int_equal(st.appended, 1001);
    assert_true(st.fsyncs <= 3);
    assert_true(h.nrecords == 1000); /* the second batch took the whole queue */
    print_message("group commit: 1001 records in %" PRIu64 " fsyncs\n", st.fsyncs);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* close() flushes the queue: every callback is called before it returns. */
static void test_close_flushes(void **state)
{
    tdir_t td;
    pq_spool_t *sp;

    tdir_make(&td);
    cbs_reset();
    sp = open_dir(td.dir, NULL);
    for (int i = 0; i < 300; i++)
        assert_int_equal(append_ti(sp, 1, i), PQ_OK);
    pq_spool_close(sp);
    assert_int_equal(cbs_total(), 300);
    assert_int_equal(cbs.ok, 300);
    sp = open_dir(td.dir, NULL);
    assert_int_equal(drain_all(sp, NULL, 0), 300);
    pq_spool_close(sp);
    tdir_remove(&td);
}

/* ---- micro-benchmark (PQ_SPOOL_BENCH=1) ---- */

typedef struct {
    pq_spool_t *sp;
    int n;
    int64_t *inflight_cap;
} bench_t;

static pthread_mutex_t bench_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bench_cv = PTHREAD_COND_INITIALIZER;
static long bench_done;

static void bench_cb(void *opaque, pq_err_t err)
{
    long *mine = opaque;
    (void)err;
    pthread_mutex_lock(&bench_mu);
    (*mine)--;
    bench_done++;
    pthread_cond_broadcast(&bench_cv);
    pthread_mutex_unlock(&bench_mu);
}

/* Each thread keeps up to `window` appends outstanding (PQ_SPOOL_BENCH_WINDOW, default 64), like
 * an event loop with many clients. */
static void *bench_main(void *arg)
{
    bench_t *b = arg;
    unsigned char val[1024];
    long outstanding = 0;
    const char *w = getenv("PQ_SPOOL_BENCH_WINDOW");
    const long window = w && atol(w) > 0 ? atol(w) : 64;

    memset(val, 'v', sizeof(val));
    for (int i = 0; i < b->n; i++) {
        pthread_mutex_lock(&bench_mu);
        while (outstanding >= window)
            pthread_cond_wait(&bench_cv, &bench_mu);
        outstanding++;
        pthread_mutex_unlock(&bench_mu);
        while (pq_spool_append(b->sp, TOPIC, "key-0123456789", 14, val, sizeof(val), bench_cb,
                               &outstanding) != PQ_OK)
            usleep(100);
    }
    pthread_mutex_lock(&bench_mu);
    while (outstanding > 0)
        pthread_cond_wait(&bench_cv, &bench_mu);
    pthread_mutex_unlock(&bench_mu);
    return NULL;
}

static void test_bench(void **state)
{
    enum { THREADS = 8, PER = 5000 };
    tdir_t td;
    pq_spool_t *sp;
    pq_spool_stats_t st;
    pthread_t th[THREADS];
    bench_t b[THREADS];
    int64_t t0, t1;
    const char *dir = getenv("PQ_SPOOL_BENCH_DIR");

    if (!getenv("PQ_SPOOL_BENCH")) {
        skip();
        return;
    }
    tdir_make(&td);
    sp = open_dir(dir ? dir : td.dir, NULL);
    t0 = pq_mono_ms();
    for (int t = 0; t < THREADS; t++) {
        b[t] = (bench_t){sp, PER, NULL};
        pthread_create(&th[t], NULL, bench_main, &b[t]);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    t1 = pq_mono_ms();
    pq_spool_stats(sp, &st);
    print_message("bench: %d threads x %d appends of 1 KiB (PQ_SPOOL_BENCH_WINDOW outstanding "
                  "each, default 64): "
                  "%.0f appends/s, "
                  "%" PRIu64 " fsyncs, %.1f records per fsync\n",
                  THREADS, PER, (double)THREADS * PER * 1000.0 / (double)(t1 - t0 ? t1 - t0 : 1),
                  st.fsyncs, st.fsyncs ? (double)st.appended / (double)st.fsyncs : 0.0);
    t0 = pq_mono_ms();
    {
        pq_spool_rec_t *rec;
        long n = 0;
        while (pq_spool_next(sp, 0, &rec) == PQ_OK) {
            pq_spool_ack(sp, rec);
            n++;
        }
        t1 = pq_mono_ms();
        print_message("bench: drained %ld records in %" PRId64 " ms\n", n, t1 - t0);
    }
    pq_spool_close(sp);
    tdir_remove(&td);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_frame_roundtrip),
        cmocka_unit_test(test_scan_classify),
        cmocka_unit_test(test_concurrent_append_reopen),
        cmocka_unit_test(test_drain_live),
        cmocka_unit_test(test_long_topic),
        cmocka_unit_test(test_recover_torn_length),
        cmocka_unit_test(test_recover_torn_payload),
        cmocka_unit_test(test_recover_bad_crc_last),
        cmocka_unit_test(test_recover_zero_tail),
        cmocka_unit_test(test_recover_corrupt_middle),
        cmocka_unit_test(test_recover_empty_and_many),
        cmocka_unit_test(test_no_ack_before_fsync),
        cmocka_unit_test(test_fsync_failure),
        cmocka_unit_test(test_caps),
        cmocka_unit_test(test_lock),
        cmocka_unit_test(test_group_commit),
        cmocka_unit_test(test_close_flushes),
        cmocka_unit_test(test_bench),
    };

    pq_log_init("test_spool", PQ_LOG_INFO, 0);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
