/* Parking and replay per route (G4; park.h).
 *
 * Every route's retry topic is created at start and on SIGHUP, then subscribed with the
 * request topics. A parked job read from a retry topic is taken in only when its route is up,
 * its ramp has a token and replayed jobs hold less than half of max_inflight; otherwise its
 * partition is held: sought back to the job's offset, then paused (librdkafka 2.0.2 resumes a
 * paused partition from the sought position; nothing past it is stored since it was never taken
 * in). A route goes down when one of its jobs parks (or every target's circuit is open) and up
 * when a probe closes one of its circuits, when one of its jobs succeeds, or at the recheck
 * (every 5 s) when some circuit is not open. Up again, its held partitions resume and replay
 * ramps: 20 jobs/s, doubling every second, unlimited after 10 s; providers' rpm/tpm still
 * apply. A held head whose deadline or park TTL passes is taken in to expire. Request and bulk
 * partitions are never held. */
#include "park.h"
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "jobdoc.h"
#include "parts.h"
#include "promptq/keys.h"
#include "promptq/log.h"
#include "promptq/util.h"

#define RECHECK_MS       5000
#define RAMP_START_RPS   20.0
#define RAMP_UNLIMITED_S 10 /* 20 * 2^9 = 10240 jobs/s in the last limited second */
#define RS_MAX_PARTS     1024

/* pq_jobdoc_dropped_fn on a route (opaque: its pq_route_state_t). */
static int route_dropped(const char *tenant, int64_t parked_at, void *opaque)
{
    return pq_park_dropped(opaque, tenant, parked_at);
}

pq_route_state_t *pq_park_route(pq_worker_t *w, const char *name)
{
    pq_route_state_t *rs;
    const pq_route_t *r;

    for (rs = w->routes; rs; rs = rs->next)
        if (strcmp(rs->name, name) == 0)
            return rs;
    r = pq_conf_route(w->gen->conf, name);
    rs = calloc(1, sizeof(*rs));
    if (!rs || !r || !(rs->name = strdup(name))) {
        free(rs);
        return NULL;
    }
    pq_conf_retry_topic(w->gen->conf, r, rs->topic, sizeof(rs->topic));
    if (pq_key_route_ops(rs->ops_key, sizeof(rs->ops_key), w->conf->redis_prefix, name) < 0) {
        rs->ops_key[0] = '\0';
        rs->ops_loaded = 1; /* no requests can be read: never wait for them */
    }
    rs->w = w;
    rs->replay_seen = pq_now_ms(); /* replay requests from before this process are done */
    rs->ramp_start = 0;            /* a fresh process ramps from its first replay */
    rs->next = w->routes;
    w->routes = rs;
    return rs;
}

/* Jobs per second the ramp allows now; 0 = unlimited. */
static double ramp_rate(const pq_route_state_t *rs, int64_t now)
{
    int64_t s = (now - rs->ramp_start) / 1000;

    if (rs->ramp_start == 0)
        return RAMP_START_RPS;
    if (s < 0)
        s = 0;
    if (s >= RAMP_UNLIMITED_S)
        return 0.0;
    return RAMP_START_RPS * (double)(1 << s);
}

/* The start time (monotonic ms) of the next replayed job: jobs are spaced 1/rate apart, the
 * rate doubling every second from 20 jobs/s (a virtual-time token bucket without bursts). */
static int64_t ramp_slot(pq_route_state_t *rs, int64_t now)
{
    double t, rate;

    if (rs->ramp_start == 0) {
        rs->ramp_start = now;
        rs->next_slot = (double)now;
    }
    t = rs->next_slot > (double)now ? rs->next_slot : (double)now;
    rate = ramp_rate(rs, (int64_t)t);
    rs->next_slot = rate > 0.0 ? t + 1000.0 / rate : t;
    return (int64_t)t;
}

/* Some target of the route may take a call now (not every circuit open). */
static int route_some_target(pq_worker_t *w, const pq_route_state_t *rs)
{
    const pq_route_t *r = pq_conf_route(w->gen->conf, rs->name);

    if (!r)
        return 1; /* removed: its jobs run (and fail as an unknown route) */
    for (size_t i = 0; i < r->ntargets; i++)
        if (pq_provs_target_available(w->gen->provs, &r->targets[i]))
            return 1;
    return 0;
}

static void route_set_down(pq_worker_t *w, pq_route_state_t *rs, const char *why)
{
    if (rs->down)
        return;
    rs->down = 1;
    rs->recheck_ms = pq_mono_ms() + RECHECK_MS;
    PQ_WARN("route %s is down (%s): its jobs park on %s until a probe finds a target available",
            rs->name, why, rs->topic);
}

void pq_park_route_parked(pq_worker_t *w, pq_route_state_t *rs)
{
    route_set_down(w, rs, "every target failed");
}

static void part_hold(pq_worker_t *w, pq_part_t *p, int64_t offset)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_error_t *e;

    rd_kafka_topic_partition_list_add(l, p->name, p->partition)->offset = offset;
    /* seek first: the pause then keeps the sought position for the resume */
    e = rd_kafka_seek_partitions(w->consumer, l, 0);
    if (e) {
        PQ_WARN("seek %s/%" PRId32 " to %" PRId64 ": %s", p->name, p->partition, offset,
                rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
    rd_kafka_pause_partitions(w->consumer, l);
    rd_kafka_topic_partition_list_destroy(l);
    /* what was polled after the head is fetched again on the resume */
    pq_backlog_purge(&w->backlog[0], p);
    p->next_polled = offset;
    p->held = 1;
    p->held_offset = offset;
    p->rs->nheld++;
    PQ_DBG("held %s/%" PRId32 " at %" PRId64, p->name, p->partition, offset);
}

static void route_resume(pq_worker_t *w, pq_route_state_t *rs)
{
    rd_kafka_topic_partition_list_t *l = NULL;
    pq_part_t *p;

    TAILQ_FOREACH(p, &w->parts, link)
    {
        if (p->rs != rs || !p->held)
            continue;
        p->held = 0;
        rs->nheld--;
        if (w->paused)
            continue; /* the flow-control resume takes it along */
        if (!l)
            l = rd_kafka_topic_partition_list_new(4);
        rd_kafka_topic_partition_list_add(l, p->name, p->partition);
    }
    if (l) {
        rd_kafka_resume_partitions(w->consumer, l);
        pq_parts_wake_fetch(w, w->consumer, l); /* at held_offset (p->next_polled) */
        rd_kafka_topic_partition_list_destroy(l);
        event_active(w->ev_drain, 0, 0); /* the io event fires only once per non-empty queue */
    }
}

void pq_park_route_up(pq_worker_t *w, pq_route_state_t *rs, const char *why)
{
    int64_t now = pq_mono_ms();

    if (!rs->down)
        return;
    rs->down = 0;
    rs->ramp_start = now;
    rs->next_slot = (double)now;
    PQ_WARN("route %s is up (%s): replaying %s ramped from %.0f jobs/s", rs->name, why, rs->topic,
            RAMP_START_RPS);
    if (rs->nheld > 0)
        pq_park_schedule(w, 0);
}

/* Probes close circuits: every route with that (provider, model) as a target is up. */
void pq_park_on_circuit(void *opaque, const pq_provider_conf_t *p, const char *model, int available)
{
    pq_worker_t *w = opaque;
    char why[300];

    if (!available)
        return;
    snprintf(why, sizeof(why), "circuit %.120s/%.120s closed", p->name, model);
    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        const pq_route_t *r = rs->down ? pq_conf_route(w->gen->conf, rs->name) : NULL;
        for (size_t i = 0; r && i < r->ntargets; i++) {
            if (strcmp(r->targets[i].provider, p->name) == 0 &&
                strcmp(r->targets[i].model, model) == 0) {
                pq_park_route_up(w, rs, why);
                break;
            }
        }
    }
}

/* A message from a retry topic: returns -1 when its partition was held, else the delay (ms)
 * after which the job may begin (its ramp slot). At most a second of slots is handed out ahead:
 * beyond that the partition is held until the window moves. */
int64_t pq_park_admit(pq_worker_t *w, pq_part_t *p, const rd_kafka_message_t *m)
{
    pq_route_state_t *rs = p->rs;
    size_t cap = w->max_inflight / 2 ? w->max_inflight / 2 : 1;
    int64_t now = pq_mono_ms();

    if (p->held)
        return -1; /* prefetched before the hold: fetched again on the resume */
    if (!rs->ops_loaded) {
        /* nothing replays before the route's operator requests are read (a drop must not
         * miss jobs a new process takes in first) */
        part_hold(w, p, m->offset);
        return -1;
    }
    if (!rs->down && !route_some_target(w, rs))
        route_set_down(w, rs, "every target's circuit is open");
    if (rs->down) {
        int dropped;
        int64_t exp =
            pq_jobdoc_parked_expiry(m->payload ? (const char *)m->payload : "", m->len,
                                    w->conf->park_ttl_s * 1000, route_dropped, rs, &dropped);
        if (exp == 0 || exp <= pq_now_ms() || dropped)
            return 0; /* unreadable (dlq), expired or dropped: taken in to end */
        if (rs->held_wake == 0 || exp < rs->held_wake)
            rs->held_wake = exp;
        part_hold(w, p, m->offset);
        return -1;
    }
    if (w->retry_inflight >= cap) {
        part_hold(w, p, m->offset); /* a job ending schedules the replay again */
        return -1;
    }
    if (rs->ramp_start != 0 && rs->next_slot - (double)now > 1000.0) {
        part_hold(w, p, m->offset);
        pq_park_schedule(w, (int64_t)(rs->next_slot - (double)now) - 1000 + 1);
        return -1;
    }
    return ramp_slot(rs, now) - now;
}

/* Resumes what may run again; schedules the next wake-up for ramps. */
static void replay_tick(pq_worker_t *w)
{
    int64_t now = pq_mono_ms(), wall = pq_now_ms(), next = -1;
    size_t cap = w->max_inflight / 2 ? w->max_inflight / 2 : 1;

    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        if (rs->down && now >= rs->recheck_ms) {
            if (route_some_target(w, rs))
                pq_park_route_up(w, rs, "recheck: some circuit is not open");
            else
                rs->recheck_ms = now + RECHECK_MS;
        }
        if (rs->nheld == 0 || !rs->ops_loaded)
            continue;
        if (rs->down) {
            if (rs->held_wake > 0 && wall >= rs->held_wake) {
                rs->held_wake = 0; /* the head expired: read it (and what follows) again */
                route_resume(w, rs);
            }
            continue;
        }
        if (w->retry_inflight >= cap)
            continue;
        if (rs->ramp_start == 0 || rs->next_slot - (double)now <= 1000.0) {
            route_resume(w, rs);
        } else {
            int64_t wait = (int64_t)(rs->next_slot - (double)now) - 1000 + 1;
            if (next < 0 || wait < next)
                next = wait;
        }
    }
    if (next >= 0)
        pq_park_schedule(w, next);
}

void pq_park_on_replay(evutil_socket_t fd, short what, void *arg)
{
    replay_tick(arg);
}

void pq_park_schedule(pq_worker_t *w, int64_t ms)
{
    struct timeval tv;

    if (ms < 0)
        ms = 0;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    if (!evtimer_pending(w->ev_replay, NULL) || ms == 0)
        evtimer_add(w->ev_replay, &tv);
}

int pq_park_dropped(const pq_route_state_t *rs, const char *tenant, int64_t parked_at)
{
    for (size_t i = 0; i < rs->ndrops; i++)
        if (strcmp(rs->drops[i].tenant, tenant) == 0)
            return parked_at > 0 && parked_at < rs->drops[i].before;
    return 0;
}

static void drops_free(pq_route_state_t *rs)
{
    for (size_t i = 0; i < rs->ndrops; i++)
        free(rs->drops[i].tenant);
    free(rs->drops);
    rs->drops = NULL;
    rs->ndrops = 0;
}

/* Replay now: the route's circuits close by force and its parked jobs replay, ramped. */
static void route_replay_now(pq_worker_t *w, pq_route_state_t *rs)
{
    const pq_route_t *r = pq_conf_route(w->gen->conf, rs->name);

    for (size_t i = 0; r && i < r->ntargets; i++) {
        pq_prov_t *pv = pq_provs_get(w->gen->provs, r->targets[i].p);
        pq_circuit_t *c = pv ? pq_prov_circuit(pv, &r->targets[i]) : NULL;
        if (c)
            pq_circuit_force_close(c, "an operator's replay");
    }
    if (rs->down) {
        pq_park_route_up(w, rs, "an operator asked for a replay");
    } else if (rs->nheld > 0) {
        route_resume(w, rs);
    }
}

/* The route's ops hash: {field, value, ...} (HGETALL). */
static void on_route_ops(void *opaque, redisReply *r)
{
    pq_route_state_t *rs = opaque;
    pq_worker_t *w = rs->w;
    struct pq_drop_s *drops = NULL;
    size_t n = 0, newer = 0;

    rs->ops_pending = 0;
    if (!r || r->type != REDIS_REPLY_ARRAY || !rs->active)
        return;
    if (!rs->ops_loaded) {
        rs->ops_loaded = 1; /* replay may start: the drops are known */
        newer = 1;
    }
    if (r->elements / 2 > 0 && !(drops = calloc(r->elements / 2, sizeof(*drops))))
        return;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *f = r->element[i], *v = r->element[i + 1];
        int64_t at;

        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        at = strtoll(v->str, NULL, 10);
        if (strcmp(f->str, "replay_at") == 0) {
            if (at > rs->replay_seen) {
                rs->replay_seen = at;
                PQ_WARN("route %s: an operator asked for a replay of its parked jobs", rs->name);
                route_replay_now(w, rs);
            }
        } else if (strncmp(f->str, "drop:", 5) == 0 && f->str[5]) {
            if (!(drops[n].tenant = strdup(f->str + 5)))
                continue;
            drops[n].before = at;
            if (!pq_park_dropped(rs, drops[n].tenant, at - 1)) {
                newer++;
                PQ_WARN("route %s: an operator dropped tenant %s's parked jobs (parked before "
                        "%" PRId64 ")",
                        rs->name, drops[n].tenant, at);
            }
            n++;
        }
    }
    drops_free(rs);
    rs->drops = drops;
    rs->ndrops = n;
    /* held partitions are read again: the dropped jobs at their heads are taken in and end
     * (and after the first read, what waited for it goes on) */
    if (newer && rs->nheld > 0)
        route_resume(w, rs);
}

static void routes_ops_poll(pq_worker_t *w)
{
    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        const char *argv[2] = {"HGETALL", rs->ops_key};
        size_t lens[2] = {7, strlen(rs->ops_key)};

        if (!rs->active || rs->ops_pending || !rs->ops_key[0])
            continue;
        if (pq_redis_command(w->redis, 2, argv, lens, on_route_ops, rs) == 0)
            rs->ops_pending = 1;
    }
}

void pq_park_on_routes(evutil_socket_t fd, short what, void *arg)
{
    routes_ops_poll(arg);
    replay_tick(arg);
}

/* Parked jobs of a route not yet replayed, estimated from this worker's retry partitions: the
 * high watermark (or the highest offset it parked there itself) minus the read position. */
int64_t pq_park_estimate(pq_worker_t *w, const pq_route_state_t *rs)
{
    int64_t n = 0;
    pq_part_t *p;

    TAILQ_FOREACH(p, &w->parts, link)
    {
        int64_t lo = -1, hi = -1, pos;
        rd_kafka_topic_partition_list_t *l;

        if (p->rs != rs)
            continue;
        rd_kafka_get_watermark_offsets(w->consumer, p->name, p->partition, &lo, &hi);
        if (p->partition < RS_MAX_PARTS && rs->hi && rs->hi[p->partition] > hi)
            hi = rs->hi[p->partition];
        if (p->held) {
            pos = p->held_offset;
        } else {
            l = rd_kafka_topic_partition_list_new(1);
            rd_kafka_topic_partition_list_add(l, p->name, p->partition);
            rd_kafka_position(w->consumer, l);
            pos = l->elems[0].offset;
            rd_kafka_topic_partition_list_destroy(l);
            if (pos < 0)
                pos = p->next_taken >= 0 ? p->next_taken : hi;
        }
        if (hi > pos && pos >= 0)
            n += hi - pos;
    }
    return n;
}

void pq_park_parked_at(pq_worker_t *w, const char *topic, int32_t partition, int64_t offset)
{
    pq_route_state_t *rs = pq_parts_route_by_topic(w, topic);

    if (!rs || partition < 0 || partition >= RS_MAX_PARTS)
        return;
    if (!rs->hi && !(rs->hi = calloc(RS_MAX_PARTS, sizeof(*rs->hi))))
        return;
    if (offset + 1 > rs->hi[partition])
        rs->hi[partition] = offset + 1;
}

void pq_park_free_all(pq_worker_t *w)
{
    pq_route_state_t *rs;

    while ((rs = w->routes)) {
        w->routes = rs->next;
        drops_free(rs);
        free(rs->hi);
        free(rs->name);
        free(rs);
    }
}

json_t *pq_park_health(pq_worker_t *w, int64_t now)
{
    json_t *routes = json_object();

    for (pq_route_state_t *rs = w->routes; rs; rs = rs->next) {
        double rate = ramp_rate(rs, now);
        if (!rs->active)
            continue;
        json_object_set_new(
            routes, rs->name,
            json_pack("{s:s, s:b, s:I, s:i, s:o, s:I, s:I, s:I}", "retry_topic", rs->topic, "down",
                      rs->down, "parked", (json_int_t)pq_park_estimate(w, rs), "held_partitions",
                      rs->nheld, "replay_rate",
                      rs->down     ? json_integer(0)
                      : rate > 0.0 ? json_integer((json_int_t)rate)
                                   : json_null(),
                      "parked_total", (json_int_t)rs->parked, "reparked_total",
                      (json_int_t)rs->reparked, "replayed_total", (json_int_t)rs->replayed));
    }
    return routes;
}
