/* The health key and the metrics endpoint (health.h). */
#include "health.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/buffer.h>
#include <event2/http.h>
#include "park.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define HEALTH_TTL_MS (3 * PQ_HEALTH_MS)

/* promptq:health:{instance}: a JSON string, SET every 5 s with a 15 s TTL (PX), read by the
 * broker for /v1/health, the CLI and the dashboard:
 *   {"instance": "<worker.instance_id or hostname-pid>", "owner": "<lease owner id>",
 *    "updated_at": <ms since the epoch>, "interval_ms": 5000,
 *    "inflight": <jobs in flight>, "replay_inflight": <of them read from retry topics>,
 *    "paused": <consumption paused by flow control>,
 *    "circuits": [{"provider", "model", "circuit": "closed"|"open"|"half_open",
 *                  "last_probe": null | {"ok": bool, "at": <ms>, "detail": "..."},
 *                  "status_page": null | "none"|"minor"|"major"|"critical"}],
 *    "routes": {"<route>": {"retry_topic", "down": bool,
 *                           "parked": <estimate: messages on this worker's retry partitions not
 *                                      yet replayed>,
 *                           "held_partitions": n, "replay_rate": <jobs/s> | null (unlimited),
 *                           "parked_total", "reparked_total", "replayed_total" (since start)}}}
 * Circuits appear once a target was used or probed. Each worker reports the retry partitions
 * assigned to it: the broker sums "parked" over workers. */
static void on_health_reply(void *opaque, redisReply *reply)
{
    pq_worker_t *w = opaque;
    w->health_pending = 0;
    if (reply && reply->type == REDIS_REPLY_ERROR)
        PQ_DBG("health key: %s", reply->str);
}

void pq_health_on_tick(evutil_socket_t fd, short what, void *arg)
{
    pq_worker_t *w = arg;
    int64_t now = pq_mono_ms();
    json_t *o;
    char *s, ttl[24];
    const char *argv[5];
    size_t lens[5];

    if (w->health_pending || !pq_redis_up(w->redis))
        return;
    o = json_object();
    json_object_set_new(o, "instance", json_string(w->instance));
    json_object_set_new(o, "owner", json_string(w->owner));
    json_object_set_new(o, "updated_at", json_integer(pq_now_ms()));
    json_object_set_new(o, "interval_ms", json_integer(PQ_HEALTH_MS));
    json_object_set_new(o, "inflight", json_integer((json_int_t)w->inflight));
    json_object_set_new(o, "replay_inflight", json_integer((json_int_t)w->retry_inflight));
    json_object_set_new(o, "paused", json_boolean(w->paused));
    json_object_set_new(o, "circuits", pq_provs_health(w->gen->provs));
    json_object_set_new(o, "routes", pq_park_health(w, now));
    s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!s)
        return;
    snprintf(ttl, sizeof(ttl), "%d", HEALTH_TTL_MS);
    argv[0] = "SET";
    argv[1] = w->health_key;
    argv[2] = s;
    argv[3] = "PX";
    argv[4] = ttl;
    for (int i = 0; i < 5; i++)
        lens[i] = strlen(argv[i]);
    if (pq_redis_command(w->redis, 5, argv, lens, on_health_reply, w) == 0)
        w->health_pending = 1;
    free(s);
}

static void on_metrics_http(struct evhttp_request *req, void *arg)
{
    pq_worker_t *w = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);

    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET &&
        evhttp_request_get_command(req) != EVHTTP_REQ_HEAD) {
        evhttp_send_error(req, 405, "Method Not Allowed");
        return;
    }
    if (path && strcmp(path, "/metrics") == 0) {
        size_t len = 0;
        char *text = pq_metrics_render(w->metrics, &len);
        if (!text) {
            evhttp_send_error(req, 500, "Internal Server Error");
            return;
        }
        evhttp_add_header(h, "Content-Type", "text/plain; version=0.0.4");
        evbuffer_add(out, text, len);
        free(text);
        evhttp_send_reply(req, 200, "OK", NULL);
    } else if (path && strcmp(path, "/healthz") == 0) {
        int up = pq_redis_up(w->redis);
        evhttp_add_header(h, "Content-Type", "application/json");
        evbuffer_add_printf(out, "{\"status\":\"%s\",\"redis\":%s,\"inflight\":%zu}\n",
                            w->stopping ? "stopping"
                            : up        ? "ok"
                                        : "degraded",
                            up ? "true" : "false", w->inflight);
        evhttp_send_reply(req, w->stopping || !up ? 503 : 200,
                          w->stopping || !up ? "Unavailable" : "OK", NULL);
    } else {
        evhttp_send_error(req, 404, "Not Found");
    }
}

/* Binds worker.metrics_listen ("HOST:PORT") on the worker's loop. Returns 0 or -1
 * (errstr). */
int pq_health_metrics_listen(pq_worker_t *w, const char *spec, char *errstr, size_t errstr_size)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    char *end;
    long port;

    if (!colon || (size_t)(colon - spec) >= sizeof(host)) {
        snprintf(errstr, errstr_size, "worker.metrics_listen: expected HOST:PORT");
        return -1;
    }
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = '\0';
    port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535 || end == colon + 1) {
        snprintf(errstr, errstr_size, "worker.metrics_listen: bad port");
        return -1;
    }
    w->mhttp = evhttp_new(w->base);
    if (!w->mhttp) {
        snprintf(errstr, errstr_size, "out of memory");
        return -1;
    }
    evhttp_set_allowed_methods(w->mhttp, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
    evhttp_set_timeout(w->mhttp, 10);
    evhttp_set_max_body_size(w->mhttp, 4096);
    evhttp_set_gencb(w->mhttp, on_metrics_http, w);
    if (!evhttp_bind_socket_with_handle(w->mhttp, host[0] ? host : "0.0.0.0", (ev_uint16_t)port)) {
        snprintf(errstr, errstr_size, "worker.metrics_listen %s: cannot bind", spec);
        evhttp_free(w->mhttp);
        w->mhttp = NULL;
        return -1;
    }
    PQ_INFO("metrics on http://%s/metrics", spec);
    return 0;
}
