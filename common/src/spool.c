/* The broker's local spool: see promptq/spool.h for the format, recovery rules and threads.
 *
 * Locking: one mutex (mu) guards the queue, the segment list and every counter. File I/O
 * happens outside it, except the short mkdir/scan in pq_spool_open before any thread runs.
 * The writer thread alone writes to the current ("active") segment; a segment is "sealed" once
 * the writer will never write to it again, and only sealed segments are deleted by acks. */
#include "promptq/spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "promptq/crc32c.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define DEFAULT_MAX_BYTES     (1ull << 30)
#define DEFAULT_SEGMENT_BYTES (16ull << 20)
#define DEFAULT_MAX_RECORD    (8u << 20)
#define SEG_NAME_FMT          "spool-%016" PRIu64 ".log"
/* Modes of what the spool creates (SECURITY.md "Local disk"; the umask may only narrow them). */
#define SPOOL_DIR_MODE  0750
#define SPOOL_FILE_MODE 0640
#define SEG_NAME_LEN    26 /* "spool-" + 16 digits + ".log" */
#define LOCK_NAME       "LOCK"
#define WRITE_IOV_MAX   1024

enum { REC_PENDING = 0, REC_OUT, REC_ACKED };

typedef struct {
    uint64_t off;
    uint32_t len; /* framed */
    uint8_t state;
} rec_ent_t;

typedef struct seg_s {
    struct seg_s *prev, *next;
    uint64_t seq;
    int fd;
    uint64_t size; /* committed bytes */
    rec_ent_t *recs;
    size_t nrec, cap;
    size_t nacked;
    size_t next_idx; /* drain cursor: records before it were handed out at least once */
    int sealed;
    char name[SEG_NAME_LEN + 8];
} seg_t;

typedef struct item_s {
    struct item_s *next;
    pq_spool_cb_t cb;
    void *opaque;
    size_t len;
    unsigned char data[];
} item_t;

typedef struct outrec_s {
    pq_spool_rec_t pub; /* first: the public pointer is the outrec */
    struct outrec_s *prev, *next;
    seg_t *seg;
    size_t idx;
    unsigned char *buf; /* NULL until read back */
} outrec_t;

struct pq_spool_s {
    char *dir;
    int dirfd;
    int lockfd;
    pq_spool_opts_t opts;

    pthread_mutex_t mu;
    pthread_cond_t wcv; /* writer: queue not empty, closing, retire */
    pthread_cond_t dcv; /* drainers: records committed or nacked, closing */
    pthread_t writer;
    int writer_started;
    int closing;
    int retire; /* the active segment may be fully acked */

    item_t *qhead, *qtail;
    uint64_t queued_bytes;

    seg_t *shead, *stail;
    seg_t *active;
    uint64_t next_seq;

    outrec_t *out;                     /* handed out (doubly linked) */
    outrec_t *retry_head, *retry_tail; /* nacked, FIFO (next only) */

    pq_spool_stats_t st; /* pending_*, inflight, disk_bytes, segments kept live */
};

/* ---- framing (pure) ---- */

static inline void put_le16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline uint16_t get_le16(const unsigned char *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

size_t pq_spool_frame_size(size_t topic_len, size_t key_len, size_t value_len)
{
    uint64_t payload;

    if (topic_len == 0 || topic_len > UINT16_MAX || key_len > UINT32_MAX || value_len > UINT32_MAX)
        return 0;
    payload = (uint64_t)PQ_SPOOL_PAYLOAD_OVERHEAD + topic_len + key_len + value_len;
    if (payload > UINT32_MAX || payload + PQ_SPOOL_FRAME_HEADER > SIZE_MAX)
        return 0;
    return (size_t)(payload + PQ_SPOOL_FRAME_HEADER);
}

size_t pq_spool_frame_encode(void *buf, size_t size, const char *topic, size_t topic_len,
                             const void *key, size_t key_len, const void *value, size_t value_len)
{
    size_t framed = pq_spool_frame_size(topic_len, key_len, value_len);
    unsigned char *p = buf, *q;

    if (framed == 0 || framed > size)
        return 0;
    q = p + PQ_SPOOL_FRAME_HEADER;
    *q++ = PQ_SPOOL_PAYLOAD_VERSION;
    put_le16(q, (uint16_t)topic_len);
    q += 2;
    memcpy(q, topic, topic_len);
    q += topic_len;
    put_le32(q, (uint32_t)key_len);
    q += 4;
    if (key_len)
        memcpy(q, key, key_len);
    q += key_len;
    if (value_len)
        memcpy(q, value, value_len);
    put_le32(p, (uint32_t)(framed - PQ_SPOOL_FRAME_HEADER));
    put_le32(p + 4, pq_crc32c(0, p + PQ_SPOOL_FRAME_HEADER, framed - PQ_SPOOL_FRAME_HEADER));
    return framed;
}

int pq_spool_payload_decode(const void *buf, size_t len, pq_spool_rec_t *rec)
{
    const unsigned char *p = buf;
    size_t tl, kl;

    if (len < PQ_SPOOL_PAYLOAD_OVERHEAD + 1 || p[0] != PQ_SPOOL_PAYLOAD_VERSION)
        return -1;
    tl = get_le16(p + 1);
    if (tl == 0 || 3 + tl + 4 > len)
        return -1;
    kl = get_le32(p + 3 + tl);
    if (kl > len - (PQ_SPOOL_PAYLOAD_OVERHEAD + tl))
        return -1;
    memset(rec, 0, sizeof(*rec));
    rec->topic = (const char *)p + 3;
    rec->topic_len = tl;
    rec->key = kl ? p + PQ_SPOOL_PAYLOAD_OVERHEAD + tl : NULL;
    rec->key_len = kl;
    rec->value = p + PQ_SPOOL_PAYLOAD_OVERHEAD + tl + kl;
    rec->value_len = len - PQ_SPOOL_PAYLOAD_OVERHEAD - tl - kl;
    return 0;
}

static int all_zero(const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

void pq_spool_scan(const void *buf, size_t len, pq_spool_scan_t *res,
                   void (*on_record)(void *opaque, size_t offset, size_t framed_len), void *opaque)
{
    const unsigned char *p = buf;
    size_t off = 0;
    pq_spool_rec_t rec;

    memset(res, 0, sizeof(*res));
    res->status = PQ_SPOOL_SCAN_OK;
    while (off < len) {
        size_t rem = len - off;
        uint32_t plen;
        int torn = 0;
        const char *why = NULL;

        if (all_zero(p + off, rem)) {
            torn = 1;
            why = "zero-filled tail";
        } else if (rem < PQ_SPOOL_FRAME_HEADER) {
            torn = 1;
            why = "file ends inside a record header";
        } else {
            plen = get_le32(p + off);
            if (plen < PQ_SPOOL_PAYLOAD_OVERHEAD + 1) {
                why = "bad record length";
            } else if (plen > rem - PQ_SPOOL_FRAME_HEADER) {
                torn = 1;
                why = "file ends inside a record payload";
            } else if (pq_crc32c(0, p + off + PQ_SPOOL_FRAME_HEADER, plen) !=
                       get_le32(p + off + 4)) {
                torn = plen == rem - PQ_SPOOL_FRAME_HEADER;
                why = torn ? "bad crc in the last record" : "bad crc";
            } else if (pq_spool_payload_decode(p + off + PQ_SPOOL_FRAME_HEADER, plen, &rec) != 0) {
                why = "malformed payload";
            }
        }
        if (why) {
            res->status = torn ? PQ_SPOOL_SCAN_TORN : PQ_SPOOL_SCAN_CORRUPT;
            res->why = why;
            break;
        }
        if (on_record)
            on_record(opaque, off, PQ_SPOOL_FRAME_HEADER + (size_t)plen);
        res->records++;
        off += PQ_SPOOL_FRAME_HEADER + (size_t)plen;
    }
    res->valid_bytes = off;
}

/* ---- helpers ---- */

void pq_spool_opts_init(pq_spool_opts_t *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->max_bytes = DEFAULT_MAX_BYTES;
    opts->segment_bytes = DEFAULT_SEGMENT_BYTES;
    opts->max_record_bytes = DEFAULT_MAX_RECORD;
}

/* mkdir -p: creates dir and its missing parents (mode 0750: the spool holds prompts). Returns 0
 * or -1 with errno. */
static int mkdir_p(const char *dir)
{
    char path[PATH_MAX];
    size_t len = pq_strlcpy(path, dir, sizeof(path));

    if (len == 0 || len >= sizeof(path)) {
        errno = len ? ENAMETOOLONG : ENOENT;
        return -1;
    }
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(path, SPOOL_DIR_MODE) != 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    if (mkdir(path, SPOOL_DIR_MODE) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* Writes the whole iovec array at off, resuming after short writes. iov is modified. */
static int pwritev_all(int fd, struct iovec *iov, int iovcnt, uint64_t off)
{
    while (iovcnt > 0) {
        int n = iovcnt > WRITE_IOV_MAX ? WRITE_IOV_MAX : iovcnt;
        ssize_t w = pwritev(fd, iov, n, (off_t)off);

        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        off += (uint64_t)w;
        while (iovcnt > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0 && w > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int pread_all(int fd, void *buf, size_t len, uint64_t off)
{
    unsigned char *p = buf;

    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = EIO; /* the file is shorter than the record index says */
            return -1;
        }
        p += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const unsigned char *p = buf;

    while (len > 0) {
        ssize_t w = write(fd, p, len);

        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static seg_t *seg_new(uint64_t seq)
{
    seg_t *seg = calloc(1, sizeof(*seg));

    if (!seg)
        return NULL;
    seg->seq = seq;
    seg->fd = -1;
    snprintf(seg->name, sizeof(seg->name), SEG_NAME_FMT, seq);
    return seg;
}

static void seg_free(seg_t *seg)
{
    if (!seg)
        return;
    if (seg->fd >= 0)
        close(seg->fd);
    free(seg->recs);
    free(seg);
}

/* Makes room for n more records in the index. */
static int seg_reserve(seg_t *seg, size_t n)
{
    size_t cap = seg->cap ? seg->cap : 64;
    rec_ent_t *r;

    if (seg->nrec + n <= seg->cap)
        return 0;
    while (cap < seg->nrec + n)
        cap *= 2;
    r = realloc(seg->recs, cap * sizeof(*r));
    if (!r)
        return -1;
    seg->recs = r;
    seg->cap = cap;
    return 0;
}

static int seg_add_rec(seg_t *seg, uint64_t off, uint32_t len)
{
    if (seg_reserve(seg, 1) != 0)
        return -1;
    seg->recs[seg->nrec].off = off;
    seg->recs[seg->nrec].len = len;
    seg->recs[seg->nrec].state = REC_PENDING;
    seg->nrec++;
    return 0;
}

/* List operations: caller holds mu. */
static void seg_link(pq_spool_t *sp, seg_t *seg)
{
    seg->prev = sp->stail;
    seg->next = NULL;
    if (sp->stail)
        sp->stail->next = seg;
    else
        sp->shead = seg;
    sp->stail = seg;
    sp->st.segments++;
    sp->st.disk_bytes += seg->size;
}

static void seg_unlink(pq_spool_t *sp, seg_t *seg)
{
    if (seg->prev)
        seg->prev->next = seg->next;
    else
        sp->shead = seg->next;
    if (seg->next)
        seg->next->prev = seg->prev;
    else
        sp->stail = seg->prev;
    seg->prev = seg->next = NULL;
    sp->st.segments--;
    sp->st.disk_bytes -= seg->size;
    sp->st.segments_deleted++;
}

/* Removes a detached segment's file and frees it. Called without mu. */
static void seg_delete(pq_spool_t *sp, seg_t *seg)
{
    if (unlinkat(sp->dirfd, seg->name, 0) != 0)
        PQ_ERR("spool %s: cannot delete %s: %s", sp->dir, seg->name, strerror(errno));
    else if (fsync(sp->dirfd) != 0)
        PQ_WARN("spool %s: directory fsync after deleting %s: %s", sp->dir, seg->name,
                strerror(errno));
    else
        PQ_DBG("spool %s: deleted %s (%zu records)", sp->dir, seg->name, seg->nrec);
    seg_free(seg);
}

/* ---- recovery ---- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int parse_seg_name(const char *name, uint64_t *seq)
{
    uint64_t v = 0;

    if (strlen(name) != SEG_NAME_LEN || strncmp(name, "spool-", 6) != 0 ||
        strcmp(name + 22, ".log") != 0)
        return -1;
    for (int i = 6; i < 22; i++) {
        if (name[i] < '0' || name[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(name[i] - '0');
    }
    *seq = v;
    return 0;
}

typedef struct {
    seg_t *seg;
    int failed;
} scan_ctx_t;

static void scan_on_record(void *opaque, size_t offset, size_t framed_len)
{
    scan_ctx_t *ctx = opaque;

    if (seg_add_rec(ctx->seg, offset, (uint32_t)framed_len) != 0)
        ctx->failed = 1;
}

/* Copies the bytes about to be cut from a corrupt segment to "<name>.cut-<offset>". */
static int save_cut(pq_spool_t *sp, seg_t *seg, const unsigned char *data, size_t off, size_t len,
                    char *qname, size_t qsize)
{
    int fd, rc = -1;

    snprintf(qname, qsize, "%s.cut-%zu", seg->name, off);
    fd = openat(sp->dirfd, qname, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, SPOOL_FILE_MODE);
    if (fd < 0)
        return -1;
    if (write_all(fd, data + off, len) == 0 && fsync(fd) == 0)
        rc = 0;
    close(fd);
    return rc;
}

/* Validates one segment; cuts a bad tail. Returns 0 (seg filled, possibly with no records) or
 * -1 with errstr set. */
static int recover_segment(pq_spool_t *sp, seg_t *seg, char *errstr, size_t errstr_size)
{
    struct stat stb;
    unsigned char *map = NULL;
    size_t len;
    pq_spool_scan_t res;
    scan_ctx_t ctx = {seg, 0};
    char qname[SEG_NAME_LEN + 32];
    int rc = -1;

    seg->fd = openat(sp->dirfd, seg->name, O_RDWR | O_CLOEXEC);
    if (seg->fd < 0 || fstat(seg->fd, &stb) != 0) {
        snprintf(errstr, errstr_size, "spool %s: cannot open %s: %s", sp->dir, seg->name,
                 strerror(errno));
        goto out;
    }
    len = (size_t)stb.st_size;
    if (len == 0) {
        rc = 0;
        goto out;
    }
    map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, seg->fd, 0);
    if (map == MAP_FAILED) {
        map = NULL;
        snprintf(errstr, errstr_size, "spool %s: cannot map %s: %s", sp->dir, seg->name,
                 strerror(errno));
        goto out;
    }
    pq_spool_scan(map, len, &res, scan_on_record, &ctx);
    if (ctx.failed) {
        snprintf(errstr, errstr_size, "spool %s: out of memory indexing %s", sp->dir, seg->name);
        goto out_unmap;
    }
    if (res.status == PQ_SPOOL_SCAN_CORRUPT) {
        if (save_cut(sp, seg, map, res.valid_bytes, len - res.valid_bytes, qname, sizeof(qname)) !=
            0) {
            snprintf(errstr, errstr_size,
                     "spool %s: %s is corrupt at offset %zu (%s) and the %zu bytes from there "
                     "cannot be saved before cutting them: %s",
                     sp->dir, seg->name, res.valid_bytes, res.why, len - res.valid_bytes,
                     strerror(errno));
            goto out_unmap;
        }
        PQ_ERR("spool %s: %s: corrupt record at offset %zu (%s): cut %zu bytes after %zu good "
               "records; the cut bytes are saved in %s",
               sp->dir, seg->name, res.valid_bytes, res.why, len - res.valid_bytes, res.records,
               qname);
        sp->st.cut_corrupt++;
    } else if (res.status == PQ_SPOOL_SCAN_TORN) {
        PQ_WARN("spool %s: %s: cut %zu bytes of torn tail at offset %zu (%s)", sp->dir, seg->name,
                len - res.valid_bytes, res.valid_bytes, res.why);
        sp->st.cut_torn++;
    }
    if (res.status != PQ_SPOOL_SCAN_OK) {
        if (ftruncate(seg->fd, (off_t)res.valid_bytes) != 0 || fdatasync(seg->fd) != 0) {
            snprintf(errstr, errstr_size, "spool %s: cannot cut %s at offset %zu: %s", sp->dir,
                     seg->name, res.valid_bytes, strerror(errno));
            goto out_unmap;
        }
        sp->st.cut_bytes += len - res.valid_bytes;
    }
    seg->size = res.valid_bytes;
    sp->st.recovered_records += res.records;
    rc = 0;
out_unmap:
    munmap(map, len);
out:
    return rc;
}

static int recover(pq_spool_t *sp, char *errstr, size_t errstr_size)
{
    DIR *d;
    struct dirent *de;
    uint64_t *seqs = NULL, max_seq = 0;
    size_t n = 0, cap = 0, removed = 0;
    int dfd, rc = -1;

    dfd = dup(sp->dirfd);
    if (dfd < 0 || !(d = fdopendir(dfd))) {
        if (dfd >= 0)
            close(dfd);
        snprintf(errstr, errstr_size, "spool %s: cannot list: %s", sp->dir, strerror(errno));
        return -1;
    }
    while ((de = readdir(d))) {
        uint64_t seq;

        if (parse_seg_name(de->d_name, &seq) != 0)
            continue;
        if (n == cap) {
            uint64_t *s = realloc(seqs, (cap ? cap * 2 : 16) * sizeof(*s));
            if (!s) {
                snprintf(errstr, errstr_size, "spool %s: out of memory", sp->dir);
                goto out;
            }
            seqs = s;
            cap = cap ? cap * 2 : 16;
        }
        seqs[n++] = seq;
    }
    if (n > 1)
        qsort(seqs, n, sizeof(*seqs), cmp_u64);
    for (size_t i = 0; i < n; i++) {
        seg_t *seg = seg_new(seqs[i]);

        if (!seg) {
            snprintf(errstr, errstr_size, "spool %s: out of memory", sp->dir);
            goto out;
        }
        if (seqs[i] > max_seq)
            max_seq = seqs[i];
        if (recover_segment(sp, seg, errstr, errstr_size) != 0) {
            seg_free(seg);
            goto out;
        }
        if (seg->nrec == 0) {
            PQ_INFO("spool %s: removing empty segment %s", sp->dir, seg->name);
            if (unlinkat(sp->dirfd, seg->name, 0) != 0)
                PQ_WARN("spool %s: cannot remove %s: %s", sp->dir, seg->name, strerror(errno));
            removed++;
            seg_free(seg);
            continue;
        }
        seg->sealed = 1;
        seg_link(sp, seg);
        sp->st.pending_records += seg->nrec;
        sp->st.pending_bytes += seg->size;
    }
    if (removed && fsync(sp->dirfd) != 0)
        PQ_WARN("spool %s: directory fsync: %s", sp->dir, strerror(errno));
    sp->next_seq = max_seq + 1;
    if (sp->st.pending_records)
        PQ_INFO("spool %s: %" PRIu64 " records (%" PRIu64 " bytes) in %" PRIu64
                " segments to drain",
                sp->dir, sp->st.pending_records, sp->st.pending_bytes, sp->st.segments);
    rc = 0;
out:
    free(seqs);
    closedir(d);
    return rc;
}

/* ---- writer ---- */

/* Creates the next segment file (directory fsync'd). Called without mu (the writer alone
 * touches next_seq after open). */
static seg_t *seg_create(pq_spool_t *sp)
{
    seg_t *seg = seg_new(sp->next_seq);

    if (!seg)
        return NULL;
    seg->fd = openat(sp->dirfd, seg->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, SPOOL_FILE_MODE);
    if (seg->fd < 0) {
        PQ_ERR("spool %s: cannot create %s: %s", sp->dir, seg->name, strerror(errno));
        goto out_free;
    }
    sp->next_seq++;
    if (fsync(sp->dirfd) != 0) {
        PQ_ERR("spool %s: directory fsync after creating %s: %s", sp->dir, seg->name,
               strerror(errno));
        unlinkat(sp->dirfd, seg->name, 0);
        goto out_free;
    }
    return seg;
out_free:
    seg_free(seg);
    return NULL;
}

/* Seals the active segment (caller holds mu). Returns it if it is now deletable (detached from
 * the list: the caller deletes it after unlocking), else NULL. */
static seg_t *seal_active(pq_spool_t *sp)
{
    seg_t *seg = sp->active;

    if (!seg)
        return NULL;
    sp->active = NULL;
    seg->sealed = 1;
    if (seg->nacked < seg->nrec)
        return NULL;
    seg_unlink(sp, seg);
    return seg;
}

static void run_callbacks(item_t *items, pq_err_t err)
{
    while (items) {
        item_t *next = items->next;

        if (items->cb)
            items->cb(items->opaque, err);
        free(items);
        items = next;
    }
}

/* Takes the whole queue (caller holds mu). */
static item_t *take_queue(pq_spool_t *sp, uint64_t *bytes)
{
    item_t *all = sp->qhead;

    *bytes = 0;
    for (item_t *it = all; it; it = it->next)
        *bytes += it->len;
    sp->qhead = sp->qtail = NULL;
    return all;
}

/* One group commit: writes the queued records that fit in the active segment, syncs once,
 * then answers their callbacks. Called and returns with mu held. */
static void write_batch(pq_spool_t *sp)
{
    seg_t *seg = sp->active, *dead = NULL;
    item_t *batch, *last, *it;
    uint64_t bytes, base;
    size_t n = 0;
    struct iovec *iov = NULL;
    int ok = 0, synced = 0, err_no = 0;

    if (seg && seg->size > 0 && seg->size + sp->qhead->len > sp->opts.segment_bytes)
        dead = seal_active(sp); /* roll over */
    if (!sp->active) {
        pthread_mutex_unlock(&sp->mu);
        if (dead)
            seg_delete(sp, dead);
        dead = NULL;
        seg = seg_create(sp);
        pthread_mutex_lock(&sp->mu);
        if (!seg) {
            batch = take_queue(sp, &bytes);
            goto out_fail;
        }
        seg->sealed = 0;
        seg_link(sp, seg);
        sp->active = seg;
    }
    /* Take records while they fit (the first one always does: the segment is empty or it
     * fitted above). */
    batch = last = sp->qhead;
    bytes = 0;
    for (it = sp->qhead; it; it = it->next) {
        if (n > 0 && seg->size + bytes + it->len > sp->opts.segment_bytes)
            break;
        bytes += it->len;
        last = it;
        n++;
    }
    sp->qhead = last->next;
    if (!sp->qhead)
        sp->qtail = NULL;
    last->next = NULL;
    base = seg->size;
    /* Index room first, so that a committed record is always indexed (and never deleted with
     * its segment before it is drained). */
    if (seg_reserve(seg, n) == 0)
        iov = malloc(n * sizeof(*iov));
    pthread_mutex_unlock(&sp->mu);

    if (!iov) {
        err_no = ENOMEM;
    } else {
        size_t i = 0;
        for (it = batch; it; it = it->next, i++) {
            iov[i].iov_base = it->data;
            iov[i].iov_len = it->len;
        }
        if (pwritev_all(seg->fd, iov, (int)n, base) != 0) {
            err_no = errno;
        } else if (sp->opts.test_hook && sp->opts.test_hook(sp->opts.test_hook_opaque, n) != 0) {
            err_no = EIO; /* simulated fsync failure */
            synced = 1;
        } else {
            synced = 1;
            if (fdatasync(seg->fd) != 0)
                err_no = errno;
            else
                ok = 1;
        }
    }
    free(iov);
    if (!ok) {
        PQ_ERR("spool %s: %s %zu records (%" PRIu64 " bytes) to %s failed: %s; cutting them",
               sp->dir, synced ? "syncing" : "writing", n, bytes, seg->name, strerror(err_no));
        /* The file's state is unknown after a failed write or sync: cut the batch, and never
         * write to this segment again (its earlier records were synced before). */
        if (ftruncate(seg->fd, (off_t)base) != 0 || fdatasync(seg->fd) != 0)
            PQ_ERR("spool %s: cannot cut %s back to %" PRIu64 " bytes: %s; the failed records "
                   "may be drained after a restart",
                   sp->dir, seg->name, base, strerror(errno));
    }

    pthread_mutex_lock(&sp->mu);
    sp->st.batches++;
    if (synced)
        sp->st.fsyncs++;
    if (ok) {
        uint64_t off = base;
        for (it = batch; it; it = it->next) {
            seg_add_rec(seg, off, (uint32_t)it->len); /* cannot fail: reserved above */
            sp->st.pending_records++;
            sp->st.pending_bytes += it->len;
            off += it->len;
        }
        seg->size += bytes;
        sp->st.disk_bytes += bytes;
        sp->st.appended += n;
        sp->queued_bytes -= bytes;
        pthread_cond_broadcast(&sp->dcv);
        pthread_mutex_unlock(&sp->mu);
        run_callbacks(batch, PQ_OK);
        pthread_mutex_lock(&sp->mu);
        return;
    }
    dead = seal_active(sp);
out_fail:
    for (it = batch; it; it = it->next)
        sp->st.append_failed++;
    sp->queued_bytes -= bytes;
    pthread_mutex_unlock(&sp->mu);
    if (dead)
        seg_delete(sp, dead);
    run_callbacks(batch, PQ_ERR_UNAVAILABLE);
    pthread_mutex_lock(&sp->mu);
}

static void *writer_main(void *arg)
{
    pq_spool_t *sp = arg;

    pthread_mutex_lock(&sp->mu);
    for (;;) {
        while (!sp->qhead && !sp->closing && !sp->retire)
            pthread_cond_wait(&sp->wcv, &sp->mu);
        if (sp->qhead) {
            write_batch(sp);
            continue;
        }
        sp->retire = 0;
        if (sp->active && sp->active->nrec > 0 && sp->active->nacked == sp->active->nrec) {
            /* Idle and fully drained: retire the segment; the next append starts a new one. */
            seg_t *dead = seal_active(sp);

            pthread_mutex_unlock(&sp->mu);
            if (dead)
                seg_delete(sp, dead);
            pthread_mutex_lock(&sp->mu);
            continue;
        }
        if (sp->closing)
            break;
    }
    pthread_mutex_unlock(&sp->mu);
    return NULL;
}

/* ---- public API ---- */

pq_spool_t *pq_spool_open(const char *dir, const pq_spool_opts_t *opts, char *errstr,
                          size_t errstr_size)
{
    pq_spool_t *sp;
    pthread_condattr_t ca;
    char pid[32];
    int n;

    if (!dir || !*dir) {
        snprintf(errstr, errstr_size, "spool: no directory given");
        return NULL;
    }
    sp = calloc(1, sizeof(*sp));
    if (!sp) {
        snprintf(errstr, errstr_size, "spool: out of memory");
        return NULL;
    }
    sp->dirfd = sp->lockfd = -1;
    if (opts)
        sp->opts = *opts;
    else
        pq_spool_opts_init(&sp->opts);
    if (!sp->opts.max_bytes)
        sp->opts.max_bytes = DEFAULT_MAX_BYTES;
    if (!sp->opts.segment_bytes)
        sp->opts.segment_bytes = DEFAULT_SEGMENT_BYTES;
    if (!sp->opts.max_record_bytes)
        sp->opts.max_record_bytes = DEFAULT_MAX_RECORD;
    pthread_mutex_init(&sp->mu, NULL);
    pthread_cond_init(&sp->wcv, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&sp->dcv, &ca);
    pthread_condattr_destroy(&ca);

    sp->dir = strdup(dir);
    if (!sp->dir) {
        snprintf(errstr, errstr_size, "spool: out of memory");
        goto out_fail;
    }
    if (mkdir_p(dir) != 0) {
        snprintf(errstr, errstr_size, "spool: cannot create directory %s: %s", dir,
                 strerror(errno));
        goto out_fail;
    }
    sp->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sp->dirfd < 0) {
        snprintf(errstr, errstr_size, "spool: cannot open directory %s: %s", dir, strerror(errno));
        goto out_fail;
    }
    sp->lockfd = openat(sp->dirfd, LOCK_NAME, O_RDWR | O_CREAT | O_CLOEXEC, SPOOL_FILE_MODE);
    if (sp->lockfd < 0) {
        snprintf(errstr, errstr_size, "spool: cannot open %s/%s: %s", dir, LOCK_NAME,
                 strerror(errno));
        goto out_fail;
    }
    if (flock(sp->lockfd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            ssize_t r = pread(sp->lockfd, pid, sizeof(pid) - 1, 0);

            pid[r > 0 ? r : 0] = '\0';
            pid[strcspn(pid, "\n")] = '\0';
            snprintf(errstr, errstr_size,
                     "spool dir %s is locked by pid %s (another broker, or this one, already "
                     "uses it)",
                     dir, *pid ? pid : "?");
        } else {
            snprintf(errstr, errstr_size, "spool: cannot lock %s/%s: %s", dir, LOCK_NAME,
                     strerror(errno));
        }
        goto out_fail;
    }
    n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
    if (ftruncate(sp->lockfd, 0) != 0 || pwrite(sp->lockfd, pid, (size_t)n, 0) != n)
        PQ_WARN("spool %s: cannot write pid to %s: %s", dir, LOCK_NAME, strerror(errno));
    if (recover(sp, errstr, errstr_size) != 0)
        goto out_fail;
    if (pthread_create(&sp->writer, NULL, writer_main, sp) != 0) {
        snprintf(errstr, errstr_size, "spool %s: cannot start the writer thread", dir);
        goto out_fail;
    }
    sp->writer_started = 1;
    return sp;
out_fail:
    pq_spool_close(sp);
    return NULL;
}

void pq_spool_close(pq_spool_t *sp)
{
    if (!sp)
        return;
    if (sp->writer_started) {
        pthread_mutex_lock(&sp->mu);
        sp->closing = 1;
        pthread_cond_broadcast(&sp->wcv);
        pthread_cond_broadcast(&sp->dcv);
        pthread_mutex_unlock(&sp->mu);
        pthread_join(sp->writer, NULL);
    }
    run_callbacks(sp->qhead, PQ_ERR_UNAVAILABLE); /* only if the writer never started */
    while (sp->out) {
        outrec_t *o = sp->out;
        sp->out = o->next;
        free(o->buf);
        free(o);
    }
    while (sp->retry_head) {
        outrec_t *o = sp->retry_head;
        sp->retry_head = o->next;
        free(o->buf);
        free(o);
    }
    while (sp->shead) {
        seg_t *seg = sp->shead;
        sp->shead = seg->next;
        seg_free(seg);
    }
    if (sp->lockfd >= 0)
        close(sp->lockfd); /* releases the flock */
    if (sp->dirfd >= 0)
        close(sp->dirfd);
    pthread_cond_destroy(&sp->dcv);
    pthread_cond_destroy(&sp->wcv);
    pthread_mutex_destroy(&sp->mu);
    free(sp->dir);
    free(sp);
}

pq_err_t pq_spool_append(pq_spool_t *sp, const char *topic, const void *key, size_t key_len,
                         const void *value, size_t value_len, pq_spool_cb_t cb, void *opaque)
{
    size_t tl = topic ? strlen(topic) : 0, framed;
    item_t *it;
    pq_err_t err = PQ_OK;

    if (tl == 0 || tl > UINT16_MAX)
        return PQ_ERR_INVALID;
    framed = pq_spool_frame_size(tl, key_len, value_len);
    if (framed == 0 || framed > sp->opts.max_record_bytes) {
        pthread_mutex_lock(&sp->mu);
        sp->st.refused_too_large++;
        pthread_mutex_unlock(&sp->mu);
        return PQ_ERR_TOO_LARGE;
    }
    it = malloc(sizeof(*it) + framed);
    if (!it)
        return PQ_ERR_NOMEM;
    it->next = NULL;
    it->cb = cb;
    it->opaque = opaque;
    it->len = pq_spool_frame_encode(it->data, framed, topic, tl, key, key_len, value, value_len);

    pthread_mutex_lock(&sp->mu);
    if (sp->closing) {
        err = PQ_ERR_UNAVAILABLE;
    } else if (sp->st.disk_bytes + sp->queued_bytes + framed > sp->opts.max_bytes) {
        sp->st.refused_full++;
        err = PQ_ERR_UNAVAILABLE;
    } else {
        if (sp->qtail)
            sp->qtail->next = it;
        else
            sp->qhead = it;
        sp->qtail = it;
        sp->queued_bytes += framed;
        if (sp->qhead == it)
            pthread_cond_signal(&sp->wcv);
        it = NULL;
    }
    pthread_mutex_unlock(&sp->mu);
    free(it);
    return err;
}

static void out_link(pq_spool_t *sp, outrec_t *o)
{
    o->prev = NULL;
    o->next = sp->out;
    if (sp->out)
        sp->out->prev = o;
    sp->out = o;
    sp->st.inflight++;
}

static void out_unlink(pq_spool_t *sp, outrec_t *o)
{
    if (o->prev)
        o->prev->next = o->next;
    else
        sp->out = o->next;
    if (o->next)
        o->next->prev = o->prev;
    o->prev = o->next = NULL;
    sp->st.inflight--;
}

/* Reads a record back and points the public fields into its buffer. Called without mu. */
static int load_rec(pq_spool_t *sp, outrec_t *o, uint64_t off, uint32_t len)
{
    unsigned char *buf;
    uint32_t plen;
    pq_spool_rec_t view;

    /* Room for a NUL-terminated copy of the topic after the record; grown below for the rare
     * topic longer than 255 bytes. */
    buf = malloc((size_t)len + 256);
    if (!buf)
        return -1;
    if (pread_all(o->seg->fd, buf, len, off) != 0) {
        PQ_ERR("spool %s: cannot read back %s offset %" PRIu64 ": %s", sp->dir, o->seg->name, off,
               strerror(errno));
        goto out_free;
    }
    plen = get_le32(buf);
    if (plen != len - PQ_SPOOL_FRAME_HEADER ||
        pq_crc32c(0, buf + PQ_SPOOL_FRAME_HEADER, plen) != get_le32(buf + 4) ||
        pq_spool_payload_decode(buf + PQ_SPOOL_FRAME_HEADER, plen, &view) != 0) {
        PQ_ERR("spool %s: %s offset %" PRIu64 " no longer checks out (changed on disk)", sp->dir,
               o->seg->name, off);
        goto out_free;
    }
    if (view.topic_len >= 256) {
        unsigned char *b = realloc(buf, (size_t)len + view.topic_len + 1);
        if (!b)
            goto out_free;
        buf = b;
        pq_spool_payload_decode(buf + PQ_SPOOL_FRAME_HEADER, plen, &view);
    }
    memcpy(buf + len, view.topic, view.topic_len);
    buf[len + view.topic_len] = '\0';
    view.topic = (const char *)buf + len;
    view.seq = o->seg->seq;
    view.offset = off;
    o->pub = view;
    o->buf = buf;
    return 0;
out_free:
    free(buf);
    return -1;
}

pq_err_t pq_spool_next(pq_spool_t *sp, int timeout_ms, pq_spool_rec_t **rec)
{
    struct timespec deadline;
    outrec_t *o = NULL;
    rec_ent_t *ent;
    uint64_t off;
    uint32_t len;

    *rec = NULL;
    if (timeout_ms > 0) {
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&sp->mu);
    for (;;) {
        if (sp->closing) {
            pthread_mutex_unlock(&sp->mu);
            return PQ_ERR_CANCELLED;
        }
        if (sp->retry_head) {
            o = sp->retry_head;
            sp->retry_head = o->next;
            if (!sp->retry_head)
                sp->retry_tail = NULL;
            break;
        }
        for (seg_t *seg = sp->shead; seg; seg = seg->next) {
            if (seg->next_idx < seg->nrec) {
                o = calloc(1, sizeof(*o));
                if (!o) {
                    pthread_mutex_unlock(&sp->mu);
                    return PQ_ERR_NOMEM;
                }
                o->seg = seg;
                o->idx = seg->next_idx++;
                break;
            }
        }
        if (o)
            break;
        if (timeout_ms == 0 ||
            (timeout_ms > 0 && pthread_cond_timedwait(&sp->dcv, &sp->mu, &deadline) != 0)) {
            pthread_mutex_unlock(&sp->mu);
            return PQ_ERR_TIMEOUT;
        }
        if (timeout_ms < 0)
            pthread_cond_wait(&sp->dcv, &sp->mu);
    }
    ent = &o->seg->recs[o->idx];
    ent->state = REC_OUT;
    off = ent->off;
    len = ent->len;
    out_link(sp, o);
    pthread_mutex_unlock(&sp->mu);

    if (!o->buf && load_rec(sp, o, off, len) != 0) {
        /* Stays pending, first in line: the drainer sees the error and backs off. */
        pthread_mutex_lock(&sp->mu);
        out_unlink(sp, o);
        o->seg->recs[o->idx].state = REC_PENDING;
        o->next = sp->retry_head;
        sp->retry_head = o;
        if (!sp->retry_tail)
            sp->retry_tail = o;
        pthread_mutex_unlock(&sp->mu);
        return PQ_ERR_INTERNAL;
    }
    *rec = &o->pub;
    return PQ_OK;
}

void pq_spool_ack(pq_spool_t *sp, pq_spool_rec_t *rec)
{
    outrec_t *o = (outrec_t *)rec;
    seg_t *seg, *dead = NULL;
    rec_ent_t *ent;

    if (!rec)
        return;
    seg = o->seg;
    pthread_mutex_lock(&sp->mu);
    out_unlink(sp, o);
    ent = &seg->recs[o->idx];
    if (ent->state != REC_ACKED) {
        ent->state = REC_ACKED;
        seg->nacked++;
        sp->st.pending_records--;
        sp->st.pending_bytes -= ent->len;
        sp->st.acked++;
    }
    if (seg->nacked == seg->nrec) {
        if (seg->sealed) {
            seg_unlink(sp, seg);
            dead = seg;
        } else {
            sp->retire = 1; /* the active segment: the writer retires it when idle */
            pthread_cond_signal(&sp->wcv);
        }
    }
    pthread_mutex_unlock(&sp->mu);
    free(o->buf);
    free(o);
    if (dead)
        seg_delete(sp, dead);
}

void pq_spool_nack(pq_spool_t *sp, pq_spool_rec_t *rec)
{
    outrec_t *o = (outrec_t *)rec;

    if (!rec)
        return;
    pthread_mutex_lock(&sp->mu);
    out_unlink(sp, o);
    o->seg->recs[o->idx].state = REC_PENDING;
    o->next = NULL;
    if (sp->retry_tail)
        sp->retry_tail->next = o;
    else
        sp->retry_head = o;
    sp->retry_tail = o;
    sp->st.nacked++;
    pthread_cond_signal(&sp->dcv);
    pthread_mutex_unlock(&sp->mu);
}

void pq_spool_pending(pq_spool_t *sp, uint64_t *records, uint64_t *bytes)
{
    pthread_mutex_lock(&sp->mu);
    if (records)
        *records = sp->st.pending_records;
    if (bytes)
        *bytes = sp->st.pending_bytes;
    pthread_mutex_unlock(&sp->mu);
}

int pq_spool_full(pq_spool_t *sp)
{
    int full;

    pthread_mutex_lock(&sp->mu);
    uint64_t used = sp->st.disk_bytes + sp->queued_bytes;
    uint64_t headroom = sp->opts.max_bytes / 8;

    if (headroom > sp->opts.max_record_bytes)
        headroom = sp->opts.max_record_bytes;
    full = used + headroom > sp->opts.max_bytes;
    pthread_mutex_unlock(&sp->mu);
    return full;
}

void pq_spool_stats(pq_spool_t *sp, pq_spool_stats_t *stats)
{
    pthread_mutex_lock(&sp->mu);
    *stats = sp->st;
    stats->queued_bytes = sp->queued_bytes;
    pthread_mutex_unlock(&sp->mu);
}
