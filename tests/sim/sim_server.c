/* promptq-sim server: the provider listener, the control listener, modes, held calls, stats.
 *
 * Every provider request becomes a call linked into sim->calls until it is answered or dropped.
 * A call is answered at once, after latency_ms (a timer), or never (hang). While a call is held
 * evhttp does not read from its connection, so a one-shot read event on the socket notices the
 * client giving up (EOF) and frees the connection.
 *
 * "down" frees the provider evhttp: its listening socket (connect() then gets ECONNREFUSED),
 * every idle keep-alive connection, and every held call (reset with SO_LINGER 0). Any other mode
 * binds the same address and port again.
 *
 * A chat call meets the state of its model (pq_sim_state_pick: the model's entry of "models",
 * else the top-level state, each possibly flapping on its schedule); other routes meet the
 * top-level state. "reset" closes the connection with SO_LINGER 0 instead of answering;
 * "stall" writes the status line, headers (Content-Length of the whole body) and half the
 * body straight to the socket, then holds the call like "hang". On every state change other
 * than to "down", each held call is looked at again under the new state: a hanging call whose
 * state is no longer "hang" is answered under it (with its latency), a stalled call whose state
 * is no longer "stall" gets the rest of its body and the connection is closed; a change to
 * "down" drops them all. A state's schedule is evaluated when a call arrives (or is looked at
 * again), so a call held by a scheduled hang waits for the next state change. */
#include "sim.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <event2/util.h>

#include "promptq/log.h"
#include "promptq/util.h"

#define LISTEN_BACKLOG    8192
#define IDLE_TIMEOUT_S    300
#define MAX_HEADERS       (64 * 1024)
#define REBIND_RETRY_MS   100
#define APPLY_FALLBACK_MS 200
#define PATH_KEY_MAX      200
#define LOG_MAX           1000 /* chat calls kept by GET /_sim/log */

typedef enum { STAGE_NEW = 0, STAGE_HANG, STAGE_DELAY, STAGE_STALL, STAGE_STREAM } stage_t;

/* One SSE event of a streamed answer, rendered; data_off/data_len locate its data value (for
 * stream_malformed_at). */
typedef struct {
    char *text;
    size_t len, data_off, data_len;
    int done; /* the end marker */
} stream_ev_t;

/* What the call does once its latency has passed. */
typedef enum { ACT_SEND = 0, ACT_RESET, ACT_STALL } action_t;

/* How a chat call was served, as the call log names it. */
typedef enum {
    OUT_OK = 0,
    OUT_ERROR,
    OUT_RATE_LIMIT,
    OUT_RESET,
    OUT_HANG,
    OUT_STALL,
    OUT_MALFORMED,
} outcome_t;

static const char *const outcome_names[] = {"ok",   "error", "rate_limit", "reset",
                                            "hang", "stall", "malformed"};

typedef struct {
    int64_t t_ms; /* arrival, ms since the sim started (monotonic) */
    int status;   /* 0: no answer (reset, hang, stall, dropped) */
    outcome_t outcome;
    char model[PQ_SIM_MODEL_MAX + 1];
    char path[PATH_KEY_MAX + 1];
} log_entry_t;

struct pq_sim_call_s {
    pq_sim_t *sim;
    struct evhttp_request *req;
    const pq_sim_route_t *route;   /* NULL: no route for this path and method */
    const pq_sim_format_t *format; /* for error answers */
    int path_known;                /* some route has this path (other method: 405) */
    stage_t stage;
    action_t action;
    outcome_t outcome;
    int chat;        /* a chat route: has a model, goes to by_model and the log */
    int model_other; /* counted in by_model under "other" (cap reached) */
    uint64_t log_id; /* 1 + its log entry number; 0: not logged */
    char model[PQ_SIM_MODEL_MAX + 1];
    int status;
    int64_t tokens;
    struct event *timer; /* latency */
    struct event *watch; /* client close while held */
    pq_sim_call_t *prev, *next;
    char arg[256];

    /* streamed answer (pq_sim_call_stream) */
    int stream;       /* the handler made the answer a stream */
    int streaming;    /* headers sent, events going out (STAGE_STREAM) */
    int detached;     /* our close callback is off the connection */
    int gone;         /* the connection closed under the stream */
    int own_req;      /* evhttp let go of req (closed without a reply): ours to free */
    int cutting;      /* stream_cut_after reached: drop once the last chunk is written */
    int stream_timer; /* timer is the stream's (stream_timer_cb), no longer the latency's */
    char eol[3];
    stream_ev_t *evs;
    size_t nev, cap, next_ev, nsent;
    int64_t chunk_ms, cut_after, malformed_at;
    int no_done;
    int reject_prefill;
};

typedef struct {
    pq_sim_t *sim;
    int is_main;
} listener_ctx_t;

struct pq_sim_s {
    struct event_base *base;
    char name[64];
    char *keys[PQ_SIM_MAX_API_KEYS];
    int nkeys;

    struct sockaddr_storage main_addr; /* with the real port once bound */
    socklen_t main_addrlen;
    struct evhttp *http;     /* provider listener; NULL while down */
    struct evhttp *ctl_http; /* control listener; NULL without --control */
    listener_ctx_t main_ctx, ctl_ctx;
    struct event *apply_ev; /* deferred listener up/down, and re-bind retries */

    pq_sim_state_t state;
    int64_t applied_ms;   /* monotonic time the state was applied (schedules count from it) */
    pq_sim_call_t *calls; /* every call not yet answered */

    int64_t requests, inflight, max_inflight, tokens;
    json_t *by_status, *by_path, *models, *by_model;
    log_entry_t *log;              /* LOG_MAX slots, entry n in slot n % LOG_MAX */
    uint64_t log_count, log_start; /* entries ever written; first one still shown */
    int64_t started_ms;            /* monotonic */
    uint64_t next_id;
    uint64_t token_floor; /* IAM tokens numbered below it are revoked */
    uint64_t rng;
    int64_t started_s;
};

static void on_request(struct evhttp_request *req, void *arg);

/* ---- small helpers ---- */

static double rng_next(pq_sim_t *sim)
{
    /* xorshift64* */
    uint64_t x = sim->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    sim->rng = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 200:
        return "OK";
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
    case 408:
        return "Request Timeout";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 529:
        return "Overloaded";
    default:
        return status < 400 ? "OK" : "Error";
    }
}

static void counter_inc(json_t *obj, const char *key, int64_t by)
{
    json_t *v = json_object_get(obj, key);
    if (v)
        json_integer_set(v, json_integer_value(v) + by);
    else
        json_object_set_new(obj, key, json_integer(by));
}

static void set_header(struct evhttp_request *req, const char *name, const char *value)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_remove_header(h, name);
    evhttp_add_header(h, name, value);
}

/* Sends a JSON document as a whole answer (control API, requests outside calls). doc: taken. */
static void send_json(struct evhttp_request *req, int status, json_t *doc)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);

    set_header(req, "Content-Type", "application/json");
    if (doc)
        pq_sim_core_dump(doc, out);
    json_decref(doc);
    evhttp_send_reply(req, status, reason_phrase(status), NULL);
}

static const char *request_path(struct evhttp_request *req)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *p = uri ? evhttp_uri_get_path(uri) : NULL;
    return p && *p ? p : "/";
}

/* "H:P" or "[H]:P" of a bound socket. */
static void sock_name(evutil_socket_t fd, char *buf, size_t size)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;

    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0) {
        if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
            evutil_inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
            port = ntohs(s6->sin6_port);
            snprintf(buf, size, "[%s]:%d", host, port);
            return;
        }
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        evutil_inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        port = ntohs(s4->sin_port);
    }
    snprintf(buf, size, "%s:%d", host, port);
}

static int addr_parse(const char *hostport, struct sockaddr_storage *ss, socklen_t *sslen,
                      char *errstr, size_t errstr_size)
{
    char host[256], *colon;
    struct addrinfo hints, *res = NULL;
    int outlen = (int)sizeof(*ss), rc;

    if (!strchr(hostport, ':')) {
        snprintf(errstr, errstr_size, "%s: expected HOST:PORT", hostport);
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    if (evutil_parse_sockaddr_port(hostport, (struct sockaddr *)ss, &outlen) == 0) {
        *sslen = (socklen_t)outlen;
        return 0;
    }
    pq_strlcpy(host, hostport, sizeof(host));
    colon = strrchr(host, ':');
    *colon = '\0';
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(errstr, errstr_size, "%s: %s", hostport, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *sslen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void accept_error_cb(struct evconnlistener *lev, void *arg)
{
    int err = EVUTIL_SOCKET_ERROR();
    PQ_WARN("accept: %s", evutil_socket_error_to_string(err));
}

/* A configured evhttp listening on sa (backlog LISTEN_BACKLOG); NULL + errstr on failure. */
static struct evhttp *http_open(pq_sim_t *sim, const struct sockaddr *sa, socklen_t salen,
                                listener_ctx_t *ctx, char *errstr, size_t errstr_size)
{
    struct evconnlistener *lev;
    struct evhttp *http;

    lev = evconnlistener_new_bind(sim->base, NULL, NULL,
                                  LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
                                  LISTEN_BACKLOG, sa, (int)salen);
    if (!lev) {
        snprintf(errstr, errstr_size, "bind: %s",
                 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
        return NULL;
    }
    http = evhttp_new(sim->base);
    if (!http) {
        snprintf(errstr, errstr_size, "evhttp_new failed");
        goto out_free_lev;
    }
    if (!evhttp_bind_listener(http, lev)) {
        snprintf(errstr, errstr_size, "evhttp_bind_listener failed");
        goto out_free_http;
    }
    evconnlistener_set_error_cb(lev, accept_error_cb);
    evhttp_set_gencb(http, on_request, ctx);
    evhttp_set_max_body_size(http, PQ_SIM_MAX_BODY);
    evhttp_set_max_headers_size(http, MAX_HEADERS);
    evhttp_set_timeout(http, IDLE_TIMEOUT_S);
    evhttp_set_default_content_type(http, "application/json");
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                         EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
                                         EVHTTP_REQ_PATCH);
    return http;

out_free_http:
    evhttp_free(http);
out_free_lev:
    evconnlistener_free(lev);
    return NULL;
}

/* The fd of the (only) listening socket of http. */
static void bound_fd_cb(struct evhttp_bound_socket *bound, void *arg)
{
    *(evutil_socket_t *)arg = evhttp_bound_socket_get_fd(bound);
}

static evutil_socket_t http_fd(struct evhttp *http)
{
    evutil_socket_t fd = -1;
    evhttp_foreach_bound_socket(http, bound_fd_cb, &fd);
    return fd;
}

/* ---- calls ---- */

static void stream_reset(pq_sim_call_t *c)
{
    for (size_t i = 0; i < c->nev; i++)
        free(c->evs[i].text);
    free(c->evs);
    c->evs = NULL;
    c->nev = c->cap = c->next_ev = c->nsent = 0;
    c->stream = 0;
}

/* Takes our close callback off a streaming call's connection (before any end of ours). */
static void stream_detach(pq_sim_call_t *c)
{
    struct evhttp_connection *evcon;

    if (!c->streaming || c->detached)
        return;
    c->detached = 1;
    evcon = c->req && !c->gone ? evhttp_request_get_connection(c->req) : NULL;
    if (evcon)
        evhttp_connection_set_closecb(evcon, NULL, NULL);
}

static void call_free(pq_sim_call_t *c)
{
    pq_sim_t *sim = c->sim;

    stream_detach(c);
    if (c->own_req)
        evhttp_request_free(c->req);
    stream_reset(c);

    if (c->prev)
        c->prev->next = c->next;
    else
        sim->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->timer)
        event_free(c->timer);
    if (c->watch)
        event_free(c->watch);
    sim->inflight--;
    free(c);
}

/* The by_model entry of the call's model, or NULL (not a chat call, no model, reset since). */
static json_t *call_model_stats(pq_sim_call_t *c)
{
    if (!c->chat || !c->model[0])
        return NULL;
    return json_object_get(c->sim->by_model, c->model_other ? "other" : c->model);
}

/* Counts an answer into the stats. */
static void call_count(pq_sim_call_t *c)
{
    pq_sim_t *sim = c->sim;
    json_t *ms = call_model_stats(c);
    char key[16];

    snprintf(key, sizeof(key), "%d", c->status);
    counter_inc(sim->by_status, key, 1);
    if (ms)
        counter_inc(json_object_get(ms, "by_status"), key, 1);
    if (c->status == 200)
        sim->tokens += c->tokens;
}

/* Appends the call to the log (chat calls only), status 0 until answered. */
static void call_log_open(pq_sim_call_t *c)
{
    pq_sim_t *sim = c->sim;
    log_entry_t *e;

    if (!c->chat || !sim->log)
        return;
    e = &sim->log[sim->log_count % LOG_MAX];
    e->t_ms = pq_mono_ms() - sim->started_ms;
    e->status = 0;
    e->outcome = c->outcome;
    pq_strlcpy(e->model, c->model, sizeof(e->model));
    pq_strlcpy(e->path, request_path(c->req), sizeof(e->path));
    c->log_id = ++sim->log_count;
}

/* Updates the call's log entry (if still kept) with status and the call's outcome. */
static void call_log_update(pq_sim_call_t *c, int status)
{
    pq_sim_t *sim = c->sim;
    uint64_t n = c->log_id - 1;

    if (!c->log_id || n < sim->log_start || sim->log_count - n > LOG_MAX)
        return;
    sim->log[n % LOG_MAX].status = status;
    sim->log[n % LOG_MAX].outcome = c->outcome;
}

/* ---- streamed answers ---- */

static void stream_timer_cb(evutil_socket_t fd, short what, void *arg);
static void call_drop(pq_sim_call_t *c, int reset);

static void stream_arm(pq_sim_call_t *c, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};

    if (c->timer && !c->stream_timer) {
        /* the latency timer, fired already: it becomes the stream's */
        event_free(c->timer);
        c->timer = NULL;
    }
    if (!c->timer)
        c->timer = evtimer_new(c->sim->base, stream_timer_cb, c);
    c->stream_timer = 1;
    if (c->timer)
        evtimer_add(c->timer, &tv);
}

/* The client's connection closed under the stream (evhttp frees it after this returns). */
static void stream_closed_cb(struct evhttp_connection *evcon, void *arg)
{
    pq_sim_call_t *c = arg;

    c->gone = 1;
    c->detached = 1;
    /* Closed before our reply ended: evhttp has let go of the request (it is ours to free);
     * else it frees it with the connection. */
    if (evhttp_request_get_connection(c->req) == NULL)
        c->own_req = 1;
    else
        c->req = NULL;
    stream_arm(c, 0); /* free the call outside evhttp's callback */
}

static void stream_cut_cb(struct evhttp_connection *evcon, void *arg)
{
    stream_arm(arg, 0);
}

/* Appends event i to out, its data cut in half when it is the malformed one. */
static void stream_render(pq_sim_call_t *c, const stream_ev_t *e, size_t n, struct evbuffer *out)
{
    if (c->malformed_at != (int64_t)n) {
        evbuffer_add(out, e->text, e->len);
        return;
    }
    evbuffer_add(out, e->text, e->data_off + e->data_len / 2);
    evbuffer_add_printf(out, "%s%s", c->eol, c->eol);
}

/* Sends the next event (all of them when chunk_ms is 0), then ends, cuts or waits. */
static void stream_next(pq_sim_call_t *c)
{
    struct evbuffer *buf = evbuffer_new();
    int cut = 0;

    if (!buf) {
        stream_detach(c);
        call_drop(c, 0);
        return;
    }
    while (c->next_ev < c->nev) {
        stream_ev_t *e = &c->evs[c->next_ev++];
        if (e->done && c->no_done)
            continue;
        stream_render(c, e, ++c->nsent, buf);
        if (c->cut_after && (int64_t)c->nsent >= c->cut_after) {
            cut = 1;
            break;
        }
        if (c->chunk_ms > 0)
            break;
    }
    if (cut) {
        c->cutting = 1;
        evhttp_send_reply_chunk_with_cb(c->req, buf, stream_cut_cb, c);
        evbuffer_free(buf);
        return;
    }
    if (evbuffer_get_length(buf))
        evhttp_send_reply_chunk(c->req, buf);
    evbuffer_free(buf);
    if (c->next_ev < c->nev) {
        stream_arm(c, c->chunk_ms);
        return;
    }
    stream_detach(c);
    evhttp_send_reply_end(c->req);
    call_free(c);
}

static void stream_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_sim_call_t *c = arg;

    if (c->gone) {
        call_free(c);
        return;
    }
    if (c->cutting) {
        stream_detach(c);
        call_drop(c, 0);
        return;
    }
    stream_next(c);
}

/* Starts a streamed answer: counts it, sends the status line and headers, then the events. */
static void stream_begin(pq_sim_call_t *c)
{
    struct evhttp_connection *evcon = evhttp_request_get_connection(c->req);

    call_count(c);
    call_log_update(c, c->status);
    set_header(c->req, "Content-Type", "text/event-stream");
    set_header(c->req, "Cache-Control", "no-cache");
    c->stage = STAGE_STREAM;
    c->streaming = 1;
    if (c->watch) {
        event_free(c->watch);
        c->watch = NULL;
    }
    if (evcon)
        evhttp_connection_set_closecb(evcon, stream_closed_cb, c);
    evhttp_send_reply_start(c->req, 200, "OK");
    stream_next(c);
}

/* A stalled stream: the whole event stream as one body (the stall sends half of it). */
static void stream_flatten(pq_sim_call_t *c)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(c->req);

    evbuffer_drain(out, evbuffer_get_length(out));
    for (size_t i = 0; i < c->nev; i++)
        evbuffer_add(out, c->evs[i].text, c->evs[i].len);
    set_header(c->req, "Content-Type", "text/event-stream");
    stream_reset(c);
}

static void call_send(pq_sim_call_t *c)
{
    if (c->stream) {
        stream_begin(c);
        return;
    }
    call_count(c);
    call_log_update(c, c->status);
    evhttp_send_reply(c->req, c->status, reason_phrase(c->status), NULL);
    call_free(c);
}

static evutil_socket_t call_fd(pq_sim_call_t *c)
{
    struct evhttp_connection *evcon = c->req ? evhttp_request_get_connection(c->req) : NULL;
    struct bufferevent *bev = evcon ? evhttp_connection_get_bufferevent(evcon) : NULL;
    return bev ? bufferevent_getfd(bev) : -1;
}

/* Frees the call and its connection, with a reset (SO_LINGER 0) or a plain close. */
static void call_drop(pq_sim_call_t *c, int reset)
{
    struct evhttp_connection *evcon =
        c->req && !c->own_req ? evhttp_request_get_connection(c->req) : NULL;
    struct linger lg = {1, 0};
    evutil_socket_t fd = call_fd(c);

    if (reset && fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    call_free(c);
    if (evcon)
        evhttp_connection_free(evcon);
}

/* Writes buf to a non-blocking socket as far as it takes it now (small answers: all). */
static void send_raw(evutil_socket_t fd, const void *buf, size_t len)
{
    const char *p = buf;

    while (fd >= 0 && len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        p += n;
        len -= (size_t)n;
    }
}

/* The client of a held call closed (or reset) its connection: free it and the connection. */
static void call_watch_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_sim_call_t *c = arg;
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);

    if (n > 0)
        return; /* pipelined bytes: stop watching, the answer will tell */
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        event_add(c->watch, NULL);
        return;
    }
    PQ_DBG("client left a held call");
    call_drop(c, 0);
}

static void call_watch(pq_sim_call_t *c)
{
    evutil_socket_t fd;

    if (c->watch)
        return;
    fd = call_fd(c);
    if (fd < 0)
        return;
    c->watch = event_new(c->sim->base, fd, EV_READ, call_watch_cb, c);
    if (c->watch)
        event_add(c->watch, NULL);
}

/* Stall: the status line, headers (Content-Length of the whole body, so the client waits for
 * the rest) and the first half of the body, then the call is held. */
static void call_stall(pq_sim_call_t *c)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(c->req);
    const char *ct = evhttp_find_header(evhttp_request_get_output_headers(c->req), "Content-Type");
    size_t len = evbuffer_get_length(out), half = len / 2;
    evutil_socket_t fd = call_fd(c);
    char head[256];
    int n;

    n = snprintf(head, sizeof(head),
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                 "Connection: close\r\n\r\n",
                 c->status, reason_phrase(c->status), ct ? ct : "application/json", len);
    c->stage = STAGE_STALL;
    call_log_update(c, 0);
    if (n > 0 && (size_t)n < sizeof(head))
        send_raw(fd, head, (size_t)n);
    if (half)
        send_raw(fd, evbuffer_pullup(out, (ev_ssize_t)half), half);
    evbuffer_drain(out, half);
    call_watch(c);
}

/* A stalled call released: the rest of its body, then the connection is closed. */
static void call_stall_finish(pq_sim_call_t *c)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(c->req);
    size_t len = evbuffer_get_length(out);

    if (len)
        send_raw(call_fd(c), evbuffer_pullup(out, -1), len);
    call_count(c);
    call_log_update(c, c->status);
    call_drop(c, 0);
}

/* The call's answer is due (at once or after latency_ms). */
static void call_act(pq_sim_call_t *c)
{
    switch (c->action) {
    case ACT_RESET:
        call_log_update(c, 0);
        call_drop(c, 1);
        break;
    case ACT_STALL:
        call_stall(c);
        break;
    default:
        call_send(c);
        break;
    }
}

static void call_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    call_act(arg);
}

static void call_retry_headers(pq_sim_call_t *c, const pq_sim_state_t *st, int always)
{
    char ms[32];

    /* retry_after_none: no Retry-After at all, even on a 429 */
    if (!st->retry_after_none && (always || st->retry_after_set))
        set_header(c->req, "Retry-After", st->retry_after);
    if (st->retry_after_ms >= 0) {
        snprintf(ms, sizeof(ms), "%lld", (long long)st->retry_after_ms);
        set_header(c->req, "retry-after-ms", ms);
    }
}

static pq_sim_ekind_t kind_for_status(int status)
{
    if (status == 429)
        return PQ_SIM_E_RATE;
    if (status == 401 || status == 403)
        return PQ_SIM_E_AUTH;
    if (status == 404 || status == 405)
        return PQ_SIM_E_NOT_FOUND;
    if (status >= 500)
        return PQ_SIM_E_SERVER;
    return PQ_SIM_E_INVALID;
}

/* A simulated (state-driven) error: the state's error_body if set, else the format's JSON
 * (with the state's error_code and error_message when given). */
static void call_sim_error(pq_sim_call_t *c, const pq_sim_state_t *st, int status,
                           const char *message, const char *code)
{
    struct evbuffer *out;

    if (!st->error_body) {
        pq_sim_error_t e = {kind_for_status(status),
                            st->error_message ? st->error_message : message, NULL,
                            st->error_code ? st->error_code : code, st->error_code != NULL};
        c->format->error(c, status, &e);
        return;
    }
    out = evhttp_request_get_output_buffer(c->req);
    evbuffer_drain(out, evbuffer_get_length(out));
    evbuffer_add(out, st->error_body, strlen(st->error_body));
    set_header(c->req, "Content-Type", "application/json");
    c->status = status;
}

static void call_handle(pq_sim_call_t *c)
{
    if (c->route) {
        c->route->handle(c);
    } else if (c->path_known) {
        pq_sim_call_error(c, 405, PQ_SIM_E_NOT_FOUND, "Method not allowed for this path.", NULL,
                          "method_not_allowed");
    } else {
        char msg[320];
        snprintf(msg, sizeof(msg), "Invalid URL (%.16s %.256s)",
                 evhttp_request_get_command(c->req) == EVHTTP_REQ_GET ? "GET" : "POST",
                 request_path(c->req));
        pq_sim_call_error(c, 404, PQ_SIM_E_NOT_FOUND, msg, NULL, "unknown_url");
    }
}

/* Masks a key the way providers echo it: a short head, stars, the last 4 characters. */
static void key_mask(const char *key, char *buf, size_t size)
{
    size_t n = strlen(key), head = n >= 12 ? 4 : 0, tail = n >= 12 ? 4 : 0;

    if (size < 16) {
        if (size)
            buf[0] = '\0';
        return;
    }
    snprintf(buf, size, "%.*s****%s", (int)head, key, key + n - tail);
}

/* 0 if the call may proceed; otherwise sets a 401 answer. */
static int call_auth(pq_sim_call_t *c)
{
    pq_sim_t *sim = c->sim;
    char key[512], masked[64], msg[256];

    if (!sim->nkeys || (c->route && !c->route->needs_auth))
        return 0;
    if (c->format->auth_key(c->req, key, sizeof(key)) != 0) {
        pq_sim_call_error(c, 401, PQ_SIM_E_AUTH,
                          "You didn't provide an API key. You need to provide your API key in "
                          "the header this API expects (OpenAI: Authorization: Bearer KEY).",
                          NULL, NULL);
        return -1;
    }
    if (pq_sim_key_valid(sim, key))
        return 0;
    key_mask(key, masked, sizeof(masked));
    snprintf(msg, sizeof(msg), "Incorrect API key provided: %s.", masked);
    pq_sim_call_error(c, 401, PQ_SIM_E_AUTH, msg, NULL, "invalid_api_key");
    return -1;
}

/* Cuts the answer body to half its length: never valid JSON (an object cut short). */
static void body_truncate(pq_sim_call_t *c)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(c->req);
    size_t len = evbuffer_get_length(out), keep = len / 2;
    char *tmp;

    if (len < 2) {
        evbuffer_drain(out, len);
        evbuffer_add(out, "{\"id\":", 6);
        return;
    }
    tmp = malloc(keep);
    if (!tmp) {
        evbuffer_drain(out, len);
        evbuffer_add(out, "{", 1);
        return;
    }
    evbuffer_remove(out, tmp, keep);
    evbuffer_drain(out, evbuffer_get_length(out));
    evbuffer_add(out, tmp, keep);
    free(tmp);
}

/* Decides the answer under st (action, outcome, status, headers, body). */
static void call_prepare(pq_sim_call_t *c, const pq_sim_state_t *st)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(c->req);

    evbuffer_drain(out, evbuffer_get_length(out));
    stream_reset(c);
    c->chunk_ms = st->chunk_ms;
    c->cut_after = st->stream_cut_after;
    c->malformed_at = st->stream_malformed_at;
    c->no_done = st->stream_no_done;
    c->reject_prefill = st->reject_prefill;
    c->tokens = 0;
    c->action = ACT_SEND;
    c->outcome = OUT_OK;
    if (st->mode == PQ_SIM_MODE_RESET) {
        c->action = ACT_RESET;
        c->outcome = OUT_RESET;
        return;
    }
    if (st->mode == PQ_SIM_MODE_MALFORMED) {
        c->outcome = OUT_MALFORMED;
        call_handle(c);
        c->status = 200;
        c->tokens = 0;
        if (c->stream)
            c->malformed_at = 1; /* a stream's first event is broken */
        else
            body_truncate(c);
        return;
    }
    if (call_auth(c))
        return;
    if (st->mode == PQ_SIM_MODE_ERROR) {
        c->outcome = OUT_ERROR;
        call_sim_error(c, st, st->status, "The server had an error while processing your request.",
                       NULL);
        call_retry_headers(c, st, 0);
        return;
    }
    if (st->mode == PQ_SIM_MODE_RATE_LIMIT) {
        c->outcome = OUT_RATE_LIMIT;
        call_sim_error(c, st, 429,
                       "Rate limit reached for requests (simulated). Please try again later.",
                       "rate_limit_exceeded");
        call_retry_headers(c, st, 1);
        return;
    }
    if (st->failure_rate > 0.0 && rng_next(c->sim) < st->failure_rate) {
        c->outcome = OUT_ERROR;
        call_sim_error(c, st, st->status, "The server had an error while processing your request.",
                       NULL);
        call_retry_headers(c, st, 0);
        return;
    }
    call_handle(c);
    if (st->mode == PQ_SIM_MODE_STALL) {
        if (c->stream)
            stream_flatten(c);
        c->action = ACT_STALL;
        c->outcome = OUT_STALL;
    }
}

/* Acts now, or after st's latency_ms. A reset or stall always waits for a timer (of 0 ms
 * without latency): it must not free the connection inside evhttp's request callback. */
static void call_schedule(pq_sim_call_t *c, const pq_sim_state_t *st)
{
    int64_t ms = st->latency_ms;
    struct timeval tv;

    if (ms <= 0 && c->action == ACT_SEND) {
        call_send(c);
        return;
    }
    c->stage = STAGE_DELAY;
    c->timer = evtimer_new(c->sim->base, call_timer_cb, c);
    if (!c->timer) {
        call_act(c);
        return;
    }
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    evtimer_add(c->timer, &tv);
    call_watch(c);
}

static void route_find(pq_sim_call_t *c, const char *path, int method)
{
    for (const pq_sim_route_t *const *t = pq_sim_route_tables; *t; t++) {
        for (const pq_sim_route_t *r = *t; r->match; r++) {
            c->arg[0] = '\0';
            if (!r->match(path, c))
                continue;
            c->path_known = 1;
            c->format = r->format;
            if (r->method == method || (r->method == EVHTTP_REQ_GET && method == EVHTTP_REQ_HEAD)) {
                c->route = r;
                return;
            }
        }
    }
    c->arg[0] = '\0';
}

/* The model a chat call is for: its body's model field or its path parameter. */
static void call_model(pq_sim_call_t *c)
{
    const char *field = c->route->model_key, *body, *m;
    json_t *doc;
    size_t len;

    if (!*field) {
        pq_strlcpy(c->model, c->arg, sizeof(c->model));
        return;
    }
    body = pq_sim_call_body(c, &len);
    doc = json_loadb(body, len, 0, NULL);
    m = json_string_value(json_object_get(doc, field));
    if (m)
        pq_strlcpy(c->model, m, sizeof(c->model));
    json_decref(doc);
}

/* Counts a chat call's arrival in by_model (capped: beyond it "other"). */
static void model_count(pq_sim_call_t *c)
{
    json_t *by_model = c->sim->by_model, *ms;

    if (!c->model[0])
        return;
    ms = json_object_get(by_model, c->model);
    if (!ms && json_object_size(by_model) >= PQ_SIM_MAX_KEYS) {
        c->model_other = 1;
        ms = json_object_get(by_model, "other");
    }
    if (!ms) {
        ms = json_pack("{s:i, s:{}}", "requests", 0, "by_status");
        if (!ms || json_object_set_new(by_model, c->model_other ? "other" : c->model, ms))
            return;
    }
    counter_inc(ms, "requests", 1);
}

/* The state the call meets now. */
static const pq_sim_state_t *call_state(pq_sim_call_t *c)
{
    return pq_sim_state_pick(&c->sim->state, c->chat ? c->model : NULL,
                             pq_mono_ms() - c->sim->applied_ms);
}

static void provider_request(pq_sim_t *sim, struct evhttp_request *req, const char *path)
{
    const pq_sim_state_t *st;
    pq_sim_call_t *c;
    char key[PATH_KEY_MAX + 1];

    sim->requests++;
    pq_strlcpy(key, path, sizeof(key));
    if (!json_object_get(sim->by_path, key) && json_object_size(sim->by_path) >= PQ_SIM_MAX_KEYS)
        pq_strlcpy(key, "other", sizeof(key));
    counter_inc(sim->by_path, key, 1);

    c = calloc(1, sizeof(*c));
    if (!c) {
        evhttp_send_error(req, 500, "out of memory");
        return;
    }
    c->sim = sim;
    c->req = req;
    c->format = &pq_sim_openai_format;
    c->status = 500;
    c->next = sim->calls;
    if (sim->calls)
        sim->calls->prev = c;
    sim->calls = c;
    if (++sim->inflight > sim->max_inflight)
        sim->max_inflight = sim->inflight;

    route_find(c, path, evhttp_request_get_command(req));
    if (c->route && c->route->model_key) {
        c->chat = 1;
        call_model(c);
        model_count(c);
    }
    st = call_state(c);
    if (st->mode == PQ_SIM_MODE_HANG) {
        c->stage = STAGE_HANG;
        c->outcome = OUT_HANG;
        call_log_open(c);
        call_watch(c);
        return;
    }
    call_prepare(c, st);
    call_log_open(c);
    call_schedule(c, st);
}

/* ---- listener state ---- */

/* Drops every held call (reset to the client) and frees the provider listener. */
static void main_close(pq_sim_t *sim)
{
    struct linger lg = {1, 0};
    int dropped = 0;

    while (sim->calls) {
        evutil_socket_t fd = call_fd(sim->calls);
        if (fd >= 0)
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        if (sim->calls->stage == STAGE_DELAY) {
            sim->calls->outcome = OUT_RESET; /* its answer will never come */
            call_log_update(sim->calls, 0);
        }
        call_free(sim->calls);
        dropped++;
    }
    evhttp_free(sim->http);
    sim->http = NULL;
    PQ_INFO("%s: provider listener closed (%d held calls dropped)", sim->name, dropped);
}

static int main_open(pq_sim_t *sim, char *errstr, size_t errstr_size)
{
    sim->http = http_open(sim, (struct sockaddr *)&sim->main_addr, sim->main_addrlen,
                          &sim->main_ctx, errstr, errstr_size);
    return sim->http ? 0 : -1;
}

/* Brings the provider listener in line with the mode; retries a failed re-bind. */
static void apply_listener(pq_sim_t *sim)
{
    char err[256];
    struct timeval tv = {0, REBIND_RETRY_MS * 1000};

    if (sim->state.mode == PQ_SIM_MODE_DOWN) {
        if (sim->http)
            main_close(sim);
        return;
    }
    if (sim->http)
        return;
    if (main_open(sim, err, sizeof(err)) == 0) {
        PQ_INFO("%s: provider listener open again", sim->name);
        return;
    }
    PQ_WARN("%s: re-bind failed (%s), retrying", sim->name, err);
    evtimer_add(sim->apply_ev, &tv);
}

static void apply_cb(evutil_socket_t fd, short what, void *arg)
{
    apply_listener(arg);
}

static void apply_after_reply(struct evhttp_request *req, void *arg)
{
    pq_sim_t *sim = arg;
    event_active(sim->apply_ev, EV_TIMEOUT, 0);
}

/* Held calls under a new (non-down) state: a hanging call no longer meeting "hang" is
 * answered under its new state, a stalled one no longer meeting "stall" is finished. */
static void release_held(pq_sim_t *sim)
{
    const pq_sim_state_t *st;
    pq_sim_call_t *c, *next;

    for (c = sim->calls; c; c = next) {
        next = c->next;
        if (c->stage != STAGE_HANG && c->stage != STAGE_STALL)
            continue;
        st = call_state(c);
        if (c->stage == STAGE_STALL) {
            if (st->mode != PQ_SIM_MODE_STALL)
                call_stall_finish(c);
            continue;
        }
        if (st->mode == PQ_SIM_MODE_HANG)
            continue;
        if (c->watch) {
            event_free(c->watch);
            c->watch = NULL;
        }
        c->stage = STAGE_NEW;
        call_prepare(c, st);
        call_log_update(c, 0);
        call_schedule(c, st);
    }
}

/* ---- control API ---- */

static void control_set_state(pq_sim_t *sim, struct evhttp_request *req, int via_main)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in);
    const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "{}";
    pq_sim_state_t st;
    char err[512];
    int listener_change;

    if (!len)
        len = 2;
    if (pq_sim_state_parse(body, len, &st, err, sizeof(err))) {
        send_json(req, 400, json_pack("{s:b, s:{s:s}}", "ok", 0, "error", "message", err));
        return;
    }
    pq_sim_state_clear(&sim->state);
    sim->state = st;
    sim->applied_ms = pq_mono_ms();
    if (st.revoke_tokens)
        sim->token_floor = sim->next_id + 1; /* every id handed out so far is below it */
    PQ_INFO("%s: state mode=%s status=%d latency_ms=%lld failure_rate=%g schedule=%s models=%zu",
            sim->name, pq_sim_mode_name(st.mode), st.status, (long long)st.latency_ms,
            st.failure_rate, st.sched_down ? "yes" : "no", st.nmodels);

    if (st.mode != PQ_SIM_MODE_DOWN)
        release_held(sim);

    listener_change = (st.mode == PQ_SIM_MODE_DOWN) != (sim->http == NULL);
    if (listener_change && via_main) {
        /* This answer travels on the listener being closed: act once it has been written. */
        struct timeval tv = {0, APPLY_FALLBACK_MS * 1000};
        evhttp_request_set_on_complete_cb(req, apply_after_reply, sim);
        evtimer_add(sim->apply_ev, &tv);
    }
    send_json(req, 200,
              json_pack("{s:b, s:o}", "ok", 1, "state", pq_sim_state_to_json(&sim->state)));
    if (listener_change && !via_main)
        apply_listener(sim);
}

static json_t *stats_json(pq_sim_t *sim)
{
    return json_pack("{s:s, s:s, s:b, s:I, s:O, s:O, s:O, s:I, s:I, s:I}", "name", sim->name,
                     "mode", pq_sim_mode_name(sim->state.mode), "listening", sim->http != NULL,
                     "requests", (json_int_t)sim->requests, "by_status", sim->by_status, "by_path",
                     sim->by_path, "by_model", sim->by_model, "inflight", (json_int_t)sim->inflight,
                     "max_inflight", (json_int_t)sim->max_inflight, "tokens",
                     (json_int_t)sim->tokens);
}

/* {"calls": [...]}: the kept chat calls, oldest first. */
static json_t *log_json(pq_sim_t *sim)
{
    json_t *calls = json_array();
    uint64_t n = sim->log_count > LOG_MAX ? sim->log_count - LOG_MAX : 0;

    if (n < sim->log_start)
        n = sim->log_start;
    for (; calls && n < sim->log_count; n++) {
        const log_entry_t *e = &sim->log[n % LOG_MAX];
        json_array_append_new(calls,
                              json_pack("{s:I, s:s, s:s, s:i, s:s}", "t_ms", (json_int_t)e->t_ms,
                                        "model", e->model, "path", e->path, "status", e->status,
                                        "outcome", outcome_names[e->outcome]));
    }
    return json_pack("{s:o}", "calls", calls);
}

static void control_request(pq_sim_t *sim, struct evhttp_request *req, const char *path,
                            int via_main)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);

    if (!strcmp(path, "/_sim/state")) {
        if (m == EVHTTP_REQ_GET)
            send_json(req, 200, pq_sim_state_to_json(&sim->state));
        else if (m == EVHTTP_REQ_POST || m == EVHTTP_REQ_PUT)
            control_set_state(sim, req, via_main);
        else
            send_json(req, 405, json_pack("{s:{s:s}}", "error", "message", "use GET or POST"));
    } else if (!strcmp(path, "/_sim/stats") && m == EVHTTP_REQ_GET) {
        send_json(req, 200, stats_json(sim));
    } else if (!strcmp(path, "/_sim/log") && m == EVHTTP_REQ_GET) {
        send_json(req, 200, log_json(sim));
    } else if (!strcmp(path, "/_sim/reset") && m == EVHTTP_REQ_POST) {
        sim->requests = 0;
        sim->tokens = 0;
        sim->max_inflight = sim->inflight;
        json_object_clear(sim->by_status);
        json_object_clear(sim->by_path);
        json_object_clear(sim->by_model);
        sim->log_start = sim->log_count;
        send_json(req, 200, json_pack("{s:b}", "ok", 1));
    } else {
        send_json(req, 404, json_pack("{s:{s:s}}", "error", "message", "unknown control path"));
    }
}

static void on_request(struct evhttp_request *req, void *arg)
{
    listener_ctx_t *ctx = arg;
    const char *path = request_path(req);

    if (!strncmp(path, "/_sim/", 6)) {
        control_request(ctx->sim, req, path, ctx->is_main);
        return;
    }
    if (!ctx->is_main) {
        send_json(req, 404,
                  json_pack("{s:{s:s}}", "error", "message",
                            "the control listener serves /_sim/ paths only"));
        return;
    }
    provider_request(ctx->sim, req, path);
}

/* ---- accessors for the formats ---- */

const char *pq_sim_call_body(pq_sim_call_t *call, size_t *len)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(call->req);

    *len = evbuffer_get_length(in);
    if (!*len)
        return "";
    return (const char *)evbuffer_pullup(in, -1);
}

struct evhttp_request *pq_sim_call_request(pq_sim_call_t *call)
{
    return call->req;
}

const char *pq_sim_call_arg(const pq_sim_call_t *call)
{
    return call->arg;
}

void pq_sim_call_set_arg(pq_sim_call_t *call, const char *s, size_t len)
{
    if (len >= sizeof(call->arg))
        len = sizeof(call->arg) - 1;
    memcpy(call->arg, s, len);
    call->arg[len] = '\0';
}

void pq_sim_call_json(pq_sim_call_t *call, int status, json_t *doc)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(call->req);

    evbuffer_drain(out, evbuffer_get_length(out));
    if (doc)
        pq_sim_core_dump(doc, out);
    json_decref(doc);
    set_header(call->req, "Content-Type", "application/json");
    call->status = status;
}

void pq_sim_call_error(pq_sim_call_t *call, int status, pq_sim_ekind_t kind, const char *message,
                       const char *param, const char *code)
{
    pq_sim_error_t e = {kind, message, param, code, 0};
    call->format->error(call, status, &e);
}

int pq_sim_call_stream(pq_sim_call_t *call, const char *eol)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(call->req);

    stream_reset(call);
    evbuffer_drain(out, evbuffer_get_length(out));
    pq_strlcpy(call->eol, eol && *eol ? eol : "\n", sizeof(call->eol));
    call->stream = 1;
    call->status = 200;
    return 0;
}

int pq_sim_call_stream_event(pq_sim_call_t *call, const char *event, const json_t *doc,
                             const char *raw, int done)
{
    char *data = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    const char *d = doc ? data : (raw ? raw : "");
    stream_ev_t *e;
    int n;

    if (doc && !data)
        return -1;
    if (call->nev == call->cap) {
        size_t cap = call->cap ? call->cap * 2 : 16;
        stream_ev_t *evs = realloc(call->evs, cap * sizeof(*evs));
        if (!evs) {
            free(data);
            return -1;
        }
        call->evs = evs;
        call->cap = cap;
    }
    e = &call->evs[call->nev];
    memset(e, 0, sizeof(*e));
    e->done = done;
    n = asprintf(&e->text, "%s%s%sdata: %s%s%s", event ? "event: " : "", event ? event : "",
                 event ? call->eol : "", d, call->eol, call->eol);
    e->data_off = (event ? 7 + strlen(event) + strlen(call->eol) : 0) + 6;
    free(data);
    if (n < 0)
        return -1;
    e->len = (size_t)n;
    e->data_len = strlen(d);
    call->nev++;
    return 0;
}

void pq_sim_call_tokens(pq_sim_call_t *call, int64_t tokens)
{
    call->tokens += tokens;
}

pq_sim_t *pq_sim_call_sim(pq_sim_call_t *call)
{
    return call->sim;
}

int pq_sim_call_query(pq_sim_call_t *call, const char *name, char *buf, size_t size)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(call->req);
    const char *q = uri ? evhttp_uri_get_query(uri) : NULL;
    struct evkeyvalq params;
    const char *v;
    int rc = -1;

    if (!q)
        return -1;
    TAILQ_INIT(&params);
    if (evhttp_parse_query_str(q, &params) == 0) {
        v = evhttp_find_header(&params, name);
        if (v && strlen(v) < size) {
            pq_strlcpy(buf, v, size);
            rc = 0;
        }
    }
    evhttp_clear_headers(&params);
    return rc;
}

int pq_sim_call_rejects_prefill(const pq_sim_call_t *call)
{
    return call->reject_prefill;
}

int pq_sim_call_header(pq_sim_call_t *call, const char *name, char *buf, size_t size)
{
    const char *v = evhttp_find_header(evhttp_request_get_input_headers(call->req), name);

    if (!v || strlen(v) >= size)
        return -1;
    pq_strlcpy(buf, v, size);
    return 0;
}

int pq_sim_key_valid(pq_sim_t *sim, const char *key)
{
    if (!sim->nkeys)
        return 1;
    for (int i = 0; i < sim->nkeys; i++)
        if (key && !strcmp(key, sim->keys[i]))
            return 1;
    return 0;
}

uint64_t pq_sim_next_id(pq_sim_t *sim)
{
    return ++sim->next_id;
}

uint64_t pq_sim_token_floor(const pq_sim_t *sim)
{
    return sim->token_floor;
}

int64_t pq_sim_now_s(pq_sim_t *sim)
{
    struct timeval tv;
    if (event_base_gettimeofday_cached(sim->base, &tv) != 0)
        return pq_now_ms() / 1000;
    return (int64_t)tv.tv_sec;
}

void pq_sim_model_seen(pq_sim_t *sim, const char *model)
{
    if (json_object_get(sim->models, model) || json_object_size(sim->models) >= PQ_SIM_MAX_KEYS)
        return;
    json_object_set_new(sim->models, model, json_true());
}

const json_t *pq_sim_models(pq_sim_t *sim)
{
    return sim->models;
}

int64_t pq_sim_started_s(pq_sim_t *sim)
{
    return sim->started_s;
}

/* ---- life cycle ---- */

pq_sim_t *pq_sim_new(struct event_base *base, const pq_sim_opts_t *opts, char *errstr,
                     size_t errstr_size)
{
    pq_sim_t *sim;
    struct sockaddr_storage ctl_addr;
    socklen_t ctl_len = 0;
    char main_name[128], ctl_name[128], err[256];

    sim = calloc(1, sizeof(*sim));
    if (!sim) {
        snprintf(errstr, errstr_size, "out of memory");
        return NULL;
    }
    sim->base = base;
    pq_strlcpy(sim->name, opts->name ? opts->name : "sim", sizeof(sim->name));
    pq_sim_state_init(&sim->state);
    sim->main_ctx.sim = sim;
    sim->main_ctx.is_main = 1;
    sim->ctl_ctx.sim = sim;
    sim->rng = (uint64_t)pq_mono_ms() * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    if (!sim->rng)
        sim->rng = 88172645463325252ULL;
    sim->started_s = pq_now_ms() / 1000;
    sim->started_ms = pq_mono_ms();
    sim->applied_ms = sim->started_ms;
    sim->by_status = json_object();
    sim->by_path = json_object();
    sim->models = json_object();
    sim->by_model = json_object();
    sim->log = calloc(LOG_MAX, sizeof(*sim->log));
    sim->apply_ev = evtimer_new(base, apply_cb, sim);
    if (!sim->by_status || !sim->by_path || !sim->models || !sim->by_model || !sim->log ||
        !sim->apply_ev) {
        snprintf(errstr, errstr_size, "out of memory");
        goto out_destroy;
    }
    json_object_set_new(sim->models, "sim-model", json_true());
    for (int i = 0; i < opts->nkeys && i < PQ_SIM_MAX_API_KEYS; i++) {
        sim->keys[i] = strdup(opts->keys[i]);
        if (!sim->keys[i]) {
            snprintf(errstr, errstr_size, "out of memory");
            goto out_destroy;
        }
        sim->nkeys++;
    }

    if (addr_parse(opts->listen, &sim->main_addr, &sim->main_addrlen, errstr, errstr_size))
        goto out_destroy;
    if (opts->control && addr_parse(opts->control, &ctl_addr, &ctl_len, errstr, errstr_size))
        goto out_destroy;
    if (opts->control) {
        sim->ctl_http =
            http_open(sim, (struct sockaddr *)&ctl_addr, ctl_len, &sim->ctl_ctx, err, sizeof(err));
        if (!sim->ctl_http) {
            snprintf(errstr, errstr_size, "--control %s: %s", opts->control, err);
            goto out_destroy;
        }
    }
    if (main_open(sim, err, sizeof(err))) {
        snprintf(errstr, errstr_size, "--listen %s: %s", opts->listen, err);
        goto out_destroy;
    }
    /* Keep the real port (port 0 asks the kernel for one) for re-binding after "down". */
    sim->main_addrlen = sizeof(sim->main_addr);
    getsockname(http_fd(sim->http), (struct sockaddr *)&sim->main_addr, &sim->main_addrlen);

    sock_name(http_fd(sim->http), main_name, sizeof(main_name));
    if (sim->ctl_http)
        sock_name(http_fd(sim->ctl_http), ctl_name, sizeof(ctl_name));
    else
        pq_strlcpy(ctl_name, main_name, sizeof(ctl_name));
    printf("listening=%s control=%s\n", main_name, ctl_name);
    fflush(stdout);
    PQ_INFO("%s: listening=%s control=%s keys=%d", sim->name, main_name, ctl_name, sim->nkeys);
    return sim;

out_destroy:
    pq_sim_destroy(sim);
    return NULL;
}

void pq_sim_destroy(pq_sim_t *sim)
{
    if (!sim)
        return;
    if (sim->http)
        main_close(sim);
    while (sim->calls)
        call_free(sim->calls);
    if (sim->ctl_http)
        evhttp_free(sim->ctl_http);
    if (sim->apply_ev)
        event_free(sim->apply_ev);
    for (int i = 0; i < sim->nkeys; i++)
        free(sim->keys[i]);
    json_decref(sim->by_status);
    json_decref(sim->by_path);
    json_decref(sim->models);
    json_decref(sim->by_model);
    free(sim->log);
    pq_sim_state_clear(&sim->state);
    free(sim);
}
