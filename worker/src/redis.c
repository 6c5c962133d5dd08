/* hiredis async + libevent adapter, with reconnect and a reply watchdog. */
#include "redis.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <event2/dns.h>
#include <event2/util.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>
#include "promptq/rasync.h"
#include "promptq/log.h"
#include "promptq/scripts.h"
#include "promptq/util.h"

#define RECONNECT_MIN_MS 100
#define RECONNECT_MAX_MS 2000
#define WATCHDOG_MS      250

typedef struct pending_s {
    pq_redis_t *r;
    pq_redis_reply_cb *cb;
    void *opaque;
    struct pending_s *next_free;
} pending_t;

struct pq_redis_s {
    struct event_base *base;
    char *host;
    int port;
    char *password;
    int db;
    int timeout_ms;
    pq_redis_state_cb *state_cb;
    void *opaque;

    redisAsyncContext *ac; /* NULL while disconnected */
    int priority;          /* libevent priority of the connection's events; -1 the default */
    int up;
    int backoff_ms;
    size_t pending;
    int64_t last_progress_ms; /* last reply, or when the oldest pending command was sent */
    struct event *reconnect_timer;
    struct event *watchdog;
    pending_t *free_list;
    int destroying;
    /* a host name is resolved with evdns (hiredis would call getaddrinfo on the loop) */
    int numeric;
    struct evdns_base *dns;
    struct evdns_getaddrinfo_request *dns_req;
    struct resolve_s *resolving; /* the lookup in flight */
    char addr[INET6_ADDRSTRLEN];
};

static void schedule_reconnect(pq_redis_t *r);

static pending_t *pending_get(pq_redis_t *r)
{
    pending_t *p = r->free_list;
    if (p) {
        r->free_list = p->next_free;
        return p;
    }
    return calloc(1, sizeof(*p));
}

static void pending_put(pq_redis_t *r, pending_t *p)
{
    p->next_free = r->free_list;
    r->free_list = p;
}

/* Marks the connection gone. The caller frees (or hiredis has freed) the context. */
static void set_down(pq_redis_t *r, const char *why)
{
    int was_up = r->up;

    r->ac = NULL;
    r->up = 0;
    if (was_up || why)
        PQ_WARN("redis %s:%d unavailable: %s", r->host, r->port, why ? why : "disconnected");
    if (!r->destroying) {
        schedule_reconnect(r);
        if (was_up && r->state_cb)
            r->state_cb(r->opaque, 0);
    }
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    pending_t *p = privdata;
    pq_redis_t *r = p->r;

    r->pending--;
    r->last_progress_ms = pq_mono_ms();
    if (p->cb)
        p->cb(p->opaque, reply);
    pending_put(r, p);
}

static void on_ready(redisAsyncContext *ac, void *reply, void *privdata)
{
    pq_redis_t *r = privdata;
    redisReply *rep = reply;

    if (!rep || r->ac != ac)
        return;
    if (rep->type == REDIS_REPLY_ERROR) {
        PQ_ERR("redis %s:%d refused the handshake (AUTH/SELECT)", r->host, r->port);
        return; /* the watchdog does not fire with nothing pending; retry by disconnecting */
    }
    r->up = 1;
    r->backoff_ms = RECONNECT_MIN_MS;
    PQ_INFO("redis %s:%d connected", r->host, r->port);
    if (r->state_cb)
        r->state_cb(r->opaque, 1);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    pq_redis_t *r = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees the context after this returns */
        if (r->ac == ac)
            set_down(r, ac->errstr[0] ? ac->errstr : "connect failed");
        return;
    }
    /* AUTH and SELECT went first (queued by pq_rasync_open); every EVALSHA sent on this connection
     * then finds its script, also on a Redis restarted empty; a later SCRIPT FLUSH is answered
     * NOSCRIPT and the caller sends EVAL */
    for (int i = 0; i < PQ_SCRIPT__CNT; i++) {
        const char *text = pq_script_text((pq_script_id_t)i);
        const char *argv[3] = {"SCRIPT", "LOAD", text};
        size_t lens[3] = {6, 4, strlen(text)};
        redisAsyncCommandArgv(r->ac, NULL, NULL, 3, argv, lens);
    }
    redisAsyncCommand(r->ac, on_ready, r, "PING");
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    pq_redis_t *r = ac->data;

    if (r->ac == ac)
        set_down(r, status == REDIS_OK ? NULL : (ac->errstr[0] ? ac->errstr : "connection lost"));
}

/* Connects to a numeric address (hiredis resolves nothing then). */
static void connect_addr(pq_redis_t *r, const char *addr)
{
    pq_rasync_opts_t o = {.base = r->base,
                          .addr = addr,
                          .port = r->port,
                          .password = r->password,
                          .db = r->db,
                          .data = r,
                          .on_connect = on_connect,
                          .on_disconnect = on_disconnect,
                          .priority = r->priority};
    char err[128];
    redisAsyncContext *ac = pq_rasync_open(&o, NULL, err, sizeof(err));

    if (!ac) {
        PQ_WARN("redis %s:%d: %s", r->host, r->port, err);
        schedule_reconnect(r);
        return;
    }
    r->ac = ac;
    r->pending = 0;
    r->last_progress_ms = pq_mono_ms();
}

/* A lookup's link back to its connection: cut when the connection is destroyed first (a
 * cancelled lookup may still call back later). */
typedef struct resolve_s {
    pq_redis_t *r;
} resolve_t;

static void on_resolved(int result, struct evutil_addrinfo *res, void *arg)
{
    resolve_t *rv = arg;
    pq_redis_t *r = rv->r;
    const void *a = NULL;

    free(rv);
    if (!r) {
        if (res)
            evutil_freeaddrinfo(res);
        return; /* destroyed meanwhile */
    }
    r->resolving = NULL;
    r->dns_req = NULL;
    if (result == 0 && res) {
        if (res->ai_family == AF_INET)
            a = &((struct sockaddr_in *)res->ai_addr)->sin_addr;
        else if (res->ai_family == AF_INET6)
            a = &((struct sockaddr_in6 *)res->ai_addr)->sin6_addr;
    }
    if (!a || !inet_ntop(res->ai_family, a, r->addr, sizeof(r->addr))) {
        PQ_WARN("redis %s:%d: cannot resolve the host: %s", r->host, r->port,
                result ? evutil_gai_strerror(result) : "no address");
        if (res)
            evutil_freeaddrinfo(res);
        schedule_reconnect(r);
        return;
    }
    evutil_freeaddrinfo(res);
    PQ_DBG("redis %s resolved to %s", r->host, r->addr);
    connect_addr(r, r->addr);
}

static void do_connect(pq_redis_t *r)
{
    struct evutil_addrinfo hints;
    struct evdns_getaddrinfo_request *req;
    resolve_t *rv;

    if (r->numeric || !r->dns) {
        connect_addr(r, r->host);
        return;
    }
    if (r->resolving)
        return;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    rv = malloc(sizeof(*rv));
    if (!rv) {
        schedule_reconnect(r);
        return;
    }
    rv->r = r;
    r->resolving = rv;
    req = evdns_getaddrinfo(r->dns, r->host, NULL, &hints, on_resolved, rv);
    if (r->resolving == rv) /* else the answer came at once (hosts file) */
        r->dns_req = req;
}

static void on_reconnect_timer(evutil_socket_t fd, short what, void *arg)
{
    do_connect(arg);
}

static void schedule_reconnect(pq_redis_t *r)
{
    struct timeval tv;

    if (evtimer_pending(r->reconnect_timer, NULL))
        return;
    tv.tv_sec = r->backoff_ms / 1000;
    tv.tv_usec = (r->backoff_ms % 1000) * 1000;
    evtimer_add(r->reconnect_timer, &tv);
    r->backoff_ms *= 2;
    if (r->backoff_ms > RECONNECT_MAX_MS)
        r->backoff_ms = RECONNECT_MAX_MS;
}

/* Drops a connection that stopped answering. */
static void drop(pq_redis_t *r, const char *why)
{
    redisAsyncContext *ac = r->ac;

    set_down(r, why);
    if (ac)
        redisAsyncFree(ac); /* runs pending callbacks with NULL */
}

static void on_watchdog(evutil_socket_t fd, short what, void *arg)
{
    pq_redis_t *r = arg;

    if (r->ac && (r->pending > 0 || !r->up) && pq_mono_ms() - r->last_progress_ms > r->timeout_ms)
        drop(r, r->up ? "no reply in time" : "handshake timed out");
}

void pq_redis_set_priority(pq_redis_t *r, int priority)
{
    r->priority = priority;
    if (r->ac && r->ac->ev.data) {
        redisLibeventEvents *e = r->ac->ev.data;
        struct event *evs[2] = {e->rev, e->wev};
        for (int i = 0; i < 2; i++) {
            int pending = event_pending(evs[i], EV_READ | EV_WRITE, NULL) != 0;
            if (pending)
                event_del(evs[i]); /* a priority changes only on an event not added */
            event_priority_set(evs[i], priority);
            if (pending)
                event_add(evs[i], NULL);
        }
    }
}

pq_redis_t *pq_redis_new(struct event_base *base, const char *host, int port, const char *password,
                         int db, int timeout_ms, pq_redis_state_cb *state_cb, void *opaque,
                         char *errstr, size_t errstr_size)
{
    pq_redis_t *r = calloc(1, sizeof(*r));
    struct timeval tv = {0, WATCHDOG_MS * 1000};

    if (!r)
        goto out_nomem;
    r->base = base;
    r->priority = -1;
    r->host = strdup(host);
    r->password = password ? strdup(password) : NULL;
    r->port = port;
    r->db = db;
    r->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    r->state_cb = state_cb;
    r->opaque = opaque;
    r->backoff_ms = RECONNECT_MIN_MS;
    r->reconnect_timer = evtimer_new(base, on_reconnect_timer, r);
    r->watchdog = event_new(base, -1, EV_PERSIST, on_watchdog, r);
    if (!r->host || (password && !r->password) || !r->reconnect_timer || !r->watchdog)
        goto out_nomem;
    {
        unsigned char buf[sizeof(struct in6_addr)];
        r->numeric = inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
    }
    if (!r->numeric) {
        r->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
                                          EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (!r->dns)
            PQ_WARN("redis %s: no resolver (evdns), resolving with getaddrinfo", host);
    }
    event_add(r->watchdog, &tv);
    r->last_progress_ms = pq_mono_ms();
    do_connect(r);
    return r;

out_nomem:
    snprintf(errstr, errstr_size, "out of memory");
    pq_redis_destroy(r);
    return NULL;
}

void pq_redis_destroy(pq_redis_t *r)
{
    pending_t *p;

    if (!r)
        return;
    r->destroying = 1;
    if (r->ac) {
        redisAsyncContext *ac = r->ac;
        r->ac = NULL;
        r->up = 0;
        redisAsyncFree(ac);
    }
    if (r->resolving) {
        r->resolving->r = NULL; /* its callback frees it */
        if (r->dns_req)
            evdns_getaddrinfo_cancel(r->dns_req);
    }
    if (r->dns)
        evdns_base_free(r->dns, 0);
    if (r->reconnect_timer)
        event_free(r->reconnect_timer);
    if (r->watchdog)
        event_free(r->watchdog);
    while ((p = r->free_list)) {
        r->free_list = p->next_free;
        free(p);
    }
    free(r->host);
    free(r->password);
    free(r);
}

int pq_redis_up(const pq_redis_t *r)
{
    return r && r->up && r->ac;
}

int pq_redis_command(pq_redis_t *r, int argc, const char **argv, const size_t *lens,
                     pq_redis_reply_cb *cb, void *opaque)
{
    pending_t *p;

    if (!pq_redis_up(r))
        return -1;
    p = pending_get(r);
    if (!p)
        return -1;
    p->r = r;
    p->cb = cb;
    p->opaque = opaque;
    if (redisAsyncCommandArgv(r->ac, on_reply, p, argc, argv, lens) != REDIS_OK) {
        pending_put(r, p);
        return -1;
    }
    if (r->pending == 0)
        r->last_progress_ms = pq_mono_ms();
    r->pending++;
    return 0;
}

size_t pq_redis_pending(const pq_redis_t *r)
{
    return r->pending;
}
