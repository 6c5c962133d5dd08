/* OpenAI Files API subset (DESIGN.md §5): POST /v1/files (multipart/form-data, fields purpose and
 * file), GET /v1/files (newest first, after + limit), GET/DELETE /v1/files/{id},
 * GET /v1/files/{id}/content.
 *
 * A file is the hash <prefix>file:{tenant}:{id} (id, bytes, created_at, filename, purpose,
 * lines, body) and a member of the sorted set <prefix>files:{tenant} (score 0, ordered by id:
 * ids are "file-" + a time-sortable unique id, so lexical order is creation order). Another
 * tenant's file is simply absent (404). The body is one Redis value, so broker.max_file_bytes
 * is capped at 256 MiB (Redis' proto-max-bulk-len is 512 MiB; the hiredis command buffer holds
 * one more copy while it is sent). The upload is read by evhttp into the request's evbuffer,
 * pulled up once, the file part is located with memmem and handed to hiredis (which copies it
 * into its output buffer): nothing blocks the loop but those copies. */
#include "broker.h"
#include "api.h"
#include "files.h"
#include "http.h"
#include "multipart.h"
#include "ratelimit.h"
#include "rconn.h"
#include "slot.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "promptq/log.h"
#include "promptq/util.h"

#define FILES_LIST_MAX     10000
#define FILES_LIST_DEFAULT 10000
#define FILENAME_MAX_LEN   255

/* ---- helpers ---- */

void pq_files_new_id(char *out, size_t size)
{
    char id[PQ_JOB_ID_LEN + 1];

    pq_id_generate(id); /* "job_" + 26 */
    snprintf(out, size, "file-%s", id + 4);
}

static int file_key(pq_bthread_t *t, char *buf, size_t size, const char *tenant, const char *id)
{
    int n = snprintf(buf, size, "%sfile:%s:%s", t->bc->conf->redis_prefix, tenant, id);

    return n > 0 && (size_t)n < size ? n : -1;
}

static int files_set_key(pq_bthread_t *t, char *buf, size_t size, const char *tenant)
{
    int n = snprintf(buf, size, "%sfiles:%s", t->bc->conf->redis_prefix, tenant);

    return n > 0 && (size_t)n < size ? n : -1;
}

static int id_ok(const char *id)
{
    return !strncmp(id, "file-", 5) && pq_id_valid(id);
}

int pq_files_store(pq_bthread_t *t, const char *tenant, const char *id, const char *filename,
                   const char *purpose, const char *body, size_t len, int64_t lines)
{
    char key[512], skey[512], bytes[24], created[24], nlines[24];
    const char *argv[16];
    size_t lens[16];
    int n = 0;

    if (file_key(t, key, sizeof(key), tenant, id) < 0 ||
        files_set_key(t, skey, sizeof(skey), tenant) < 0)
        return -1;
    snprintf(bytes, sizeof(bytes), "%zu", len);
    snprintf(created, sizeof(created), "%lld", (long long)(pq_now_ms() / 1000));
    snprintf(nlines, sizeof(nlines), "%lld", (long long)lines);
    argv[n++] = "HSET";
    argv[n++] = key;
    argv[n++] = "id";
    argv[n++] = id;
    argv[n++] = "bytes";
    argv[n++] = bytes;
    argv[n++] = "created_at";
    argv[n++] = created;
    argv[n++] = "filename";
    argv[n++] = filename;
    argv[n++] = "purpose";
    argv[n++] = purpose;
    argv[n++] = "lines";
    argv[n++] = nlines;
    argv[n++] = "body";
    argv[n++] = body;
    for (int i = 0; i < n - 1; i++) /* the body is not NUL-terminated */
        lens[i] = strlen(argv[i]);
    lens[n - 1] = len;
    if (pq_rconn_send(t, NULL, NULL, n, argv, lens))
        return -1;
    return pq_rconn_sendf(t, NULL, NULL, "ZADD %s 0 %s", skey, id);
}

static const char *el(const redisReply *r, size_t i)
{
    return r && i < r->elements && r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str
                                                                             : NULL;
}

/* The file object from (id, bytes, created_at, filename, purpose). */
static json_t *file_object(const char *id, const char *bytes, const char *created,
                           const char *filename, const char *purpose)
{
    return json_pack("{s:s, s:s, s:I, s:I, s:s, s:s, s:s, s:n, s:n}", "id", id, "object", "file",
                     "bytes", (json_int_t)(bytes ? strtoll(bytes, NULL, 10) : 0), "created_at",
                     (json_int_t)(created ? strtoll(created, NULL, 10) : 0), "filename",
                     filename ? filename : "", "purpose", purpose ? purpose : "", "status",
                     "processed", "expires_at", "status_details");
}

/* ---- POST /v1/files ---- */

typedef struct {
    char id[64];
    char tenant[PQ_TENANT_MAX + 1];
    char filename[FILENAME_MAX_LEN + 1];
    char purpose[32];
    size_t bytes;
} upload_t;

/* The length of the client's file name that is kept: at most FILENAME_MAX_LEN bytes, cut
 * before a UTF-8 continuation byte so no character is split; -1 when the name is not UTF-8
 * (or holds NUL), which no file object could carry. */
static long filename_keep(const char *name, size_t len)
{
    size_t keep = len < FILENAME_MAX_LEN ? len : FILENAME_MAX_LEN;
    json_t *probe;

    while (keep < len && keep > 0 && ((unsigned char)name[keep] & 0xC0) == 0x80)
        keep--;
    if (memchr(name, '\0', keep))
        return -1;
    probe = json_stringn(name, keep);
    if (!probe)
        return -1;
    json_decref(probe);
    return (long)keep;
}

static void upload_stored(pq_slot_t *s, const void *r)
{
    upload_t *u = s->ctx;
    char bytes[24], created[24], key[512], skey[512];
    json_t *o;

    snprintf(bytes, sizeof(bytes), "%zu", u->bytes);
    snprintf(created, sizeof(created), "%lld", (long long)(pq_now_ms() / 1000));
    o = file_object(u->id, bytes, created, u->filename, u->purpose);
    if (!o) {
        /* not answerable: take back what was stored so no file is left that nobody was told
         * of, that does not list and does not read */
        if (file_key(s->t, key, sizeof(key), u->tenant, u->id) >= 0)
            pq_rconn_sendf(s->t, NULL, NULL, "DEL %s", key);
        if (files_set_key(s->t, skey, sizeof(skey), u->tenant) >= 0)
            pq_rconn_sendf(s->t, NULL, NULL, "ZREM %s %s", skey, u->id);
        PQ_ERR("file %s/%s: cannot build the file object: upload removed", u->tenant, u->id);
        pq_http_error(s->t, s->req, s->path, 500, "internal", "cannot build the file object");
        pq_slot_release(s);
        return;
    }
    pq_counter_add(s->t->b->m_files_uploaded, (uint64_t)u->bytes);
    pq_http_reply_json(s, 200, o);
    pq_slot_release(s);
}

static void files_post(pq_bthread_t *t, struct evhttp_request *req, const char *tenant)
{
    const pq_conf_t *conf = t->bc->conf;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    char boundary[100], errstr[128], key[512], skey[512], bytes[24], created[24], nlines[24];
    const char *body, *argv[16];
    size_t lens[16];
    pq_form_t f;
    upload_t *u;
    pq_slot_t *s;
    int64_t lines = 0;
    long fl = 0;
    int n = 0;

    if (pq_form_boundary(evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type"),
                         boundary, sizeof(boundary))) {
        pq_http_error(t, req, PQ_PATH_FILES, 400, "invalid_request_error",
                      "expected Content-Type: multipart/form-data with a boundary");
        return;
    }
    if (len > (size_t)conf->max_file_bytes + 65536) {
        pq_http_error(t, req, PQ_PATH_FILES, 413, "invalid_request_error",
                      "upload exceeds the limit of %lld bytes (broker.max_file_bytes)",
                      (long long)conf->max_file_bytes);
        return;
    }
    body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    if (pq_form_parse(body, len, boundary, &f, errstr, sizeof(errstr))) {
        pq_http_error(t, req, PQ_PATH_FILES, 400, "invalid_request_error", "%s", errstr);
        return;
    }
    if (!f.purpose || f.purpose_len != 5 || memcmp(f.purpose, "batch", 5) != 0) {
        pq_http_error(t, req, PQ_PATH_FILES, 400, "invalid_request_error",
                      "purpose: only \"batch\" is supported");
        return;
    }
    if (!f.have_file) {
        pq_http_error(t, req, PQ_PATH_FILES, 400, "invalid_request_error",
                      "file: missing form field");
        return;
    }
    if (f.file_len > (size_t)conf->max_file_bytes) {
        pq_http_error(t, req, PQ_PATH_FILES, 413, "invalid_request_error",
                      "file of %zu bytes exceeds the limit of %lld bytes (broker.max_file_bytes)",
                      f.file_len, (long long)conf->max_file_bytes);
        return;
    }
    if (f.filename && (fl = filename_keep(f.filename, f.filename_len)) < 0) {
        pq_http_error(t, req, PQ_PATH_FILES, 400, "invalid_request_error",
                      "filename: not valid UTF-8");
        return;
    }
    for (const char *p = f.file, *e = f.file + f.file_len; p < e;) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));

        lines++;
        if (!nl)
            break;
        p = nl + 1;
    }
    if (!pq_rconn_usable(t)) {
        pq_api_unavailable(t, req, PQ_PATH_FILES);
        return;
    }
    s = pq_slot_get(t, PQ_PATH_FILES, req, &pq_api_ops);
    u = calloc(1, sizeof(*u));
    if (!s || !u) {
        free(u);
        if (s)
            pq_slot_release(s);
        pq_api_unavailable(t, req, PQ_PATH_FILES);
        return;
    }
    s->ctx = u;
    s->ctx_free = free;
    pq_files_new_id(u->id, sizeof(u->id));
    pq_strlcpy(u->tenant, tenant, sizeof(u->tenant));
    if (f.filename) {
        memcpy(u->filename, f.filename, (size_t)fl);
        u->filename[fl] = '\0';
    } else {
        pq_strlcpy(u->filename, "upload.jsonl", sizeof(u->filename));
    }
    pq_strlcpy(u->purpose, "batch", sizeof(u->purpose));
    u->bytes = f.file_len;
    file_key(t, key, sizeof(key), tenant, u->id);
    files_set_key(t, skey, sizeof(skey), tenant);
    snprintf(bytes, sizeof(bytes), "%zu", f.file_len);
    snprintf(created, sizeof(created), "%lld", (long long)(pq_now_ms() / 1000));
    snprintf(nlines, sizeof(nlines), "%lld", (long long)lines);
    /* ZADD first (no reply wanted), then the HSET whose reply answers */
    if (pq_rconn_sendf(t, NULL, NULL, "ZADD %s 0 %s", skey, u->id)) {
        pq_api_unavailable(t, req, PQ_PATH_FILES);
        pq_slot_release(s);
        return;
    }
    argv[n++] = "HSET";
    argv[n++] = key;
    argv[n++] = "id";
    argv[n++] = u->id;
    argv[n++] = "bytes";
    argv[n++] = bytes;
    argv[n++] = "created_at";
    argv[n++] = created;
    argv[n++] = "filename";
    argv[n++] = u->filename;
    argv[n++] = "purpose";
    argv[n++] = u->purpose;
    argv[n++] = "lines";
    argv[n++] = nlines;
    argv[n++] = "body";
    argv[n++] = f.file;
    for (int i = 0; i < n - 1; i++) /* the body is not NUL-terminated */
        lens[i] = strlen(argv[i]);
    lens[n - 1] = f.file_len;
    if (pq_api_send(s, upload_stored, n, argv, lens)) {
        pq_api_unavailable(t, req, PQ_PATH_FILES);
        pq_slot_release(s);
        return;
    }
    /* a large value takes a while to go out: do not time the request out at 200 ms */
    if (f.file_len > 1024 * 1024) {
        struct timeval tv = {5 + (time_t)(f.file_len >> 24), 0};

        event_del(&s->timer);
        event_add(&s->timer, &tv);
    }
}

/* ---- GET /v1/files, GET/DELETE /v1/files/{id}, content ---- */

static void list_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    long limit = (long)(intptr_t)s->ctx;
    json_t *data = json_array(), *o;
    size_t n = reply->type == REDIS_REPLY_ARRAY ? reply->elements / 2 : 0;
    int more = (long)n > limit;

    s->ctx = NULL;
    for (size_t i = 0; i < n && (long)i < limit; i++) {
        const redisReply *v = reply->element[2 * i + 1];

        if (v->type != REDIS_REPLY_ARRAY || !el(v, 0))
            continue;
        json_array_append_new(data, file_object(el(v, 0), el(v, 1), el(v, 2), el(v, 3), el(v, 4)));
    }
    o = json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", more);
    if (o) {
        size_t k = json_array_size(data);

        json_object_set_new(o, "first_id",
                            k ? json_deep_copy(json_object_get(json_array_get(data, 0), "id"))
                              : json_null());
        json_object_set_new(o, "last_id",
                            k ? json_deep_copy(json_object_get(json_array_get(data, k - 1), "id"))
                              : json_null());
    }
    pq_http_reply_json(s, 200, o);
    pq_slot_release(s);
}

static void one_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;

    if (!el(reply, 0)) {
        pq_http_error(s->t, s->req, s->path, 404, "invalid_request_error",
                      "No such File object: %s", s->id);
    } else if (s->api.step == 1) { /* content */
        const redisReply *b = reply->element[1];

        evhttp_add_header(evhttp_request_get_output_headers(s->req), "Content-Type",
                          "application/octet-stream");
        pq_http_reply(s->t, s->req, s->path, 200, b->type == REDIS_REPLY_STRING ? b->str : "",
                      b->type == REDIS_REPLY_STRING ? (size_t)b->len : 0);
    } else {
        pq_http_reply_json(
            s, 200,
            file_object(el(reply, 0), el(reply, 1), el(reply, 2), el(reply, 3), el(reply, 4)));
    }
    pq_slot_release(s);
}

static void del_reply(pq_slot_t *s, const void *r)
{
    const redisReply *reply = r;
    char skey[512];

    if (reply->type != REDIS_REPLY_INTEGER || reply->integer != 1) {
        pq_http_error(s->t, s->req, s->path, 404, "invalid_request_error",
                      "No such File object: %s", s->id);
    } else {
        if (files_set_key(s->t, skey, sizeof(skey), s->tenant) > 0)
            pq_rconn_sendf(s->t, NULL, NULL, "ZREM %s %s", skey, s->id);
        pq_http_reply_json(
            s, 200, json_pack("{s:s, s:s, s:b}", "id", s->id, "object", "file", "deleted", 1));
    }
    pq_slot_release(s);
}

void pq_files_serve(pq_bthread_t *t, struct evhttp_request *req, const char *rest)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    pq_path_t path = rest[0] ? PQ_PATH_FILE : PQ_PATH_FILES;
    char tenant[PQ_TENANT_MAX + 1], id[PQ_ID_MAX + 1], key[512];
    int content;
    pq_slot_t *s;

    if (pq_api_tenant(t, req, path, tenant, sizeof(tenant)))
        return;
    if (path == PQ_PATH_FILES) {
        if (m == EVHTTP_REQ_POST) {
            if (pq_http_ratelimit(t, req, path, tenant))
                return;
            files_post(t, req, tenant);
            return;
        }
        if (m == EVHTTP_REQ_GET) {
            static const char *fields[] = {"id", "bytes", "created_at", "filename", "purpose"};
            char after[PQ_ID_MAX + 1], skey[512], pfx[512];
            long limit = pq_api_query_limit(req, after, sizeof(after), FILES_LIST_DEFAULT,
                                            FILES_LIST_MAX, pq_id_valid);

            if (limit < 0) {
                pq_http_error(t, req, path, 400, "invalid_request_error", "limit: must be 1 to %d",
                              FILES_LIST_MAX);
                return;
            }
            files_set_key(t, skey, sizeof(skey), tenant);
            snprintf(pfx, sizeof(pfx), "%sfile:%s:", t->bc->conf->redis_prefix, tenant);
            pq_api_list(t, req, path, list_reply, skey, pfx, after, limit, 5, fields);
            return;
        }
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, POST");
        pq_http_error(t, req, path, 405, "invalid_request_error", "method not allowed");
        return;
    }
    content = pq_api_path_id(t, req, path, rest, "/content", PQ_ID_MAX, id_ok, "File", id);
    if (content < 0)
        return;
    if (!(m == EVHTTP_REQ_GET || (m == EVHTTP_REQ_DELETE && !content))) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
                          content ? "GET" : "GET, DELETE");
        pq_http_error(t, req, path, 405, "invalid_request_error", "method not allowed");
        return;
    }
    if (m == EVHTTP_REQ_DELETE && pq_http_ratelimit(t, req, path, tenant))
        return;
    file_key(t, key, sizeof(key), tenant, id);
    s = pq_slot_get(t, path, req, &pq_api_ops);
    if (!s) {
        pq_api_unavailable(t, req, path);
        return;
    }
    pq_strlcpy(s->id, id, sizeof(s->id));
    pq_strlcpy(s->tenant, tenant, sizeof(s->tenant));
    s->api.step = content;
    {
        const char *get[] = {"HMGET", key, "id", "bytes", "created_at", "filename", "purpose"};
        const char *getc[] = {"HMGET", key, "id", "body"};
        const char *del[] = {"DEL", key};
        int rc;

        if (m == EVHTTP_REQ_DELETE)
            rc = pq_api_sendv(s, del_reply, 2, del);
        else if (content)
            rc = pq_api_sendv(s, one_reply, 4, getc);
        else
            rc = pq_api_sendv(s, one_reply, 7, get);
        if (rc) {
            pq_api_unavailable(t, req, path);
            pq_slot_release(s);
        }
    }
}
