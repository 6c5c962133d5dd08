/* One broker loop thread: event base, evhttp on a SO_REUSEPORT listener, request routing,
 * the slot table, config hand-over and graceful stop. */
#include "broker.h"
#include "batch.h"
#include "bspool.h"
#include "chat.h"
#include "files.h"
#include "http.h"
#include "intake.h"
#include "jobs.h"
#include "kprod.h"
#include "loop.h"
#include "ops.h"
#include "rconn.h"
#include "rsub.h"
#include "slot.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>

#include "promptq/log.h"
#include "promptq/util.h"

/* At exit, the loop's producer gets at most this long to deliver what it still holds. */
#define PQ_BROKER_EXIT_FLUSH_MS 1000

/* Connections idle this long are closed. */
#define PQ_BROKER_IDLE_S 120

/* ---- simple endpoints ---- */

static void serve_healthz(pq_bthread_t *t, struct evhttp_request *req)
{
    static const char ok[] = "{\"status\":\"ok\"}";

    pq_http_reply(t, req, PQ_PATH_HEALTHZ, 200, ok, sizeof(ok) - 1);
}

/* Ready while a job can be made durable: Kafka reachable, or room left in the spool. */
static void serve_readyz(pq_bthread_t *t, struct evhttp_request *req)
{
    int kafka = pq_bspool_kafka_up(t->b);
    int full = pq_bspool_full(t->b);
    char body[128];
    int n;

    if (!t->stopping && (kafka || !full)) {
        n = snprintf(body, sizeof(body),
                     "{\"status\":\"ready\",\"kafka\":\"%s\",\"durability\":\"%s\"}",
                     kafka ? "up" : "down", kafka ? "kafka" : "spooled");
        pq_http_reply(t, req, PQ_PATH_READYZ, 200, body, (size_t)n);
        return;
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After",
                      t->stopping ? "1" : "5");
    pq_http_error(t, req, PQ_PATH_READYZ, 503, "unavailable",
                  t->stopping ? "shutting down"
                              : "no Kafka broker reachable and the spool is full");
}

static void free_rendered(const void *data, size_t len, void *arg)
{
    free((void *)data);
}

static void serve_metrics(pq_bthread_t *t, struct evhttp_request *req)
{
    size_t len = 0;
    char *text;
    struct evbuffer *out = evhttp_request_get_output_buffer(req);

    pq_bspool_metrics(t->b);
    text = pq_metrics_render(t->b->metrics, &len);
    if (!text) {
        pq_http_error(t, req, PQ_PATH_METRICS, 500, "internal", "cannot render metrics");
        return;
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "text/plain; version=0.0.4");
    if (evbuffer_add_reference(out, text, len, free_rendered, NULL)) {
        free(text);
        pq_http_error(t, req, PQ_PATH_METRICS, 500, "internal", "out of memory");
        return;
    }
    pq_http_reply(t, req, PQ_PATH_METRICS, 200, NULL, 0);
}

/* ---- routing ---- */

static int method_is(struct evhttp_request *req, enum evhttp_cmd_type a, enum evhttp_cmd_type b)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);

    return m == a || m == b;
}

static void method_not_allowed(pq_bthread_t *t, struct evhttp_request *req, pq_path_t path,
                               const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
    pq_http_error(t, req, path, 405, "method_not_allowed", "method not allowed; allowed: %s",
                  allow);
}

static void on_request(struct evhttp_request *req, void *arg)
{
    pq_bthread_t *t = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL, *p;

    if (!path)
        path = "";
    if (pq_http_check_head(t, req))
        return;
    if (t->stopping) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Connection", "close");
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        pq_http_error(t, req, PQ_PATH_OTHER, 503, "unavailable", "shutting down");
        return;
    }
    if (!strcmp(path, "/v1/jobs")) {
        if (evhttp_request_get_command(req) == EVHTTP_REQ_POST)
            pq_intake_post(t, req);
        else if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            pq_jobs_list(t, req);
        else
            method_not_allowed(t, req, PQ_PATH_JOBS, "GET, POST");
    } else if (!strncmp(path, "/v1/jobs/", 9) && path[9] && !strchr(path + 9, '/')) {
        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            pq_jobs_get(t, req, path + 9);
        else if (evhttp_request_get_command(req) == EVHTTP_REQ_DELETE)
            pq_jobs_delete(t, req, path + 9);
        else
            method_not_allowed(t, req, PQ_PATH_JOB, "GET, DELETE");
    } else if (!strncmp(path, "/v1/jobs/", 9) && path[9] && (p = strchr(path + 9, '/')) &&
               !strcmp(p, "/stream") && p - (path + 9) <= PQ_ID_MAX) {
        char id[PQ_ID_MAX + 1];

        memcpy(id, path + 9, (size_t)(p - (path + 9)));
        id[p - (path + 9)] = '\0';
        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            pq_chat_resume(t, req, id);
        else
            method_not_allowed(t, req, PQ_PATH_JOB, "GET");
    } else if (!strcmp(path, "/v1/chat/completions")) {
        if (evhttp_request_get_command(req) == EVHTTP_REQ_POST)
            pq_chat_post(t, req);
        else
            method_not_allowed(t, req, PQ_PATH_CHAT, "POST");
    } else if (!strcmp(path, "/v1/models") || (!strncmp(path, "/v1/models/", 11) && path[11])) {
        pq_path_t p = path[10] ? PQ_PATH_MODEL : PQ_PATH_MODELS;

        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            pq_models_get(t, req, path[10] ? path + 11 : NULL);
        else
            method_not_allowed(t, req, p, "GET");
    } else if (!strcmp(path, "/v1/files") || !strncmp(path, "/v1/files/", 10)) {
        pq_files_serve(t, req, path + 9);
    } else if (!strcmp(path, "/v1/batches") || !strncmp(path, "/v1/batches/", 12)) {
        pq_batch_serve(t, req, path + 11);
    } else if (!strcmp(path, "/v1/health") || !strcmp(path, "/v1/parked") ||
               !strncmp(path, "/v1/parked/", 11) || !strcmp(path, "/v1/dlq/redrive")) {
        pq_ops_serve(t, req, path);
    } else if (!strcmp(path, "/healthz")) {
        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            serve_healthz(t, req);
        else
            method_not_allowed(t, req, PQ_PATH_HEALTHZ, "GET");
    } else if (!strcmp(path, "/readyz")) {
        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            serve_readyz(t, req);
        else
            method_not_allowed(t, req, PQ_PATH_READYZ, "GET");
    } else if (!strcmp(path, "/metrics")) {
        if (method_is(req, EVHTTP_REQ_GET, EVHTTP_REQ_HEAD))
            serve_metrics(t, req);
        else
            method_not_allowed(t, req, PQ_PATH_METRICS, "GET");
    } else {
        pq_http_error(t, req, PQ_PATH_OTHER, 404, "not_found", "no such path");
    }
}

/* ---- config hand-over and stop ---- */

static void apply_conf(pq_bthread_t *t)
{
    const pq_conf_t *conf = t->bc->conf;
    struct timeval tv;
    int ack = conf->ack_timeout_ms > 0 ? conf->ack_timeout_ms : 1000;
    /* evhttp itself refuses bodies far beyond the cap (with its own 413 and a closed
     * connection); up to this the broker reads them and answers a JSON 413. */
    size_t hard = t->bc->max_body * 2 + 65536;

    /* POST /v1/files bodies (multipart) up to broker.max_file_bytes plus the form's overhead */
    if ((size_t)conf->max_file_bytes + 65536 > hard)
        hard = (size_t)conf->max_file_bytes + 65536;

    evhttp_set_max_body_size(t->http, (ev_ssize_t)hard);
    tv.tv_sec = ack / 1000;
    tv.tv_usec = (ack % 1000) * 1000;
    t->tv_ack = event_base_init_common_timeout(t->base, &tv);
}

/* Spooled jobs get this much longer than the stop deadline to be fsync'd and answered. */
#define PQ_BROKER_SPOOL_GRACE_MS 5000

static void shutdown_tick(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    struct timeval grace = {0, 100000};
    int64_t now = pq_mono_ms();

    if (t->inflight > 0 && now < t->stop_deadline_ms)
        return;
    if (t->inflight > 0 && now < t->stop_deadline_ms + PQ_BROKER_SPOOL_GRACE_MS) {
        /* Deadline passed: what still waits for Kafka goes to the spool and is answered from
         * there; reads are answered now. */
        int waiting = 0;

        for (uint32_t i = 1; i <= t->nslots; i++) {
            pq_slot_t *s = pq_slot_at(t, i);

            if (s->state != PQ_SLOT_FREE && s->ops->stop)
                s->ops->stop(s);
            if (s->state == PQ_SLOT_SPOOLING)
                waiting++;
        }
        if (waiting > 0)
            return;
    } else if (t->inflight > 0) {
        PQ_WARN("thread %d: %u requests still waiting for the spool at exit", t->no, t->inflight);
    }
    event_del(t->shutdown_ev);
    /* Let the last replies reach the sockets before the loop ends. */
    event_base_loopexit(t->base, &grace);
}

static void begin_stop(pq_bthread_t *t)
{
    struct timeval tick = {0, 20000};

    if (t->stopping)
        return;
    t->stopping = 1;
    t->stop_deadline_ms = pq_mono_ms() + PQ_BROKER_SHUTDOWN_MS;
    if (t->bound) {
        evhttp_del_accept_socket(t->http, t->bound); /* closes the listener */
        t->bound = NULL;
    }
    t->shutdown_ev = event_new(t->base, -1, EV_PERSIST, shutdown_tick, t);
    if (!t->shutdown_ev) {
        event_base_loopexit(t->base, NULL);
        return;
    }
    event_add(t->shutdown_ev, &tick);
}

static void ctl_cb(evutil_socket_t fd, short what, void *arg)
{
    pq_bthread_t *t = arg;
    pq_bconf_t *bc = atomic_exchange(&t->next_bc, NULL);

    if (bc) {
        pq_bconf_unref(t->bc);
        t->bc = bc;
        apply_conf(t);
    }
    if (atomic_load(&t->stop))
        begin_stop(t);
}

void pq_bthread_poke(pq_bthread_t *t)
{
    event_active(t->ctl_ev, EV_READ, 0);
}

/* ---- lifecycle ---- */

int pq_bthread_init(pq_bthread_t *t, pq_broker_t *b, int no, char *errstr, size_t errstr_size)
{
    struct timeval tv_redis = {0, PQ_BROKER_REDIS_TIMEOUT_MS * 1000};
    const pq_kprod_dr_t dr = {pq_intake_delivered, pq_jobs_cancel_delivered, pq_batch_delivered};
    struct event_config *cfg;

    t->b = b;
    t->no = no;
    t->kpipe[0] = t->kpipe[1] = -1;
    atomic_init(&t->kafka_up, -1);
    atomic_init(&t->stop, 0);
    pq_bconf_ref(b->bconf);
    t->bc = b->bconf;
    atomic_init(&t->next_bc, NULL);

    /* The changelist coalesces the epoll_ctl calls evhttp makes while it toggles read and
     * write interest on a connection within one loop iteration. */
    cfg = event_config_new();
    if (cfg) {
        event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
        t->base = event_base_new_with_config(cfg);
        event_config_free(cfg);
    }
    if (!t->base) {
        snprintf(errstr, errstr_size, "event_base_new failed");
        return -1;
    }
    t->http = evhttp_new(t->base);
    t->ctl_ev = event_new(t->base, -1, 0, ctl_cb, t);
    if (!t->http || !t->ctl_ev) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    evhttp_set_gencb(t->http, on_request, t);
    evhttp_set_timeout(t->http, PQ_BROKER_IDLE_S);
    evhttp_set_max_headers_size(t->http, 32768);
    evhttp_set_allowed_methods(t->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    evhttp_set_default_content_type(t->http, "application/json");
    t->tv_redis = event_base_init_common_timeout(t->base, &tv_redis);
    apply_conf(t);

    if (pq_bspool_thread_init(t)) {
        snprintf(errstr, errstr_size, "cannot set up the spool completion queue");
        return -1;
    }
    if (pq_intake_thread_init(t)) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    if (pq_kprod_start(t, &dr, errstr, errstr_size))
        return -1;
    if (pq_rconn_start(t) || pq_chat_thread_init(t) ||
        pq_rsub_start(t, pq_chat_notify, pq_chat_subscribed) || pq_batch_thread_init(t)) {
        snprintf(errstr, errstr_size, "cannot set up the Redis connections");
        return -1;
    }
    return 0;
}

int pq_bthread_listen(pq_bthread_t *t, int *port, char *errstr, size_t errstr_size)
{
    const pq_conf_t *conf = t->bc->conf;
    struct addrinfo hints, *ai = NULL;
    struct evconnlistener *lst;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof(ss);
    char portstr[16];
    int rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof(portstr), "%d", *port);
    rc = getaddrinfo(conf->listen_host && conf->listen_host[0] ? conf->listen_host : NULL, portstr,
                     &hints, &ai);
    if (rc != 0) {
        snprintf(errstr, errstr_size, "broker.listen: %s", gai_strerror(rc));
        return -1;
    }
    lst = evconnlistener_new_bind(
        t->base, NULL, NULL,
        LEV_OPT_REUSEABLE | LEV_OPT_REUSEABLE_PORT | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
        conf->backlog > 0 ? conf->backlog : 4096, ai->ai_addr, (int)ai->ai_addrlen);
    freeaddrinfo(ai);
    if (!lst) {
        snprintf(errstr, errstr_size, "broker.listen: cannot bind %s:%d: %s", conf->listen_host,
                 *port, strerror(errno));
        return -1;
    }
    t->bound = evhttp_bind_listener(t->http, lst);
    if (!t->bound) {
        evconnlistener_free(lst);
        snprintf(errstr, errstr_size, "broker.listen: evhttp_bind_listener failed");
        return -1;
    }
    if (*port == 0 &&
        getsockname(evconnlistener_get_fd(lst), (struct sockaddr *)&ss, &sslen) == 0) {
        if (ss.ss_family == AF_INET)
            *port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            *port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return 0;
}

static void *thread_main(void *arg)
{
    pq_bthread_t *t = arg;
    int64_t left;

    pq_bthread_current = t;
    event_base_dispatch(t->base);
    /* Every request is answered: each job is in Kafka, in the spool, or was refused. What the
     * producer still holds is a copy of a spooled job; a short flush only saves the drainer
     * producing it again. */
    left = t->stop_deadline_ms ? t->stop_deadline_ms - pq_mono_ms() : 0;
    if (left > PQ_BROKER_EXIT_FLUSH_MS)
        left = PQ_BROKER_EXIT_FLUSH_MS;
    pq_kprod_stop(t, left > 0 ? (int)left : 0);
    pq_rconn_stop(t);
    pq_rsub_stop(t);
    pq_bthread_current = NULL;
    return NULL;
}

int pq_bthread_start(pq_bthread_t *t, char *errstr, size_t errstr_size)
{
    int rc = pthread_create(&t->thread, NULL, thread_main, t);

    if (rc) {
        snprintf(errstr, errstr_size, "pthread_create: %s", strerror(rc));
        return -1;
    }
    return 0;
}

void pq_bthread_free(pq_bthread_t *t)
{
    if (!t)
        return;
    pq_kprod_stop(t, 0);
    pq_rconn_stop(t);
    pq_rsub_stop(t);
    if (t->http)
        evhttp_free(t->http);
    if (t->ctl_ev)
        event_free(t->ctl_ev);
    if (t->shutdown_ev)
        event_free(t->shutdown_ev);
    pq_bspool_thread_free(t);
    pq_slots_free(t);
    pq_chat_thread_free(t);
    pq_batch_thread_free(t);
    pq_rconn_dns_free(t);
    pq_intake_thread_free(t);
    if (t->base)
        event_base_free(t->base);
    pq_bconf_unref(t->bc);
    pq_bconf_unref(atomic_exchange(&t->next_bc, NULL));
    free(t);
}
