/* libcurl multi socket API on libevent (the hiperfifo pattern, written for promptq). */
#include "http.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include "promptq/log.h"
#include "promptq/util.h"
#include "rate_hints.h"

/* Finished requests (their curl easy handles, with connections and DNS cache entries) are kept
 * for reuse up to the most that were ever active at once (at most POOL_MAX), so a wave at
 * max_inflight does not create and destroy handles. Their receive buffers are kept too, up to
 * KEEP_BUF_MAX each for the first KEEP_BUFS_MAX pooled requests and KEEP_BUF_SMALL beyond:
 * memory stays near what the answers in flight need. */
/* libcurl's receive buffer per handle (its default is 16 KB, one per call in flight): most
 * answers of a chat call fit in one or two reads of this; measured at 10,000 in flight, peak RSS
 * 302 -> 288 MB at the same CPU per job (BENCHMARKS.md). */
#define RECV_BUFFER_BYTES 4096L
#define POOL_MAX          100000
#define KEEP_BUFS_MAX     1024
#define KEEP_BUF_MAX      (64 * 1024)
#define KEEP_BUF_SMALL    (8 * 1024)

typedef struct shard_s shard_t;

struct pq_http_req_s {
    pq_http_t *h;
    shard_t *shard;
    CURL *easy;
    struct curl_slist *headers;
    char *body;
    char *resp;
    size_t resp_len, resp_cap, resp_max;
    int too_large;
    pq_http_data_cb *on_data; /* streaming: a 2xx body goes here as it arrives, NULL = buffer */
    int data_mode;            /* 0: status not looked at yet, 1: to on_data, 2: buffered */
    size_t data_len;          /* bytes given to on_data (counted against resp_max) */
    pq_err_t data_err;        /* on_data stopped the transfer with this code */
    pq_rate_hints_t hints;
    int64_t started_ms;
    int64_t last_rx_ms;  /* monotonic ms of the last byte received, 0 before the first */
    int first_byte_ms;   /* 0 = none */
    int idle_ms;         /* 0 = none */
    struct event *watch; /* first byte / idle watch (created on first use, kept) */
    pq_http_done_cb *cb;
    void *opaque;
    pq_http_req_t *next_free;
    char errbuf[CURL_ERROR_SIZE];
};

/* libcurl 7.88 walks a multi handle's connection cache on every transfer removal, so many
 * connections are spread over several multi handles (shards), transfers round-robin. */
#define SHARDS_MAX      8
#define CONNS_PER_SHARD 64
#define H2_STREAMS_MAX  1000L

struct shard_s {
    pq_http_t *h;
    CURLM *multi;
    struct event *timer;
};

typedef struct trust_s {
    struct trust_s *next;
    char *prefix; /* https://host[:port][/path], no trailing slash */
    char *ca_file;
} trust_t;

struct pq_http_s {
    struct event_base *base;
    shard_t shards[SHARDS_MAX];
    int nshards;
    int next_shard;
    pq_http_req_t *free_reqs;
    size_t nfree;
    size_t active;
    size_t peak;    /* most requests active at once: the pool's bound */
    int priority;   /* libevent priority of its events, -1 = the base's default */
    trust_t *trust; /* CA files by URL prefix (pq_http_trust), a short list */
};

typedef struct sock_s {
    struct event *ev;
} sock_t;

static void check_done(shard_t *h);

/* The CA file of the longest registered prefix of url that ends at a path boundary, or NULL
 * (the system's trust store). */
static const char *trust_for(const pq_http_t *h, const char *url)
{
    const trust_t *best = NULL;
    size_t best_len = 0;

    for (const trust_t *t = h->trust; t; t = t->next) {
        size_t n = strlen(t->prefix);
        char c = url[n];

        if (n > best_len && strncmp(url, t->prefix, n) == 0 && (c == '\0' || c == '/' || c == '?'))
            best = t, best_len = n;
    }
    return best ? best->ca_file : NULL;
}

static void on_socket_event(evutil_socket_t fd, short what, void *arg)
{
    shard_t *h = arg;
    int running = 0;
    int action =
        ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);

    curl_multi_socket_action(h->multi, fd, action, &running);
    check_done(h);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
    shard_t *h = arg;
    int running = 0;

    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(h);
}

static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    shard_t *h = userp;
    sock_t *sk = socketp;
    short kind;

    if (what == CURL_POLL_REMOVE) {
        if (sk) {
            event_free(sk->ev);
            free(sk);
            curl_multi_assign(h->multi, s, NULL);
        }
        return 0;
    }
    kind = (short)(((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0) |
                   EV_PERSIST);
    if (!sk) {
        sk = calloc(1, sizeof(*sk));
        if (!sk)
            return -1;
        curl_multi_assign(h->multi, s, sk);
    } else {
        event_free(sk->ev);
    }
    sk->ev = event_new(h->h->base, s, kind, on_socket_event, h);
    if (!sk->ev)
        return -1;
    if (h->h->priority >= 0)
        event_priority_set(sk->ev, h->h->priority);
    event_add(sk->ev, NULL);
    return 0;
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    shard_t *h = userp;

    if (timeout_ms < 0) {
        evtimer_del(h->timer);
    } else {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(h->timer, &tv);
    }
    return 0;
}

static void watch_in(pq_http_req_t *r, int64_t ms);

/* A part of the answer arrived: the first one moves the watch from the first-byte limit to
 * idle gaps (later ones only note the time; the watch re-arms itself from it). */
static void note_rx(pq_http_req_t *r)
{
    int first = r->last_rx_ms == 0;

    r->last_rx_ms = pq_mono_ms();
    if (first && r->watch) {
        evtimer_del(r->watch);
        if (r->idle_ms > 0)
            watch_in(r, r->idle_ms);
    }
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    pq_http_req_t *r = userp;
    size_t n = size * nmemb;

    note_rx(r);
    if (r->on_data && r->data_mode == 0) {
        long status = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        r->data_mode = status >= 200 && status < 300 ? 1 : 2;
    }
    if (r->data_mode == 1) {
        pq_err_t err;
        if (r->data_len + n > r->resp_max) {
            r->too_large = 1;
            return 0;
        }
        r->data_len += n;
        if ((err = r->on_data(r->opaque, data, n)) != PQ_OK) {
            r->data_err = err;
            return 0; /* CURLE_WRITE_ERROR ends the transfer */
        }
        return n;
    }
    if (r->resp_len + n > r->resp_max) {
        r->too_large = 1;
        return 0; /* CURLE_WRITE_ERROR ends the transfer */
    }
    if (r->resp_len + n + 1 > r->resp_cap) {
        size_t cap = r->resp_cap ? r->resp_cap : 4096;
        char *p;
        while (cap < r->resp_len + n + 1)
            cap *= 2;
        if (cap > r->resp_max + 1)
            cap = r->resp_max + 1;
        p = realloc(r->resp, cap);
        if (!p)
            return 0;
        r->resp = p;
        r->resp_cap = cap;
    }
    memcpy(r->resp + r->resp_len, data, n);
    r->resp_len += n;
    r->resp[r->resp_len] = '\0';
    return n;
}

/* Headers: the rate-limit hints (rate_hints.h) of the last response (a new status line, after
 * 100 Continue or a redirect, starts over). */
static size_t header_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    pq_http_req_t *r = userp;
    size_t n = size * nmemb;

    note_rx(r);
    if (n >= 5 && strncmp(data, "HTTP/", 5) == 0) {
        pq_rate_hints_init(&r->hints);
        r->data_mode = 0;
    } else
        pq_rate_hints_header(&r->hints, data, n, pq_now_ms());
    return n;
}

static pq_err_t map_curl_error(CURLcode rc)
{
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return PQ_ERR_TIMEOUT;
    case CURLE_OUT_OF_MEMORY:
        return PQ_ERR_NOMEM;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
        return PQ_ERR_CONFIG;
    default:
        /* connect, resolve, send/recv, TLS, connection closed mid-answer */
        return PQ_ERR_CONNECT;
    }
}

static void req_free(pq_http_req_t *r)
{
    curl_easy_cleanup(r->easy);
    if (r->watch)
        event_free(r->watch);
    free(r->resp);
    free(r);
}

static void req_recycle(pq_http_t *h, pq_http_req_t *r)
{
    if (r->watch)
        evtimer_del(r->watch);
    curl_slist_free_all(r->headers);
    r->headers = NULL;
    free(r->body);
    r->body = NULL;
    r->cb = NULL;
    r->opaque = NULL;
    if (h->nfree >= h->peak || h->nfree >= POOL_MAX) {
        req_free(r);
        return;
    }
    if (r->resp_cap > (h->nfree < KEEP_BUFS_MAX ? KEEP_BUF_MAX : KEEP_BUF_SMALL)) {
        free(r->resp);
        r->resp = NULL;
        r->resp_cap = 0;
    }
    r->next_free = h->free_reqs;
    h->free_reqs = r;
    h->nfree++;
}

static void check_done(shard_t *sh)
{
    pq_http_t *h = sh->h;

    CURLMsg *msg;
    int left;

    while ((msg = curl_multi_info_read(sh->multi, &left))) {
        pq_http_req_t *r = NULL;
        pq_http_result_t res;

        if (msg->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        memset(&res, 0, sizeof(res));
        if (msg->data.result == CURLE_OK) {
            res.err = PQ_OK;
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
        } else if (r->data_err != PQ_OK) {
            res.err = r->data_err;
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
        } else if (r->too_large) {
            res.err = PQ_ERR_TOO_LARGE;
            curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
        } else {
            res.err = map_curl_error(msg->data.result);
            if (res.err == PQ_ERR_TIMEOUT) {
                curl_off_t connected = 0;
                curl_easy_getinfo(r->easy, CURLINFO_PRETRANSFER_TIME_T, &connected);
                res.timeout = connected > 0 ? PQ_HTTP_TIMEOUT_TOTAL : PQ_HTTP_TIMEOUT_CONNECT;
            }
        }
        res.body = r->resp ? r->resp : "";
        res.body_len = r->resp_len;
        res.streamed = r->data_mode == 1;
        res.retry_after_ms = pq_rate_hints_wait_ms(&r->hints);
        res.detail = r->errbuf[0] ? r->errbuf : curl_easy_strerror(msg->data.result);
        res.elapsed_ms = pq_mono_ms() - r->started_ms;
        curl_multi_remove_handle(sh->multi, r->easy);
        h->active--;
        if (r->cb)
            r->cb(r->opaque, &res);
        req_recycle(h, r);
    }
}

const char *pq_http_timeout_name(pq_http_timeout_t t)
{
    switch (t) {
    case PQ_HTTP_TIMEOUT_CONNECT:
        return "connect";
    case PQ_HTTP_TIMEOUT_FIRST_BYTE:
        return "first_byte";
    case PQ_HTTP_TIMEOUT_IDLE:
        return "idle";
    case PQ_HTTP_TIMEOUT_TOTAL:
        return "total";
    default:
        return "";
    }
}

static void watch_in(pq_http_req_t *r, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};

    evtimer_add(r->watch, &tv);
}

/* Ends r as a timeout of our own (first byte or idle): libcurl has no such timeouts. */
static void watch_expire(pq_http_req_t *r, pq_http_timeout_t kind, int ms)
{
    pq_http_t *h = r->h;
    pq_http_result_t res;
    char detail[96];

    snprintf(detail, sizeof(detail), "%s timeout: nothing received for %d ms",
             pq_http_timeout_name(kind), ms);
    memset(&res, 0, sizeof(res));
    res.err = PQ_ERR_TIMEOUT;
    res.timeout = kind;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
    res.body = r->resp ? r->resp : "";
    res.body_len = r->resp_len;
    res.streamed = r->data_mode == 1;
    res.retry_after_ms = -1;
    res.detail = detail;
    res.elapsed_ms = pq_mono_ms() - r->started_ms;
    curl_multi_remove_handle(r->shard->multi, r->easy);
    h->active--;
    if (r->cb)
        r->cb(r->opaque, &res);
    req_recycle(h, r);
}

/* The first byte and idle watch: one timer per transfer, re-armed from the time of the last
 * byte (the data callbacks only note the time). */
static void on_watch(evutil_socket_t fd, short what, void *arg)
{
    pq_http_req_t *r = arg;
    int64_t now = pq_mono_ms();

    (void)fd;
    (void)what;
    if (r->last_rx_ms == 0) {
        /* the first-byte limit passed; a transfer still connecting (no pre-transfer time yet;
         * a reused connection has one) is libcurl's connect timeout to report: look again */
        curl_off_t connected = 0;
        curl_easy_getinfo(r->easy, CURLINFO_PRETRANSFER_TIME_T, &connected);
        if (connected > 0) {
            watch_expire(r, PQ_HTTP_TIMEOUT_FIRST_BYTE, r->first_byte_ms);
            return;
        }
        watch_in(r, 50);
        return;
    }
    if (r->idle_ms <= 0)
        return;
    if (now - r->last_rx_ms >= r->idle_ms) {
        watch_expire(r, PQ_HTTP_TIMEOUT_IDLE, r->idle_ms);
        return;
    }
    watch_in(r, r->idle_ms - (now - r->last_rx_ms));
}

pq_http_t *pq_http_new(struct event_base *base, long max_host_conns, char *errstr,
                       size_t errstr_size)
{
    pq_http_t *h = calloc(1, sizeof(*h));
    long per_shard = 0;

    if (!h) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    h->base = base;
    h->priority = -1;
    h->nshards = 1;
    if (max_host_conns > CONNS_PER_SHARD) {
        h->nshards = (int)((max_host_conns + CONNS_PER_SHARD - 1) / CONNS_PER_SHARD);
        if (h->nshards > SHARDS_MAX)
            h->nshards = SHARDS_MAX;
    } else if (max_host_conns == 0) {
        h->nshards = SHARDS_MAX;
    }
    if (max_host_conns > 0)
        per_shard = (max_host_conns + h->nshards - 1) / h->nshards;
    for (int i = 0; i < h->nshards; i++) {
        shard_t *sh = &h->shards[i];
        sh->h = h;
        sh->multi = curl_multi_init();
        sh->timer = evtimer_new(base, on_timer, sh);
        if (!sh->multi || !sh->timer) {
            snprintf(errstr, errstr_size, "curl_multi_init or evtimer_new failed");
            pq_http_destroy(h);
            return NULL;
        }
        curl_multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        curl_multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, sh);
        curl_multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
        curl_multi_setopt(sh->multi, CURLMOPT_TIMERDATA, sh);
        curl_multi_setopt(sh->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
        /* streams per HTTP/2 connection, at most what the server allows (its SETTINGS);
         * libcurl's own default (100) opens another connection per 100 calls of a shard */
        curl_multi_setopt(sh->multi, CURLMOPT_MAX_CONCURRENT_STREAMS, H2_STREAMS_MAX);
        if (per_shard > 0) {
            curl_multi_setopt(sh->multi, CURLMOPT_MAX_HOST_CONNECTIONS, per_shard);
            curl_multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS, per_shard * 2);
        }
    }
    return h;
}

void pq_http_set_priority(pq_http_t *h, int priority)
{
    h->priority = priority;
    for (int i = 0; i < h->nshards; i++)
        if (h->shards[i].timer && !event_pending(h->shards[i].timer, EV_TIMEOUT, NULL))
            event_priority_set(h->shards[i].timer, priority);
}

int pq_http_trust(pq_http_t *h, const char *url_prefix, const char *ca_file)
{
    trust_t *t = calloc(1, sizeof(*t));
    size_t n;

    if (!t || !(t->prefix = strdup(url_prefix)) || !(t->ca_file = strdup(ca_file))) {
        if (t)
            free(t->prefix);
        free(t);
        return -1;
    }
    n = strlen(t->prefix);
    while (n > 0 && t->prefix[n - 1] == '/')
        t->prefix[--n] = '\0';
    t->next = h->trust;
    h->trust = t;
    return 0;
}

void pq_http_destroy(pq_http_t *h)
{
    pq_http_req_t *r;

    if (!h)
        return;
    while (h->trust) {
        trust_t *t = h->trust;
        h->trust = t->next;
        free(t->prefix);
        free(t->ca_file);
        free(t);
    }
    /* Transfers still running belong to their owners, who cancel them first; free the pool. */
    while ((r = h->free_reqs)) {
        h->free_reqs = r->next_free;
        req_free(r);
    }
    for (int i = 0; i < h->nshards; i++) {
        if (h->shards[i].multi)
            curl_multi_cleanup(h->shards[i].multi);
        if (h->shards[i].timer)
            event_free(h->shards[i].timer);
    }
    free(h);
}

static pq_http_req_t *http_start(pq_http_t *h, const char *url, struct curl_slist *headers,
                                 char *body, size_t body_len, int get, const pq_timeouts_t *to,
                                 size_t max_response, pq_http_data_cb *on_data, pq_http_done_cb *cb,
                                 void *opaque)
{
    pq_http_req_t *r = h->free_reqs;
    struct curl_slist *hs;

    if (r) {
        h->free_reqs = r->next_free;
        h->nfree--;
        curl_easy_reset(r->easy);
    } else {
        r = calloc(1, sizeof(*r));
        if (!r)
            goto out_fail;
        r->easy = curl_easy_init();
        if (!r->easy) {
            free(r);
            r = NULL;
            goto out_fail;
        }
    }
    r->h = h;
    r->resp_len = 0;
    r->resp_max = max_response;
    r->too_large = 0;
    r->on_data = on_data;
    r->data_mode = 0;
    r->data_len = 0;
    r->data_err = PQ_OK;
    pq_rate_hints_init(&r->hints);
    r->last_rx_ms = 0;
    r->first_byte_ms =
        to->first_byte_ms > 0 && to->first_byte_ms < to->total_ms ? to->first_byte_ms : 0;
    r->idle_ms = to->idle_ms > 0 && to->idle_ms < to->total_ms ? to->idle_ms : 0;
    r->errbuf[0] = '\0';
    r->cb = cb;
    r->opaque = opaque;
    r->body = body;
    /* No "Expect: 100-continue" round trip for large bodies. */
    hs = curl_slist_append(headers, "Expect:");
    if (!hs) {
        r->headers = headers;
        req_recycle(h, r);
        return NULL;
    }
    r->headers = hs;
    r->started_ms = pq_mono_ms();

    curl_easy_setopt(r->easy, CURLOPT_URL, url);
    if (get) {
        curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    } else {
        curl_easy_setopt(r->easy, CURLOPT_POST, 1L);
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, body ? body : "");
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    }
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(r->easy, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, r);
    curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->easy, CURLOPT_BUFFERSIZE, RECV_BUFFER_BYTES);
    curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, (long)to->total_ms);
    curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT_MS,
                     (long)(to->connect_ms > 0 && to->connect_ms < to->total_ms ? to->connect_ms
                                                                                : to->total_ms));
    curl_easy_setopt(r->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    /* Wait for a connection being set up to tell whether it multiplexes (HTTP/2 over TLS)
     * rather than opening another; plain http:// is HTTP/1.1 here, and waiting there would
     * hold every new transfer until the first answer arrives. */
    curl_easy_setopt(r->easy, CURLOPT_PIPEWAIT, strncmp(url, "https://", 8) == 0 ? 1L : 0L);
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(r->easy, CURLOPT_SSL_VERIFYHOST, 2L);
    if (h->trust) {
        const char *ca = trust_for(h, url);
        if (ca)
            curl_easy_setopt(r->easy, CURLOPT_CAINFO, ca);
    }
    curl_easy_setopt(r->easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(r->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(r->easy, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(r->easy, CURLOPT_ACCEPT_ENCODING, "");

    r->shard = &h->shards[h->next_shard];
    h->next_shard = (h->next_shard + 1) % h->nshards;
    if (r->first_byte_ms > 0 || r->idle_ms > 0) {
        if (!r->watch) {
            r->watch = evtimer_new(h->base, on_watch, r);
            if (r->watch && h->priority >= 0)
                event_priority_set(r->watch, h->priority);
        }
        if (!r->watch) {
            req_recycle(h, r);
            return NULL;
        }
        /* before the first byte the watch looks at the first-byte limit; after, at idle gaps
         * (note_rx arms it then) */
        if (r->first_byte_ms > 0)
            watch_in(r, r->first_byte_ms);
    }
    if (curl_multi_add_handle(r->shard->multi, r->easy) != CURLM_OK) {
        req_recycle(h, r);
        return NULL;
    }
    h->active++;
    if (h->active > h->peak)
        h->peak = h->active;
    return r;

out_fail:
    curl_slist_free_all(headers);
    free(body);
    return NULL;
}

/* The timeouts of a call that has only a total: connect within 10 s of it. */
static pq_timeouts_t total_only(long timeout_ms)
{
    pq_timeouts_t to = {.connect_ms = timeout_ms < 10000 ? (int)timeout_ms : 10000,
                        .total_ms = (int)timeout_ms};

    return to;
}

pq_http_req_t *pq_http_post(pq_http_t *h, const char *url, struct curl_slist *headers, char *body,
                            size_t body_len, long timeout_ms, size_t max_response,
                            pq_http_done_cb *cb, void *opaque)
{
    pq_timeouts_t to = total_only(timeout_ms);

    return http_start(h, url, headers, body, body_len, 0, &to, max_response, NULL, cb, opaque);
}

pq_http_req_t *pq_http_post_timed(pq_http_t *h, const char *url, struct curl_slist *headers,
                                  char *body, size_t body_len, const pq_timeouts_t *to,
                                  size_t max_response, pq_http_done_cb *cb, void *opaque)
{
    return http_start(h, url, headers, body, body_len, 0, to, max_response, NULL, cb, opaque);
}

pq_http_req_t *pq_http_get(pq_http_t *h, const char *url, struct curl_slist *headers,
                           long timeout_ms, size_t max_response, pq_http_done_cb *cb, void *opaque)
{
    pq_timeouts_t to = total_only(timeout_ms);

    return http_start(h, url, headers, NULL, 0, 1, &to, max_response, NULL, cb, opaque);
}

pq_http_req_t *pq_http_post_stream(pq_http_t *h, const char *url, struct curl_slist *headers,
                                   char *body, size_t body_len, const pq_timeouts_t *to,
                                   size_t max_response, pq_http_data_cb *on_data,
                                   pq_http_done_cb *cb, void *opaque)
{
    return http_start(h, url, headers, body, body_len, 0, to, max_response, on_data, cb, opaque);
}

void pq_http_cancel(pq_http_t *h, pq_http_req_t *req)
{
    if (!req)
        return;
    curl_multi_remove_handle(req->shard->multi, req->easy);
    h->active--;
    req_recycle(h, req);
}

size_t pq_http_active(const pq_http_t *h)
{
    return h->active;
}
