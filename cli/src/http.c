/* The CLI's HTTP plumbing: one reusable libcurl easy handle for sequential requests (keep-alive),
 * the common per-transfer setup shared with batch.c's multi handle, and error reporting. */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "promptq/util.h"

void pq_cli_errorf(const char *fmt, ...)
{
    va_list ap;
    char buf[2048];

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    fprintf(stderr, "promptq: %s\n", buf);
}

int pq_cli_init(pq_cli_t *c)
{
    const char *url = getenv("PROMPTQ_URL");
    const char *key = getenv("PROMPTQ_API_KEY");

    memset(c, 0, sizeof(*c));
    pq_strlcpy(c->url, url && *url ? url : PQ_CLI_DEFAULT_URL, sizeof(c->url));
    c->key = key && *key ? key : NULL;
    c->start_ms = pq_mono_ms();
    c->stdout_tty = isatty(STDOUT_FILENO);
    c->stderr_tty = isatty(STDERR_FILENO);
    return 0;
}

void pq_cli_term(pq_cli_t *c)
{
    if (c->easy)
        curl_easy_cleanup(c->easy);
    c->easy = NULL;
    if (c->auth) {
        /* the header holds the key: wipe it before freeing */
        memset(c->auth, 0, strlen(c->auth));
        free(c->auth);
    }
    c->auth = NULL;
    if (c->key_own) {
        memset(c->key_own, 0, strlen(c->key_own));
        free(c->key_own);
    }
    c->key_own = NULL;
    c->key = NULL;
}

int pq_cli_set_url(pq_cli_t *c, const char *url)
{
    size_t n;

    if (strncasecmp(url, "http://", 7) && strncasecmp(url, "https://", 8))
        return -1;
    if (pq_strlcpy(c->url, url, sizeof(c->url)) >= sizeof(c->url))
        return -1;
    n = strlen(c->url);
    while (n > 0 && c->url[n - 1] == '/')
        c->url[--n] = '\0';
    return 0;
}

int pq_cli_ready(pq_cli_t *c)
{
    size_t n;

    if (pq_cli_set_url(c, c->url)) {
        pq_cli_errorf("broker URL must start with http:// or https:// (got %.200s)", c->url);
        return -1;
    }
    if (!c->key)
        return 0;
    for (const char *p = c->key; *p; p++) {
        if (*p == '\r' || *p == '\n') {
            pq_cli_errorf("the API key contains a line break");
            return -1;
        }
    }
    n = strlen(c->key) + sizeof("Authorization: Bearer ");
    c->auth = malloc(n);
    if (!c->auth)
        return -1;
    snprintf(c->auth, n, "Authorization: Bearer %s", c->key);
    return 0;
}

int64_t pq_cli_remaining_ms(const pq_cli_t *c)
{
    int64_t left;

    if (c->timeout_ms <= 0)
        return INT64_MAX;
    left = c->start_ms + c->timeout_ms - pq_mono_ms();
    return left > 0 ? left : 0;
}

long pq_cli_request_timeout_ms(const pq_cli_t *c)
{
    int64_t left = pq_cli_remaining_ms(c);

    if (c->timeout_ms <= 0)
        return PQ_CLI_REQUEST_TIMEOUT;
    return left < 1 ? 1 : (long)left;
}

void pq_cli_resp_reset(pq_cli_resp_t *r)
{
    free(r->body);
    memset(r, 0, sizeof(*r));
    r->retry_after_s = -1;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *opaque)
{
    pq_cli_resp_t *r = opaque;
    size_t n = size * nmemb, want;
    char *nb;

    if (r->too_big)
        return n; /* keep reading, drop the rest */
    if (r->len + n > PQ_CLI_MAX_BODY) {
        r->too_big = 1;
        return n;
    }
    want = r->len + n + 1;
    if (want > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;

        while (cap < want)
            cap *= 2;
        nb = realloc(r->body, cap);
        if (!nb)
            return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
        r->body = nb;
        r->cap = cap;
    }
    memcpy(r->body + r->len, ptr, n);
    r->len += n;
    r->body[r->len] = '\0';
    return n;
}

/* Captures Retry-After and Location; a new status line (100 Continue, redirects) resets them. */
static size_t on_header(char *buf, size_t size, size_t nitems, void *opaque)
{
    pq_cli_resp_t *r = opaque;
    size_t n = size * nitems, vlen;
    const char *v;

    if (n >= 5 && !strncmp(buf, "HTTP/", 5)) {
        r->retry_after_s = -1;
        r->location[0] = '\0';
        return n;
    }
    if (n > 12 && !strncasecmp(buf, "Retry-After:", 12)) {
        v = buf + 12;
        while (v < buf + n && (*v == ' ' || *v == '\t'))
            v++;
        if (v < buf + n && isdigit((unsigned char)*v)) {
            long s = 0;

            while (v < buf + n && isdigit((unsigned char)*v) && s < 86400)
                s = s * 10 + (*v++ - '0');
            r->retry_after_s = (int)s;
        }
    } else if (n > 9 && !strncasecmp(buf, "Location:", 9)) {
        v = buf + 9;
        while (v < buf + n && (*v == ' ' || *v == '\t'))
            v++;
        vlen = (size_t)(buf + n - v);
        while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n'))
            vlen--;
        if (vlen < sizeof(r->location)) {
            memcpy(r->location, v, vlen);
            r->location[vlen] = '\0';
        }
    }
    return n;
}

int pq_cli_easy_setup(pq_cli_t *c, CURL *h, const char *method, const char *path, const char *body,
                      size_t len, const char *extra_header, struct curl_slist **hdrs,
                      pq_cli_resp_t *r)
{
    char url[4096];
    struct curl_slist *l = NULL, *t;
    long tmo = pq_cli_request_timeout_ms(c);

    if ((size_t)snprintf(url, sizeof(url), "%s%s", c->url, path) >= sizeof(url))
        return -1;
    *hdrs = NULL;
#define ADD(s)                                                                                     \
    do {                                                                                           \
        t = curl_slist_append(l, (s));                                                             \
        if (!t)                                                                                    \
            goto out_fail;                                                                         \
        l = t;                                                                                     \
    } while (0)
    ADD("Accept: application/json");
    ADD("Expect:"); /* no 100-continue round trip for larger bodies */
    if (body)
        ADD("Content-Type: application/json");
    if (c->auth)
        ADD(c->auth);
    if (extra_header)
        ADD(extra_header);
#undef ADD

    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "promptq-cli/0.1");
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, tmo < 10000 ? tmo : 10000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, tmo);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, l);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    if (body) {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, strcmp(method, "POST") ? method : NULL);
    } else if (!strcmp(method, "GET")) {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, NULL);
    } else if (!strcmp(method, "POST")) {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, NULL);
    } else {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    }
    *hdrs = l;
    return 0;
out_fail:
    curl_slist_free_all(l);
    return -1;
}

int pq_cli_request(pq_cli_t *c, const char *method, const char *path, const char *body, size_t len,
                   const char *extra_header, pq_cli_resp_t *r)
{
    struct curl_slist *hdrs = NULL;
    CURLcode rc;
    int ret = -1;

    pq_cli_resp_reset(r);
    if (!c->easy) {
        c->easy = curl_easy_init();
        if (!c->easy) {
            r->cerr = CURLE_OUT_OF_MEMORY;
            pq_strlcpy(r->errbuf, "out of memory", sizeof(r->errbuf));
            return -1;
        }
    }
    if (pq_cli_easy_setup(c, c->easy, method, path, body, len, extra_header, &hdrs, r)) {
        r->cerr = CURLE_URL_MALFORMAT;
        pq_strlcpy(r->errbuf, "request URL too long", sizeof(r->errbuf));
        return -1;
    }
    rc = curl_easy_perform(c->easy);
    r->cerr = rc;
    if (rc == CURLE_OK) {
        curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &r->status);
        ret = 0;
    } else if (!r->errbuf[0]) {
        pq_strlcpy(r->errbuf, curl_easy_strerror(rc), sizeof(r->errbuf));
    }
    curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hdrs);
    return ret;
}

json_t *pq_cli_resp_json(const pq_cli_resp_t *r)
{
    if (!r->body || !r->len || r->too_big)
        return NULL;
    return json_loadb(r->body, r->len, 0, NULL);
}

int pq_cli_is_unreachable(CURLcode cerr)
{
    switch (cerr) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_PARTIAL_FILE:
    case CURLE_WEIRD_SERVER_REPLY:
        return 1;
    default:
        return 0;
    }
}

/* Copies at most n bytes of s into out, replacing control characters so that a broker (or
 * whatever answers on that port) cannot write escape sequences to the terminal. */
static void printable(char *out, size_t size, const char *s, size_t n)
{
    size_t o = 0;

    for (size_t i = 0; i < n && s[i] && o + 1 < size; i++) {
        unsigned char ch = (unsigned char)s[i];

        out[o++] = (ch < 0x20 || ch == 0x7f) ? ' ' : (char)ch;
    }
    if (size)
        out[o] = '\0';
}

int pq_cli_report(const pq_cli_t *c, const char *what, const pq_cli_resp_t *r)
{
    json_t *doc, *err;
    const char *type = NULL, *msg = NULL;
    char tbuf[128], mbuf[1024];

    if (r->status == 0) {
        pq_cli_errorf("cannot reach the broker at %s: %s", c->url,
                      r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->cerr));
        return pq_cli_is_unreachable(r->cerr) ? PQ_CLI_EXIT_UNREACHABLE : PQ_CLI_EXIT_FAILED;
    }
    doc = pq_cli_resp_json(r);
    err = doc ? json_object_get(doc, "error") : NULL;
    if (json_is_object(err)) {
        type = json_string_value(json_object_get(err, "type"));
        msg = json_string_value(json_object_get(err, "message"));
    } else if (json_is_string(err)) {
        msg = json_string_value(err);
    }
    printable(tbuf, sizeof(tbuf), type ? type : "http_error", 127);
    if (msg)
        printable(mbuf, sizeof(mbuf), msg, sizeof(mbuf) - 1);
    else if (r->body && r->len)
        printable(mbuf, sizeof(mbuf), r->body, r->len < 200 ? r->len : 200);
    else
        pq_strlcpy(mbuf, "(empty answer)", sizeof(mbuf));
    pq_cli_errorf("%ld %s: %s", r->status, tbuf, mbuf);
    if (r->status == 404 && what && type && !strcmp(type, "not_found") && msg &&
        !strcmp(msg, "no such path"))
        pq_cli_errorf("the broker at %s does not serve %s (not in this broker version)", c->url,
                      what);
    json_decref(doc);
    return PQ_CLI_EXIT_FAILED;
}

int pq_cli_unreachable_expired(int64_t *since)
{
    int64_t now = pq_mono_ms();

    if (!*since) {
        *since = now;
        return 0;
    }
    return now - *since > PQ_CLI_UNREACHABLE_MS;
}

int64_t pq_cli_retry_after_ms(const pq_cli_resp_t *r, int64_t delay)
{
    int64_t ra = r->retry_after_s * 1000LL;

    if (r->retry_after_s > 0 && ra > delay)
        return ra > 5000 ? 5000 : ra;
    return delay;
}

int64_t pq_cli_backoff_next(int64_t delay, int64_t cap)
{
    return delay * 2 > cap ? cap : delay * 2;
}

char *pq_cli_escape(const char *s)
{
    return curl_easy_escape(NULL, s, 0);
}
