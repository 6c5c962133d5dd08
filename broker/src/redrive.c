/* POST /v1/dlq/redrive: being written (see broker.h). Until then it answers 501. */
#include "broker.h"

void pq_redrive_serve(pq_bthread_t *t, struct evhttp_request *req)
{
    const char *tenant;

    if (pq_http_auth(t, req, PQ_PATH_DLQ, &tenant))
        return;
    pq_http_error(t, req, PQ_PATH_DLQ, 501, "not_implemented", "dlq redrive is not available");
}

int pq_redrive_start(pq_broker_t *b, char *errstr, size_t errstr_size)
{
    (void)b;
    (void)errstr;
    (void)errstr_size;
    return 0;
}

void pq_redrive_stop(pq_broker_t *b)
{
    (void)b;
}
