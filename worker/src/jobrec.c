/* A job's records from its state (job_int.h; the documents themselves: jobdoc.c). */
#include <string.h>
#include "job_int.h"

/* The job's record inputs (jobdoc.h), borrowed from j; the time is now. */
void pq_jobrec_doc(const pq_job_t *j, pq_jobdoc_t *d)
{
    memset(d, 0, sizeof(*d));
    d->env = &j->env;
    d->status = j->status;
    d->provider = j->last_target ? j->last_target->provider : NULL;
    d->model = j->last_target ? j->last_target->model : NULL;
    d->attempts = j->attempts;
    d->alog = j->alog;
    d->slim = j->slim;
    d->cached = j->cached;
    d->response = j->response;
    d->err = j->err;
    d->errmsg = j->errmsg;
    d->http_status = j->http_status;
    d->fault_code = j->fault.code;
    d->fault_reason = j->fault.reason;
    d->created_ms = j->created_ms;
    d->now_ms = pq_now_ms();
    d->src_topic = j->src_topic;
    d->partition = j->partition;
    d->offset = j->offset;
}

json_t *pq_jobrec_error(const pq_job_t *j)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    return pq_jobdoc_error(&d);
}

char *pq_jobrec_result(const pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    return pq_jobdoc_result(&d, len);
}

char *pq_jobrec_dlq_small(pq_job_t *j, size_t *len)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    j->dlq_small = 1;
    return pq_jobdoc_dlq_small(&d, len);
}

/* Envelope + "error" (taken) for promptq.dlq (the small stand-in when that is over max_msg). */
char *pq_jobrec_dlq(pq_job_t *j, json_t *error, size_t *len)
{
    pq_jobdoc_t d;

    pq_jobrec_doc(j, &d);
    return pq_jobdoc_dlq(&d, error, j->w->max_msg, &j->dlq_small, len);
}
