/* GET /v1/health, GET /v1/parked, parked operations (ops.c). */
#ifndef PQ_BROKER_OPS_H
#define PQ_BROKER_OPS_H

#include "broker.h"

/* ops.c: GET /v1/health, GET /v1/parked (aggregated from the workers' health keys), POST
 * /v1/parked/{route}/replay and DELETE /v1/parked/{route} (requests the workers read from the
 * route's ops hash); POST /v1/dlq/redrive goes to redrive.c. path is the request's path. */
void pq_ops_serve(pq_bthread_t *t, struct evhttp_request *req, const char *path);

#endif
