/* Parking and replay per route (G4): the routes' parking state, holding and resuming their
 * retry partitions, the replay ramp, operator drops and replays. Below the consumer and the
 * job, above parts.h: it calls neither of them. */
#ifndef PQ_PARK_H
#define PQ_PARK_H

#include "worker_int.h"

#define PQ_PARK_TICK_MS 1000 /* operator requests read, replay ticked (ev_routes) */

/* The route's parking state (created on first use; name copied). NULL when out of memory or
 * not a route of the current config. Borrowed: kept for the worker's life. */
pq_route_state_t *pq_park_route(pq_worker_t *w, const char *name);

/* A job of rs parked: replay of rs waits for a probe (or the recheck). */
void pq_park_route_parked(pq_worker_t *w, pq_route_state_t *rs);

/* A job of rs succeeded on a provider: rs is up (replay resumes, ramped). */
void pq_park_route_up(pq_worker_t *w, pq_route_state_t *rs, const char *why);

/* Whether a job of tenant parked at parked_at (wall ms; 0 unknown) on rs was dropped by an
 * operator (DELETE /v1/parked/{route}: the route's ops hash, read every second). */
int pq_park_dropped(const pq_route_state_t *rs, const char *tenant, int64_t parked_at);

/* A parked job is on topic at (partition, offset) (health estimates). */
void pq_park_parked_at(pq_worker_t *w, const char *topic, int32_t partition, int64_t offset);

/* A message polled from retry partition p: -1 when the partition was held (m is fetched again
 * on the resume), else the delay (ms) after which its job may begin (its ramp slot). */
int64_t pq_park_admit(pq_worker_t *w, pq_part_t *p, const rd_kafka_message_t *m);

/* Ticks the replay in ms (0: now, and sooner than a pending tick). */
void pq_park_schedule(pq_worker_t *w, int64_t ms);

/* Parked jobs of rs not yet replayed, estimated from this worker's retry partitions. */
int64_t pq_park_estimate(pq_worker_t *w, const pq_route_state_t *rs);

/* The providers' circuit listener (pq_provs_set_listener; opaque: the worker): a closed
 * circuit brings up every route with that target. */
void pq_park_on_circuit(void *opaque, const pq_provider_conf_t *p, const char *model,
                        int available);

/* ev_routes (every PQ_PARK_TICK_MS) and ev_replay callbacks; arg: the worker. */
void pq_park_on_routes(evutil_socket_t fd, short what, void *arg);
void pq_park_on_replay(evutil_socket_t fd, short what, void *arg);

/* The health key's "routes": {name: {retry_topic, down, parked, held_partitions, replay_rate,
 * parked_total, reparked_total, replayed_total}} of the routes of the current config. now:
 * monotonic ms. New reference. */
json_t *pq_park_health(pq_worker_t *w, int64_t now);

/* Frees every route's parking state (at exit). */
void pq_park_free_all(pq_worker_t *w);

#endif
