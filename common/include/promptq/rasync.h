/* One hiredis async connection on a libevent loop, set up the same way for every user in the
 * broker and the worker (rasync.c). */
#ifndef PQ_RASYNC_H
#define PQ_RASYNC_H

#include <stddef.h>

#include <event2/event.h>
#include <hiredis/async.h>

typedef struct {
    struct event_base *base;
    const char *addr; /* a numeric address: hiredis would resolve a name blocking */
    int port;
    const char *password; /* AUTH, or NULL */
    int db;               /* SELECT when not 0 */
    void *data;           /* the context's data */
    redisConnectCallback *on_connect;
    redisDisconnectCallback *on_disconnect;
    /* the replies of AUTH and SELECT (privdata "AUTH" or "SELECT"); NULL: not read */
    redisCallbackFn *on_setup;
    int priority; /* the libevent priority of its read and write events; -1: the base's */
} pq_rasync_opts_t;

/* Connects (non-blocking), attaches to the loop, sets the callbacks and queues AUTH and SELECT,
 * which hiredis sends before anything queued after. Returns the context, with *nsetup (when not
 * NULL) set to the setup commands queued; or NULL with err set (nothing to free). */
redisAsyncContext *pq_rasync_open(const pq_rasync_opts_t *o, int *nsetup, char *err,
                                  size_t err_size);

#endif
