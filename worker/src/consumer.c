/* The consumer (consumer.h): partition bookkeeping, offsets storing (G5) and flow control. Each
 * lane polls into a bounded backlog that feeds free slots; it pauses when the backlog is full,
 * Redis is down or the worker stops. */
#include "consumer.h"
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "park.h"
#include "parts.h"
#include "promptq/log.h"

#define DRAIN_BUDGET      512
#define BULK_DRAIN_BUDGET 64 /* per loop turn: interactive events run in between */
#define LANE_RESERVE_DIV  8  /* max_inflight / 8 is kept for the interactive lane */
#define BACKLOG_MIN       64 /* messages: a lane's backlog holds max(this, max_inflight / 2) */
#define BACKLOG_MAX_BYTES (16 * 1024 * 1024) /* payload bytes per lane's backlog */
static const char BACKLOG_FULL[] = "backlog full (every slot busy)";

static void part_assign(pq_worker_t *w, const char *topic_name, int32_t partition)
{
    pq_route_state_t *rs;
    int topic = pq_parts_topic_index(w, topic_name, &rs);
    pq_part_t *p;

    if (topic < 0 || pq_parts_find(w, topic, rs, partition))
        return;
    p = calloc(1, sizeof(*p));
    if (!p) {
        PQ_ERR("out of memory assigning %s/%" PRId32, topic_name, partition);
        return;
    }
    p->topic = topic;
    p->rs = rs;
    p->name = rs ? rs->topic : w->topics[topic];
    p->partition = partition;
    p->refcnt = 1;
    p->next_taken = -1;
    p->next_polled = -1;
    pq_offsets_init(&p->offsets);
    TAILQ_INSERT_TAIL(&w->parts, p, link);
}

static void part_revoke(pq_worker_t *w, pq_part_t *p)
{
    TAILQ_REMOVE(&w->parts, p, link);
    p->revoked = 1;
    pq_backlog_purge(&w->backlog[p->topic == PQ_T_REQUESTS], p); /* the new owner reads them */
    if (p->held) {
        p->held = 0;
        p->rs->nheld--;
    }
    if (pq_offsets_count(&p->offsets) > 0)
        PQ_INFO("%s/%" PRId32 " revoked with %zu jobs in flight: they finish under their lease, "
                "the new owner redelivers them",
                p->name, p->partition, pq_offsets_count(&p->offsets));
    pq_part_unref(p);
}

/* Stores the offsets that advanced (offset + 1 semantics: the next one to read). */
void pq_consumer_flush_offsets(pq_worker_t *w)
{
    rd_kafka_topic_partition_list_t *list = NULL;
    rd_kafka_resp_err_t err;
    pq_part_t *p;

    if (w->no_store)
        return;
    TAILQ_FOREACH(p, &w->parts, link)
    {
        if (!p->dirty || p->revoked || p->offsets.next < 0)
            continue;
        p->dirty = 0;
        if (!list)
            list = rd_kafka_topic_partition_list_new(8);
        rd_kafka_topic_partition_list_add(list, p->name, p->partition)->offset = p->offsets.next;
    }
    if (!list)
        return;
    err = rd_kafka_offsets_store(w->consumer, list);
    if (err)
        PQ_WARN("offsets_store: %s", rd_kafka_err2str(err));
    for (int i = 0; i < list->cnt; i++)
        if (list->elems[i].err)
            PQ_DBG("offsets_store %s/%" PRId32 ": %s", list->elems[i].topic,
                   list->elems[i].partition, rd_kafka_err2str(list->elems[i].err));
    rd_kafka_topic_partition_list_destroy(list);
}

void pq_consumer_on_flush(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_flush_offsets(arg);
}

/* Pauses or resumes one lane's partitions (lane 1: <prefix>requests, 0: bulk and retry
 * topics). Every message polled so far is in the backlog or taken in, so a resume fetches
 * from the next one (pausing drops only prefetched messages). */
static void set_paused(pq_worker_t *w, int lane, int pause, const char *why)
{
    rd_kafka_topic_partition_list_t *a = rd_kafka_topic_partition_list_new(16);
    rd_kafka_t *rk = w->consumer;
    pq_part_t *p;

    /* the assignment as we track it; held retry partitions stay paused on a resume */
    TAILQ_FOREACH(p, &w->parts, link)
    if ((p->topic == PQ_T_REQUESTS) == lane && (pause || !p->held))
        rd_kafka_topic_partition_list_add(a, p->name, p->partition);
    if (a->cnt > 0) {
        if (pause) {
            rd_kafka_pause_partitions(rk, a);
        } else {
            rd_kafka_resume_partitions(rk, a);
            pq_parts_wake_fetch(w, rk, a);
        }
    }
    rd_kafka_topic_partition_list_destroy(a);
    if (lane)
        w->ipaused = pause;
    else
        w->paused = pause;
    if (pause)
        w->pause_why[lane] = why;
    /* a full backlog pauses and resumes often under load: debug; Redis and stopping: info */
    PQ_LOG(w->pause_why[lane] == BACKLOG_FULL ? PQ_LOG_DEBUG : PQ_LOG_INFO,
           "consumption %s%s (%s lane; %zu jobs in flight, %zu interactive, %zu in backlog)",
           pause ? "paused: " : "resumed", pause ? why : "", lane ? "interactive" : "bulk",
           w->inflight, w->iinflight, w->backlog[lane].count);
    if (!pause) /* the io event fires only once per non-empty queue */
        event_active(lane ? w->ev_idrain : w->ev_drain, 0, 0);
}

/* Whether a job of the lane may start now (a slot free, Redis up, not stopping). The bulk lane
 * keeps a share of max_inflight for the interactive one. */
static int flow_may_start(const pq_worker_t *w, int lane)
{
    size_t cap = lane ? w->max_inflight : w->max_inflight - w->reserve;

    return !w->stopping && w->inflight < cap && pq_redis_up(w->redis);
}

/* Why the bulk lane (0) or the interactive one (1) must pause now; NULL: it may
 * fetch. Slots do not pause it: it fetches into its backlog, which is the bound. resume: the
 * lower mark (half the backlog) applies, so that a resume has half a backlog of work to cover
 * its first fetch. */
static const char *flow_stop(pq_worker_t *w, int lane, int redis_up, int resume)
{
    const pq_backlog_t *b = &w->backlog[lane];

    if (w->stopping)
        return "stopping";
    if (!redis_up)
        return "redis unavailable";
    if (resume ? b->count > b->max / 2 || b->bytes > b->max_bytes / 2 : pq_backlog_full(b))
        return BACKLOG_FULL;
    return NULL;
}

void pq_consumer_update_flow(pq_worker_t *w)
{
    int redis_up = pq_redis_up(w->redis);
    const char *why;

    for (int lane = 1; lane >= 0; lane--) {
        int paused = lane ? w->ipaused : w->paused;
        if (!paused && (why = flow_stop(w, lane, redis_up, 0)))
            set_paused(w, lane, 1, why);
        else if (paused && !flow_stop(w, lane, redis_up, 1))
            set_paused(w, lane, 0, NULL);
    }
}

static void job_gone(pq_worker_t *w, pq_part_t *part)
{
    w->inflight--;
    if (part && part->topic == PQ_T_REQUESTS && --w->iinflight == 0 && !TAILQ_EMPTY(&w->lane_wait))
        event_active(w->ev_lanes, 0, 0); /* on the loop, not inside this job's end */
    if (part && part->rs && part->rs->nheld > 0 && !part->rs->down)
        pq_park_schedule(w, 0); /* a replay slot is free */
    pq_part_unref(part);
    if (w->stopping && w->inflight == 0) {
        PQ_INFO("every job in flight finished");
        event_base_loopbreak(w->base);
        return;
    }
    /* a slot is free: the next job of a backlog starts on the loop */
    if (w->backlog[1].count > 0)
        event_active(w->ev_idrain, 0, 0);
    if (w->backlog[0].count > 0)
        event_active(w->ev_drain, 0, 0);
    pq_consumer_update_flow(w);
}

void pq_consumer_on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                              rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    pq_worker_t *w = opaque;
    int coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
    rd_kafka_error_t *e = NULL;

    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_topic_partition_list_t *lane[2] = {rd_kafka_topic_partition_list_new(parts->cnt),
                                                    rd_kafka_topic_partition_list_new(parts->cnt)};

        for (int i = 0; i < parts->cnt; i++) {
            const char *topic = parts->elems[i].topic;
            int32_t partition = parts->elems[i].partition;
            int li = strcmp(topic, w->topics[PQ_T_REQUESTS]) == 0;

            part_assign(w, topic, partition);
            rd_kafka_topic_partition_list_add(lane[li], topic, partition);
            if (li) { /* before the assignment starts its fetcher: the interactive queue */
                rd_kafka_queue_t *q = rd_kafka_queue_get_partition(rk, topic, partition);
                if (q) {
                    rd_kafka_queue_forward(q, w->iqueue);
                    rd_kafka_queue_destroy(q);
                } else {
                    PQ_ERR("%s/%" PRId32 ": no partition queue: served on the bulk lane", topic,
                           partition);
                }
            }
        }
        if (coop)
            e = rd_kafka_incremental_assign(rk, parts);
        else
            rd_kafka_assign(rk, parts);
        /* librdkafka keeps a partition's pause flag across unassign/assign: a partition paused
         * while we owned it before would otherwise stay silent now. */
        for (int li = 0; li < 2; li++) {
            if (lane[li]->cnt > 0 && (li ? w->ipaused : w->paused))
                rd_kafka_pause_partitions(rk, lane[li]);
            else if (lane[li]->cnt > 0)
                rd_kafka_resume_partitions(rk, lane[li]);
            rd_kafka_topic_partition_list_destroy(lane[li]);
        }
        PQ_INFO("assigned %d partitions", parts->cnt);
    } else {
        if (err != RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
            PQ_ERR("rebalance error: %s", rd_kafka_err2str(err));
        pq_consumer_flush_offsets(w); /* still ours: the commit on revoke includes them */
        for (int i = 0; i < parts->cnt; i++) {
            pq_route_state_t *rs;
            int topic = pq_parts_topic_index(w, parts->elems[i].topic, &rs);
            pq_part_t *p =
                topic < 0 ? NULL : pq_parts_find(w, topic, rs, parts->elems[i].partition);
            if (p)
                part_revoke(w, p);
        }
        if (coop)
            e = rd_kafka_incremental_unassign(rk, parts);
        else
            rd_kafka_assign(rk, NULL);
        PQ_INFO("revoked %d partitions", parts->cnt);
    }
    if (e) {
        PQ_ERR("incremental rebalance: %s", rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    }
}

static void on_message(pq_worker_t *w, const rd_kafka_message_t *m)
{
    pq_route_state_t *rs;
    int topic = pq_parts_topic_index(w, rd_kafka_topic_name(m->rkt), &rs);
    pq_part_t *part;
    int64_t delay = 0;

    if (topic < 0) {
        PQ_WARN("message from unexpected topic %s", rd_kafka_topic_name(m->rkt));
        return;
    }
    if (w->stopping) {
        /* Not taken in: its offset is never stored, the next owner reads it. */
        pq_counter_add(w->m.handed_back, 1);
        return;
    }
    part = pq_parts_find(w, topic, rs, m->partition);
    if (part && part->next_taken >= 0 && m->offset < part->next_taken) {
        /* Fetched again after a pause/resume: this offset is already in flight or done. */
        pq_counter_add(w->m.duplicates, 1);
        return;
    }
    if (topic == PQ_T_RETRY && part && (delay = pq_park_admit(w, part, m)) < 0)
        return;
    if (topic == PQ_T_REQUESTS && part)
        w->iinflight++; /* job_gone takes it off */
    pq_job_intake(w, part, topic, m, delay);
}

static void on_consumer_error(pq_worker_t *w, const rd_kafka_message_t *m)
{
    if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
        return;
    if (m->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
        m->err == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE) {
        pq_counter_add(w->m.offset_resets, 1);
        PQ_ERR("kafka offset reset on %s/%" PRId32 ": %s",
               m->rkt ? rd_kafka_topic_name(m->rkt) : "?", m->partition,
               rd_kafka_message_errstr(m));
        return;
    }
    PQ_WARN("consumer: %s%s%s", rd_kafka_err2name(m->err), m->rkt ? " on " : "",
            m->rkt ? rd_kafka_topic_name(m->rkt) : "");
}

/* Takes in the oldest message of the lane's backlog. */
static void backlog_start_one(pq_worker_t *w, int lane)
{
    rd_kafka_message_t *m = pq_backlog_pop(&w->backlog[lane]);

    on_message(w, m);
    rd_kafka_message_destroy(m);
}

/* One lane (1: interactive, its queue iqueue; 0: bulk, the consumer queue): starts jobs from
 * its backlog while slots are free and polls into the backlog until it is full. Polling goes on
 * while saturated (at least one poll per call: max.poll.interval.ms); the lane's partitions pause
 * when the backlog fills (librdkafka then drops what it prefetched for them, fetched again on the
 * resume). The bulk lane does a small batch per loop turn, so an interactive message waits for at
 * most that much work. */
void pq_consumer_drain(pq_worker_t *w, int lane)
{
    rd_kafka_t *rk = w->consumer;
    pq_backlog_t *b = &w->backlog[lane];
    int n, polled = 0, budget = lane ? DRAIN_BUDGET : BULK_DRAIN_BUDGET;

    for (n = 0; n < budget; n++) {
        rd_kafka_message_t *m;

        if (b->count > 0 && flow_may_start(w, lane)) {
            backlog_start_one(w, lane);
            /* half empty: resume now, so the next fetch overlaps the rest of this batch */
            if ((lane ? w->ipaused : w->paused) && b->count <= b->max / 2)
                pq_consumer_update_flow(w);
            continue;
        }
        if (polled && pq_backlog_full(b))
            break;
        /* the consumer queue serves rebalances and errors too; iqueue only messages */
        m = lane ? rd_kafka_consume_queue(w->iqueue, 0) : rd_kafka_consumer_poll(rk, 0);
        polled = 1;
        if (!m)
            break;
        if (m->err) {
            on_consumer_error(w, m);
            rd_kafka_message_destroy(m);
            continue;
        }
        {
            pq_route_state_t *rs;
            int topic = pq_parts_topic_index(w, rd_kafka_topic_name(m->rkt), &rs);
            pq_part_t *p = topic < 0 ? NULL : pq_parts_find(w, topic, rs, m->partition);
            if (p && m->offset + 1 > p->next_polled)
                p->next_polled = m->offset + 1;
        }
        if (pq_backlog_push(b, m) != 0) { /* out of memory: taken in now, over the cap */
            on_message(w, m);
            rd_kafka_message_destroy(m);
        }
        /* full: pause now, not after the batch, so that librdkafka drops what it prefetched
         * instead of handing it all over */
        if (!(lane ? w->ipaused : w->paused) && pq_backlog_full(b))
            pq_consumer_update_flow(w);
    }
    if (n == budget) /* more waiting: other events first */
        event_active(lane ? w->ev_idrain : w->ev_drain, 0, 0);
    pq_consumer_update_flow(w);
}

void pq_consumer_drain_pipe(int fd)
{
    char buf[256];
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
}

void pq_consumer_on_cqueue(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_drain_pipe(fd);
    pq_consumer_drain(arg, 0);
}

void pq_consumer_on_iqueue(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_drain_pipe(fd);
    pq_consumer_drain(arg, 1);
}

void pq_consumer_on_idrain(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_drain(arg, 1);
}

void pq_consumer_on_drain(evutil_socket_t fd, short what, void *arg)
{
    pq_consumer_drain(arg, 0);
}

void pq_consumer_init(pq_worker_t *w)
{
    w->reserve = w->max_inflight / LANE_RESERVE_DIV;
    for (int lane = 0; lane < 2; lane++) {
        w->backlog[lane].max =
            w->max_inflight / 2 > BACKLOG_MIN ? w->max_inflight / 2 : BACKLOG_MIN;
        w->backlog[lane].max_bytes = BACKLOG_MAX_BYTES;
    }
    w->job_gone = job_gone;
}
