/* The hiredis async connection set-up shared by the broker and the worker (rasync.h). */
#include "promptq/rasync.h"

#include <stdio.h>
#include <string.h>

#include <hiredis/adapters/libevent.h>

redisAsyncContext *pq_rasync_open(const pq_rasync_opts_t *o, int *nsetup, char *err,
                                  size_t err_size)
{
    redisAsyncContext *ac = redisAsyncConnect(o->addr, o->port);
    int n = 0;

    if (!ac || ac->err) {
        snprintf(err, err_size, "%s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        return NULL;
    }
    ac->data = o->data;
    if (redisLibeventAttach(ac, o->base) != REDIS_OK) {
        snprintf(err, err_size, "cannot attach to the event loop");
        redisAsyncFree(ac);
        return NULL;
    }
    if (o->priority >= 0 && ac->ev.data) {
        redisLibeventEvents *e = ac->ev.data;

        event_priority_set(e->rev, o->priority);
        event_priority_set(e->wev, o->priority);
    }
    if (o->on_connect)
        redisAsyncSetConnectCallback(ac, o->on_connect);
    if (o->on_disconnect)
        redisAsyncSetDisconnectCallback(ac, o->on_disconnect);
    /* queued before the connection is up: hiredis sends them first */
    if (o->password) {
        redisAsyncCommand(ac, o->on_setup, "AUTH", "AUTH %s", o->password);
        n++;
    }
    if (o->db) {
        redisAsyncCommand(ac, o->on_setup, "SELECT", "SELECT %d", o->db);
        n++;
    }
    if (nsetup)
        *nsetup = n;
    return ac;
}
