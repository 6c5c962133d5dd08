/* A Redis connection on a libevent loop (hiredis async) that reconnects by itself and watches
 * its own replies: hiredis 0.14 has no async timeouts, so a command unanswered for timeout_ms
 * drops the connection (every pending callback then runs with a NULL reply). */
#ifndef PQ_WORKER_REDIS_H
#define PQ_WORKER_REDIS_H

#include <stddef.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>

typedef struct pq_redis_s pq_redis_t;

/* reply: borrowed, NULL when the connection was lost before the answer (the command may or may
 * not have run). */
typedef void(pq_redis_reply_cb)(void *opaque, redisReply *reply);

/* up: 1 when the connection is ready (after AUTH/SELECT), 0 when it was lost. */
typedef void(pq_redis_state_cb)(void *opaque, int up);

/* Connects in the background (and again after every loss, with backoff), and SCRIPT LOADs every
 * script of promptq/scripts.h on each connection before it is up, so EVALSHA finds them. host,
 * password: copied; password may be NULL. Returns NULL with errstr set. */
pq_redis_t *pq_redis_new(struct event_base *base, const char *host, int port, const char *password,
                         int db, int timeout_ms, pq_redis_state_cb *state_cb, void *opaque,
                         char *errstr, size_t errstr_size);

/* Drops the connection (pending callbacks run with NULL) and frees. NULL is a no-op. */
void pq_redis_destroy(pq_redis_t *r);

/* 1 when commands can be sent. */
int pq_redis_up(const pq_redis_t *r);

/* Sends a command. argv/lens: borrowed (copied into the output buffer). Returns 0 when sent (cb
 * runs exactly once later), -1 when Redis is down (cb does not run). */
int pq_redis_command(pq_redis_t *r, int argc, const char **argv, const size_t *lens,
                     pq_redis_reply_cb *cb, void *opaque);

/* The libevent priority of the connection's events (this one and every reconnection); the
 * base must have priorities. */
void pq_redis_set_priority(pq_redis_t *r, int priority);

/* Commands sent and not answered yet. */
size_t pq_redis_pending(const pq_redis_t *r);

#endif
