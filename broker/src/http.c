/* HTTP replies (every one is counted by path and status code), JSON errors and API-key auth. */
#include "broker.h"
#include "http.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/http_struct.h> /* headers_size, major, minor: not in the accessor API */
#include <event2/keyvalq_struct.h>
#include <event2/util.h>
#include <jansson.h>

#include "promptq/log.h"

static const int counted_codes[PQ_BROKER_NCODES - 1] = {
    200, 202, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 500, 502, 503, 504, 499, 501};
static const char *const path_labels[PQ_PATH__COUNT] = {
    "/v1/jobs",   "/v1/jobs/{id}",        "/healthz",        "/readyz",
    "/metrics",   "/v1/chat/completions", "/v1/models",      "/v1/models/{id}",
    "/v1/files",  "/v1/files/{id}",       "/v1/batches",     "/v1/batches/{id}",
    "/v1/health", "/v1/parked",           "/v1/dlq/redrive", "other",
};

static pq_counter_t *request_counter(pq_bthread_t *t, pq_path_t path, int code)
{
    char labels[96];
    int ci = PQ_BROKER_NCODES - 1;

    for (int i = 0; i < PQ_BROKER_NCODES - 1; i++) {
        if (counted_codes[i] == code) {
            ci = i;
            break;
        }
    }
    if (!t->m_requests[path][ci]) {
        char codestr[8];

        if (ci == PQ_BROKER_NCODES - 1)
            snprintf(codestr, sizeof(codestr), "other");
        else
            snprintf(codestr, sizeof(codestr), "%d", code);
        snprintf(labels, sizeof(labels), "path=\"%s\",code=\"%s\"", path_labels[path], codestr);
        t->m_requests[path][ci] =
            pq_metrics_counter(t->b->metrics, "promptq_broker_http_requests_total",
                               "HTTP requests answered, by path and status code", labels);
    }
    return t->m_requests[path][ci];
}

static const char *reason(int code)
{
    switch (code) {
    case 200:
        return "OK";
    case 202:
        return "Accepted";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 502:
        return "Bad Gateway";
    case 504:
        return "Gateway Timeout";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 503:
        return "Service Unavailable";
    default:
        return "";
    }
}

void pq_http_reply(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *body, size_t len)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);

    if (body && len)
        evbuffer_add(evhttp_request_get_output_buffer(req), body, len);
    if (!evhttp_find_header(h, "Content-Type"))
        evhttp_add_header(h, "Content-Type", "application/json");
    pq_counter_add(request_counter(t, path, code), 1);
    evhttp_send_reply(req, code, reason(code), NULL);
}

void pq_http_reply_start(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code)
{
    pq_counter_add(request_counter(t, path, code), 1);
    evhttp_send_reply_start(req, code, reason(code));
}

void pq_http_method_not_allowed(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                                const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
    pq_http_error(t, req, path, 405, "method_not_allowed", "method not allowed; allowed: %s",
                  allow);
}

void pq_http_reply_json(pq_slot_t *s, int code, json_t *o)
{
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;

    json_decref(o);
    if (!text) {
        pq_http_error(s->t, s->req, s->path, 500, "internal", "out of memory");
        return;
    }
    pq_http_reply(s->t, s->req, s->path, code, text, strlen(text));
    free(text);
}

void pq_http_unavailable(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                         const char *retry_after, const char *why)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", retry_after);
    pq_counter_add(t->b->m_unavailable, 1);
    pq_http_error(t, req, path, 503, "unavailable", "job not accepted: %s; retry", why);
}

size_t pq_http_json_escape(char *out, size_t size, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;

    for (; *s && o + 7 < size; s++) {
        unsigned char c = (unsigned char)*s;

        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            out[o++] = '\\';
            out[o++] = 'u';
            out[o++] = '0';
            out[o++] = '0';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
    return o;
}

void pq_http_error(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, int code,
                   const char *type, const char *fmt, ...)
{
    char msg[512], esc[1024], body[1200];
    va_list ap;
    int n;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pq_http_json_escape(esc, sizeof(esc), msg);
    if (path == PQ_PATH_CHAT || path == PQ_PATH_MODELS || path == PQ_PATH_MODEL ||
        (path >= PQ_PATH_FILES && path <= PQ_PATH_BATCH))
        n = snprintf(body, sizeof(body),
                     "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
                     "\"code\":\"%s\"}}",
                     esc, type, type);
    else
        n = snprintf(body, sizeof(body), "{\"error\":{\"type\":\"%s\",\"message\":\"%s\"}}", type,
                     esc);
    if (n < 0 || (size_t)n >= sizeof(body))
        n = (int)strlen(body);
    pq_http_reply(t, req, path, code, body, (size_t)n);
}

/* Compares without an early exit, so the time taken does not reveal a key's prefix. */
static int key_equal(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    unsigned char d = (unsigned char)(alen != blen);

    for (size_t i = 0; i < alen; i++)
        d |= (unsigned char)(a[i] ^ b[i < blen ? i : 0]);
    return d == 0 && blen > 0;
}

static const char *http_method_name(enum evhttp_cmd_type m)
{
    switch (m) {
    case EVHTTP_REQ_GET:
        return "GET";
    case EVHTTP_REQ_POST:
        return "POST";
    case EVHTTP_REQ_HEAD:
        return "HEAD";
    case EVHTTP_REQ_PUT:
        return "PUT";
    case EVHTTP_REQ_DELETE:
        return "DELETE";
    case EVHTTP_REQ_OPTIONS:
        return "OPTIONS";
    case EVHTTP_REQ_TRACE:
        return "TRACE";
    case EVHTTP_REQ_CONNECT:
        return "CONNECT";
    case EVHTTP_REQ_PATCH:
        return "PATCH";
    }
    return NULL;
}

/* RFC 9110 §5.6.2 token characters. */
static int http_token_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static void http_head_error(pq_bthread_t *t, struct evhttp_request *req, const char *what,
                            const char *msg)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
    pq_http_error(t, req, PQ_PATH_OTHER, 400, "invalid_request", "%s%.64s%s%s",
                  what ? "header \"" : "", what ? what : "", what ? "\": " : "", msg);
}

int pq_http_check_head(pq_bthread_t *t, struct evhttp_request *req)
{
    struct evkeyvalq *h = evhttp_request_get_input_headers(req);
    const struct evkeyval *kv;
    const char *method = http_method_name(evhttp_request_get_command(req));
    const char *uri = evhttp_request_get_uri(req);
    size_t seen = 0, nheaders = 0, ncl = 0, nhost = 0;

    TAILQ_FOREACH(kv, h, next)
    {
        const unsigned char *k = (const unsigned char *)kv->key;

        if (!*k) {
            http_head_error(t, req, NULL, "a header line has an empty name");
            return -1;
        }
        for (; *k; k++) {
            if (!http_token_char(*k)) {
                http_head_error(t, req, kv->key,
                                "the name holds whitespace or a character a header name may not "
                                "hold (no space before the colon)");
                return -1;
            }
        }
        nheaders++;
        seen += strlen(kv->key) + 1 + strlen(kv->value);
        if (!evutil_ascii_strcasecmp(kv->key, "Content-Length")) {
            const char *v = kv->value;

            if (++ncl > 1) {
                http_head_error(t, req, NULL, "Content-Length: given more than once");
                return -1;
            }
            if (!*v || strspn(v, "0123456789") != strlen(v)) {
                http_head_error(t, req, NULL, "Content-Length: must be decimal digits only");
                return -1;
            }
        } else if (!evutil_ascii_strcasecmp(kv->key, "Host")) {
            nhost++;
        }
    }
    if (req->major == 1 && req->minor >= 1 && nhost != 1) {
        http_head_error(t, req, NULL,
                        nhost ? "Host: given more than once" : "Host: required in HTTP/1.1");
        return -1;
    }
    if (nhost > 1) {
        http_head_error(t, req, NULL, "Host: given more than once");
        return -1;
    }
    /* libevent keeps each line's length in headers_size but stores the value only up to a NUL:
     * the request line and "Name: value" lines (one optional space after the colon) account
     * for every byte of a head without one. */
    if (method && uri) {
        seen += strlen(method) + 1 + strlen(uri) + 1 + 8; /* "HTTP/1.1" */
        if (req->headers_size > seen + nheaders) {
            http_head_error(t, req, NULL,
                            evhttp_find_header(h, "Idempotency-Key")
                                ? "Idempotency-Key (or another header or the request line): "
                                  "holds a NUL byte, or a header value has extra whitespace"
                                : "a header or the request line holds a NUL byte, or a header "
                                  "value has extra whitespace");
            return -1;
        }
    }
    return 0;
}

int pq_http_auth(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path, const char **tenant)
{
    const pq_conf_t *conf = t->bc->conf;
    const char *h, *key;
    size_t klen;

    *tenant = NULL;
    if (conf->napi_keys == 0)
        return 0;
    h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
        pq_http_error(t, req, path, 401, "unauthorized",
                      "missing API key: send Authorization: Bearer KEY");
        return -1;
    }
    key = h + 7;
    while (*key == ' ')
        key++;
    klen = strlen(key);
    while (klen > 0 && key[klen - 1] == ' ')
        klen--;
    for (size_t i = 0; i < conf->napi_keys; i++) {
        if (key_equal(key, klen, conf->api_keys[i].key)) {
            *tenant = conf->api_keys[i].value;
            return 0;
        }
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate", "Bearer");
    pq_http_error(t, req, path, 401, "unauthorized", "invalid API key");
    return -1;
}
